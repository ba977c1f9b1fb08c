"""The engine on Ray actors: sessions placed over actors give the single-process avatars, and survive an actor's death.

A local Ray instance (2 CPUs, its files in the test's temp dir) runs `micro` engine actors; the daemon in the test
process tracks PyAV-encoded clips of a real face and publishes over real ZeroMQ sockets.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fastavatar_stream.demo import make_demo_clip

CLI = [sys.executable, "-m", "fastavatar_stream"]
ARRAYS = ("means", "quats", "scales", "opacities", "colors")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    """Two different clips (different framing and length), so sessions mixed up on an actor would show."""
    folder = tmp_path_factory.mktemp("clips")
    return [make_demo_clip(folder / "a.mp4", n_frames=12, size=192),
            make_demo_clip(folder / "b.mp4", n_frames=9, size=160)]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    import ray

    from fastavatar_stream.ray_engine import NAMESPACE

    ray.init(num_cpus=2, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("r")))  # short: Unix socket names have 107 bytes
    yield ray
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_daemon(weights: Path, clips: list[Path], *, ray: str | None, actors: int | None = None,
               refine_s: float = 0.0, publish: str | None = None, control: str | None = None,
               on_version=None, before_shutdown=None) -> tuple[dict, dict]:
    """Run one session per clip to its end; returns ({session: Session}, {session: final live arrays}).
    before_shutdown(sessions) is awaited once every session ended, while the daemon still publishes."""
    from engine.avatar_model import AvatarModel
    from fastavatar_stream.daemon import Daemon, DaemonConfig
    from fastavatar_stream.session import SessionOptions
    from fastavatar_stream.sources import VideoFileSource

    async def scenario():
        config = DaemonConfig(weights=str(weights), ray=ray, engine_actors=actors, publish=publish, control=control)
        daemon = Daemon(config, model=AvatarModel.load(weights))
        await daemon.start()
        try:
            ids = [await daemon.open_session(VideoFileSource(c), options=SessionOptions(refine_seconds=refine_s))
                   for c in clips]
            if on_version is not None:
                for sid in ids:
                    daemon.subscribe(sid, lambda buffer, stats, d=daemon: on_version(d, buffer, stats))
            sessions = {sid: await daemon.wait_session(sid) for sid in ids}
            if before_shutdown is not None:
                await before_shutdown(sessions)
            return sessions, {sid: daemon.buffers[sid].live_arrays() for sid in ids}
        finally:
            await daemon.shutdown()

    return asyncio.run(scenario())


def assert_same_avatar(got: dict, want: dict) -> None:
    assert len(got["means"]) == len(want["means"]) > 0
    for name in ARRAYS:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_a_fuser_resumed_from_its_state_goes_on_exactly_like_the_one_that_stopped():
    """What a new actor does with a dead one's session: same versions, same uids, same avatar."""
    import pickle

    import torch

    from engine.fusion import IncrementalFuser
    from engine.gaussians import GaussianSet

    def window(w: int) -> list[GaussianSet]:
        g = torch.Generator().manual_seed(w)
        return [GaussianSet.from_activated(
            anchor=torch.randint(0, 10, (30,), generator=g), offset=0.01 * torch.randn(30, 3, generator=g),
            rotation=torch.randn(30, 4, generator=g), scale=0.001 + 0.004 * torch.rand(30, 3, generator=g),
            opacity=torch.rand(30, generator=g), color=torch.rand(30, 3, generator=g),
            importance=torch.randn(30, generator=g), frame=w * 4 + f) for f in range(3)]

    whole = IncrementalFuser(budget=50)
    for w in range(3):
        whole.add_window(window(w))
    stopped = IncrementalFuser(budget=50)
    stopped.add_window(window(0))
    stopped.add_window(window(1))
    moved = IncrementalFuser.resume(pickle.loads(pickle.dumps(stopped.state())), budget=50)  # across processes
    version = moved.add_window(window(2))
    assert version.version == whole.version == 3
    assert torch.equal(moved.avatar.uid, whole.avatar.uid)
    for name in ("anchor", "offset", "rotation", "log_scale", "opacity_logit", "color", "frame"):
        assert torch.equal(getattr(moved.avatar, name), getattr(whole.avatar, name)), name


def test_serve_with_ray_reconstructs_every_source_and_writes_their_snapshots(tmp_path, tmp_path_factory, clips,
                                                                           micro_weights):
    from protocols.ply import load_ply

    pub, ctl, snaps = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}", tmp_path / "snaps"
    # a short folder: Ray's socket paths under it must stay within the 107 bytes of a Unix socket name
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_TMPDIR=str(tmp_path_factory.mktemp("r")))
    daemon = subprocess.Popen(CLI + ["serve", "--ray", "local", "--engine-actors", "2", "--source", str(clips[0]),
                                     "--source", str(clips[1]), "--snapshot-dir", str(snaps), "--publish", pub,
                                     "--control", ctl, "--weights", str(micro_weights), "--refine", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        deadline = time.time() + 120
        while len(list(snaps.glob("*.ply"))) < 2 and daemon.poll() is None and time.time() < deadline:
            time.sleep(0.5)
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err
    written = sorted(p.name for p in snaps.glob("*.ply"))
    assert [name.split("_")[0] for name in written] == ["s1", "s2"], written
    for path in snaps.glob("*.ply"):
        assert len(load_ply(path)["means"]) > 0
    assert "placed on engine-0" in err and "placed on engine-1" in err  # least loaded: one source per actor


@pytest.mark.parametrize("address, says", [("127.0.0.1:1", "no Ray head answers"), ("nonsense", "HOST:PORT")])
def test_serve_with_a_bad_ray_address_exits_2_with_one_line(micro_weights, address, says):
    result = subprocess.run(CLI + ["serve", "--ray", address, "--publish", "none", "--control", "none", "--weights",
                                   str(micro_weights)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if " INFO " not in line and line.strip()]
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in result.stderr


def test_two_actors_and_four_sessions_give_the_single_process_avatars(ray_cluster, clips, micro_weights):
    from fastavatar_stream.ray_engine import RayEngineWorker

    single, single_arrays = run_daemon(micro_weights, clips, ray=None)
    placements: dict[str, str] = {}

    def placed(daemon, buffer, stats) -> None:
        if isinstance(daemon.worker, RayEngineWorker):
            placements.update(daemon.worker.placement())

    sessions, arrays = run_daemon(micro_weights, clips + clips, ray="local", actors=2, on_version=placed)
    assert len(sessions) == 4
    for (sid, session), clip_index in zip(sessions.items(), [0, 1, 0, 1]):
        reference = list(single.values())[clip_index]
        assert session.state == "ended" and session.error is None
        assert session.report.versions == reference.report.versions == list(range(1, reference.windows_done + 1))
        assert_same_avatar(arrays[sid], list(single_arrays.values())[clip_index])
    assert sorted(placements.values()) == ["engine-0", "engine-0", "engine-1", "engine-1"]


def test_killing_an_actor_mid_stream_moves_its_sessions_and_versions_go_on(ray_cluster, clips, micro_weights):
    from protocols.client import AvatarSubscriber

    pub, ctl = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    killed: list[str] = []
    versions_at_kill: dict[str, int] = {}
    received: dict[str, list] = {}
    stop = threading.Event()

    def kill_after_first_version(daemon, buffer, stats) -> None:
        placement = daemon.worker.placement()
        victim = placement.get(buffer.session)
        if not killed and victim is not None and buffer.version >= 2:
            killed.append(victim)
            ray_cluster.kill(daemon.worker.actor_handle(victim))  # mid-stream: its sessions still have windows to go
            versions_at_kill.update({sid: daemon.buffers[sid].version for sid, name in placement.items()
                                     if name == victim})

    def subscribe() -> None:
        with AvatarSubscriber(pub, ctl) as subscriber:
            while not stop.is_set():
                try:
                    v = subscriber.next_version(timeout=0.2)
                except TimeoutError:
                    continue
                received.setdefault(v.session, []).append(v)

    async def final_versions_received(sessions) -> None:
        deadline = time.time() + 20
        while time.time() < deadline and any(
                not received.get(sid) or received[sid][-1].version < s.report.versions[-1]
                for sid, s in sessions.items()):
            await asyncio.sleep(0.1)

    listener = threading.Thread(target=subscribe, daemon=True)
    listener.start()
    try:
        sessions, arrays = run_daemon(micro_weights, clips + clips, ray="local", actors=2, refine_s=1.0,
                                      publish=pub, control=ctl, on_version=kill_after_first_version,
                                      before_shutdown=final_versions_received)
    finally:
        stop.set()
        listener.join(timeout=10)
    assert killed, "no actor was killed"
    moved = {sid for sid, s in sessions.items() if s.report.migrations}
    assert moved == set(versions_at_kill), "exactly the dead actor's sessions moved"
    for sid in moved:  # and went on where they were: more windows, refined versions after the move
        assert sessions[sid].report.versions[-1] > versions_at_kill[sid]
    for sid, session in sessions.items():
        assert session.state == "ended" and session.error is None, session.error
        versions = session.report.versions
        assert versions == list(range(1, len(versions) + 1)), versions  # no gap, no repeat across the move
        assert session.windows_done == len(session.window_timings)
        got = received.get(sid, [])
        assert got and [v.version for v in got] == sorted({v.version for v in got}), "subscriber order"
        assert got[-1].version == versions[-1]
        assert_same_avatar(got[-1].arrays, arrays[sid])


def test_two_daemons_on_one_cluster_share_its_actors_and_spread_their_sessions(ray_cluster, clips, micro_weights):
    from engine.avatar_model import AvatarModel
    from fastavatar_stream.daemon import Daemon, DaemonConfig
    from fastavatar_stream.sources import VideoFileSource

    placed: dict[str, str] = {}

    async def scenario():
        # "auto" in a process that already joined a cluster: that cluster, its named actors shared by both daemons
        daemons = [Daemon(DaemonConfig(weights=str(micro_weights), ray="auto", engine_actors=2),
                          model=AvatarModel.load(micro_weights)) for _ in range(2)]
        for daemon in daemons:
            await daemon.start()
        try:
            first = await daemons[0].open_session(VideoFileSource(clips[0]))
            while daemons[0].sessions[first].latest is None:  # its session is open on an actor now
                await asyncio.sleep(0.05)
            placed["first"] = daemons[0].worker.placement()[first]
            second = await daemons[1].open_session(VideoFileSource(clips[1]))
            while daemons[1].sessions[second].latest is None:
                await asyncio.sleep(0.05)
            placed["second"] = daemons[1].worker.placement()[second]
            ends = [await daemons[0].wait_session(first), await daemons[1].wait_session(second)]
            names = ("engine-0", "engine-1")
            pids = [[ray_cluster.get(d.worker.actor_handle(n).describe.remote())["pid"] for n in names] for d in daemons]
            same = pids[0] == pids[1]
            return ends, same
        finally:
            for daemon in daemons:
                await daemon.shutdown()
            for name in ("engine-0", "engine-1"):  # detached: they outlive the daemons by design
                ray_cluster.kill(ray_cluster.get_actor(name))

    ends, same_actors = asyncio.run(scenario())
    assert same_actors, "the second daemon started actors of its own"
    assert {placed["first"], placed["second"]} == {"engine-0", "engine-1"}  # the other daemon's session counts
    assert all(s.state == "ended" and s.error is None and s.windows_done > 0 for s in ends)


def test_a_session_closed_with_work_left_is_never_placed_again(ray_cluster, clips, micro_weights):
    from engine.avatar_model import AvatarModel
    from fastavatar_stream.daemon import Daemon, DaemonConfig
    from fastavatar_stream.session import SessionOptions
    from fastavatar_stream.sources import VideoFileSource

    async def scenario():
        daemon = Daemon(DaemonConfig(weights=str(micro_weights), ray="local", engine_actors=1),
                        model=AvatarModel.load(micro_weights))
        await daemon.start()
        try:
            sid = await daemon.open_session(VideoFileSource(clips[0], loop=True),
                                            options=SessionOptions(refine_seconds=60.0))
            while daemon.buffers[sid].version < 1:  # placed, working, with windows and refinement still to do
                await asyncio.sleep(0.05)
            assert sid in daemon.worker.placement()
            await daemon.close_session(sid)
            await asyncio.sleep(1.0)  # several rounds of the Ray engine's loop
            return sid, daemon.worker.placement()
        finally:
            await daemon.shutdown()

    sid, placement = asyncio.run(scenario())
    assert sid not in placement
