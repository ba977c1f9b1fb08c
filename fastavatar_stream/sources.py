"""Frame sources: video files, camera devices, image folders and multi-view captures.

Every source yields `SourceFrame`s, both through a plain iterator (`for f in source`) and through an
asyncio reader (`async for f in source.aiter()`) that decodes in a worker thread, so the event loop
never blocks on I/O or decoding. One source must be read by one reader at a time: PyAV containers are
not thread-safe, so the asyncio reader keeps all decoding on a single dedicated thread.

Offline sources (files, folders) run as fast as they can be read, or paced to their timestamps with
`realtime=True`. Cameras are paced by the device. A problem found when opening a source (missing file,
not a video, no video stream, frames too large) raises `engine.errors.InputError` with one line.
Corruption found after frames were delivered ends the source cleanly: iteration stops and the reason is
kept in `source.error`. Corruption before any frame was delivered raises `InputError`.

Multi-view capture folder layout (`MultiViewSource`)::

    capture/
      calibration.json
      cam_front/000000.png  000001.png ...
      cam_left/000000.png   000001.png ...

`calibration.json`::

    {
      "fps": 25,                                   # optional, default from the `fps` option
      "cameras": {
        "cam_front": {"K": [[fx,0,cx],[0,fy,cy],[0,0,1]],          # pixels
                      "w2c": [[...4x4 world-to-camera, OpenCV axes: x right, y down, z forward...]],
                      "width": 512, "height": 512},
        "cam_left": {...}
      }
    }

Camera ids are the positions of the camera names in sorted order. A time step is one frame name (file
stem) and yields the frames of every camera that has an image with that name, in camera-id order; a
camera missing a frame is skipped for that step (logged once). Images must have the calibrated size.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterator

import numpy as np

from engine.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_MAX_FRAME_PIXELS = 4096 * 4096
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: seconds a stopped asyncio reader waits for its decode thread to close the source
CLOSE_WAIT_S = 5.0
#: FFmpeg demuxers a restricted file source may use (no playlists, concat scripts or other indirections that
#: make FFmpeg open further files or URLs), and local files as the only protocol
SAFE_DEMUXERS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,flv,ivf,h264,hevc,mjpeg,gif"
SAFE_AV_OPTIONS = {"protocol_whitelist": "file", "format_whitelist": SAFE_DEMUXERS}
DEVICE_PREFIX = "device:"


@dataclass
class SourceFrame:
    """One decoded frame.

    image:     (H, W, 3) uint8 RGB
    pts:       presentation time in seconds from the first frame of the stream
    index:     frame number (multi-view: time step) within the stream
    camera_id: camera of a multi-view capture (0 otherwise)
    t_capture: wall-clock time (time.time()) when the frame was delivered to the reader
    K, viewmat: (3, 3) intrinsics in pixels and (4, 4) world-to-camera (OpenCV axes) when the source is
               calibrated (multi-view), else None
    """

    image: np.ndarray
    pts: float
    index: int
    camera_id: int = 0
    t_capture: float = 0.0
    K: np.ndarray | None = None
    viewmat: np.ndarray | None = None


_END = object()


class FrameSource:
    """Base class: subclasses implement `_frames()`, a generator of frames without pacing.

    Attributes: `name` (for messages), `live` (True for devices), `frames_read`, `error` (None, or one
    line saying why the source ended early).
    """

    live = False
    _reader_active = False  # an asyncio reader's decode thread owns the source until it closes it

    def __init__(self, name: str, realtime: bool = False) -> None:
        self.name = name
        self.realtime = bool(realtime) and not self.live
        self.frames_read = 0
        self.error: str | None = None

    # -- subclasses -------------------------------------------------------------------------------------
    def _frames(self) -> Iterator[SourceFrame]:
        raise NotImplementedError

    def close(self) -> None:
        """Release files/devices; safe to call twice."""

    # -- shared ---------------------------------------------------------------------------------------------
    def _fail(self, reason: str) -> None:
        """Record a mid-stream failure, or raise when nothing was delivered yet."""
        if self.frames_read == 0:
            raise InputError(reason)
        self.error = reason
        log.warning("%s: stream ended early: %s", self.name, reason)

    def _deliver(self, frame: SourceFrame) -> SourceFrame:
        frame.t_capture = time.time()
        self.frames_read += 1
        return frame

    def __iter__(self) -> Iterator[SourceFrame]:
        pacer = _Pacer(self.realtime)
        try:
            for frame in self._frames():
                delay = pacer.delay(frame.pts)
                if delay > 0:
                    time.sleep(delay)
                yield self._deliver(frame)
        finally:
            self.close()

    async def aiter(self) -> AsyncIterator[SourceFrame]:
        """Asyncio reader: decoding runs on one dedicated thread; pacing uses asyncio.sleep.

        However the reader ends (exhausted, broken off, cancelled), the decoder is closed on its own thread
        after the decode call in flight returns, and the reader waits for that (up to `CLOSE_WAIT_S`): a
        container closed under a running demuxer is a crash, not an error."""
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"source-{self.name[:20]}")
        frames = self._frames()
        pacer = _Pacer(self.realtime)
        self._reader_active = True
        try:
            while True:
                frame = await loop.run_in_executor(executor, next, frames, _END)
                if frame is _END:
                    break
                delay = pacer.delay(frame.pts)
                if delay > 0:
                    await asyncio.sleep(delay)
                yield self._deliver(frame)
        finally:
            closed = loop.run_in_executor(executor, _close_all, frames, self)
            executor.shutdown(wait=False)
            try:
                await asyncio.wait_for(asyncio.shield(closed), CLOSE_WAIT_S)
            except asyncio.TimeoutError:
                # the decode call in flight never returned (a device or pipe that hangs): the decode
                # thread closes the source when it does; nobody else may touch the container before
                log.warning("%s: decoder still busy %.0f s after the reader stopped; it closes when it returns",
                            self.name, CLOSE_WAIT_S)

    def __aiter__(self) -> AsyncIterator[SourceFrame]:
        return self.aiter()


def _close_all(frames, source: FrameSource) -> None:
    """Runs on the decode thread: the only thread that may close a source an asyncio reader decodes."""
    try:
        frames.close()
    finally:
        source._reader_active = False
        source.close()


class _Pacer:
    """Maps stream timestamps to wall-clock deadlines (starting at the first frame)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._origin: tuple[float, float] | None = None  # (wall time, pts) of the first frame

    def delay(self, pts: float) -> float:
        if not self.enabled:
            return 0.0
        now = time.monotonic()
        if self._origin is None:
            self._origin = (now, pts)
            return 0.0
        wall0, pts0 = self._origin
        return (wall0 + (pts - pts0)) - now


# ----------------------------------------------------------------------------------------------------------
# PyAV: files and devices
# ----------------------------------------------------------------------------------------------------------
def _av_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class _AvSource(FrameSource):
    """Shared decoding loop over the first video stream of a PyAV container."""

    def __init__(self, name: str, realtime: bool, max_frame_pixels: int) -> None:
        super().__init__(name, realtime)
        if max_frame_pixels <= 0:
            raise InputError(f"max_frame_pixels must be positive, got {max_frame_pixels}")
        self.max_frame_pixels = int(max_frame_pixels)
        self._container = None
        self._lock = threading.Lock()

    def _open(self):  # returns an opened container
        raise NotImplementedError

    def _check_size(self, width: int, height: int) -> str | None:
        if width * height > self.max_frame_pixels:
            return (f"{self.name}: frames of {width}x{height} exceed the limit of {self.max_frame_pixels} pixels; "
                    f"downscale the video or raise max_frame_pixels")
        return None

    def _video_stream(self, container):
        if not container.streams.video:
            container.close()
            raise InputError(f"{self.name}: no video stream in this file (audio or data only); give a video file")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if ctx.width and ctx.height:
            problem = self._check_size(ctx.width, ctx.height)
            if problem:
                container.close()
                raise InputError(problem)
        return stream

    def _decode(self, container, stream, index0: int = 0, pts_offset: float = 0.0,
                t0: list | None = None) -> Iterator[SourceFrame]:
        import av

        index = index0
        fps = float(stream.average_rate) if stream.average_rate else 25.0
        last_t = None
        t0 = t0 if t0 is not None else [None]
        try:
            for packet in container.demux(stream):
                try:
                    decoded = packet.decode()
                except (av.error.FFmpegError, ValueError) as exc:
                    self._fail(f"{self.name}: corrupt video data at frame {index}: {_av_reason(exc)}")
                    return
                for frame in decoded:
                    problem = self._check_size(frame.width, frame.height)
                    if problem:
                        self._fail(problem)
                        return
                    t = frame.time if frame.time is not None else (index - index0) / fps
                    if t0[0] is None:
                        t0[0] = t
                    last_t = t
                    image = frame.to_ndarray(format="rgb24")
                    yield SourceFrame(image=image, pts=float(t - t0[0]) + pts_offset, index=index)
                    index += 1
        except (av.error.FFmpegError, OSError) as exc:
            self._fail(f"{self.name}: reading stopped at frame {index}: {_av_reason(exc)}")
        if index == index0 and self.frames_read == 0 and self.error is None:
            raise InputError(f"{self.name}: the video stream holds no decodable frames; the file may be damaged")
        expected = _declared_duration(container, stream)
        if self.error is None and last_t is not None and expected and last_t - t0[0] < expected - 3.0 / fps:
            # demuxers of damaged mkv/webm files often just stop: compare with the declared duration
            self.error = (f"{self.name}: stream ended at {last_t - t0[0]:.2f} s of a declared {expected:.2f} s; "
                          f"the file may be truncated or damaged")
            log.warning("%s", self.error)

    def close(self) -> None:
        if self._reader_active:
            return  # its decode thread closes it (see FrameSource.aiter)
        with self._lock:
            if self._container is not None:
                self._container.close()
                self._container = None


def _declared_duration(container, stream) -> float | None:
    """Duration the file declares for the video stream (seconds), or None when unknown."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


class VideoFileSource(_AvSource):
    """A video file FFmpeg can read (mp4, mkv, webm, mov, ...; h264, vp8/vp9, mjpeg, ...).

    The container is probed on construction, so a missing, unreadable or video-less file raises
    `InputError` right away. `loop=True` restarts at the end (pts and index keep increasing), for soak
    benchmarks. `restricted=True` (sources a remote peer named) limits FFmpeg to local files and plain video
    demuxers (`SAFE_DEMUXERS`), so a playlist or concat file cannot make it open other files or URLs.
    """

    def __init__(self, path: str | Path, realtime: bool = False,
                 max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS, loop: bool = False,
                 restricted: bool = False) -> None:
        self.path = Path(path)
        super().__init__(str(self.path), realtime, max_frame_pixels)
        self.loop = loop
        self.av_options = dict(SAFE_AV_OPTIONS) if restricted else {}
        if not self.path.is_file():
            raise InputError(f"video file not found: {self.path}; check the path")
        container = self._open()
        try:
            stream = container.streams.video[0]
            self.fps = float(stream.average_rate) if stream.average_rate else 25.0
            self.width = stream.codec_context.width
            self.height = stream.codec_context.height
            self.codec = stream.codec_context.name
            self.n_frames = int(stream.frames) or None
        finally:
            container.close()

    def _open(self):
        import av

        try:
            container = av.open(str(self.path), mode="r", options=self.av_options)
        except (av.error.FFmpegError, OSError, UnicodeDecodeError, ValueError) as exc:
            raise InputError(f"cannot read video file {self.path}: {_av_reason(exc)}; "
                             f"give a video FFmpeg can read (mp4, mkv, webm, mov)") from None
        self._video_stream(container)
        return container

    def _frames(self) -> Iterator[SourceFrame]:
        index, offset, t0 = 0, 0.0, [None]
        while True:
            container = self._open()
            with self._lock:
                self._container = container
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            last_pts = offset
            n_before = index
            for frame in self._decode(container, stream, index0=index, pts_offset=offset, t0=t0):
                last_pts = frame.pts
                index = frame.index + 1
                yield frame
            self.close()
            if not self.loop or self.error is not None or index == n_before:
                return
            offset = last_pts + 1.0 / self.fps
            t0 = [None]


def _camera_format() -> tuple[str, str]:
    """FFmpeg input device format for this platform and a hint for device names."""
    if sys.platform.startswith("linux"):
        return "v4l2", "/dev/video0"
    if sys.platform == "darwin":
        return "avfoundation", "0 (device index)"
    if sys.platform.startswith("win"):
        return "dshow", "video=<camera name>"
    raise InputError(f"camera capture is not supported on platform {sys.platform}; use a video file")


class CameraSource(_AvSource):
    """A camera device through FFmpeg's platform input (v4l2 on Linux, avfoundation on macOS, dshow on Windows).

    device: '/dev/video0' or '0' on Linux ('0' means /dev/video0), '0' on macOS, 'video=Name' on Windows.
    fmt overrides the input format; size is (width, height); fps the requested frame rate.
    """

    live = True

    def __init__(self, device: str, fmt: str | None = None, size: tuple[int, int] | None = None,
                 fps: float | None = None, max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> None:
        default_fmt, hint = (fmt, "") if fmt else _camera_format()
        self.fmt = fmt or default_fmt
        device = str(device)
        if self.fmt in ("v4l2", "video4linux2") and device.isdigit():
            device = f"/dev/video{device}"
        self.device = device
        self._hint = hint
        super().__init__(f"camera {device}", False, max_frame_pixels)
        self.options: dict[str, str] = {}
        if size is not None:
            w, h = (int(v) for v in size)
            if w <= 0 or h <= 0:
                raise InputError(f"camera size must be positive, got {size}")
            self.options["video_size"] = f"{w}x{h}"
        if fps is not None:
            if fps <= 0:
                raise InputError(f"camera fps must be positive, got {fps}")
            self.options["framerate"] = f"{fps:g}"
        self._container = self._open()

    def _open(self):
        import av

        try:
            container = av.open(self.device, mode="r", format=self.fmt, options=self.options)
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            hint = f" (e.g. {self._hint})" if self._hint else ""
            raise InputError(f"camera {self.device} not available through {self.fmt}: {_av_reason(exc)}; "
                             f"check the device name{hint} and permissions") from None
        self._video_stream(container)
        return container

    def _frames(self) -> Iterator[SourceFrame]:
        with self._lock:
            container = self._container
        if container is None:
            container = self._open()
            with self._lock:
                self._container = container
        yield from self._decode(container, container.streams.video[0])


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------
def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def _load_image(path: Path, max_frame_pixels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.width * img.height > max_frame_pixels:
                raise InputError(f"{path}: image of {img.width}x{img.height} exceeds the limit of "
                                 f"{max_frame_pixels} pixels; downscale it or raise max_frame_pixels")
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"cannot read image {path}: {_av_reason(exc)}") from None


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.width, img.height
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"cannot read image {path}: {_av_reason(exc)}") from None


class ImageFolderSource(FrameSource):
    """A folder of images (png, jpg, bmp, webp), in natural sorted order; pts = index / fps."""

    def __init__(self, path: str | Path, fps: float = 25.0, realtime: bool = False,
                 max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> None:
        self.path = Path(path)
        super().__init__(str(self.path), realtime)
        if not self.path.is_dir():
            raise InputError(f"image folder not found: {self.path}")
        if fps <= 0:
            raise InputError(f"fps must be positive, got {fps}")
        self.fps = float(fps)
        self.max_frame_pixels = int(max_frame_pixels)
        self.files = sorted((p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                            key=_natural_key)
        if not self.files:
            raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {self.path}")

    def _frames(self) -> Iterator[SourceFrame]:
        for index, file in enumerate(self.files):
            try:
                image = _load_image(file, self.max_frame_pixels)
            except InputError as exc:
                self._fail(str(exc))
                return
            yield SourceFrame(image=image, pts=index / self.fps, index=index)


@dataclass
class CameraCalibration:
    """One calibrated camera of a multi-view capture. K (3, 3) pixels; viewmat (4, 4) world-to-camera, OpenCV."""

    name: str
    camera_id: int
    K: np.ndarray
    viewmat: np.ndarray
    width: int
    height: int


def load_calibration(path: Path) -> tuple[list[CameraCalibration], float | None]:
    """Read and validate `calibration.json` (see the module docstring). Returns cameras and the optional fps."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read calibration {path}: {_av_reason(exc)}") from None
    cams = data.get("cameras") if isinstance(data, dict) else None
    if not isinstance(cams, dict) or not cams:
        raise InputError(f"{path}: expected an object with a non-empty 'cameras' object")
    out = []
    for camera_id, name in enumerate(sorted(cams)):
        entry = cams[name]
        try:
            K = np.asarray(entry["K"], dtype=np.float64)
            w2c = np.asarray(entry["w2c"], dtype=np.float64)
            width, height = int(entry["width"]), int(entry["height"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: camera '{name}' needs K (3x3), w2c (4x4), width and height ({exc})") from None
        if K.shape != (3, 3) or w2c.shape != (4, 4) or not (np.isfinite(K).all() and np.isfinite(w2c).all()):
            raise InputError(f"{path}: camera '{name}' has K of shape {K.shape} and w2c of shape {w2c.shape}; "
                             f"expected finite 3x3 and 4x4")
        if width <= 0 or height <= 0:
            raise InputError(f"{path}: camera '{name}' has a non-positive image size {width}x{height}")
        out.append(CameraCalibration(name, camera_id, K.astype(np.float32), w2c.astype(np.float32), width, height))
    fps = data.get("fps")
    if fps is not None and (not isinstance(fps, (int, float)) or fps <= 0):
        raise InputError(f"{path}: 'fps' must be a positive number, got {fps!r}")
    return out, (float(fps) if fps is not None else None)


class MultiViewSource(FrameSource):
    """A calibrated multi-view capture folder (layout in the module docstring).

    Yields, per time step, the frames of all cameras (camera_id, K and viewmat set), in camera-id order.
    """

    def __init__(self, path: str | Path, fps: float = 25.0, realtime: bool = False,
                 max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> None:
        self.path = Path(path)
        super().__init__(str(self.path), realtime)
        calib = self.path / "calibration.json"
        if not calib.is_file():
            raise InputError(f"multi-view folder {self.path} has no calibration.json")
        self.cameras, file_fps = load_calibration(calib)
        self.fps = file_fps or float(fps)
        if self.fps <= 0:
            raise InputError(f"fps must be positive, got {fps}")
        self.max_frame_pixels = int(max_frame_pixels)
        self.files: dict[int, dict[str, Path]] = {}
        for cam in self.cameras:
            folder = self.path / cam.name
            if not folder.is_dir():
                raise InputError(f"multi-view folder {self.path}: camera '{cam.name}' has no image folder")
            self.files[cam.camera_id] = {p.stem: p for p in folder.iterdir()
                                         if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
        self.steps = sorted({stem for per_cam in self.files.values() for stem in per_cam},
                            key=lambda s: _natural_key(Path(s)))
        if not self.steps:
            raise InputError(f"multi-view folder {self.path}: no images in any camera folder")
        for cam in self.cameras:  # headers only: catches a calibration that does not match the images
            first = min(self.files[cam.camera_id].values(), key=_natural_key, default=None)
            if first is not None:
                size = _image_size(first)
                if size != (cam.width, cam.height):
                    raise InputError(f"{first}: image is {size[0]}x{size[1]} but camera '{cam.name}' is "
                                     f"calibrated for {cam.width}x{cam.height}")

    def _frames(self) -> Iterator[SourceFrame]:
        warned: set[int] = set()
        for index, stem in enumerate(self.steps):
            for cam in self.cameras:
                file = self.files[cam.camera_id].get(stem)
                if file is None:
                    if cam.camera_id not in warned:
                        warned.add(cam.camera_id)
                        log.warning("%s: camera '%s' misses frame '%s' (and maybe others); skipped",
                                    self.name, cam.name, stem)
                    continue
                try:
                    image = _load_image(file, self.max_frame_pixels)
                except InputError as exc:
                    self._fail(str(exc))
                    return
                if image.shape[:2] != (cam.height, cam.width):
                    self._fail(f"{file}: image is {image.shape[1]}x{image.shape[0]} but camera '{cam.name}' "
                               f"is calibrated for {cam.width}x{cam.height}")
                    return
                yield SourceFrame(image=image, pts=index / self.fps, index=index, camera_id=cam.camera_id,
                                  K=cam.K.copy(), viewmat=cam.viewmat.copy())


# ----------------------------------------------------------------------------------------------------------
def open_source(spec: str | Path, *, restricted: bool = False, **opts) -> FrameSource:
    """Open a source from a spec: 'device:<name>' for a camera, a folder with calibration.json for a
    multi-view capture, any other folder for images, a file for video.

    Options set to None or False are ignored (so a CLI can pass its defaults through); any other option
    the chosen source does not take raises InputError. `restricted` (a source a remote peer named): video
    files open with `SAFE_AV_OPTIONS`.
    """
    spec_s = str(spec)
    if spec_s.startswith(DEVICE_PREFIX):
        cls, target = CameraSource, spec_s[len(DEVICE_PREFIX):]
        if not target:
            raise InputError("empty camera device in 'device:'; give e.g. device:/dev/video0")
    else:
        path = Path(spec_s)
        if path.is_dir():
            cls = MultiViewSource if (path / "calibration.json").is_file() else ImageFolderSource
        elif path.exists():
            cls = VideoFileSource
        else:
            raise InputError(f"source not found: {spec_s}; give a video file, an image folder or device:<name>")
        target = path
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    given = {k: v for k, v in opts.items() if v is not None and v is not False}
    unknown = sorted(set(given) - accepted)
    if unknown:
        raise InputError(f"option(s) {', '.join(unknown)} do not apply to a {cls.__name__} ({spec_s})")
    if restricted and cls is VideoFileSource:
        given["restricted"] = True
    return cls(target, **given)
