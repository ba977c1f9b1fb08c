"""The daemon end to end: PyAV-encoded clips through tracking, windows, the engine, fusion and publishing.

The model is a randomly initialised `micro` network (the pipeline is under test, not its quality); frames are a
real face (scikit-image's public-domain astronaut portrait) moved in the image plane and encoded with PyAV.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

CLI = [sys.executable, "-m", "fastavatar_stream"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ)
    e.setdefault("PYTHONUNBUFFERED", "1")
    return e


def test_replay_writes_avatar_report_preview_and_publishes_to_subscribers(tmp_path, clip, micro_weights):
    from protocols.client import AvatarSubscriber
    from protocols.ply import load_ply

    pub, ctl = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    out = tmp_path / "out"
    replay = subprocess.Popen(CLI + ["replay", str(clip), "--out", str(out), "--weights", str(micro_weights),
                                     "--publish", pub, "--control", ctl, "--no-refine", "--linger", "4"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), text=True)
    sub_dir = tmp_path / "sub"
    other = subprocess.Popen(CLI + ["subscribe", "--connect", pub, "--control", ctl, "--out", str(sub_dir),
                                    "--count", "2", "--timeout", "120"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), text=True)
    received = []
    with AvatarSubscriber(pub, ctl) as subscriber:
        while replay.poll() is None:
            try:
                received.append(subscriber.next_version(timeout=0.5))
            except TimeoutError:
                pass
    _, err = replay.communicate()
    assert replay.returncode == 0, err
    assert other.wait(timeout=60) == 0, other.stderr.read()
    assert len(list(sub_dir.glob("v*.ply"))) == 2  # the subscriber process exits after --count versions

    report = json.loads((out / "report.json").read_text())
    for key in ("frames_read", "frames_tracked", "frames_dropped", "windows", "versions", "n_gaussians", "wall_s",
                "realtime_factor", "first_avatar_s", "stages"):
        assert key in report, key
    assert report["frames_read"] == 24 and report["frames_tracked"] == 24
    assert report["windows"] == 5  # early windows at 1, 4 and 8 frames, then 20, then the last 4 frames
    assert report["versions"] == 5 and report["versions_published"] == sorted(set(report["versions_published"]))
    assert all(set(v) >= {"p50", "p95", "p99"} for v in report["stages"].values())
    assert (out / "preview.png").stat().st_size > 1000

    avatar = load_ply(out / "avatar.ply")
    assert received, "the in-test subscriber got no version"
    last = received[-1]
    assert last.version == report["versions_published"][-1]
    for name in ("means", "quats", "scales", "colors"):
        np.testing.assert_allclose(last.arrays[name], avatar[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(last.arrays["opacities"], avatar["opacities"], atol=1e-5)


@pytest.mark.parametrize("content", ["missing", "garbage", "text"])
def test_replay_bad_input_exits_2_with_one_line(tmp_path, content):
    path = tmp_path / "clip.mp4"
    if content == "garbage":
        path.write_bytes(os.urandom(5000))
    elif content == "text":
        path.write_text("not a video\n")
    result = subprocess.run(CLI + ["replay", str(path), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env(), timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip() and " INFO " not in line
             and " WARNING " not in line]
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in result.stderr


def test_replay_of_a_clip_without_a_face_exits_2(tmp_path, micro_weights):
    import av

    path = tmp_path / "noise.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.width = s.height = 128
        s.pix_fmt = "yuv420p"
        for _ in range(6):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    result = subprocess.run(CLI + ["replay", str(path), "--out", str(tmp_path / "out"), "--weights",
                                   str(micro_weights), "--no-refine"], capture_output=True, text=True, env=env(),
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert "no usable face" in result.stderr


class FailingSource:
    """Yields the first `n` frames of a clip, then breaks like a camera unplugged mid-stream."""

    live = False

    def __init__(self, clip: Path, n: int) -> None:
        from fastavatar_stream.sources import VideoFileSource

        self.inner, self.n, self.name = VideoFileSource(clip), n, "failing"

    async def aiter(self):
        i = 0
        async for frame in self.inner.aiter():
            if i == self.n:
                raise RuntimeError("device unplugged")
            i += 1
            yield frame

    def close(self) -> None:
        self.inner.close()


def test_two_sessions_stay_independent_and_a_failed_one_keeps_its_avatar(clip, micro_weights):
    from engine.avatar_model import AvatarModel
    from fastavatar_stream.daemon import Daemon, DaemonConfig
    from fastavatar_stream.session import SessionOptions
    from fastavatar_stream.sources import VideoFileSource

    async def scenario():
        daemon = Daemon(DaemonConfig(), model=AvatarModel.load(micro_weights))
        await daemon.start()
        try:
            good = await daemon.open_session(VideoFileSource(clip), options=SessionOptions())
            bad = await daemon.open_session(FailingSource(clip, 10), options=SessionOptions())
            s_bad = await daemon.wait_session(bad)
            s_good = await daemon.wait_session(good)
            snapshot = await daemon._control(type("R", (), {"command": "snapshot", "args": {"session": bad}})())
            return daemon, s_good, s_bad, snapshot
        finally:
            await daemon.shutdown()

    daemon, good, bad, snapshot = asyncio.run(scenario())
    assert good.state == "ended" and good.error is None and good.windows_done == 5
    assert bad.state == "failed" and "device unplugged" in bad.error
    assert bad.latest is not None and bad.latest.version >= 1  # what was reconstructed is kept
    assert snapshot.version == bad.latest.version and len(snapshot.arrays["means"]) > 0
    assert good.report.frames_read == 24 and bad.report.frames_read == 10


def _nice_of_threads() -> dict[int, int]:
    """Thread id -> nice value of every thread of this process (Linux /proc)."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        out[int(task.name)] = int(fields[16])  # field 19 of stat: nice
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread priorities are a Linux feature")
def test_the_engine_yields_the_cpu_to_tracking_and_a_paced_file_is_served_like_a_camera(clip, micro_weights):
    from engine.avatar_model import AvatarModel
    from fastavatar_stream.daemon import Daemon, DaemonConfig
    from fastavatar_stream.session import SessionOptions
    from fastavatar_stream.sources import VideoFileSource

    base = os.getpriority(os.PRIO_PROCESS, 0)
    options = SessionOptions()

    async def scenario():
        daemon = Daemon(DaemonConfig(engine_nice=5), model=AvatarModel.load(micro_weights))
        await daemon.start()
        try:
            sid = await daemon.open_session(VideoFileSource(clip, realtime=True), options=options)
            session = await daemon.wait_session(sid)
            return session, daemon.worker.native_id, _nice_of_threads()
        finally:
            await daemon.shutdown()

    session, worker_tid, nice = asyncio.run(scenario())
    assert session.state == "ended" and session.windows_done >= 1
    assert session.options.live and not options.live, "paced like a camera: live, without touching the caller's"
    assert nice[worker_tid] == min(19, base + 5)
    assert nice[threading.get_native_id()] == base, "the loop, and so tracking and motion, keep their priority"
    if torch.get_num_threads() > 1:  # the torch threads the engine started run at its priority
        assert sum(v == min(19, base + 5) for v in nice.values()) >= 2


def test_serve_starts_sessions_from_the_control_api_and_shuts_down_cleanly(tmp_path, clip, micro_weights):
    import signal

    from protocols.client import AvatarSubscriber

    pub, ctl = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    daemon = subprocess.Popen(CLI + ["serve", "--publish", pub, "--control", ctl, "--weights", str(micro_weights),
                                     "--refine", "0", "--snapshot-dir", str(tmp_path / "snaps"),
                                     "--allow-source", str(clip.parent), "--allow-source", str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), text=True)
    try:
        with AvatarSubscriber(pub, ctl) as subscriber:
            deadline = time.time() + 90
            while time.time() < deadline:  # the daemon loads its model before it answers
                try:
                    if subscriber.request("status", timeout=2).ok:
                        break
                except TimeoutError:
                    continue
            reply = subscriber.request("start", source=str(clip), timeout=60)
            assert reply.ok, reply
            session = reply.result["session"]
            version = subscriber.next_version(timeout=90)
            assert version.session == session and version.version >= 1
            listing = subscriber.request("list", timeout=5)
            assert any(s["session"] == session for s in listing.result["sessions"])
            bad = subscriber.request("start", source=str(tmp_path / "missing.mp4"), timeout=5)
            assert not bad.ok and "missing.mp4" in bad.error
            assert subscriber.request("status", timeout=5).ok  # still serving after a bad request
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err
    assert list((tmp_path / "snaps").glob("s1_v*.ply")), "the final snapshot was written at shutdown"
