"""WebRTC capture and avatar delivery with two real aiortc peers on loopback (no browser).

The server side is `fastavatar_stream.webrtc_server` in front of a stand-in hub (tests/fake_hub.py)
whose avatar grows with the frames it receives; the client is `fastavatar_stream.webrtc_client`.
"""
from __future__ import annotations

import asyncio
import fractions
import json
import sys
from pathlib import Path

import av
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_hub import FakeHub  # noqa: E402

from fastavatar_stream.webrtc_client import AvatarReceiver, run_client  # noqa: E402
from fastavatar_stream.webrtc_server import WEBRTC_KEY, ServerConfig, start_http  # noqa: E402
from protocols.avatar_buffer import AvatarBuffer  # noqa: E402
from protocols.errors import ProtocolError  # noqa: E402
from protocols.webrtc import (DataChannelSender, LatestFrameRelay, PacedChannel, loopback_ice,  # noqa: E402
                              make_rtc_config, parse_control, validate_offer)

N_FRAMES, SIZE, FPS = 30, 96, 15


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """A 2 s 96x96 H.264 clip whose frames differ (so the encoder sends every one)."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        for i in range(N_FRAMES):
            img = np.zeros((SIZE, SIZE, 3), np.uint8)
            img[..., 0] = i * 8
            img[: i * 3, :, 1] = 200
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


async def _serve(hub, **config):
    runner = await start_http(hub, "127.0.0.1", 0, ServerConfig(**config))
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def _post(url: str, body) -> tuple[int, dict]:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        async with http.post(url + "/offer", data=data, headers={"Content-Type": "application/json"}) as resp:
            return resp.status, await resp.json(content_type=None)


async def _offer(*, video: bool = True, channel: bool = True):
    """A real aiortc offer (the caller closes the returned peer connection)."""
    from aiortc import RTCPeerConnection, VideoStreamTrack

    pc = RTCPeerConnection(make_rtc_config())
    if video:
        pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
    if channel:
        pc.createDataChannel("avatar")
    if not video:
        pc.addTransceiver("audio", direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, {"type": "offer", "sdp": pc.localDescription.sdp}


# ----- end to end -----------------------------------------------------------------------------------
def test_clip_as_camera_track_yields_the_hubs_avatar_and_bad_offers_get_400(clip):
    hub = FakeHub(frames_per_version=3, gaussians_per_frame=40)

    async def scenario():
        with loopback_ice():
            runner, url = await _serve(hub)
            try:
                # garbage first: each gets a clear 400 and the server keeps serving
                bad = [await _post(url, b"{not json"),
                       await _post(url, {"type": "offer", "sdp": "hello"}),
                       await _post(url, {"type": "offer", "sdp": "v=0\r\no=- x\r\nm=video nonsense\r\n"}),
                       await _post(url, {"type": "answer", "sdp": "v=0"})]
                pc, no_video = await _offer(video=False)
                bad.append(await _post(url, no_video))
                await pc.close()
                pc, no_channel = await _offer(channel=False)
                bad.append(await _post(url, no_channel))
                await pc.close()
                result = await run_client(clip, url, timeout=40, settle=1.5)
                await asyncio.sleep(0.3)  # the server sees the peer close
                return bad, result, dict(runner.app[WEBRTC_KEY].peers)
            finally:
                await runner.cleanup()

    bad, result, peers_after = asyncio.run(scenario())
    statuses = [status for status, _ in bad]
    errors = [body["error"] for _, body in bad]
    assert statuses == [400] * 6, bad
    assert "JSON" in errors[0]
    assert "malformed SDP" in errors[1] and "malformed SDP" in errors[2] or "no video" in errors[2]
    assert "'type' must be 'offer'" in errors[3]
    assert "no video" in errors[4]
    assert "no data channel" in errors[5]
    assert len(hub.sessions) == 1, "rejected offers must not open sessions"

    report = result.report()
    session = hub.sessions[result.session]
    assert result.frames_sent == N_FRAMES
    assert session.done, "the client's 'end' message lets the session finish"
    assert session.frames >= N_FRAMES - 3  # the last frame or two may still be in the encoder
    # the client holds exactly the avatar the hub holds: every slot, every bit
    assert result.buffer is not None and result.buffer.version == session.buffer.version
    assert result.buffer.equals(session.buffer)
    assert report["versions_received"] == session.buffer.version
    assert report["snapshots"] >= 1 and report["deltas"] >= 1 and report["gaps"] == 0
    assert report["malformed_messages"] == 0 and report["server_errors"] == []
    assert report["latency_ms"]["capture_to_receipt_p50"] is not None
    assert report["server_stats"]["frames"] == session.frames
    # frames reached the hub through the relay as RGB, timestamped by pts (seconds from the first)
    shapes = {shape for _, _, shape in hub.frame_log}
    assert shapes == {(SIZE, SIZE, 3)}
    pts = np.array([p for _, p, _ in hub.frame_log])
    assert pts[0] == 0.0 and np.all(np.diff(pts) > 0)
    assert abs(np.median(np.diff(pts)) - 1 / FPS) < 2e-3
    # the peer went away: its session was ended
    assert hub.closed == [result.session] and peers_after == {}


def test_invalid_channel_messages_get_errors_and_unconnected_peers_time_out():
    from aiortc import RTCPeerConnection, RTCSessionDescription, VideoStreamTrack

    hub = FakeHub()

    async def scenario():
        with loopback_ice():
            runner, url = await _serve(hub, ice_timeout=1.0, stats_interval=0.1)
            server = runner.app[WEBRTC_KEY]
            try:
                # a peer that sends an offer and then vanishes (never applies the answer: no ICE)
                ghost, offer = await _offer()
                status, body = await _post(url, offer)
                ghost_session = body.get("session")
                # a well-behaved peer that sends invalid messages on the data channel
                pc = RTCPeerConnection(make_rtc_config())
                pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
                channel = pc.createDataChannel("avatar")
                replies: list = []
                opened = asyncio.Event()
                channel.on("open", opened.set)
                channel.on("message", lambda m: isinstance(m, str) and replies.append(json.loads(m)))
                await pc.setLocalDescription(await pc.createOffer())
                _, answer = await _post(url, {"type": "offer", "sdp": pc.localDescription.sdp})
                await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
                await asyncio.wait_for(opened.wait(), 10)
                for bad in ("not json", json.dumps([1, 2]), json.dumps({"type": "launch"}), b"\x00\x01binary"):
                    channel.send(bad)
                channel.send(json.dumps({"type": "ping", "t": 7}))
                await asyncio.sleep(2.0)  # past the ghost's ICE timeout; the good peer keeps streaming
                state = (status, ghost_session, list(hub.closed), set(server.peers), answer["peer"],
                         pc.connectionState, hub.sessions[answer["session"]].buffer.version)
                await pc.close()
                await ghost.close()
                return state, replies
            finally:
                await runner.cleanup()

    (status, ghost_session, closed, peers, good_peer, good_state, good_version), replies = asyncio.run(scenario())
    assert status == 200
    assert closed == [ghost_session], "the peer that never connected is closed and its session ended"
    assert peers == {good_peer} and good_state == "connected"
    errors = [r["error"] for r in replies if r["type"] == "error"]
    assert len(errors) == 4
    assert "not JSON" in errors[0] and "JSON object" in errors[1] and "unknown control message type 'launch'" in errors[2]
    assert "binary messages" in errors[3]
    assert {"type": "pong", "t": 7} in replies
    assert any(r["type"] == "stats" and r["frames"] > 0 for r in replies)
    assert good_version >= 1, "the session kept running after the bad messages"


# ----- units --------------------------------------------------------------------------------------
def _video_frame(pts: int, value: int = 0, size: tuple[int, int] = (8, 6)) -> av.VideoFrame:
    frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), value, np.uint8), format="rgb24")
    frame.pts = pts
    frame.time_base = fractions.Fraction(1, 90_000)
    return frame


def test_relay_keeps_only_the_newest_frame_and_counts_drops():
    async def scenario():
        relay = LatestFrameRelay(max_pixels=32)
        for i in range(5):  # nobody reads: each new frame replaces the previous one
            relay.put(_video_frame(90_000 + 3000 * i, value=10 * i))
        first = await relay.next()
        relay.put(_video_frame(90_000 + 3000 * 5, value=50))
        relay.end()
        second = await relay.next()
        return relay, first, second, await relay.next()

    relay, first, second, after_end = asyncio.run(scenario())
    assert relay.dropped == 4 and relay.received == 6 and relay.delivered == 2
    assert first.index == 4 and first.pts == pytest.approx(4 * 3000 / 90_000) and first.image[0, 0, 0] == 40
    assert first.image.shape[0] * first.image.shape[1] <= 32, "frames above max_pixels are scaled down"
    assert second.index == 5 and second.pts == pytest.approx(5 / 30)
    assert after_end is None


class _SlowChannel:
    readyState = "open"

    def __init__(self) -> None:
        self.bufferedAmount = 0
        self.sent: list = []

    def send(self, data) -> None:
        self.sent.append(data)
        self.bufferedAmount += len(data)


def test_sender_conflates_under_back_pressure_and_the_receiver_matches():
    from fake_hub import fake_avatar

    channel = _SlowChannel()
    sender = DataChannelSender(channel, max_buffered=1000)
    receiver = AvatarReceiver()
    hub_buffer = AvatarBuffer("s")

    def deliver() -> None:
        for chunk in channel.sent:
            if isinstance(chunk, bytes):
                receiver.feed(chunk)
        channel.sent.clear()
        channel.bufferedAmount = 0

    results = []
    for version in range(1, 8):  # an avatar that only grows: deltas stay far smaller than snapshots
        ids, arrays = fake_avatar(1000 + 20 * version, 1)
        hub_buffer.assign(ids, arrays, version)
        results.append(sender.publish(hub_buffer, t_capture=1.0))
        if version in (1, 6):  # the peer only drains its buffer twice
            deliver()
    # v1 goes out and is drained; v2 fills the buffer; v3..v6 are skipped; v7 carries v3..v7 as one delta
    assert results == [True, True, False, False, False, False, True]
    assert sender.stats.skipped == 4 and sender.stats.snapshots == 1 and sender.stats.deltas == 2
    assert sender.flush() is False  # nothing newer to send
    deliver()
    assert [(r.kind, r.version) for r in receiver.received] == [("snapshot", 1), ("delta", 2), ("delta", 7)]
    assert receiver.buffer.equals(hub_buffer)
    # a state skipped while the buffer was full is flushed when it drains, without a new version
    ids, arrays = fake_avatar(400, 8)
    channel.bufferedAmount = 5000
    hub_buffer.assign(ids, arrays, 8)
    assert sender.publish(hub_buffer) is False
    channel.bufferedAmount = 0
    assert sender.flush() is True
    deliver()
    assert receiver.buffer.version == 8 and receiver.buffer.equals(hub_buffer)
    # a snapshot on request
    sender.request_snapshot()
    deliver()
    assert receiver.received[-1].kind == "snapshot" and receiver.buffer.equals(hub_buffer)


async def _motion_position_behind_a_megabyte(paced: bool) -> tuple[int, list[int]]:
    """Two real aiortc peers on loopback: 64 avatar chunks of 16 KiB, then one motion on the unordered,
    no-retransmit channel. Returns how many avatar chunks arrived before the motion, and their order."""
    from aiortc import RTCPeerConnection

    sender_pc, receiver_pc = RTCPeerConnection(make_rtc_config()), RTCPeerConnection(make_rtc_config())
    avatar = sender_pc.createDataChannel("avatar")
    motion = sender_pc.createDataChannel("motion", ordered=False, maxRetransmits=0)
    arrived: list = []
    done = asyncio.Event()

    @receiver_pc.on("datachannel")
    def on_channel(channel) -> None:
        @channel.on("message")
        def on_message(data) -> None:
            arrived.append("motion" if channel.label == "motion" else int.from_bytes(data[:4], "big"))
            if len(arrived) == 65:
                done.set()

    try:
        await sender_pc.setLocalDescription(await sender_pc.createOffer())
        await receiver_pc.setRemoteDescription(sender_pc.localDescription)
        await receiver_pc.setLocalDescription(await receiver_pc.createAnswer())
        await sender_pc.setRemoteDescription(receiver_pc.localDescription)
        for _ in range(500):
            if avatar.readyState == "open" and motion.readyState == "open":
                break
            await asyncio.sleep(0.01)
        motion.send(b"warm-up")  # the receiver learns both channels before the measured burst
        await asyncio.sleep(0.3)
        arrived.clear()
        out = PacedChannel(avatar) if paced else avatar
        for i in range(64):
            out.send(i.to_bytes(4, "big") + bytes(16 * 1024 - 4))
        motion.send(b"pose")
        await asyncio.wait_for(done.wait(), 20)
    finally:
        await sender_pc.close()
        await receiver_pc.close()
    position = arrived.index("motion")
    return position, [a for a in arrived if a != "motion"]


def test_a_motion_overtakes_the_avatar_megabyte_sent_before_it_on_a_paced_channel():
    with loopback_ice():
        bare_position, bare_order = asyncio.run(_motion_position_behind_a_megabyte(paced=False))
        paced_position, paced_order = asyncio.run(_motion_position_behind_a_megabyte(paced=True))
    # aiortc sends the messages of all channels of a connection in one queue: on the bare channel the motion
    # leaves after (nearly) the whole megabyte
    assert bare_position >= 56
    # paced, at most the 16 KiB window (and what is in flight) goes first; every chunk still arrives, in order
    assert paced_position <= 8
    assert paced_order == bare_order == list(range(64))


class _DrainableChannel(_SlowChannel):
    """A stand-in with aiortc's bufferedamountlow rule: fired when bufferedAmount falls to the threshold."""

    def __init__(self) -> None:
        super().__init__()
        self.bufferedAmountLowThreshold = 0
        self.handlers: dict[str, list] = {}

    def on(self, event, handler) -> None:
        self.handlers.setdefault(event, []).append(handler)

    def drain(self) -> None:
        was = self.bufferedAmount
        self.bufferedAmount = 0
        if was > self.bufferedAmountLowThreshold:
            for handler in self.handlers.get("bufferedamountlow", []):
                handler()


def test_a_paced_channel_reports_what_waits_so_conflation_still_sees_back_pressure():
    channel = _DrainableChannel()
    paced = PacedChannel(channel, window=4096)
    low = []
    paced.bufferedAmountLowThreshold = 1000
    paced.on("bufferedamountlow", lambda: low.append(paced.bufferedAmount))
    for _ in range(10):
        paced.send(bytes(1024))
    assert channel.bufferedAmount == 4096, "only the window enters the connection"
    assert paced.bufferedAmount == 10 * 1024, "what waits here counts as buffered"
    channel.drain()
    assert channel.bufferedAmount == 4096 and paced.bufferedAmount == 6 * 1024 and low == []
    channel.drain()
    channel.drain()
    assert paced.bufferedAmount == 0 and low == [0], "low once, when everything has left"
    assert sum(len(d) for d in channel.sent) == 10 * 1024


def test_control_messages_and_offer_validation_say_what_is_wrong():
    assert parse_control('{"type": "snapshot"}') == {"type": "snapshot"}
    assert parse_control('{"type": "ping", "t": 1.5}')["t"] == 1.5
    for bad, text in [(b"{}", "binary"), ("[]", "JSON object"), ('{"type": "ping", "t": "x"}', "optional number"),
                      ('{"type": "end", "now": 1}', "no arguments"), ("x" * 5000, "limit")]:
        with pytest.raises(ProtocolError, match=text):
            parse_control(bad)
    for body, text in [([], "JSON object"), ({"type": "offer"}, "non-empty string"),
                       ({"type": "offer", "sdp": "garbage"}, "v=0"),
                       ({"type": "offer", "sdp": "v=0\r\n" + "a=x\r\n" * 20000}, "limit")]:
        with pytest.raises(ProtocolError, match=text):
            validate_offer(body)


# ----- CLI ----------------------------------------------------------------------------------------
class _ServerThread:
    """The server + fake hub on their own event loop in a thread, so the CLI can run asyncio.run."""

    def __init__(self, hub) -> None:
        import threading

        self.hub = hub
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.runner = self.loop.run_until_complete(start_http(self.hub, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        self.ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_webrtc_send_cli_writes_the_last_avatar_and_a_report(clip, tmp_path, capsys):
    from fastavatar_stream.cli import main
    from protocols.ply import load_ply

    hub = FakeHub(frames_per_version=4, gaussians_per_frame=30)
    with loopback_ice():
        server = _ServerThread(hub)
        try:
            code = main(["webrtc-send", str(clip), "--url", server.url, "--out", str(tmp_path / "out"),
                         "--timeout", "40", "--settle", "1.5"])
        finally:
            server.stop()
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    session = hub.sessions[report["session"]]
    assert report["frames_sent"] == N_FRAMES
    assert report["versions_received"] == report["last_version"] == session.buffer.version
    assert report["latency_ms"]["capture_to_receipt_p95"] >= report["latency_ms"]["capture_to_receipt_p50"] > 0
    ply = load_ply(tmp_path / "out" / "avatar.ply")
    live = session.buffer.live_arrays()
    np.testing.assert_array_equal(ply["means"], live["means"])
    np.testing.assert_allclose(ply["colors"], live["colors"], atol=1e-6)


@pytest.mark.parametrize("argv, text", [
    (["webrtc-send", "missing.mp4", "--url", "http://127.0.0.1:9"], "video file not found"),
    (["webrtc-send", "{clip}", "--url", "ftp://x"], "not an http(s) address"),
    (["webrtc-send", "{clip}", "--url", "http://127.0.0.1:9", "--timeout", "0"], "--timeout"),
    (["webrtc-send", "{clip}", "--url", "http://127.0.0.1:9"], "cannot reach http://127.0.0.1:9/offer"),
])
def test_webrtc_send_cli_bad_input_exits_2_with_one_line(clip, tmp_path, capsys, argv, text):
    from fastavatar_stream.cli import main

    argv = [a.replace("{clip}", str(clip)) for a in argv] + ["--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and text in err, err
