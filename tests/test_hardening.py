"""A daemon that can be left running: who may start what, bad options refused up front, CURVE and HTTP checks,
no crash from a failing session, ended sessions freed, the last version kept on disk and served after a
restart, and replay interrupted by SIGINT/SIGTERM writing what it built."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from fastavatar_stream.authority import (NO_DEVICES, NO_REMOTE_START, OUTSIDE_ROOTS, SourcePolicy, SourceRefused,
                                         check_start)
from fastavatar_stream.cli import main
from fastavatar_stream.demo import make_demo_clip

CLI = [sys.executable, "-m", "fastavatar_stream"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----- control authority ---------------------------------------------------------------------------------------
def test_remote_start_is_refused_without_allowed_folders_and_outside_them_alike(tmp_path, clip):
    with pytest.raises(SourceRefused, match="remote start is disabled"):
        check_start(str(clip), None, SourcePolicy())
    root = tmp_path / "allowed"
    root.mkdir()
    policy = SourcePolicy.from_folders([root])
    replies = set()
    for outside in (str(clip), "/etc/passwd", "/no/such/file.mp4", str(root / ".." / "x.mp4")):
        with pytest.raises(SourceRefused) as refused:
            check_start(outside, None, policy)
        replies.add(str(refused.value))
    assert replies == {OUTSIDE_ROOTS}, "the reply must not tell which paths exist"


def test_links_may_not_lead_out_of_an_allowed_folder_and_pipes_are_not_opened(tmp_path, clip):
    root = tmp_path / "allowed"
    root.mkdir()
    (root / "escape.mp4").symlink_to(clip)
    os.mkfifo(root / "pipe.mp4")
    (root / "inside.mp4").write_bytes(clip.read_bytes())
    policy = SourcePolicy.from_folders([root])
    with pytest.raises(SourceRefused, match="not under a folder"):
        check_start(str(root / "escape.mp4"), None, policy)
    with pytest.raises(SourceRefused, match="regular files"):
        check_start(str(root / "pipe.mp4"), None, policy)
    plan = check_start(str(root / "inside.mp4"), {"realtime": True, "max_frames": 5}, policy)
    assert plan.spec == str((root / "inside.mp4").resolve()) and plan.max_frames == 5
    assert plan.source_options == {"realtime": True}


def test_cameras_need_allow_device_and_peers_never_choose_formats(tmp_path):
    with pytest.raises(SourceRefused, match="allow-device"):
        check_start("device:0", None, SourcePolicy.from_folders([tmp_path]))
    assert NO_DEVICES.startswith("camera sources are disabled")
    policy = SourcePolicy((), allow_device=True)
    assert check_start("device:/dev/video0", None, policy).spec == "device:/dev/video0"
    for name, options in (("device:/etc/passwd", None), ("device:0", {"fmt": "lavfi"}),
                          ("device:tcp://127.0.0.1:9", None), ("device:0", {"size": [16, 16]})):
        with pytest.raises(SourceRefused):
            check_start(name, options, policy)


def test_a_restricted_video_source_will_not_follow_a_playlist(tmp_path):
    from engine.errors import InputError
    from fastavatar_stream.sources import open_source

    playlist = tmp_path / "list.mp4"
    playlist.write_text("#EXTM3U\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n")
    with pytest.raises(InputError):
        open_source(playlist, restricted=True)


# ----- options validated up front ----------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [["--fov", "0"], ["--fov", "180"], ["--fov", "nan"], ["--fov", "-10"],
                                   ["--max-frames", "0"], ["--max-frames", "-3"], ["--refine", "nan"],
                                   ["--linger", "-1"], ["--linger", "inf"]])
def test_replay_refuses_absurd_options_with_one_line(tmp_path, clip, capsys, extra):
    code = main(["replay", str(clip), "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and extra[0] in err[0]
    assert not (tmp_path / "out").exists(), "nothing starts before every option was checked"


def test_replay_and_serve_refuse_output_folders_they_cannot_write(tmp_path, clip, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["replay", str(clip), "--out", str(a_file)]) == 2
    assert main(["serve", "--snapshot-dir", str(a_file), "--publish", "none", "--control", "none"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "--snapshot-dir" in err and "Traceback" not in err


@pytest.mark.parametrize("args, needs", [
    (["--publish", "tcp://0.0.0.0:{port}"], "--curve-keys"),
    (["--control", "tcp://*:{port}"], "--curve-keys"),
    (["--http", "0.0.0.0:{port}"], "--token"),
    (["--refine", "nan"], "--refine"),
    (["--allow-source", "/no/such/folder"], "--allow-source"),
    (["--curve-keys", "/no/such/folder"], "--curve-keys"),
    (["--engine-nice", "40"], "--engine-nice"),
])
def test_serve_refuses_exposed_or_bad_settings_before_starting(capsys, args, needs):
    args = [a.format(port=free_port()) for a in args]
    assert main(["serve", "--publish", "none", "--control", "none", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needs in err[0]


def test_keys_command_writes_both_key_pairs_once(tmp_path, capsys):
    assert main(["keys", str(tmp_path / "k")]) == 0
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [
        "client.key", "client.key_secret", "server.key", "server.key_secret"]
    assert (tmp_path / "k" / "server.key_secret").stat().st_mode & 0o077 == 0
    assert main(["keys", str(tmp_path / "k")]) == 2 and "--force" in capsys.readouterr().err


# ----- CURVE -------------------------------------------------------------------------------------------------
def test_curve_admits_only_clients_with_the_keys(tmp_path):
    from protocols.avatar_buffer import AvatarBuffer
    from protocols.client import AvatarSubscriber
    from protocols.zmq_transport import (AvatarPublisher, ControlServer, CurveClient, CurveServer, make_keys,
                                         publisher_handler)
    from fake_hub import fake_avatar

    make_keys(tmp_path / "keys")
    make_keys(tmp_path / "other")
    security = CurveServer(tmp_path / "keys")
    pub, ctl = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"

    async def scenario():
        publisher = AvatarPublisher(pub, security=security)
        control = ControlServer(publisher_handler(publisher), ctl, security=security)
        serving = asyncio.create_task(control.serve())
        buffer = AvatarBuffer("s1")
        ids, arrays = fake_avatar(50, 1)
        buffer.assign(ids, arrays, 1)
        publisher.publish(buffer)

        def follow(keys):
            client = CurveClient(keys) if keys else None
            with AvatarSubscriber(pub, ctl, "s1", security=client, request_timeout_s=1.0) as sub:
                try:
                    return sub.next_version(timeout=3.0).version
                except TimeoutError:
                    return None

        loop = asyncio.get_running_loop()
        try:
            return [await loop.run_in_executor(None, follow, keys)
                    for keys in (tmp_path / "keys", None, tmp_path / "other")]
        finally:
            serving.cancel()
            control.close()
            publisher.close()
            security.stop()

    assert asyncio.run(scenario()) == [1, None, None]


# ----- HTTP signaling ----------------------------------------------------------------------------------------
def test_offers_need_json_the_served_origin_and_the_token():
    import aiohttp

    from fastavatar_stream.webrtc_server import ServerConfig, start_http
    from fake_hub import FakeHub

    async def scenario():
        runner = await start_http(FakeHub(), "127.0.0.1", 0,
                                  ServerConfig(allow_origins=["https://viewer.example"], token="secret-token"))
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        body = json.dumps({"type": "offer", "sdp": "garbage"})
        results = []
        try:
            async with aiohttp.ClientSession() as http:
                for headers in ({"Content-Type": "text/plain", "X-Fastavatar-Token": "secret-token"},
                                {"Content-Type": "application/json", "Origin": "http://evil.example",
                                 "X-Fastavatar-Token": "secret-token"},
                                {"Content-Type": "application/json", "Origin": url},
                                {"Content-Type": "application/json", "Origin": url,
                                 "X-Fastavatar-Token": "secret-token"},
                                {"Content-Type": "application/json", "Origin": "https://viewer.example",
                                 "X-Fastavatar-Token": "secret-token"}):
                    async with http.post(url + "/offer", data=body, headers=headers) as resp:
                        results.append(resp.status)
        finally:
            await runner.cleanup()
        return results

    # 400: allowed through to offer validation, which refuses the garbage SDP
    assert asyncio.run(scenario()) == [415, 403, 403, 400, 400]


# ----- the daemon ----------------------------------------------------------------------------------------------
class Request:
    def __init__(self, command: str, **args) -> None:
        self.command, self.args = command, args


def _daemon(micro_weights, **config):
    from engine.avatar_model import AvatarModel
    from fastavatar_stream.daemon import Daemon, DaemonConfig
    from fastavatar_stream.session import SessionOptions

    config.setdefault("session_defaults", SessionOptions(refine_seconds=0.0))
    return Daemon(DaemonConfig(**config), model=AvatarModel.load(micro_weights))


def test_control_start_is_refused_cleanly_and_a_pipe_never_blocks_the_daemon(tmp_path, clip, micro_weights):
    from protocols.client import AvatarSubscriber

    root = tmp_path / "allowed"
    root.mkdir()
    os.mkfifo(root / "pipe.mp4")
    (root / "clip.mp4").write_bytes(clip.read_bytes())
    pub, ctl = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"

    async def scenario(policy):
        daemon = _daemon(micro_weights, publish=pub, control=ctl, source_policy=policy)
        await daemon.start()

        def ask():
            with AvatarSubscriber(pub, ctl) as sub:
                replies = [sub.request("start", source=str(clip), timeout=5),
                           sub.request("start", source="/etc/passwd", timeout=5),
                           sub.request("start", source="device:/etc/passwd", options={"fmt": "rawvideo"}, timeout=5)]
                t0 = time.monotonic()
                replies.append(sub.request("start", source=str(root / "pipe.mp4"), timeout=5))
                replies.append(sub.request("status", timeout=5))
                waited = time.monotonic() - t0
                replies.append(sub.request("start", source=str(root / "clip.mp4"), options={"max_frames": 8},
                                           timeout=30))
                return replies, waited

        try:
            replies, waited = await asyncio.get_running_loop().run_in_executor(None, ask)
            if replies[-1].ok:
                await daemon.wait_session(replies[-1].result["session"])
            return replies, waited
        finally:
            await daemon.shutdown()

    replies, _ = asyncio.run(scenario(SourcePolicy()))
    assert [r.ok for r in replies[:4]] == [False] * 4 and replies[4].ok
    assert all(r.error == NO_REMOTE_START for r in replies[:2])
    replies, waited = asyncio.run(scenario(SourcePolicy.from_folders([root])))
    assert replies[0].error == replies[1].error == OUTSIDE_ROOTS
    assert not replies[2].ok and "\n" not in replies[2].error
    assert not replies[3].ok and "regular files" in replies[3].error and waited < 3.0
    assert replies[4].ok and replies[5].ok, replies[5]


def test_a_session_whose_tracking_fails_ends_alone_with_one_reason(clip, micro_weights):
    from fastavatar_stream.session import SessionOptions
    from fastavatar_stream.sources import VideoFileSource

    async def scenario():
        daemon = _daemon(micro_weights)
        await daemon.start()
        try:
            good = await daemon.open_session(VideoFileSource(clip), options=SessionOptions())
            bad = [await daemon.open_session(VideoFileSource(clip), options=SessionOptions(fov_degrees=0.0))
                   for _ in range(3)]
            return [await daemon.wait_session(sid) for sid in [good, *bad]]
        finally:
            await daemon.shutdown()

    good, *bad = asyncio.run(scenario())
    assert good.state == "ended" and good.error is None and good.windows_done == 5
    for session in bad:
        assert session.state == "failed" and session.error and "\n" not in session.error
        assert len(session.report.errors) == 1


def test_ended_sessions_are_freed_and_the_last_version_is_on_disk_and_served_after_a_restart(
        tmp_path, clip, micro_weights):
    from fastavatar_stream.session import SessionOptions
    from fastavatar_stream.sources import VideoFileSource
    from protocols.ply import load_ply

    snaps = tmp_path / "snaps"

    async def first_run():
        daemon = _daemon(micro_weights, snapshot_dir=snaps, keep_ended=2, publish=None)
        await daemon.start()
        try:
            sids, finals = [], {}
            for n in (8, 12, 9):  # one after another: the oldest ended session is the one evicted
                sid = await daemon.open_session(VideoFileSource(clip), options=SessionOptions(max_frames=n))
                session = await daemon.wait_session(sid)
                sids.append(sid)
                finals[sid] = (session.report.versions[-1], daemon.buffers[sid].live_arrays())
            kept, worker_sessions = sorted(daemon.sessions), dict(daemon.worker._sessions)
            listing = {s["session"]: s for s in (await daemon._control(Request("list")))["sessions"]}
            return sids, finals, kept, worker_sessions, listing
        finally:
            await daemon.shutdown()

    sids, finals, kept, worker_sessions, listing = asyncio.run(first_run())
    assert kept == sids[1:] and worker_sessions == {}, "only the newest keep_ended ended sessions stay"
    assert set(listing) == set(sids) and all(s["state"] == "ended" for s in listing.values())
    for sid, (version, arrays) in finals.items():
        files = list(snaps.glob(f"{sid}_v*.ply"))
        assert [f.name for f in files] == [f"{sid}_v{version}.ply"], "one file: the last published version"
        assert np.array_equal(load_ply(files[0])["means"], arrays["means"])
    assert not list(snaps.glob("*.tmp"))

    async def second_run():
        daemon = _daemon(micro_weights, snapshot_dir=snaps, publish=None)
        await daemon.start()
        try:
            listing = (await daemon._control(Request("list")))["sessions"]
            snapshot = await daemon._control(Request("snapshot", session=sids[0]))
            new = await daemon.open_session(VideoFileSource(clip), options=SessionOptions(max_frames=4))
            await daemon.wait_session(new)
            return listing, snapshot, new
        finally:
            await daemon.shutdown()

    listing, snapshot, new = asyncio.run(second_run())
    assert {s["session"]: s["version"] for s in listing} == {sid: finals[sid][0] for sid in sids}
    assert snapshot.version == finals[sids[0]][0]
    assert np.allclose(snapshot.arrays["means"], load_ply(snaps / f"{sids[0]}_v{finals[sids[0]][0]}.ply")["means"])
    assert new not in sids, "session ids continue after the saved ones"


# ----- replay signals --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_replay_interrupted_writes_what_it_built_and_exits_with_the_signal_code(tmp_path, micro_weights, sig, code):
    from protocols.client import AvatarSubscriber
    from protocols.ply import load_ply

    long_clip = make_demo_clip(tmp_path / "long.mp4", n_frames=200, size=128)
    pub, ctl = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    out = tmp_path / "out"
    replay = subprocess.Popen(CLI + ["replay", str(long_clip), "--out", str(out), "--weights", str(micro_weights),
                                     "--no-refine", "--realtime", "--publish", pub, "--control", ctl,
                                     "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with AvatarSubscriber(pub, ctl) as sub:
            sub.next_version(timeout=60)
        replay.send_signal(sig)
        _, err = replay.communicate(timeout=60)
    finally:
        replay.kill()
    assert replay.returncode == code, err
    assert f"interrupted by {signal.Signals(sig).name}" in err and "Traceback" not in err
    report = json.loads((out / "report.json").read_text())
    assert report["interrupted"] is True and report["signal"] == signal.Signals(sig).name
    assert report["frames_read"] < 200 and report["wall_s"] > 0
    assert report["version_final"] == report["versions_published"][-1]
    assert len(load_ply(out / "avatar.ply")["means"]) == report["n_gaussians_final"]


def test_serve_killed_with_sigkill_serves_its_last_snapshots_after_a_restart(tmp_path, clip, micro_weights):
    from protocols.client import AvatarSubscriber
    from protocols.ply import load_ply

    snaps = tmp_path / "snaps"

    def serve(pub: str, ctl: str) -> subprocess.Popen:
        return subprocess.Popen(CLI + ["serve", "--publish", pub, "--control", ctl, "--weights", str(micro_weights),
                                       "--refine", "0", "--snapshot-dir", str(snaps), "--allow-source",
                                       str(clip.parent)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_ready(sub: AvatarSubscriber) -> None:
        deadline = time.time() + 90
        while time.time() < deadline:  # the daemon loads its model before it answers
            try:
                if sub.request("status", timeout=2).ok:
                    return
            except TimeoutError:
                continue
        raise AssertionError("the daemon never answered")

    pub, ctl = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    daemon = serve(pub, ctl)
    try:
        with AvatarSubscriber(pub, ctl) as sub:
            wait_ready(sub)
            reply = sub.request("start", source=str(clip), options={"realtime": True}, timeout=30)
            session = reply.result["session"]
            sub.next_version(timeout=90)
            deadline = time.time() + 30
            while not list(snaps.glob(f"{session}_v*.ply")) and time.time() < deadline:
                time.sleep(0.2)
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.communicate(timeout=30)
    saved = list(snaps.glob(f"{session}_v*.ply"))
    assert len(saved) == 1, "a running session's snapshot is on disk before it ends"
    version = int(saved[0].stem.split("_v")[1])

    pub, ctl = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    daemon = serve(pub, ctl)
    try:
        with AvatarSubscriber(pub, ctl) as sub:
            wait_ready(sub)
            listing = {s["session"]: s for s in sub.request("list", timeout=5).result["sessions"]}
            reply = sub.request("snapshot", session=session, timeout=10)
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err
    assert listing[session]["state"] == "saved" and listing[session]["version"] == version
    assert reply.ok and reply.message.version == version
    assert np.allclose(reply.message.arrays["means"], load_ply(saved[0])["means"])
