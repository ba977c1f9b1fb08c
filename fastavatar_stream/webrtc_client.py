"""A Python WebRTC peer for the daemon: sends a video file as a camera track, receives the avatar.

For tests, benchmarks and people without a browser. `run_client(video, url)` opens a peer
connection to `url`'s `POST /offer` with one send-only video track (the file's frames paced by
their pts, like a camera) and a data channel; avatar messages arriving on the channel are
reassembled (`protocols.chunking`), decoded and applied to an `AvatarBuffer` exactly like the
browser page does; the avatar's rig arrives on that channel too, and motions on a second, unordered
channel without retransmits ("motion"), like the page's. It returns when the clip has been sent and nothing new arrived for `settle`
seconds, or at `timeout`.
"""
from __future__ import annotations

import asyncio
import fractions
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastavatar_stream.errors import UserError
from fastavatar_stream.sources import VideoFileSource
from protocols.avatar_buffer import AvatarBuffer
from protocols.chunking import Reassembler
from protocols.errors import ProtocolError
from protocols.animation import Motion, Rig, decode_motion
from protocols.webrtc import DATA_CHANNEL_LABEL, MOTION_CHANNEL_LABEL, make_rtc_config
from protocols.wire import Message, decode

log = logging.getLogger(__name__)

VIDEO_CLOCK = 90_000
_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK)


def _media_track_base():
    from aiortc import MediaStreamTrack

    return MediaStreamTrack


class VideoFileTrack(_media_track_base()):
    """A video file as an aiortc camera track: frames paced by pts, 90 kHz timestamps.

    Decoding runs on the source's own worker thread; `frames_sent` counts frames handed to the
    encoder. The track ends (recv raises MediaStreamError) at the end of the file.
    """

    kind = "video"

    def __init__(self, path: str | Path, realtime: bool = True, max_frames: int | None = None) -> None:
        super().__init__()
        self.source = VideoFileSource(path, realtime=realtime)
        self.max_frames = max_frames
        self.frames_sent = 0
        self.finished = asyncio.Event()
        self._frames = self.source.aiter()

    async def recv(self):
        import av
        from aiortc.mediastreams import MediaStreamError

        if self.readyState != "live" or (self.max_frames is not None and self.frames_sent >= self.max_frames):
            self._end()
            raise MediaStreamError
        try:
            frame = await self._frames.__anext__()
        except StopAsyncIteration:
            self._end()
            raise MediaStreamError from None
        video = av.VideoFrame.from_ndarray(frame.image, format="rgb24")
        video.pts = int(round(frame.pts * VIDEO_CLOCK))
        video.time_base = _TIME_BASE
        self.frames_sent += 1
        return video

    def _end(self) -> None:
        self.finished.set()
        self.stop()

    def stop(self) -> None:
        self.finished.set()
        super().stop()

    async def aclose(self) -> None:
        """Stop and release the decoder (its worker thread and file)."""
        self.stop()
        await self._frames.aclose()


@dataclass
class Received:
    """One applied avatar message as seen by the client."""

    kind: str
    version: int
    seq: int
    t_capture: float
    t_publish: float
    t_received: float
    gaussians: int
    nbytes: int


class AvatarReceiver:
    """Data-channel bytes -> avatar: chunk reassembly, decoding, snapshot/delta application.

    `feed(data)` takes one binary channel message and returns the applied `Message` when it completed
    one. A delta that does not fit the held version is dropped and `needs_snapshot` is set (the
    caller asks the server for a snapshot). Text messages go to `feed_text` (stats, errors).
    """

    def __init__(self) -> None:
        self.reassembler = Reassembler()
        self.buffer: AvatarBuffer | None = None
        self.received: list[Received] = []
        self.malformed = 0
        self.gaps = 0
        self.needs_snapshot = False
        self.stats: dict[str, Any] = {}
        self.errors: list[str] = []
        self.last_activity = time.monotonic()
        self.rig: Rig | None = None
        self.rigs = 0
        self.motions: list[tuple[Motion, float, int]] = []  # (motion, t_received, bytes)

    def feed(self, data: bytes) -> Message | None:
        self.last_activity = time.monotonic()
        try:
            frames = self.reassembler.feed(data)
            if frames is None:
                return None
            msg = decode(frames)
        except ProtocolError as exc:
            self.malformed += 1
            log.warning("malformed avatar message: %s", exc)
            return None
        if msg.type == "rig":
            self.rig = Rig.from_message(msg)
            self.rigs += 1
            return msg
        if msg.type == "snapshot":
            self.buffer = AvatarBuffer.from_snapshot(msg)
            self.needs_snapshot = False
        elif self.buffer is None or msg.base_version != self.buffer.version or msg.session != self.buffer.session:
            self.gaps += 1
            self.needs_snapshot = True
            return None
        else:
            self.buffer.apply(msg)
        self.received.append(Received(msg.type, msg.version, msg.seq, msg.t_capture, msg.t_publish, time.time(),
                                      self.buffer.n_live, msg.nbytes))
        return msg

    def feed_motion(self, data: bytes) -> Motion | None:
        """One message of the motion channel."""
        t_received = time.time()
        try:
            motion = decode_motion(data)
        except ProtocolError as exc:
            self.malformed += 1
            log.warning("malformed motion: %s", exc)
            return None
        self.motions.append((motion, t_received, len(data)))
        return motion

    def feed_text(self, text: str) -> None:
        try:
            body = json.loads(text)
        except ValueError:
            self.malformed += 1
            return
        if not isinstance(body, dict):
            self.malformed += 1
        elif body.get("type") == "stats":
            stats = {k: v for k, v in body.items() if k != "type"}
            if stats != self.stats:  # periodic stats count as activity only while something changes
                self.stats = stats
                self.last_activity = time.monotonic()
        elif body.get("type") == "error":
            self.errors.append(str(body.get("error")))
            log.warning("server says: %s", body.get("error"))


@dataclass
class ClientResult:
    """What one `run_client` call saw."""

    session: str | None
    frames_sent: int
    receiver: AvatarReceiver
    duration_s: float
    connection_state: str
    answer: dict = field(default_factory=dict)

    @property
    def buffer(self) -> AvatarBuffer | None:
        return self.receiver.buffer

    def report(self) -> dict[str, Any]:
        recv = self.receiver.received
        capture = [1e3 * (r.t_received - r.t_capture) for r in recv if r.t_capture > 0]
        publish = [1e3 * (r.t_received - r.t_publish) for r in recv if r.t_publish > 0]

        def pct(values: list[float], q: float) -> float | None:
            return round(float(np.percentile(values, q)), 2) if values else None

        buf = self.receiver.buffer
        motions = self.receiver.motions
        motion_ms = [1e3 * (t - m.t_capture) for m, t, _ in motions if m.t_capture > 0]
        frames = [m.frame for m, _, _ in motions]
        return {
            "session": self.session,
            "versions_received": len(recv),
            "last_version": buf.version if buf is not None else None,
            "gaussians": buf.n_live if buf is not None else 0,
            "frames_sent": self.frames_sent,
            "snapshots": sum(r.kind == "snapshot" for r in recv),
            "deltas": sum(r.kind == "delta" for r in recv),
            "bytes_received": sum(r.nbytes for r in recv),
            "latency_ms": {"capture_to_receipt_p50": pct(capture, 50), "capture_to_receipt_p95": pct(capture, 95),
                           "publish_to_receipt_p50": pct(publish, 50), "publish_to_receipt_p95": pct(publish, 95),
                           "samples": len(capture)},
            "rigs_received": self.receiver.rigs,
            "motion": {"received": len(motions), "bytes": sum(n for _, _, n in motions),
                       "out_of_order": sum(b < a for a, b in zip(frames, frames[1:])),
                       "capture_to_receipt_p50": pct(motion_ms, 50), "capture_to_receipt_p95": pct(motion_ms, 95)},
            "malformed_messages": self.receiver.malformed,
            "gaps": self.receiver.gaps,
            "server_errors": self.receiver.errors,
            "server_stats": self.receiver.stats,
            "duration_s": round(self.duration_s, 3),
            "connection_state": self.connection_state,
        }


async def post_offer(url: str, offer: dict, timeout: float = 30.0, token: str | None = None) -> dict:
    """POST an offer to `url` + /offer (with the daemon's `token` when it needs one); the answer dict, or
    UserError with the server's reason."""
    import aiohttp

    endpoint = url.rstrip("/") + "/offer"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            headers = {"X-Fastavatar-Token": token} if token else None
            async with http.post(endpoint, json=offer, headers=headers) as resp:
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = {}
                if resp.status != 200:
                    reason = body.get("error") if isinstance(body, dict) else None
                    raise UserError(f"{endpoint} refused the offer (HTTP {resp.status}): {reason or resp.reason}")
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise UserError(f"cannot reach {endpoint}: {exc.__class__.__name__}: {exc}; is the daemon serving "
                        "(fastavatar-stream serve --http HOST:PORT)?") from None
    if not isinstance(body, dict) or body.get("type") != "answer" or not isinstance(body.get("sdp"), str):
        raise UserError(f"{endpoint} did not answer with an SDP answer")
    return body


async def run_client(video: str | Path, url: str, *, timeout: float = 120.0, settle: float = 5.0,
                     realtime: bool = True, max_frames: int | None = None, rtc_config: Any = None,
                     receiver: AvatarReceiver | None = None, token: str | None = None) -> ClientResult:
    """Stream `video` to the server at `url` and collect the avatar until done (see module doc)."""
    from aiortc import RTCPeerConnection, RTCSessionDescription

    track = VideoFileTrack(video, realtime=realtime, max_frames=max_frames)
    receiver = receiver or AvatarReceiver()
    pc = RTCPeerConnection(rtc_config or make_rtc_config())
    t0 = time.monotonic()
    answer: dict = {}
    try:
        pc.addTransceiver(track, direction="sendonly")
        channel = pc.createDataChannel(DATA_CHANNEL_LABEL, ordered=True)
        motion_channel = pc.createDataChannel(MOTION_CHANNEL_LABEL, ordered=False, maxRetransmits=0)

        @motion_channel.on("message")
        def on_motion(data) -> None:
            if isinstance(data, bytes):
                receiver.feed_motion(data)

        @channel.on("message")
        def on_message(data) -> None:
            if isinstance(data, str):
                receiver.feed_text(data)
                return
            receiver.feed(data)
            if receiver.needs_snapshot and channel.readyState == "open":
                channel.send(json.dumps({"type": "snapshot"}))
                receiver.needs_snapshot = False

        @pc.on("connectionstatechange")
        def on_state() -> None:
            log.info("connection %s", pc.connectionState)

        await pc.setLocalDescription(await pc.createOffer())
        answer = await post_offer(url, {"type": pc.localDescription.type, "sdp": pc.localDescription.sdp},
                                  timeout=min(timeout, 30.0), token=token)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        deadline = t0 + timeout
        end_sent = False
        while time.monotonic() < deadline:
            if pc.connectionState in ("failed", "closed"):
                break
            if track.finished.is_set() and not end_sent and channel.readyState == "open":
                channel.send(json.dumps({"type": "end"}))  # let the session publish its final version
                end_sent = True
                receiver.last_activity = time.monotonic()
            if end_sent and time.monotonic() - receiver.last_activity >= settle:
                break
            await asyncio.sleep(0.05)
        else:
            log.info("stopping at the %.0f s timeout", timeout)
        state = pc.connectionState
    finally:
        await pc.close()
        await track.aclose()
    return ClientResult(answer.get("session"), track.frames_sent, receiver, time.monotonic() - t0, state, answer)
