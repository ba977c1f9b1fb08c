"""WebRTC pieces that need no daemon: the camera-frame relay, the avatar data-channel sender,
offer validation and ICE configuration (aiortc/aioice only; no torch, nothing of the engine).

Camera in: `LatestFrameRelay` reads an aiortc video track into a one-frame slot. A frame that
arrives before the previous one was taken replaces it (counted in `dropped`): the consumer always
gets the newest frame and memory never grows, however slow tracking is. Frames leave as RGB numpy
arrays (converted in a worker thread) with `pts` in seconds from the first frame of the track.

Avatar out: `DataChannelSender` sends the wire messages of `protocols.wire` (snapshot first, then
deltas from a per-peer `DeltaStream`) chunked to 16 KiB by `protocols.chunking`. Before each
message it looks at the channel's `bufferedAmount`: above `max_buffered` bytes the version is
skipped (counted) and the next send carries one conflated delta from the last state that really
left, so a slow browser gets the newest state, never a backlog. When the buffer drains
(`bufferedamountlow`) the skipped state is flushed, so the last version always arrives. The daemon wraps the
avatar channel in a `PacedChannel`, which lets its chunks into the peer connection 16 KiB at a time: aiortc sends
all channels of a connection through one queue, and a motion must not wait behind megabytes of avatar.

Animation out: `AnimationSender` sends the session's `rig` (a `protocols.wire` message, see
`protocols.animation`) on the avatar channel after the avatar messages, the newest one waiting while that
channel is above `max_buffered`; and every `motion` (one binary message of <= 512 bytes) on a second channel
the peer opens with the label "motion", unordered and with maxRetransmits 0, so a lost or late pose is never
resent nor queued: a motion that cannot leave at once (channel not open, or more than `motion_max_buffered`
bytes waiting) is dropped and counted.

Control from the peer (text messages on the same channel, JSON objects with a `type`):
    {"type": "snapshot"}   resend the whole avatar (the next message is a snapshot)
    {"type": "ping", "t": <number>}  answered by {"type": "pong", "t": <same>}
    {"type": "end"}        the camera stream is over (a file was sent): the session finishes its
                           last frames and publishes its final version; the channel stays open
Anything else is answered by {"type": "error", "error": "<why>"}; the peer stays connected.
Server -> peer text messages: {"type": "stats", ...}, {"type": "pong", ...}, {"type": "error", ...}.
"""
from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol

import numpy as np

from protocols.animation import Motion, Rig, encode_motion
from protocols.avatar_buffer import CORE_SPECS, AvatarBuffer, DeltaStream
from protocols.chunking import DEFAULT_CHUNK_BYTES, Chunker
from protocols.errors import ProtocolError
from protocols.wire import Limits, Message, encode

log = logging.getLogger(__name__)

DEFAULT_MAX_BUFFERED = 1024 * 1024
DEFAULT_MAX_FRAME_PIXELS = 4096 * 4096
MAX_SDP_BYTES = 64 * 1024
MAX_CONTROL_BYTES = 4 * 1024
DATA_CHANNEL_LABEL = "avatar"
MOTION_CHANNEL_LABEL = "motion"
DEFAULT_MOTION_MAX_BUFFERED = 4 * 1024
# bulk (avatar, rig) bytes let into the peer connection's send queue at once: what a motion may wait behind
DEFAULT_BULK_WINDOW = 16 * 1024


# ----- camera in ----------------------------------------------------------------------------------
@dataclass
class RelayFrame:
    """One camera frame taken from the relay.

    image:     (H, W, 3) uint8 RGB
    pts:       seconds since the first frame of the track (from the frame's pts * time_base)
    index:     number of frames received from the track before this one (gaps = dropped frames)
    t_capture: wall-clock time (time.time()) the frame arrived from the track
    """

    image: np.ndarray
    pts: float
    index: int
    t_capture: float


def frame_to_rgb(frame: Any, max_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> np.ndarray:
    """av.VideoFrame -> (H, W, 3) uint8 RGB; frames above `max_pixels` are scaled down (aspect kept)."""
    width, height = int(frame.width), int(frame.height)
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        width, height = max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)
        return frame.reformat(width=width, height=height, format="rgb24").to_ndarray()
    return frame.to_ndarray(format="rgb24")


def frame_seconds(frame: Any) -> float | None:
    """A frame's pts in seconds (pts * time_base), or None when it carries no timestamp."""
    if frame.pts is None or frame.time_base is None:
        return None
    return float(fractions.Fraction(frame.pts) * frame.time_base)


class LatestFrameRelay:
    """A one-frame slot between an aiortc video track and a (slower) consumer.

    `run(track)` (a task) receives frames until the track ends or `close()`; `next()` waits for a
    frame newer than the last one taken and returns it as a `RelayFrame`, or None once the track has
    ended and the slot is empty. A frame replacing one nobody took is counted in `dropped`.
    """

    def __init__(self, max_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> None:
        self.max_pixels = int(max_pixels)
        self.received = 0
        self.delivered = 0
        self.dropped = 0
        self.ended = False
        self.error: str | None = None
        self._slot: tuple[Any, float, int, float] | None = None  # (frame, pts seconds, index, t_capture)
        self._changed = asyncio.Event()
        self._pts0: float | None = None
        self._task: asyncio.Task | None = None

    def attach(self, track: Any) -> asyncio.Task:
        """Start reading `track` in a task owned by the relay (cancelled by `close()`)."""
        if self._task is not None:
            raise RuntimeError("the relay already reads a track")
        self._task = asyncio.ensure_future(self.run(track))
        return self._task

    async def run(self, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        try:
            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    break
                self.put(frame)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken track ends this relay, never the process
            self.error = f"{exc.__class__.__name__}: {exc}"
            log.warning("camera track failed: %s", self.error)
        finally:
            self.end()

    def put(self, frame: Any, t_capture: float | None = None) -> None:
        """Offer one decoded frame (av.VideoFrame): replaces an untaken one."""
        if self.ended:
            return
        seconds = frame_seconds(frame)
        if seconds is None:  # no timestamp: fall back to arrival time
            seconds = time.monotonic()
        if self._pts0 is None:
            self._pts0 = seconds
        if self._slot is not None:
            self.dropped += 1
        self._slot = (frame, seconds - self._pts0, self.received, time.time() if t_capture is None else t_capture)
        self.received += 1
        self._changed.set()

    def end(self) -> None:
        """No more frames will come (the frame in the slot can still be taken)."""
        self.ended = True
        self._changed.set()

    async def next(self) -> RelayFrame | None:
        while self._slot is None:
            if self.ended:
                return None
            self._changed.clear()
            await self._changed.wait()
        frame, pts, index, t_capture = self._slot
        self._slot = None
        image = await asyncio.to_thread(frame_to_rgb, frame, self.max_pixels)
        self.delivered += 1
        return RelayFrame(image=image, pts=pts, index=index, t_capture=t_capture)

    def close(self) -> None:
        """Stop reading the track and drop the slot; `next()` returns None from now on."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._slot = None
        self.end()

    @property
    def counters(self) -> dict[str, int]:
        return {"frames_received": self.received, "frames_delivered": self.delivered,
                "frames_dropped": self.dropped}


# ----- avatar out ----------------------------------------------------------------------------------
class Channel(Protocol):
    """What `DataChannelSender` needs of an aiortc RTCDataChannel (or a stand-in in tests)."""

    readyState: str
    bufferedAmount: int

    def send(self, data: bytes | str) -> None: ...


class PacedChannel:
    """A data channel that lets at most `window` bytes of its messages into the SCTP association at once.

    aiortc keeps one send queue for all data channels of a peer connection, first in first out: a motion sent
    after a 1 MB snapshot leaves after the whole snapshot. Here the avatar channel's chunks wait in a queue of
    their own and enter the association as it drains (on the channel's `bufferedamountlow`), so a motion waits
    behind at most `window` bytes. `bufferedAmount` counts both queues and "bufferedamountlow" fires when their
    sum falls to `bufferedAmountLowThreshold`, so `DataChannelSender`'s and `AnimationSender`'s conflation see
    the same back-pressure as on the bare channel. Other events and attributes pass through.
    """

    def __init__(self, channel: Any, window: int = DEFAULT_BULK_WINDOW) -> None:
        self.channel = channel
        self.window = int(window)
        self._queue: deque[bytes | str] = deque()
        self._queued = 0
        self._low_handlers: list[Callable[[], Any]] = []
        self._above_threshold = False
        self.bufferedAmountLowThreshold = 0
        channel.on("bufferedamountlow", self._pump)

    @property
    def bufferedAmountLowThreshold(self) -> int:
        return self._low_threshold

    @bufferedAmountLowThreshold.setter
    def bufferedAmountLowThreshold(self, value: int) -> None:
        # the channel wakes the pump at half the window, or lower when the sum must be watched further down
        self._low_threshold = int(value)
        self.channel.bufferedAmountLowThreshold = min(self.window // 2, max(self._low_threshold, 0))

    def __getattr__(self, name: str) -> Any:  # label, readyState, id, ... of the channel
        return getattr(self.channel, name)

    @property
    def bufferedAmount(self) -> int:
        return self._queued + self.channel.bufferedAmount

    def on(self, event: str, handler: Callable[..., Any] | None = None):
        if event != "bufferedamountlow":
            return self.channel.on(event, handler) if handler is not None else self.channel.on(event)
        if handler is None:
            return lambda f: self.on(event, f)
        self._low_handlers.append(handler)
        return handler

    def send(self, data: bytes | str) -> None:
        if getattr(self.channel, "readyState", "open") != "open":
            self.channel.send(data)  # raises what the channel raises
            return
        self._queue.append(data)
        self._queued += len(data)
        self._above_threshold |= self.bufferedAmount > self.bufferedAmountLowThreshold
        self._pump()

    def _pump(self) -> None:
        while self._queue and self.channel.bufferedAmount < self.window:
            if getattr(self.channel, "readyState", "open") != "open":
                self._queue.clear()
                self._queued = 0
                return
            data = self._queue.popleft()
            self._queued -= len(data)
            self.channel.send(data)
        if self._above_threshold and self.bufferedAmount <= self.bufferedAmountLowThreshold:
            self._above_threshold = False
            for handler in list(self._low_handlers):
                handler()


@dataclass
class SenderStats:
    messages: int = 0
    snapshots: int = 0
    deltas: int = 0
    chunks: int = 0
    bytes: int = 0
    skipped: int = 0
    control: int = 0
    control_errors: int = 0


def _header_safe(stats: Mapping[str, Any] | None) -> dict[str, Any]:
    """The scalar entries of a stats dict (what can travel in a message header)."""
    out: dict[str, Any] = {}
    for key, value in (stats or {}).items():
        if isinstance(key, str) and (value is None or isinstance(value, (bool, int, str))
                                     or (isinstance(value, float) and math.isfinite(value))):
            out[key] = value
    return out


class DataChannelSender:
    """Sends one session's avatar to one peer on a data channel, conflating under back-pressure.

    `publish(buffer, t_capture, stats)` is called on the event loop with the session's current
    `AvatarBuffer` after each new version. The first message (and any after `request_snapshot()`)
    is a snapshot; later ones are deltas against what the peer already holds. Returns True when a
    message went out, False when it was skipped (channel not open, or `bufferedAmount` above
    `max_buffered`); a skipped state is flushed by `flush()` or when the channel's buffer drains.
    """

    def __init__(self, channel: Channel, *, max_buffered: int = DEFAULT_MAX_BUFFERED,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, limits: Limits = Limits(),
                 on_end: Callable[[], None] | None = None) -> None:
        self.channel = channel
        self.on_end = on_end
        self.max_buffered = int(max_buffered)
        self.limits = limits
        self.stats = SenderStats()
        self._chunker = Chunker(chunk_bytes)
        self._stream: DeltaStream | None = None
        self._want_snapshot = True
        self._pending: tuple[AvatarBuffer, float, dict[str, Any]] | None = None
        if hasattr(channel, "on"):
            # the threshold below which aiortc emits "bufferedamountlow": flush a skipped state then
            channel.bufferedAmountLowThreshold = self.max_buffered // 2
            channel.on("bufferedamountlow", self.flush)
            channel.on("open", self.flush)

    @property
    def version(self) -> int | None:
        """The avatar version the peer holds once everything sent arrives (None before the first)."""
        return None if self._stream is None or self._want_snapshot else self._stream.last.version

    def request_snapshot(self) -> None:
        self._want_snapshot = True
        if self._stream is not None:
            self._pending = self._pending or (self._stream.last.copy(), self._stream.t_capture, {})
        self.flush()

    def publish(self, buffer: AvatarBuffer, t_capture: float = 0.0, stats: Mapping[str, Any] | None = None) -> bool:
        self._pending = (buffer, float(t_capture), _header_safe(stats))
        return self.flush()

    def flush(self) -> bool:
        """Send the newest state not yet sent, if the channel has room; True when something left."""
        if self._pending is None:
            return False
        if getattr(self.channel, "readyState", "open") != "open" or self.channel.bufferedAmount > self.max_buffered:
            self.stats.skipped += 1
            return False
        buffer, t_capture, stats = self._pending
        stream = self._stream
        if stream is not None and not self._want_snapshot and buffer.version == stream.last.version:
            self._pending = None  # the peer already holds this version
            return False
        if (stream is None or self._want_snapshot or buffer.session != stream.last.session
                or buffer.specs != stream.last.specs or buffer.n_slots < stream.last.n_slots
                or buffer.version < stream.last.version):
            msg = self._snapshot(buffer, t_capture, stats)
        else:
            msg = stream.next_delta(buffer, t_capture=t_capture, stats=stats)
            if msg.nbytes > buffer.n_slots * self._slot_bytes(buffer):  # cheaper as a snapshot
                msg = self._snapshot(buffer, t_capture, stats)
        self._send(msg)
        if msg.type == "snapshot":
            stream = self._stream = DeltaStream(buffer.session, buffer.specs[len(CORE_SPECS):], buffer.id_dtype.name)
            stream.last = buffer.copy()
            stream.seq = msg.seq
            stream.t_capture = msg.t_capture
            self._want_snapshot = False
            self.stats.snapshots += 1
        else:
            stream.sent(buffer, msg)
            self.stats.deltas += 1
        self._pending = None
        return True

    @staticmethod
    def _slot_bytes(buffer: AvatarBuffer) -> int:
        return buffer.id_dtype.itemsize + sum(s.dtype.itemsize * int(np.prod(s.shape, dtype=np.int64))
                                              for s in buffer.specs)

    def _snapshot(self, buffer: AvatarBuffer, t_capture: float, stats: dict[str, Any]) -> Message:
        seq = self._stream.seq if self._stream is not None else 0
        return buffer.snapshot(seq=seq, t_capture=t_capture, stats=stats)

    def _send(self, msg: Message) -> None:
        frames = encode(msg, self.limits)
        for chunk in self._chunker.chunks(frames):
            self.channel.send(chunk)
            self.stats.chunks += 1
            self.stats.bytes += len(chunk)
        self.stats.messages += 1

    def send_json(self, body: Mapping[str, Any]) -> bool:
        """Send a text control/stats message; False when the channel is not open."""
        if getattr(self.channel, "readyState", "open") != "open":
            return False
        self.channel.send(json.dumps(body, separators=(",", ":"), allow_nan=False, default=str))
        return True

    def handle_control(self, data: bytes | str) -> dict[str, Any] | None:
        """Handle one message from the peer; returns the reply sent (an error reply for bad input)."""
        self.stats.control += 1
        try:
            request = parse_control(data)
        except ProtocolError as exc:
            self.stats.control_errors += 1
            reply: dict[str, Any] = {"type": "error", "error": str(exc)}
            self.send_json(reply)
            return reply
        if request["type"] == "snapshot":
            self.request_snapshot()
            return None
        if request["type"] == "end":
            if self.on_end is not None:
                self.on_end()
            return None
        reply = {"type": "pong", "t": request.get("t")}
        self.send_json(reply)
        return reply


@dataclass
class AnimationStats:
    rigs: int = 0
    rig_bytes: int = 0
    rigs_waiting: int = 0     # rigs that waited for the avatar channel to drain
    motions: int = 0
    motion_bytes: int = 0
    motions_dropped: int = 0


class AnimationSender:
    """Rigs and motions of one session to one peer (see the module docstring). Use on the event loop."""

    def __init__(self, *, max_buffered: int = DEFAULT_MAX_BUFFERED,
                 motion_max_buffered: int = DEFAULT_MOTION_MAX_BUFFERED, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 limits: Limits = Limits()) -> None:
        self.max_buffered = int(max_buffered)
        self.motion_max_buffered = int(motion_max_buffered)
        self.limits = limits
        self.stats = AnimationStats()
        self.avatar_channel: Channel | None = None
        self.motion_channel: Channel | None = None
        self._chunker = Chunker(chunk_bytes)
        self._pending_rig: Rig | None = None
        self._newest_rig: Rig | None = None
        self._sent_rig: tuple[str, int] | None = None

    def attach_avatar(self, channel: Channel) -> None:
        self.avatar_channel = channel
        if hasattr(channel, "on"):
            channel.on("open", self.flush)
            channel.on("bufferedamountlow", self.flush)
        self.flush()

    def attach_motion(self, channel: Channel) -> None:
        self.motion_channel = channel

    def send_rig(self, rig: Rig) -> bool:
        """Send `rig` now, or keep it (newest wins) until the avatar channel has room; True when it left."""
        self._pending_rig = self._newest_rig = rig
        return self.flush()

    def resend_rig(self) -> bool:
        """Send the newest rig again (the peer asked for a snapshot: it starts over)."""
        self._sent_rig = None
        return self.send_rig(self._newest_rig) if self._newest_rig is not None else False

    def flush(self) -> bool:
        rig, channel = self._pending_rig, self.avatar_channel
        if rig is None or channel is None:
            return False
        if getattr(channel, "readyState", "open") != "open" or channel.bufferedAmount > self.max_buffered:
            self.stats.rigs_waiting += 1
            return False
        self._pending_rig = None
        if self._sent_rig == (rig.session, rig.version):
            return False
        for chunk in self._chunker.chunks(encode(rig.message(seq=self.stats.rigs, t_publish=time.time()),
                                                 self.limits)):
            channel.send(chunk)
            self.stats.rig_bytes += len(chunk)
        self.stats.rigs += 1
        self._sent_rig = (rig.session, rig.version)
        return True

    def send_motion(self, motion: Motion) -> bool:
        """Send one motion now or drop it; True when it left."""
        channel = self.motion_channel
        if (channel is None or getattr(channel, "readyState", "open") != "open"
                or channel.bufferedAmount > self.motion_max_buffered):
            self.stats.motions_dropped += 1
            return False
        motion.t_publish = time.time()
        data = encode_motion(motion)
        channel.send(data)
        self.stats.motions += 1
        self.stats.motion_bytes += len(data)
        return True


def parse_control(data: bytes | str) -> dict[str, Any]:
    """One peer->server data-channel message -> a validated request; ProtocolError says what is wrong."""
    if not isinstance(data, str):
        raise ProtocolError("binary messages from the peer are not accepted; send JSON text "
                            "like {\"type\": \"snapshot\"}")
    if len(data) > MAX_CONTROL_BYTES:
        raise ProtocolError(f"control message is {len(data)} characters, limit is {MAX_CONTROL_BYTES}")
    try:
        body = json.loads(data)
    except ValueError as exc:
        raise ProtocolError(f"control message is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("control message must be a JSON object with a 'type'")
    kind = body.get("type")
    if kind in ("snapshot", "end"):
        if set(body) != {"type"}:
            raise ProtocolError(f"{kind!r} takes no arguments")
        return body
    if kind == "ping":
        t = body.get("t")
        if set(body) - {"type", "t"} or (t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)))):
            raise ProtocolError("'ping' takes one optional number 't'")
        return body
    raise ProtocolError(f"unknown control message type {kind!r}; expected 'snapshot', 'ping' or 'end'")


# ----- signaling -----------------------------------------------------------------------------------
@dataclass
class OfferInfo:
    """What a valid offer carries: its SDP and which media sections it has."""

    sdp: str
    video: int = 0
    audio: int = 0
    application: int = 0
    kinds: list[str] = field(default_factory=list)


def validate_offer(body: Any, max_sdp_bytes: int = MAX_SDP_BYTES, require_data_channel: bool = True) -> OfferInfo:
    """A POST /offer JSON body -> OfferInfo; ProtocolError (a 400 for the peer) says what is wrong.

    Needs {"type": "offer", "sdp": "<SDP>"} whose SDP parses and has a video section the peer sends
    (sendrecv/sendonly) and, unless `require_data_channel` is False, a data channel section.
    """
    if not isinstance(body, dict):
        raise ProtocolError("the offer must be a JSON object {\"type\": \"offer\", \"sdp\": \"...\"}")
    if body.get("type") != "offer":
        raise ProtocolError(f"'type' must be 'offer', got {body.get('type')!r}")
    sdp = body.get("sdp")
    if not isinstance(sdp, str) or not sdp.strip():
        raise ProtocolError("'sdp' must be a non-empty string")
    if len(sdp) > max_sdp_bytes:
        raise ProtocolError(f"SDP is {len(sdp)} characters, limit is {max_sdp_bytes}")
    if not sdp.lstrip().startswith("v=0"):
        raise ProtocolError("malformed SDP: it must start with 'v=0'")
    from aiortc.sdp import SessionDescription

    try:
        parsed = SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc's parser raises assorted types on garbage
        raise ProtocolError(f"malformed SDP: {exc.__class__.__name__}: {exc}") from None
    info = OfferInfo(sdp=sdp)
    for media in parsed.media:
        info.kinds.append(media.kind)
        if media.kind == "video" and media.direction in (None, "sendrecv", "sendonly") and media.port != 0:
            info.video += 1
        elif media.kind == "audio":
            info.audio += 1
        elif media.kind == "application":
            info.application += 1
    if not info.video:
        raise ProtocolError("the offer has no video the peer sends; add a camera track (sendonly or sendrecv)")
    if require_data_channel and not info.application:
        raise ProtocolError(f"the offer has no data channel; create one (label {DATA_CHANNEL_LABEL!r}) before "
                            "the offer so avatar versions can be sent back")
    return info


def make_rtc_config(ice_servers: list[str] | None = None) -> Any:
    """An RTCConfiguration with the given STUN/TURN URLs; none by default (no outside lookups).

    For two peers on one machine (tests) combine with `loopback_ice()`.
    """
    from aiortc import RTCConfiguration, RTCIceServer

    return RTCConfiguration(iceServers=[RTCIceServer(urls=url) for url in (ice_servers or [])])


@contextlib.contextmanager
def loopback_ice() -> Iterator[None]:
    """Limit ICE host candidates to 127.0.0.1 while the block runs (process-wide; tests only).

    aioice never offers 127.0.0.1 by itself, so two peers on a machine whose other addresses are
    firewalled would not connect. Restores aioice's own address lookup on exit.
    """
    import aioice.ice

    original = aioice.ice.get_host_addresses

    def loopback_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return ["127.0.0.1"] if use_ipv4 else []

    aioice.ice.get_host_addresses = loopback_addresses
    try:
        yield
    finally:
        aioice.ice.get_host_addresses = original
