"""Frame sources read real files encoded here by PyAV, and fail with one clear InputError on bad input."""
from __future__ import annotations

import asyncio
import json
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from engine.errors import InputError
from fastavatar_stream.sources import (CameraSource, ImageFolderSource, MultiViewSource, VideoFileSource,
                                       open_source)

W, H = 64, 48


def _pattern(i: int) -> np.ndarray:
    """A frame whose mean brightness encodes its index (survives lossy coding)."""
    img = np.zeros((H, W, 3), np.uint8)
    img[..., 0] = (i * 20) % 250
    img[..., 1] = 128
    img[:, : W // 2, 2] = 255
    return img


def _encode(path: Path, codec: str, n: int, fps: int = 25, pix_fmt: str = "yuv420p") -> Path:
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, pix_fmt
        stream.time_base = Fraction(1, fps)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(_pattern(i), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:
        return False


H264 = "libx264" if _has_encoder("libx264") else "mpeg4"  # mpeg4 when this FFmpeg build lacks libx264
CASES = [("mp4", H264, "yuv420p"), ("mov", "mjpeg", "yuvj420p")]
CASES += [("mkv", c, "yuv420p") for c in ("libvpx-vp9", "libvpx") if _has_encoder(c)][:1]
CASES += [("webm", "libvpx", "yuv420p")] if _has_encoder("libvpx") else []


def test_encoder_choice_is_reported():
    print(f"h264 test clip encoder: {H264}; cases: {CASES}")
    assert H264 in ("libx264", "mpeg4")


@pytest.mark.parametrize("ext,codec,pix_fmt", CASES)
def test_video_file_decodes_every_frame_with_timestamps(tmp_path, ext, codec, pix_fmt):
    n = 20
    path = _encode(tmp_path / f"clip.{ext}", codec, n, fps=25, pix_fmt=pix_fmt)
    source = VideoFileSource(path)
    assert (source.width, source.height) == (W, H)
    frames = list(source)
    assert len(frames) == n
    assert [f.index for f in frames] == list(range(n))
    np.testing.assert_allclose([f.pts for f in frames], np.arange(n) / 25, atol=1e-3)
    assert all(f.image.shape == (H, W, 3) and f.image.dtype == np.uint8 for f in frames)
    # content survived: red channel tracks the index
    red = np.array([f.image[..., 0].mean() for f in frames])
    np.testing.assert_allclose(red, [(i * 20) % 250 for i in range(n)], atol=12)
    assert source.error is None and source.frames_read == n
    assert all(f.t_capture > 0 for f in frames)


def test_realtime_pacing_follows_timestamps(tmp_path):
    path = _encode(tmp_path / "clip.mkv", "mpeg4", 10, fps=25)  # 0.36 s from first to last frame
    t0 = time.monotonic()
    frames = list(VideoFileSource(path, realtime=True))
    elapsed = time.monotonic() - t0
    assert len(frames) == 10
    assert 0.33 <= elapsed < 1.0
    gaps = np.diff([f.t_capture for f in frames])
    assert gaps.min() > 0.02  # not delivered in a burst
    t0 = time.monotonic()
    list(VideoFileSource(path))
    assert time.monotonic() - t0 < 0.3  # without realtime: as fast as possible


def test_asyncio_reader_does_not_block_the_loop(tmp_path):
    path = _encode(tmp_path / "clip.mp4", "mpeg4", 12)

    async def main():
        ticks = 0
        stop = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        task = asyncio.create_task(ticker())
        frames = [f async for f in VideoFileSource(path, realtime=True).aiter()]
        stop.set()
        await task
        return frames, ticks

    frames, ticks = asyncio.run(main())
    assert [f.index for f in frames] == list(range(12))
    assert ticks >= 20  # the loop kept running through ~0.44 s of pacing and decoding


def test_loop_option_restarts_with_increasing_pts(tmp_path):
    path = _encode(tmp_path / "clip.mp4", "mpeg4", 5)
    source = VideoFileSource(path, loop=True)
    frames = []
    for f in source:
        frames.append(f)
        if len(frames) == 12:
            break
    assert [f.index for f in frames] == list(range(12))
    assert np.all(np.diff([f.pts for f in frames]) > 0)


def test_real_clip_decodes(real_clip):
    source = open_source(real_clip)
    frames = list(source)
    assert len(frames) == 190 and source.error is None
    assert frames[0].image.shape == (512, 512, 3)
    np.testing.assert_allclose(frames[-1].pts, 189 / 25, atol=1e-3)


@pytest.mark.parametrize("make,needle", [
    (lambda p: p.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes()), "cannot read"),
    (lambda p: p.write_text("this is not a video\n" * 100), "cannot read"),
    (lambda p: p.write_bytes(b""), "cannot read"),
])
def test_unreadable_files_raise_one_line_input_error(tmp_path, make, needle):
    path = tmp_path / "bad.mp4"
    make(path)
    with pytest.raises(InputError) as err:
        VideoFileSource(path)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_truncated_mp4_is_an_input_error(tmp_path):
    path = _encode(tmp_path / "clip.mp4", "mpeg4", 20)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the index (moov) is at the end: it is gone
    with pytest.raises(InputError):
        list(open_source(path))


def _damage(path: Path, at: float, n: int = 2000) -> None:
    data = bytearray(path.read_bytes())
    k = int(len(data) * at)
    data[k:k + n] = np.random.default_rng(1).integers(0, 256, n, np.uint8).tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("ext,codec,pix_fmt", [("mov", "mjpeg", "yuvj420p"), ("mkv", "mpeg4", "yuv420p"),
                                               ("webm", "libvpx", "yuv420p")])
def test_corruption_mid_stream_ends_the_source_with_an_error(tmp_path, ext, codec, pix_fmt):
    if not _has_encoder(codec):
        pytest.skip(f"{codec} encoder not in this FFmpeg build")
    path = _encode(tmp_path / f"clip.{ext}", codec, 40, pix_fmt=pix_fmt)
    _damage(path, 0.5)
    source = VideoFileSource(path)
    frames = list(source)  # never raises once frames were delivered
    assert 5 < len(frames) < 40
    assert source.error and "\n" not in source.error


def test_truncated_recording_is_reported(tmp_path):
    path = _encode(tmp_path / "clip.mkv", "mpeg4", 40)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])  # a recording cut short: mkv has no trailing index
    source = VideoFileSource(path)
    frames = list(source)
    assert 5 < len(frames) < 40 and "declared" in source.error


def test_audio_only_file_is_an_input_error(tmp_path):
    path = tmp_path / "sound.wav"
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with pytest.raises(InputError, match="no video stream"):
        open_source(path)


def test_huge_frames_are_refused(tmp_path):
    path = _encode(tmp_path / "clip.mp4", "mpeg4", 3)
    with pytest.raises(InputError, match="exceed the limit"):
        VideoFileSource(path, max_frame_pixels=W * H - 1)


def test_missing_paths_and_bad_options(tmp_path):
    with pytest.raises(InputError, match="not found"):
        open_source(tmp_path / "nope.mp4")
    path = _encode(tmp_path / "clip.mp4", "mpeg4", 3)
    with pytest.raises(InputError, match="fps"):
        open_source(path, fps=30)
    assert isinstance(open_source(path, fps=None, realtime=False), VideoFileSource)


def test_missing_camera_device_is_an_input_error():
    with pytest.raises(InputError, match="camera .* not available"):
        CameraSource("/dev/video-does-not-exist")
    with pytest.raises(InputError, match="not available"):
        open_source("device:/dev/video-does-not-exist", size=(640, 480), fps=30)


def test_image_folder_natural_order_and_pts(tmp_path):
    for i in (10, 2, 1):
        Image.fromarray(_pattern(i)).save(tmp_path / f"frame{i}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    source = open_source(tmp_path, fps=10)
    assert isinstance(source, ImageFolderSource)
    frames = list(source)
    assert [f.index for f in frames] == [0, 1, 2]
    np.testing.assert_allclose([f.pts for f in frames], [0.0, 0.1, 0.2])
    np.testing.assert_array_equal(frames[2].image, _pattern(10))  # frame10 after frame2


def test_image_folder_errors(tmp_path):
    with pytest.raises(InputError, match="no images"):
        ImageFolderSource(tmp_path)
    (tmp_path / "a.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read image"):
        list(ImageFolderSource(tmp_path))
    Image.fromarray(_pattern(0)).save(tmp_path / "0.png")
    source = ImageFolderSource(tmp_path)  # '0.png' is good, 'a.png' (after it) is broken
    frames = list(source)
    assert len(frames) == 1 and "a.png" in source.error


def _multiview(root: Path, names=("front", "left"), steps=3) -> dict:
    calib = {"fps": 5, "cameras": {}}
    for k, name in enumerate(names):
        K = [[100.0, 0, W / 2], [0, 100.0, H / 2], [0, 0, 1]]
        w2c = np.eye(4)
        w2c[0, 3] = k
        calib["cameras"][name] = {"K": K, "w2c": w2c.tolist(), "width": W, "height": H}
        (root / name).mkdir()
        for t in range(steps):
            Image.fromarray(_pattern(t + 10 * k)).save(root / name / f"{t:06d}.png")
    (root / "calibration.json").write_text(json.dumps(calib))
    return calib


def test_multiview_yields_all_cameras_per_step(tmp_path):
    _multiview(tmp_path)
    source = open_source(tmp_path)
    assert isinstance(source, MultiViewSource)
    assert [c.name for c in source.cameras] == ["front", "left"]
    frames = list(source)
    assert [(f.index, f.camera_id) for f in frames] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    np.testing.assert_allclose([f.pts for f in frames[::2]], [0, 0.2, 0.4])
    assert frames[1].viewmat[0, 3] == 1.0 and frames[1].K.shape == (3, 3)
    np.testing.assert_array_equal(frames[3].image, _pattern(11))


def test_multiview_validation(tmp_path):
    calib = _multiview(tmp_path)
    calib["cameras"]["left"]["K"] = [[1, 2], [3, 4]]
    (tmp_path / "calibration.json").write_text(json.dumps(calib))
    with pytest.raises(InputError, match="'left'"):
        MultiViewSource(tmp_path)
    calib["cameras"]["left"]["K"] = np.eye(3).tolist()
    calib["cameras"]["left"]["width"] = W + 1  # images do not match the calibrated size
    (tmp_path / "calibration.json").write_text(json.dumps(calib))
    with pytest.raises(InputError, match="calibrated for"):
        MultiViewSource(tmp_path)
    calib["cameras"]["left"]["width"] = W
    (tmp_path / "calibration.json").write_text(json.dumps(calib))
    Image.fromarray(np.zeros((H, W + 2, 3), np.uint8)).save(tmp_path / "left" / "000001.png")
    source = MultiViewSource(tmp_path)
    frames = list(source)  # a later image of the wrong size ends the stream with an error
    assert len(frames) == 3 and "calibrated for" in source.error
