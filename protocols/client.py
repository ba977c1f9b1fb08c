"""Avatar subscriber for applications: needs only numpy, msgpack and pyzmq.

    from protocols.client import AvatarSubscriber
    with AvatarSubscriber("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556") as sub:
        for state in sub:                       # or sub.next_version(timeout=5.0)
            print(state.session, state.version, state.arrays["means"].shape)

Clone pattern: the SUB socket connects and subscribes first; then a snapshot is requested on the
DEALER control socket while deltas are buffered. When the snapshot (version V, seq S) arrives,
buffered deltas with seq <= S are dropped and the rest applied in order. A delta whose
base_version is not the version held (the publisher dropped messages for this slow subscriber, or
this one missed some) triggers a new snapshot request: the subscriber jumps to the newest state.

Live animation: the subscriber also keeps each session's newest `rig` (published with every avatar version,
asked for on the control socket when none is held or a motion names a newer shape) and reads motion on a SUB
socket of its own with ZMQ_CONFLATE, so only the newest pose ever waits. `next_pose(timeout)` blocks for the
next motion and returns the avatar posed by it (`pose(rig, motion)`, numpy only); `latest_pose()` poses the
newest motion received without waiting.

    with AvatarSubscriber(pub, control) as sub:
        frame = sub.next_pose(timeout=5.0)     # PosedFrame: arrays means/quats/scales/opacities/colors
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
import zmq

from protocols.animation import Motion, Rig, decode_motion, pose
from protocols.avatar_buffer import AvatarBuffer
from protocols.errors import ProtocolError
from protocols.wire import Limits, Message, decode
from protocols.zmq_transport import (MOTION_PREFIX, RIG_PREFIX, ControlReply, CurveClient, decode_reply,
                                     encode_request, motion_topic, rig_topic, topic_for)

__all__ = ["AvatarSubscriber", "AvatarVersion", "PosedFrame", "SubscriberStats", "pose"]

log = logging.getLogger(__name__)


@dataclass
class AvatarVersion:
    """One applied avatar version. arrays: live Gaussians (compacted copies, slot order):
    ids (M,), means (M,3), quats (M,4) wxyz, scales (M,3), opacities (M,), colors (M,3), extras."""

    session: str
    version: int
    seq: int
    kind: str  # "snapshot" or "delta": what brought this version
    arrays: dict[str, np.ndarray]
    n_slots: int
    t_capture: float
    t_publish: float
    t_received: float
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PosedFrame:
    """The avatar of `session` (rig of avatar `version`) posed by the motion of tracked `frame`.
    arrays: means (M,3), quats (M,4) wxyz, scales (M,3), opacities (M,), colors (M,3) float32, world space."""

    session: str
    version: int
    frame: int
    arrays: dict[str, np.ndarray]
    motion: Motion
    t_received: float


@dataclass
class SubscriberStats:
    snapshots: int = 0
    deltas: int = 0
    stale: int = 0        # deltas already folded into the snapshot held
    gaps: int = 0         # deltas that did not chain: a snapshot was re-requested
    malformed: int = 0    # messages rejected by the decoder
    snapshot_errors: int = 0
    resyncs: int = 0      # snapshots requested because `list` showed a newer version than any delta
    rigs: int = 0         # rigs received (published or asked for)
    motions: int = 0      # motion frames received


@dataclass
class _Session:
    buffer: AvatarBuffer | None = None
    seq: int = 0
    pending: deque = field(default_factory=lambda: deque(maxlen=64))  # deltas waiting for a snapshot
    request_id: int | None = None
    next_request_at: float = 0.0
    rig: Rig | None = None
    motion: Motion | None = None
    motion_received: float = 0.0
    rig_request_id: int | None = None
    next_rig_request_at: float = 0.0


class AvatarSubscriber:
    """Receives one session's (or every session's) avatar and yields each applied version.

    connect: the daemon's PUB endpoint; control: its ROUTER endpoint; session: follow only this
    session (None: every session the daemon publishes). `next_version(timeout)` raises TimeoutError.
    security: a `CurveClient` when the daemon runs with CURVE keys.
    """

    def __init__(self, connect: str, control: str, session: str | None = None, *, limits: Limits = Limits(),
                 rcvhwm: int = 8, snapshot_retry_s: float = 0.5, request_timeout_s: float = 5.0,
                 idle_check_s: float = 1.0, animate: bool = True, security: CurveClient | None = None) -> None:
        self.session = session
        self.idle_check_s = idle_check_s
        self.limits = limits
        self.snapshot_retry_s = snapshot_retry_s
        self.request_timeout_s = request_timeout_s
        self.stats = SubscriberStats()
        self._context = zmq.Context()
        self._sub = self._context.socket(zmq.SUB)
        self._control = self._context.socket(zmq.DEALER)
        for sock in (self._sub, self._control):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, limits.max_message_bytes)
            if security is not None:
                security.apply(sock)
        self._sub.setsockopt(zmq.RCVHWM, rcvhwm)
        try:
            self._sub.connect(connect)
            self._control.connect(control)
        except zmq.ZMQError as exc:
            self.close()
            raise ProtocolError(f"cannot connect to {connect} / {control}: {exc}") from None
        self._sub.setsockopt(zmq.SUBSCRIBE, topic_for(session) if session is not None else b"")
        if session is not None:
            self._sub.setsockopt(zmq.SUBSCRIBE, rig_topic(session))
        self._poller = zmq.Poller()
        self._poller.register(self._sub, zmq.POLLIN)
        self._poller.register(self._control, zmq.POLLIN)
        self._motion_sub: zmq.Socket | None = None
        if animate:
            self._motion_sub = self._context.socket(zmq.SUB)
            self._motion_sub.setsockopt(zmq.LINGER, 0)
            self._motion_sub.setsockopt(zmq.CONFLATE, 1)  # keep only the newest pose
            self._motion_sub.setsockopt(zmq.SUBSCRIBE, motion_topic(session) if session is not None else MOTION_PREFIX)
            self._motion_sub.connect(connect)
            self._poller.register(self._motion_sub, zmq.POLLIN)
        self._new_motion = False
        self._ids = itertools.count(1)
        self._sessions: dict[str, _Session] = {}
        # bounded: a subscriber that only reads poses never takes versions (the oldest unread ones go first)
        self._ready: deque[AvatarVersion] = deque(maxlen=64)
        self._replies: dict[int, ControlReply] = {}
        self._awaiting: set[int] = set()  # ids of request() calls still waiting
        self._list_id: int | None = None
        self._next_list_at = 0.0  # when to ask `list` again (discovery / staleness check)
        if session is not None:
            self._sessions[session] = _Session()

    # ----- public API ---------------------------------------------------------------------------
    def next_version(self, timeout: float | None = None) -> AvatarVersion:
        """Block until a new avatar version is applied; TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimeoutError(f"no avatar version within {timeout} s")
            self._request_snapshots(now)
            wait = self.snapshot_retry_s if deadline is None else min(self.snapshot_retry_s, deadline - now)
            self._pump(max(wait, 0.0))
        return self._ready.popleft()

    def __iter__(self) -> Iterator[AvatarVersion]:
        while True:
            yield self.next_version()

    def request(self, command: str | Mapping[str, Any], timeout: float | None = None, **args: Any) -> ControlReply:
        """Send a control command (`"list"`, `"status"`, `"start"`, `"stop"`, `"snapshot"`) and wait for its reply.

        `command` may also be a full request map {"command": ..., ...}. Returns the ControlReply
        (ok, result or error, and the decoded message for snapshots); TimeoutError if none comes.
        """
        if isinstance(command, Mapping):
            args = {**{k: v for k, v in command.items() if k != "command"}, **args}
            command = command["command"]
        request_id = next(self._ids)
        self._send(encode_request(command, args, request_id))
        self._awaiting.add(request_id)
        limit = self.request_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        while request_id not in self._replies:
            left = deadline - time.monotonic()
            if left <= 0:
                self._awaiting.discard(request_id)
                raise TimeoutError(f"no reply to {command!r} within {limit} s")
            self._pump(left, replies_only=True)
        self._awaiting.discard(request_id)
        return self._replies.pop(request_id)

    def next_pose(self, timeout: float | None = None) -> PosedFrame:
        """Block until a motion arrives for a session whose rig is held; the avatar posed by it.
        TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if self._new_motion:
                posed = self.latest_pose()
                self._new_motion = False
                if posed is not None:
                    return posed
            if deadline is not None and now >= deadline:
                raise TimeoutError(f"no posed avatar within {timeout} s")
            self._request_snapshots(now)
            self._request_rigs(now)
            wait = self.snapshot_retry_s if deadline is None else min(self.snapshot_retry_s, deadline - now)
            self._pump(max(wait, 0.0))

    def latest_pose(self, session: str | None = None) -> PosedFrame | None:
        """The newest motion received (of `session`, or of any session) applied to that session's rig, or None
        while no rig and motion are held. Reads what has arrived without waiting for more."""
        self._pump(0.0)
        held = [(name, s) for name, s in self._sessions.items()
                if s.rig is not None and s.motion is not None and (session is None or name == session)]
        if not held:
            return None
        name, state = max(held, key=lambda item: item[1].motion_received)
        return PosedFrame(name, state.rig.version, state.motion.frame, pose(state.rig, state.motion), state.motion,
                          state.motion_received)

    def rig(self, session: str) -> Rig | None:
        """The newest rig held for `session`."""
        state = self._sessions.get(session)
        return state.rig if state else None

    def buffer(self, session: str) -> AvatarBuffer | None:
        """The slot arrays held for `session` (None before its first snapshot)."""
        state = self._sessions.get(session)
        return state.buffer if state else None

    def close(self) -> None:
        for sock in (self._sub, self._control, self._motion_sub):
            if sock is not None:
                sock.close(linger=0)
        self._context.term()

    def __enter__(self) -> "AvatarSubscriber":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- machinery ----------------------------------------------------------------------------
    def _pump(self, wait_s: float, replies_only: bool = False) -> None:
        events = dict(self._poller.poll(int(wait_s * 1000)))
        if self._control in events:
            while True:
                try:
                    frames = self._control.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_reply(frames)
        if self._sub in events and not replies_only:
            for _ in range(64):  # bounded burst, then give the control socket a turn
                try:
                    frames = self._sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_publication(frames)
        if self._motion_sub is not None and self._motion_sub in events and not replies_only:
            while True:
                try:
                    frame = self._motion_sub.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_motion(frame)

    def _on_motion(self, frame: bytes) -> None:
        name_end = frame.find(b"\x00")
        try:
            if not frame.startswith(MOTION_PREFIX) or name_end < 0:
                raise ProtocolError("motion frame without a motion topic")
            motion = decode_motion(frame[name_end + 1:])
            if frame[:name_end + 1] != motion_topic(motion.session):
                raise ProtocolError("motion topic does not match its session")
        except ProtocolError as exc:
            self.stats.malformed += 1
            log.warning("dropped a malformed motion: %s", exc)
            return
        if self.session is not None and motion.session != self.session:
            return
        state = self._sessions.setdefault(motion.session, _Session())
        if state.motion is not None and motion.frame <= state.motion.frame:
            return  # older than the pose held (reordered on the way): never step back
        state.motion, state.motion_received = motion, time.time()
        self.stats.motions += 1
        self._new_motion = True
        if state.rig is None or motion.shape_version > state.rig.shape_version:
            self._request_rigs(time.monotonic())

    def _request_rigs(self, now: float) -> None:
        for name, state in self._sessions.items():
            stale = state.rig is None or (state.motion is not None and state.motion.shape_version > state.rig.shape_version)
            if stale and state.rig_request_id is None and now >= state.next_rig_request_at:
                state.rig_request_id = next(self._ids)
                state.next_rig_request_at = now + self.snapshot_retry_s
                self._control.send(encode_request("rig", {"session": name}, state.rig_request_id))
            elif state.rig_request_id is not None and now >= state.next_rig_request_at + self.request_timeout_s:
                state.rig_request_id = None  # lost reply: ask again

    def _on_rig(self, name: str, rig: Rig) -> None:
        state = self._sessions.setdefault(name, _Session())
        if state.rig is None or rig.version >= state.rig.version:
            state.rig = rig
            self.stats.rigs += 1

    def _request_snapshots(self, now: float) -> None:
        for name, state in self._sessions.items():
            if state.buffer is None and state.request_id is None and now >= state.next_request_at:
                self._ask_snapshot(name, state, now)
            elif state.request_id is not None and now >= state.next_request_at + self.request_timeout_s:
                state.request_id = None  # lost reply: ask again next round
        # `list` finds sessions (session=None) and, while the PUB socket is quiet, tells whether the
        # publisher moved on: its last deltas to us may have been dropped, and no later one will show the gap.
        if now >= self._next_list_at:
            self._next_list_at = now + (self.snapshot_retry_s if not self._sessions else self.idle_check_s)
            self._list_id = next(self._ids)
            self._send(encode_request("list", {}, self._list_id))

    def _ask_snapshot(self, name: str, state: _Session, now: float) -> None:
        state.request_id = next(self._ids)
        state.next_request_at = now
        self._send(encode_request("snapshot", {"session": name}, state.request_id))

    def _send(self, frame: bytes) -> None:
        """Queue a request without ever blocking: a control socket with no usable peer (no daemon, or a CURVE
        handshake it refused) drops it and the caller's reply wait times out."""
        try:
            self._control.send(frame, flags=zmq.NOBLOCK)
        except zmq.Again:
            log.debug("control request not sent: no connected daemon")

    def _on_reply(self, frames: list[bytes]) -> None:
        try:
            reply = decode_reply(frames, self.limits)
        except ProtocolError as exc:
            self.stats.malformed += 1
            log.warning("dropped a malformed control reply: %s", exc)
            return
        if reply.id is not None and reply.id == self._list_id:
            self._list_id = None
            if reply.ok and isinstance(reply.result, dict) and isinstance(reply.result.get("sessions"), list):
                self._on_list(reply.result["sessions"])
            return
        for name, state in self._sessions.items():
            if reply.id is not None and reply.id == state.request_id:
                state.request_id = None
                self._on_snapshot(name, state, reply)
                return
            if reply.id is not None and reply.id == state.rig_request_id:
                state.rig_request_id = None
                if reply.ok and reply.message is not None and reply.message.type == "rig" \
                        and reply.message.session == name:
                    self._on_rig(name, Rig.from_message(reply.message))
                return
        if reply.id in self._awaiting:
            self._replies[reply.id] = reply

    def _on_list(self, entries: list) -> None:
        """`list` result: [{session, version}, ...]. New sessions are followed; stale ones re-synchronised."""
        for entry in entries:
            name = entry.get("session") if isinstance(entry, dict) else None
            version = entry.get("version") if isinstance(entry, dict) else None
            if not isinstance(name, str) or (self.session is not None and name != self.session):
                continue
            state = self._sessions.setdefault(name, _Session())
            if (state.buffer is not None and isinstance(version, int) and version > state.buffer.version
                    and state.request_id is None):
                self.stats.resyncs += 1
                self._ask_snapshot(name, state, time.monotonic())

    def _on_snapshot(self, name: str, state: _Session, reply: ControlReply) -> None:
        msg = reply.message
        if not reply.ok or msg is None or msg.type != "snapshot" or msg.session != name:
            self.stats.snapshot_errors += 1
            state.next_request_at = time.monotonic() + self.snapshot_retry_s
            log.debug("snapshot of %s not available: %s", name, reply.error)
            return
        held = state.buffer.version if state.buffer is not None else -1
        if msg.version < held:
            return  # older than what we hold already (a late reply)
        state.buffer = AvatarBuffer.from_snapshot(msg)
        state.seq = msg.seq
        self.stats.snapshots += 1
        pending, state.pending = list(state.pending), deque(maxlen=state.pending.maxlen)
        last: Message = msg
        kind = "snapshot"
        for delta in pending:
            if delta.seq <= state.seq:
                self.stats.stale += 1
                continue
            if delta.base_version != state.buffer.version:
                self._gap(name, state)
                break
            try:
                state.buffer.apply(delta)
            except ProtocolError as exc:
                self.stats.malformed += 1
                log.warning("buffered delta could not be applied (%s); re-requesting the snapshot", exc)
                self._gap(name, state)
                break
            state.seq = delta.seq
            last, kind = delta, "delta"
            self.stats.deltas += 1
        if state.buffer is not None and state.buffer.version > held:
            self._emit(name, state, last, kind)

    def _on_publication(self, frames: list[bytes]) -> None:
        if frames and frames[0].startswith(MOTION_PREFIX):
            return  # motion read by the conflating motion socket (a catch-all subscription sees it here too)
        if frames and frames[0].startswith(RIG_PREFIX):
            self._on_rig_publication(frames)
            return
        self._next_list_at = max(self._next_list_at, time.monotonic() + self.idle_check_s)
        if len(frames) < 2:
            self.stats.malformed += 1
            return
        try:
            msg = decode(frames[1:], self.limits)
            if frames[0] != topic_for(msg.session) or msg.type != "delta":
                raise ProtocolError("topic does not match the message session, or not a delta")
        except ProtocolError as exc:
            self.stats.malformed += 1
            log.warning("dropped a malformed publication: %s", exc)
            return
        if self.session is not None and msg.session != self.session:
            return
        state = self._sessions.get(msg.session)
        if state is None:
            state = self._sessions[msg.session] = _Session()
        if state.buffer is None:
            state.pending.append(msg)  # oldest fall off: the snapshot will cover them
            if state.request_id is None:
                self._ask_snapshot(msg.session, state, time.monotonic())
            return
        if msg.seq <= state.seq:
            self.stats.stale += 1
            return
        if msg.base_version != state.buffer.version:
            self._gap(msg.session, state)
            state.pending.append(msg)
            return
        try:
            state.buffer.apply(msg)
        except ProtocolError as exc:
            self.stats.malformed += 1
            log.warning("delta could not be applied (%s); re-requesting the snapshot", exc)
            self._gap(msg.session, state)
            return
        state.seq = msg.seq
        self.stats.deltas += 1
        self._emit(msg.session, state, msg, "delta")

    def _on_rig_publication(self, frames: list[bytes]) -> None:
        try:
            msg = decode(frames[1:], self.limits)
            if frames[0] != rig_topic(msg.session) or msg.type != "rig":
                raise ProtocolError("rig topic does not match the message session, or not a rig")
        except ProtocolError as exc:
            self.stats.malformed += 1
            log.warning("dropped a malformed rig: %s", exc)
            return
        if self.session is None or msg.session == self.session:
            self._on_rig(msg.session, Rig.from_message(msg))

    def _gap(self, name: str, state: _Session) -> None:
        """The chain broke: keep the state held, request a fresh snapshot, buffer deltas meanwhile."""
        self.stats.gaps += 1
        if state.request_id is None:
            self._ask_snapshot(name, state, time.monotonic())

    def _emit(self, name: str, state: _Session, msg: Message, kind: str) -> None:
        buf = state.buffer
        self._ready.append(AvatarVersion(
            session=name, version=buf.version, seq=state.seq, kind=kind, arrays=buf.live_arrays(),
            n_slots=buf.n_slots, t_capture=msg.t_capture, t_publish=msg.t_publish, t_received=time.time(),
            stats=dict(msg.stats)))
