"""ZeroMQ transport with real sockets on 127.0.0.1: clone pattern across processes, slow subscribers,
control requests. Each scenario is bounded by timeouts."""
from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
import zmq.asyncio

from protocols.avatar_buffer import AvatarBuffer
from protocols.client import AvatarSubscriber
from protocols.wire import Message
from protocols.zmq_transport import (AvatarPublisher, ControlRequest, ControlServer, decode_reply, encode_request,
                                     publisher_handler)

ANY_PORT = "tcp://127.0.0.1:*"

# A subscriber process: numpy/msgpack/pyzmq only (it asserts torch never got imported).
CHILD = r"""
import json, sys, time
import numpy as np
from protocols.client import AvatarSubscriber
import os
connect, control, session, final, out, go = sys.argv[1:7]
final = int(final)
seen = []
with AvatarSubscriber(connect, control, session=session) as sub:
    state = sub.next_version(timeout=8)
    seen.append([state.version, state.kind])
    print("ready", flush=True)
    stop_until = time.monotonic() + 20
    while go != "-" and not os.path.exists(go) and time.monotonic() < stop_until:
        time.sleep(0.02)  # a subscriber that stops reading until told to go on
    deadline = time.monotonic() + 8
    while state.version < final:
        try:
            state = sub.next_version(timeout=max(0.05, deadline - time.monotonic()))
        except TimeoutError:
            sys.exit(f"timed out at version {state.version} of {final}: {sub.stats} seen {seen[-5:]}")
        seen.append([state.version, state.kind])
    buf = sub.buffer(session)
    np.savez(out, ids=buf.ids, live_ids=state.arrays["ids"], live_means=state.arrays["means"], **buf.fields)
    print(json.dumps({"seen": seen, "gaps": sub.stats.gaps, "snapshots": sub.stats.snapshots,
                      "resyncs": sub.stats.resyncs,
                      "torch": "torch" in sys.modules, "engine": "engine" in sys.modules}), flush=True)
"""


class Avatar:
    """A daemon-like avatar that grows, prunes and refines with every version."""

    def __init__(self, session: str, seed: int = 0, grow: int = 40, change: float = 0.2, prune: float = 0.1) -> None:
        self.buffer = AvatarBuffer(session)
        self.rng = np.random.default_rng(seed)
        self.grow, self.change, self.prune = grow, change, prune
        self.ids = np.zeros(0, np.int64)
        self.vals = self._values(0)
        self.next_id = 0

    def _values(self, n: int) -> dict[str, np.ndarray]:
        r = self.rng
        return {"means": r.normal(size=(n, 3)).astype(np.float32), "quats": r.normal(size=(n, 4)).astype(np.float32),
                "scales": r.uniform(1e-3, 0.05, (n, 3)).astype(np.float32),
                "opacities": r.uniform(0, 1, n).astype(np.float32), "colors": r.uniform(0, 1, (n, 3)).astype(np.float32)}

    def step(self) -> AvatarBuffer:
        keep = self.rng.random(self.ids.size) >= self.prune
        self.ids, self.vals = self.ids[keep], {k: v[keep] for k, v in self.vals.items()}
        changed = self.rng.random(self.ids.size) < self.change
        fresh = self._values(int(changed.sum()))
        for k in self.vals:
            self.vals[k][changed] = fresh[k]
        new = self._values(self.grow)
        self.ids = np.concatenate([self.ids, np.arange(self.next_id, self.next_id + self.grow)])
        self.next_id += self.grow
        self.vals = {k: np.concatenate([self.vals[k], new[k]]) for k in self.vals}
        self.buffer.assign(self.ids, self.vals, self.buffer.version + 1)
        return self.buffer


async def start_child(pub: AvatarPublisher, server: ControlServer, session: str, final: int, out: Path,
                      go: Path | None = None) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, pub.endpoint, server.endpoint, session, str(final), str(out), str(go or "-"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    line = await asyncio.wait_for(proc.stdout.readline(), 10)
    if line.strip() != b"ready":
        proc.kill()
        err = await proc.stderr.read()
        raise AssertionError(f"subscriber process failed: {line!r} {err.decode()[-2000:]}")
    return proc


async def finish_child(proc: asyncio.subprocess.Process) -> dict:
    out, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, err.decode()[-2000:]
    return json.loads(out.decode().strip().splitlines()[-1])


def assert_same_avatar(npz_path: Path, buffer: AvatarBuffer) -> None:
    got = np.load(npz_path)
    assert np.array_equal(got["ids"], buffer.ids)
    for name, a in buffer.fields.items():
        assert got[name].dtype == a.dtype and np.array_equal(got[name].view(np.uint8), a.view(np.uint8)), name
    live = buffer.live_arrays()
    assert np.array_equal(got["live_ids"], live["ids"]) and np.array_equal(got["live_means"], live["means"])


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_subscriber_process_rebuilds_the_publishers_avatar_and_late_joiners_get_the_snapshot(tmp_path):
    async def scenario() -> None:
        pub = AvatarPublisher(ANY_PORT)
        server = ControlServer(publisher_handler(pub), ANY_PORT)
        serving = asyncio.ensure_future(server.serve())
        avatar = Avatar("s1")
        other = Avatar("s2", seed=9)
        try:
            for _ in range(3):  # versions published before anyone listens
                pub.publish(avatar.step())
                pub.publish(other.step())
            proc = await start_child(pub, server, "s1", 12, tmp_path / "sub.npz")
            for _ in range(9):
                pub.publish(avatar.step(), t_capture=time.time())
                pub.publish(other.step())  # another session on the same socket is filtered out
                await asyncio.sleep(0.03)
            report = await finish_child(proc)
            assert report["seen"][0] == [3, "snapshot"]  # late joiner: the current state first
            versions = [v for v, _ in report["seen"]]
            assert versions == sorted(set(versions)) and versions[-1] == 12
            assert any(kind == "delta" for _, kind in report["seen"][1:])
            assert not report["torch"] and not report["engine"]
            assert_same_avatar(tmp_path / "sub.npz", avatar.buffer)

            # a subscriber joining after the last version gets exactly that state
            def late() -> tuple:
                with AvatarSubscriber(pub.endpoint, server.endpoint, session="s2") as sub:
                    state = sub.next_version(timeout=5)
                    return state, sub.buffer("s2").copy()

            state, held = await asyncio.wait_for(asyncio.to_thread(late), 10)
            assert state.kind == "snapshot" and state.version == other.buffer.version == 12
            assert held.equals(other.buffer)
        finally:
            serving.cancel()
            server.close()
            pub.close()

    asyncio.run(scenario())


def test_a_subscriber_that_stops_reading_neither_blocks_nor_grows_the_publisher(tmp_path):
    async def scenario() -> dict:
        pub = AvatarPublisher(ANY_PORT, sndhwm=4)
        server = ControlServer(publisher_handler(pub), ANY_PORT)
        serving = asyncio.ensure_future(server.serve())
        avatar = Avatar("live", grow=3000, change=1.0, prune=0.0)
        avatar.step()
        avatar.grow = 0  # from now on every version rewrites all 3000 Gaussians: ~180 kB per delta
        try:
            pub.publish(avatar.buffer)
            n_versions = 450
            final = avatar.buffer.version + n_versions + 20
            go = tmp_path / "go"
            proc = await start_child(pub, server, "live", final, tmp_path / "slow.npz", go=go)
            for _ in range(20):  # warm up allocations before measuring
                pub.publish(avatar.step())
            rss0 = rss_bytes()
            worst, total, sent_bytes = 0.0, 0.0, pub.stats.bytes_sent
            t_start = time.perf_counter()
            while avatar.buffer.version < final:
                buf = avatar.step()
                t0 = time.perf_counter()
                pub.publish(buf)
                dt = time.perf_counter() - t0
                worst, total = max(worst, dt), total + dt
                if buf.version % 100 == 0:
                    await asyncio.sleep(0)
            wall = time.perf_counter() - t_start
            growth = rss_bytes() - rss0
            offered = pub.stats.bytes_sent - sent_bytes
            go.touch()
            report = await finish_child(proc)
            assert_same_avatar(tmp_path / "slow.npz", avatar.buffer)
            return {"report": report, "worst": worst, "mean": total / n_versions, "growth": growth,
                    "offered": offered, "wall": wall}
        finally:
            serving.cancel()
            server.close()
            pub.close()

    r = asyncio.run(scenario())
    print(f"\nstalled subscriber: {r['offered'] / 1e6:.0f} MB offered in {r['wall']:.2f} s, publish mean "
          f"{r['mean'] * 1e3:.2f} ms worst {r['worst'] * 1e3:.1f} ms, publisher RSS growth {r['growth'] / 1e6:.1f} MB, "
          f"subscriber gaps {r['report']['gaps']} resyncs {r['report']['resyncs']} snapshots {r['report']['snapshots']} "
          f"versions seen {len(r['report']['seen'])}")
    assert r["offered"] > 75e6  # a backlog would have been this big
    assert r["growth"] < 40e6  # bounded by SNDHWM, not by what was published
    # diff + encode included; a blocking send would wait for the stalled subscriber (until `go`)
    assert r["worst"] < 0.5 and r["mean"] < 0.05
    # the stalled subscriber skipped the backlog: it resynchronised from a snapshot to the newest state
    assert r["report"]["gaps"] + r["report"]["resyncs"] >= 1 and r["report"]["snapshots"] >= 2
    assert r["report"]["seen"][-1] == [r["report"]["seen"][-1][0], "snapshot"]
    assert len(r["report"]["seen"]) < 100


def test_malformed_control_requests_get_error_replies_and_the_server_keeps_serving():
    calls: list[ControlRequest] = []

    def handler(request: ControlRequest):
        calls.append(request)
        if request.command == "start":
            if request.args["source"] == "boom":
                raise RuntimeError("engine exploded")
            return {"session": "new-1", "options": request.args.get("options", {})}
        if request.command == "stop":
            raise KeyError(f"unknown session {request.args['session']!r}")
        return {"sessions": []}

    async def scenario() -> None:
        ctx = zmq.asyncio.Context()
        server = ControlServer(handler, ANY_PORT, max_request_bytes=4096)
        serving = asyncio.ensure_future(server.serve())
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(server.endpoint)

        async def ask(*frames: bytes) -> dict:
            await dealer.send_multipart(list(frames))
            reply = await asyncio.wait_for(dealer.recv_multipart(), 5)
            return msgpack.unpackb(reply[0], raw=False)

        try:
            bad = [
                (b"\xc1\xc1not msgpack", "not valid msgpack"),
                (msgpack.packb([1, 2, 3]), "must be a msgpack map"),
                (msgpack.packb({"command": "format_disk"}), "unknown command"),
                (msgpack.packb({"nocommand": 1}), "unknown command"),
                (encode_request("snapshot", {}), "missing argument 'session'"),
                (encode_request("snapshot", {"session": 5}), "must be str"),
                (encode_request("list", {"extra": 1}), "unexpected arguments"),
                (encode_request("start", {"source": "boom"}), "internal error"),
                (encode_request("stop", {"session": "nope"}), "unknown session 'nope'"),
            ]
            for frame, expected in bad:
                reply = await ask(frame)
                assert reply["ok"] is False and expected in reply["error"], (frame, reply)
            reply = await ask(b"a", b"b")
            assert reply["ok"] is False and "one frame" in reply["error"]
            # an oversized request: libzmq drops that peer; the server still answers everyone else
            big = ctx.socket(zmq.DEALER)
            big.setsockopt(zmq.LINGER, 0)
            big.connect(server.endpoint)
            await big.send(b"\x00" * 100_000)
            big.close()
            reply = await ask(encode_request("start", {"source": "cam0", "options": {"fps": 25}}, request_id=7))
            assert reply == {"v": 1, "id": 7, "ok": True, "message": False,
                             "result": {"session": "new-1", "options": {"fps": 25}}}
            # a REQ peer works too
            req = ctx.socket(zmq.REQ)
            req.setsockopt(zmq.LINGER, 0)
            req.connect(server.endpoint)
            await req.send(encode_request("list"))
            got = decode_reply(await asyncio.wait_for(req.recv_multipart(), 5))
            assert got.ok and got.result == {"sessions": []}
            req.close()
            assert server.errors == len(bad) + 1 and not serving.done()
        finally:
            serving.cancel()
            dealer.close()
            server.close()
            ctx.term()

    asyncio.run(scenario())


def test_subscriber_request_api_and_snapshot_of_unknown_session():
    async def scenario() -> None:
        pub = AvatarPublisher(ANY_PORT)
        server = ControlServer(publisher_handler(pub), ANY_PORT)
        serving = asyncio.ensure_future(server.serve())
        avatar = Avatar("a")
        pub.publish(avatar.step())

        def client() -> tuple:
            with AvatarSubscriber(pub.endpoint, server.endpoint) as sub:
                listed = sub.request("list")
                missing = sub.request({"command": "snapshot", "session": "zzz"})
                snap = sub.request("snapshot", session="a")
                first = sub.next_version(timeout=5)  # session=None: finds "a" through `list`
                try:
                    sub.next_version(timeout=0.3)
                    timed_out = False
                except TimeoutError:
                    timed_out = True
                return listed, missing, snap, first, timed_out

        try:
            listed, missing, snap, first, timed_out = await asyncio.wait_for(asyncio.to_thread(client), 10)
        finally:
            serving.cancel()
            server.close()
            pub.close()
        assert listed.ok and listed.result == {"sessions": [{"session": "a", "version": 1}]}
        assert not missing.ok and "unknown session 'zzz'" in missing.error
        assert snap.ok and isinstance(snap.message, Message) and snap.message.version == 1
        assert first.session == "a" and first.version == 1 and first.arrays["means"].shape == (40, 3)
        assert timed_out

    asyncio.run(scenario())


def test_publisher_binds_loopback_and_reports_bad_endpoints():
    from protocols.errors import ProtocolError

    with AvatarPublisher(ANY_PORT) as pub:
        assert pub.endpoint.startswith("tcp://127.0.0.1:")
        with pytest.raises(ProtocolError, match="cannot bind"):
            AvatarPublisher(pub.endpoint)


def test_subscribe_command_writes_a_ply_per_version_and_fails_cleanly_without_a_daemon(tmp_path):
    from protocols.ply import load_ply

    async def scenario() -> tuple:
        pub = AvatarPublisher(ANY_PORT)
        server = ControlServer(publisher_handler(pub), ANY_PORT)
        serving = asyncio.ensure_future(server.serve())
        avatar = Avatar("cli")
        snapshots: dict[int, dict] = {}
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "fastavatar_stream", "subscribe", "--connect", pub.endpoint, "--control",
                server.endpoint, "--out", str(tmp_path / "out"), "--count", "3", "--timeout", "8",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            communicate = asyncio.ensure_future(proc.communicate())
            while not communicate.done():
                buf = avatar.step()
                pub.publish(buf)
                snapshots[buf.version] = buf.live_arrays()
                await asyncio.wait([communicate], timeout=0.15)
            out, err = communicate.result()
            return proc.returncode, out.decode(), err.decode(), snapshots
        finally:
            serving.cancel()
            server.close()
            pub.close()

    rc, out, err, published = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert rc == 0, err
    lines = [line for line in out.splitlines() if line.startswith("session=cli")]
    files = sorted((tmp_path / "out").glob("v*.ply"), key=lambda p: int(p.stem[1:]))
    assert len(lines) == 3 and len(files) == 3
    for path in files:
        got, want = load_ply(path), published[int(path.stem[1:])]
        assert np.array_equal(got["means"], want["means"])
        np.testing.assert_allclose(got["opacities"], want["opacities"], rtol=1e-5, atol=1e-6)

    import subprocess

    done = subprocess.run([sys.executable, "-m", "fastavatar_stream", "subscribe", "--connect", "tcp://127.0.0.1:9",
                           "--control", "tcp://127.0.0.1:9", "--out", str(tmp_path / "none"), "--timeout", "0.3"],
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "no avatar version arrived within 0.3 s" in done.stderr


def test_a_subscriber_whose_last_deltas_were_dropped_resyncs_when_the_publisher_goes_quiet():
    """No later delta will reveal the gap: the idle `list` check sees the newer version and fetches it."""

    async def scenario() -> None:
        heard = AvatarPublisher(ANY_PORT)  # the PUB the subscriber listens to
        lost = AvatarPublisher(ANY_PORT)  # same avatar, but its deltas never reach the subscriber
        server = ControlServer(publisher_handler(lost), ANY_PORT)
        serving = asyncio.ensure_future(server.serve())
        avatar = Avatar("q")
        lost.publish(avatar.step())

        def client() -> list:
            with AvatarSubscriber(heard.endpoint, server.endpoint, session="q", idle_check_s=0.2) as sub:
                first = sub.next_version(timeout=5)
                future = asyncio.run_coroutine_threadsafe(publish_more(), loop)
                future.result(5)
                second = sub.next_version(timeout=5)
                return [first.version, second.version, second.kind, sub.stats.resyncs, sub.buffer("q").copy()]

        async def publish_more() -> None:
            lost.publish(avatar.step())
            lost.publish(avatar.step())

        loop = asyncio.get_running_loop()
        try:
            v1, v3, kind, resyncs, held = await asyncio.wait_for(asyncio.to_thread(client), 10)
        finally:
            serving.cancel()
            server.close()
            heard.close()
            lost.close()
        assert (v1, v3, kind, resyncs) == (1, 3, "snapshot", 1)
        assert held.equals(avatar.buffer)

    asyncio.run(scenario())
