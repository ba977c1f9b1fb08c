"""Live animation end to end: the daemon publishes a rig per avatar version and a motion per tracked frame on
ZeroMQ; subscribers pose the avatar; replay writes a drivable avatar.npz that `reenact` drives with another
video and `subscribe --animate` renders live.

The model is a randomly initialised `micro` network; the clip is a real face (scikit-image's astronaut portrait)
moved in the image plane and encoded with PyAV.
"""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from fastavatar_stream.demo import make_demo_clip
from protocols.animation import MAX_MOTION_BYTES, encode_motion, load_avatar, pose

CLI = [sys.executable, "-m", "fastavatar_stream"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ)
    e.setdefault("PYTHONUNBUFFERED", "1")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


@pytest.fixture(scope="module")
def replayed(tmp_path_factory, clip, micro_weights):
    """A paced replay publishing on ZeroMQ, with a subscriber that collects poses while it runs."""
    from protocols.client import AvatarSubscriber

    pub, ctl = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    out = tmp_path_factory.mktemp("replay")
    replay = subprocess.Popen(CLI + ["replay", str(clip), "--out", str(out), "--weights", str(micro_weights),
                                     "--publish", pub, "--control", ctl, "--no-refine", "--realtime",
                                     "--linger", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), text=True)
    poses = []
    with AvatarSubscriber(pub, ctl) as subscriber:
        while replay.poll() is None:
            try:
                poses.append(subscriber.next_pose(timeout=0.5))
            except TimeoutError:
                pass
        stats = subscriber.stats
    _, err = replay.communicate()
    assert replay.returncode == 0, err
    return out, poses, stats


def test_subscribers_receive_a_rig_and_a_motion_per_tracked_frame_and_pose_the_avatar(replayed):
    out, poses, stats = replayed
    assert stats.rigs >= 1 and stats.malformed == 0
    assert len(poses) >= 5, f"only {len(poses)} poses arrived"
    frames = [p.frame for p in poses]
    assert frames == sorted(set(frames)), "poses never step back"
    for posed in poses:
        assert len(encode_motion(posed.motion)) <= MAX_MOTION_BYTES
        assert posed.motion.t_capture > 0 and posed.t_received >= posed.motion.t_capture
        m = posed.arrays["means"].shape[0]
        assert posed.arrays["quats"].shape == (m, 4) and np.all(np.isfinite(posed.arrays["means"]))
    jaw = np.array([p.motion.jaw for p in poses])
    rotation = np.array([p.motion.rotation for p in poses])
    assert np.ptp(rotation, axis=0).max() > 0 or np.ptp(jaw, axis=0).max() > 0, "the tracked pose never changed"


def test_replay_writes_a_drivable_avatar_that_poses_like_the_live_rig(replayed):
    out, poses, _ = replayed
    rig = load_avatar(out / "avatar.npz")
    last = poses[-1]
    assert rig.version >= last.version
    if rig.version == last.version:
        np.testing.assert_allclose(pose(rig, last.motion)["means"], last.arrays["means"], atol=1e-6)
    from protocols.ply import load_ply

    neutral = load_ply(out / "avatar.ply")
    assert rig.n_gaussians == neutral["means"].shape[0]


def _frames(path: Path) -> tuple[int, tuple[int, int]]:
    with av.open(str(path)) as container:
        images = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return len(images), images[0].shape[:2]


def test_reenact_writes_one_output_frame_per_driving_frame(replayed, clip, tmp_path):
    out, _, _ = replayed
    video = tmp_path / "reenacted.mp4"
    done = subprocess.run(CLI + ["reenact", str(out / "avatar.npz"), str(clip), "--out", str(video)],
                          capture_output=True, text=True, env=env(), timeout=300)
    assert done.returncode == 0, done.stderr
    n, (h, w) = _frames(video)
    driving, (dh, dw) = _frames(clip)
    assert n == driving and h == dh and w == 2 * dw


@pytest.mark.parametrize("broken", ["avatar", "video"])
def test_reenact_with_a_bad_avatar_or_video_exits_2_with_one_line(replayed, clip, tmp_path, broken):
    out, _, _ = replayed
    garbage = tmp_path / ("bad.npz" if broken == "avatar" else "bad.mp4")
    garbage.write_bytes(os.urandom(3000))
    avatar, video = (garbage, clip) if broken == "avatar" else (out / "avatar.npz", garbage)
    done = subprocess.run(CLI + ["reenact", str(avatar), str(video), "--out", str(tmp_path / "o.mp4")],
                          capture_output=True, text=True, env=env(), timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(garbage.name) in lines[0], done.stderr


def test_a_npz_that_is_not_an_avatar_is_refused(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, means=np.zeros((3, 3), np.float32))
    done = subprocess.run(CLI + ["reenact", str(path), str(path), "--out", str(tmp_path / "o.mp4")],
                          capture_output=True, text=True, env=env(), timeout=120)
    assert done.returncode == 2 and "not a fastavatar avatar file" in done.stderr


def test_subscribe_animate_renders_the_live_driven_avatar_to_a_video(tmp_path, clip, micro_weights):
    pub, ctl = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    replay = subprocess.Popen(CLI + ["replay", str(clip), "--out", str(tmp_path / "r"), "--weights",
                                     str(micro_weights), "--publish", pub, "--control", ctl, "--no-refine",
                                     "--realtime", "--linger", "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), text=True)
    video = tmp_path / "live.mp4"
    try:
        done = subprocess.run(CLI + ["subscribe", "--connect", pub, "--control", ctl, "--animate", str(video),
                                     "--seconds", "4", "--timeout", "60"],
                              capture_output=True, text=True, env=env(), timeout=180)
    finally:
        replay.wait(timeout=120)
    assert done.returncode == 0, done.stderr
    n, (h, w) = _frames(video)
    assert n >= 10 and h == w == 256
    assert "poses" in done.stdout


def test_a_webrtc_peer_receives_the_rig_and_unordered_motion_and_the_snapshot_dir_gets_a_drivable_avatar(
        tmp_path, micro_weights):
    from engine.avatar_model import AvatarModel
    from fastavatar_stream.daemon import Daemon, DaemonConfig
    from fastavatar_stream.session import SessionOptions
    from fastavatar_stream.webrtc_client import run_client
    from fastavatar_stream.webrtc_server import WEBRTC_KEY, ServerConfig, start_http
    from protocols.webrtc import loopback_ice

    clip = make_demo_clip(tmp_path / "face.mp4", n_frames=20, size=192, fps=10)
    channels = []

    async def scenario():
        daemon = Daemon(DaemonConfig(session_defaults=SessionOptions(refine_seconds=0.0),
                                     snapshot_dir=tmp_path / "snapshots"),
                        model=AvatarModel.load(micro_weights))
        await daemon.start()
        with loopback_ice():
            runner = await start_http(daemon, "127.0.0.1", 0, ServerConfig())
            url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            server = runner.app[WEBRTC_KEY]
            try:
                task = asyncio.ensure_future(run_client(clip, url, timeout=90, settle=4.0))
                while not task.done():
                    for peer in list(server.peers.values()):
                        if peer.animation.motion_channel is not None:
                            channels.append(peer.animation.motion_channel)
                    await asyncio.sleep(0.2)
                result = task.result()
                await daemon.wait_session(result.session)
                return result, daemon.animator.rig(result.session)
            finally:
                await runner.cleanup()
                await daemon.shutdown()

    result, rig = asyncio.run(scenario())
    report = result.report()
    assert report["rigs_received"] >= 1 and report["malformed_messages"] == 0
    assert report["motion"]["received"] >= 10, report["motion"]
    assert report["motion"]["bytes"] <= MAX_MOTION_BYTES * report["motion"]["received"]
    assert channels and channels[-1].ordered is False and channels[-1].maxRetransmits == 0
    held = result.receiver.rig
    assert held.version == rig.version
    motion = result.receiver.motions[-1][0]
    np.testing.assert_array_equal(pose(held, motion)["means"], pose(rig, motion)["means"])
    saved = load_avatar(tmp_path / "snapshots" / f"{result.session}_v{rig.version}_avatar.npz")
    assert saved.version == rig.version
    np.testing.assert_array_equal(pose(saved, motion)["means"], pose(rig, motion)["means"])
