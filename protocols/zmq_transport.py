"""ZeroMQ transport: a PUB socket for avatar deltas and a ROUTER socket for snapshots and control.

Concurrency choice: everything here is meant to run on the daemon's asyncio event loop thread.
- `AvatarPublisher` uses a plain (synchronous) PUB socket and only ever sends with NOBLOCK, so a
  call from a coroutine returns at once. PUB drops messages for a subscriber whose queue is at its
  (small) send high-water mark instead of blocking or queueing more; that subscriber notices the
  version gap and asks for a snapshot, so a slow subscriber gets the newest state, never a backlog.
  Per-session conflation: each session has a `DeltaStream` that diffs against the last state that
  really left; if a send is refused (zmq.Again), the drop is counted and the next publish folds the
  skipped versions into one delta. Publisher memory is bounded by SNDHWM messages per subscriber.
- `ControlServer` is a zmq.asyncio ROUTER: `await server.serve()` as a task answers requests one at a
  time through a handler callback (sync or async). Malformed requests get an error reply; an
  exception in the handler becomes an error reply; the server keeps serving.

Both bind to 127.0.0.1 unless told otherwise. With a `CurveServer` (`security=`) both sockets use ZeroMQ CURVE:
encrypted, and only clients whose public key is in the key folder are let in (pyzmq's own `zmq.auth`
authenticator decides); subscribers pass a `CurveClient`. `make_keys(DIR)` writes server.key,
server.key_secret, client.key and client.key_secret. Sockets are not thread-safe: use each object from the
thread (event loop) that created it.

PUB messages: [topic, header, buffer...] with topic = session UTF-8 + b"\\0" (so a SUB filter for
"s1" does not also match "s10"). Animation (see `protocols.animation`) shares the PUB socket on topics of its
own, which no avatar topic starts with (session names are printable): a session's `rig` (sent with every avatar
version) as [b"\\x02" + session + b"\\0", header, buffer...], and its per-frame `motion` as ONE frame,
b"\\x01" + session + b"\\0" + motion, so a subscriber can read motion on a SUB socket of its own with
ZMQ_CONFLATE (only the newest motion waits: a slow subscriber skips stale poses instead of queueing them;
conflation needs single-frame messages). Control requests: one msgpack map frame
`{command, id?, ...args}`; replies: `[reply-header, message frames...]`, reply-header =
`{v: 1, id, ok, result | error, message: bool}`; with `message: true` the wire frames of an
avatar message (a snapshot) follow.
"""
from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import msgpack
import zmq
import zmq.asyncio

from protocols.animation import Motion, Rig, encode_motion
from protocols.avatar_buffer import CORE_SPECS, AvatarBuffer, DeltaStream
from protocols.errors import ProtocolError
from protocols.wire import Limits, Message, decode, encode

log = logging.getLogger(__name__)

DEFAULT_PUBLISH = "tcp://127.0.0.1:5555"
DEFAULT_CONTROL = "tcp://127.0.0.1:5556"
DEFAULT_SNDHWM = 4
MAX_REQUEST_BYTES = 64 * 1024
CONTROL_VERSION = 1

#: command -> {argument: (type, required)}. Result contracts (what a handler returns):
#:   snapshot {session}          -> a snapshot `Message` (the last *published* state with its seq)
#:   list                        -> {"sessions": [{"session": str, "version": int, ...}, ...]}
#:                                  (subscribers use the versions to notice deltas they never got)
#:   status {session?}           -> a map of counters (free-form)
#:   start {source, options?, session?} -> {"session": str, ...}
#:   stop {session}              -> a map (free-form); unknown sessions raise LookupError/ProtocolError
#:   rig {session}               -> the session's newest `rig` Message (see protocols.animation)
COMMANDS: dict[str, dict[str, tuple[type, bool]]] = {
    "snapshot": {"session": (str, True)},
    "list": {},
    "status": {"session": (str, False)},
    "start": {"source": (str, True), "options": (dict, False), "session": (str, False)},
    "stop": {"session": (str, True)},
    "rig": {"session": (str, True)},
}


MOTION_PREFIX = b"\x01"
RIG_PREFIX = b"\x02"
# ----- CURVE security -------------------------------------------------------------------------------
KEY_FILES = ("server.key", "server.key_secret", "client.key", "client.key_secret")


def make_keys(folder: str | Path) -> list[Path]:
    """Write a server and a client CURVE key pair (zmq.auth certificate files) into `folder`."""
    import zmq.auth

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("server", "client"):
        zmq.auth.create_certificates(str(folder), name)
    for secret in (folder / "server.key_secret", folder / "client.key_secret"):
        secret.chmod(0o600)
    return [folder / name for name in KEY_FILES]


def _load(path: Path) -> tuple[bytes, bytes | None]:
    import zmq.auth

    if not path.is_file():
        raise ProtocolError(f"CURVE key file {path} is missing; make keys with `fastavatar-stream keys DIR`")
    try:
        return zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as exc:
        raise ProtocolError(f"CURVE key file {path} is not a zmq.auth certificate: {exc}") from None


class CurveServer:
    """Server side of CURVE: the server key pair, and a zmq.auth authenticator that admits the client public
    keys (`*.key`) of `folder`. Sockets must be made from `context` (one per process is enough)."""

    def __init__(self, folder: str | Path) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        folder = Path(folder)
        self.public, self.secret = _load(folder / "server.key_secret")
        if self.secret is None:
            raise ProtocolError(f"{folder / 'server.key_secret'} holds no secret key")
        self.context = zmq.Context()
        self._auth = ThreadAuthenticator(self.context)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(folder))

    def apply(self, socket: zmq.Socket) -> None:
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_server = True

    def async_context(self) -> zmq.asyncio.Context:
        return zmq.asyncio.Context.shadow(self.context.underlying)

    def stop(self) -> None:
        self._auth.stop()


class CurveClient:
    """Client side of CURVE: the client key pair and the server's public key, from a `make_keys` folder."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.server_public, _ = _load(folder / "server.key")
        self.public, self.secret = _load(folder / "client.key_secret")
        if self.secret is None:
            raise ProtocolError(f"{folder / 'client.key_secret'} holds no secret key")

    def apply(self, socket: zmq.Socket) -> None:
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret


def topic_for(session: str) -> bytes:
    """The PUB topic frame of a session (terminated, so prefixes do not collide)."""
    return session.encode("utf-8") + b"\x00"


def motion_topic(session: str) -> bytes:
    """The prefix of a session's motion frames."""
    return MOTION_PREFIX + topic_for(session)


def rig_topic(session: str) -> bytes:
    """The topic frame of a session's rig messages."""
    return RIG_PREFIX + topic_for(session)


# ----- control messages ---------------------------------------------------------------------------
@dataclass
class ControlRequest:
    command: str
    args: dict[str, Any]
    id: Any = None


@dataclass
class ControlReply:
    ok: bool
    result: Any = None
    error: str | None = None
    id: Any = None
    message: Message | None = None


def encode_request(command: str, args: Mapping[str, Any] | None = None, request_id: Any = None) -> bytes:
    body = {"command": command, **dict(args or {})}
    if request_id is not None:
        body["id"] = request_id
    return msgpack.packb(body, use_bin_type=True)


def parse_request(frame: bytes, max_bytes: int = MAX_REQUEST_BYTES) -> ControlRequest:
    """One request frame -> ControlRequest; ProtocolError says what is wrong with it."""
    if len(frame) > max_bytes:
        raise ProtocolError(f"request is {len(frame)} bytes, limit is {max_bytes}")
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_ext_len=0)
    except Exception as exc:
        raise ProtocolError(f"request is not valid msgpack ({exc.__class__.__name__})") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"request must be a msgpack map, got {type(body).__name__}")
    request_id = body.pop("id", None)
    if request_id is not None and (isinstance(request_id, bool) or not isinstance(request_id, (int, str))):
        request_id = None
    body.pop("v", None)
    command = body.pop("command", None)
    if command not in COMMANDS:
        raise ProtocolError(f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
    schema = COMMANDS[command]
    unexpected = sorted(str(k) for k in body if k not in schema)
    if unexpected:
        raise ProtocolError(f"{command}: unexpected arguments {unexpected}")
    for name, (kind, required) in schema.items():
        if name not in body:
            if required:
                raise ProtocolError(f"{command}: missing argument {name!r}")
        elif not isinstance(body[name], kind):
            raise ProtocolError(f"{command}: argument {name!r} must be {kind.__name__}")
    return ControlRequest(command, body, request_id)


def encode_reply(reply: ControlReply, limits: Limits = Limits()) -> list[bytes]:
    header: dict[str, Any] = {"v": CONTROL_VERSION, "id": reply.id, "ok": reply.ok,
                              "message": reply.message is not None}
    if reply.ok:
        header["result"] = reply.result
    else:
        header["error"] = reply.error or "error"
    frames = [msgpack.packb(header, use_bin_type=True)]
    if reply.message is not None:
        frames += encode(reply.message, limits)
    return frames


def decode_reply(frames: list[bytes], limits: Limits = Limits()) -> ControlReply:
    if not frames or len(frames[0]) > limits.max_header_bytes:
        raise ProtocolError("control reply missing or its header is too large")
    try:
        header = msgpack.unpackb(frames[0], raw=False, strict_map_key=True, max_ext_len=0)
    except Exception as exc:
        raise ProtocolError(f"control reply is not valid msgpack ({exc.__class__.__name__})") from None
    if not isinstance(header, dict) or header.get("v") != CONTROL_VERSION or not isinstance(header.get("ok"), bool):
        raise ProtocolError("control reply header is malformed")
    message = None
    if header.get("message"):
        message = decode(frames[1:], limits)
    elif len(frames) != 1:
        raise ProtocolError("control reply has unexpected extra frames")
    return ControlReply(header["ok"], header.get("result"), header.get("error"), header.get("id"), message)


# ----- publisher --------------------------------------------------------------------------------
@dataclass
class PublisherStats:
    sent: int = 0
    dropped: int = 0
    bytes_sent: int = 0
    per_session: dict[str, dict[str, int]] = field(default_factory=dict)
    per_kind: dict[str, dict[str, int]] = field(default_factory=dict)  # "rig"/"motion": sent, dropped, bytes


class AvatarPublisher:
    """PUB socket publishing each session's avatar as deltas; holds what was published for snapshots."""

    def __init__(self, bind: str = DEFAULT_PUBLISH, *, sndhwm: int = DEFAULT_SNDHWM, limits: Limits = Limits(),
                 context: zmq.Context | None = None, security: CurveServer | None = None) -> None:
        if context is None and security is not None:
            context = security.context
        self._own_context = context is None
        self._context = context if context is not None else zmq.Context()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, sndhwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        if security is not None:
            security.apply(self._socket)
        try:
            self._socket.bind(bind)
        except zmq.ZMQError as exc:
            self.close()
            raise ProtocolError(f"cannot bind the publisher to {bind}: {exc}") from None
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.limits = limits
        self.stats = PublisherStats()
        self._streams: dict[str, DeltaStream] = {}
        self._rigs: dict[str, Rig] = {}

    def publish(self, buffer: AvatarBuffer, t_capture: float = 0.0, stats: Mapping[str, Any] | None = None) -> bool:
        """Send the delta from the last published state of `buffer.session` to `buffer`. Never blocks.

        Returns False when the socket refused the message (counted in `stats.dropped`; the next call
        sends a conflated delta from the same base).
        """
        stream = self._streams.get(buffer.session)
        if stream is None:
            stream = self._streams[buffer.session] = DeltaStream(
                buffer.session, buffer.specs[len(CORE_SPECS):], buffer.id_dtype.name)
        msg = stream.next_delta(buffer, t_capture=t_capture, stats=stats)
        frames = encode(msg, self.limits)
        counters = self.stats.per_session.setdefault(buffer.session, {"sent": 0, "dropped": 0})
        try:
            self._socket.send_multipart([topic_for(buffer.session), *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.stats.dropped += 1
            counters["dropped"] += 1
            return False
        stream.sent(buffer, msg)
        self.stats.sent += 1
        self.stats.bytes_sent += sum(len(f) for f in frames)
        counters["sent"] += 1
        return True

    def publish_rig(self, rig: Rig) -> bool:
        """Send a session's rig (kept for `rig` requests even when the socket refuses it). Never blocks."""
        self._rigs[rig.session] = rig
        frames = encode(rig.message(seq=0, t_publish=time.time()), self.limits)
        return self._send_counted("rig", [rig_topic(rig.session), *frames])

    def publish_motion(self, motion: Motion) -> bool:
        """Send one motion frame. Never blocks; False when the socket refused it (that pose is simply skipped)."""
        motion.t_publish = time.time()
        return self._send_counted("motion", [motion_topic(motion.session) + encode_motion(motion)])

    def rig(self, session: str) -> Rig:
        """The newest rig of `session`; KeyError before its first avatar version."""
        return self._rigs[session]

    def _send_counted(self, kind: str, frames: list[bytes]) -> bool:
        counters = self.stats.per_kind.setdefault(kind, {"sent": 0, "dropped": 0, "bytes": 0})
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            counters["dropped"] += 1
            return False
        counters["sent"] += 1
        counters["bytes"] += sum(len(f) for f in frames)
        return True

    def snapshot(self, session: str, stats: Mapping[str, Any] | None = None) -> Message:
        """The last published state of `session` with its seq; KeyError for an unknown session."""
        if session not in self._streams:
            raise KeyError(f"unknown session {session!r}")
        return self._streams[session].snapshot(stats)

    def sessions(self) -> list[str]:
        return list(self._streams)

    def version(self, session: str) -> int:
        return self._streams[session].last.version

    def remove(self, session: str) -> None:
        self._streams.pop(session, None)
        self._rigs.pop(session, None)

    def close(self) -> None:
        self._socket.close(linger=0)
        if self._own_context:
            self._context.term()

    def __enter__(self) -> "AvatarPublisher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----- control server ---------------------------------------------------------------------------
Handler = Callable[[ControlRequest], Any]


def publisher_handler(publisher: AvatarPublisher, others: Handler | None = None) -> Handler:
    """A handler answering `snapshot`, `list` (and `status` without `others`) from a publisher."""

    def handle(request: ControlRequest) -> Any:
        if request.command == "snapshot":
            try:
                return publisher.snapshot(request.args["session"])
            except KeyError:
                raise ProtocolError(f"unknown session {request.args['session']!r}; 'list' shows the sessions") from None
        if request.command == "list":
            return {"sessions": [{"session": s, "version": publisher.version(s)} for s in publisher.sessions()]}
        if request.command == "rig":
            try:
                return publisher.rig(request.args["session"]).message(t_publish=time.time())
            except KeyError:
                raise ProtocolError(f"no rig for session {request.args['session']!r} yet") from None
        if others is not None:
            return others(request)
        if request.command == "status":
            return {"sessions": len(publisher.sessions()), "sent": publisher.stats.sent,
                    "dropped": publisher.stats.dropped}
        raise ProtocolError(f"command {request.command!r} is not supported by this server")

    return handle


class ControlServer:
    """ROUTER socket answering control requests through `handler(ControlRequest)`.

    The handler (sync or async) returns a msgpack-able result, or a `Message` (a snapshot reply).
    ProtocolError/ValueError/LookupError become error replies with their text; any other exception
    becomes an "internal error" reply and is logged. Accepts DEALER peers and REQ peers.
    """

    def __init__(self, handler: Handler, bind: str = DEFAULT_CONTROL, *, limits: Limits = Limits(),
                 max_request_bytes: int = MAX_REQUEST_BYTES, context: zmq.asyncio.Context | None = None,
                 security: CurveServer | None = None) -> None:
        self.handler = handler
        self.limits = limits
        self.max_request_bytes = max_request_bytes
        self.requests = 0
        self.errors = 0
        if context is None and security is not None:
            context = security.async_context()
        self._own_context = context is None
        self._context = context if context is not None else zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        if security is not None:
            security.apply(self._socket)
        # a peer sending a bigger frame is disconnected by libzmq before we hold it in memory
        self._socket.setsockopt(zmq.MAXMSGSIZE, max_request_bytes)
        try:
            self._socket.bind(bind)
        except zmq.ZMQError as exc:
            self.close()
            raise ProtocolError(f"cannot bind the control server to {bind}: {exc}") from None
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    async def handle(self, frames: list[bytes]) -> list[bytes] | None:
        """One received ROUTER message -> the reply frames (envelope included), or None to ignore."""
        if len(frames) < 2:
            return None  # no identity + body: nothing to answer to
        envelope = [frames[0]]
        body = frames[1:]
        if body[0] == b"" and len(body) > 1:  # REQ peers put an empty delimiter first
            envelope.append(b"")
            body = body[1:]
        self.requests += 1
        request_id = None
        try:
            if len(body) != 1:
                raise ProtocolError(f"a request is one frame, got {len(body)}")
            request = parse_request(bytes(body[0]), self.max_request_bytes)
            request_id = request.id
            result = self.handler(request)
            if inspect.isawaitable(result):
                result = await result
            reply = (ControlReply(True, {"type": result.type}, id=request_id, message=result)
                     if isinstance(result, Message) else ControlReply(True, result, id=request_id))
            try:
                out = encode_reply(reply, self.limits)
            except (TypeError, ValueError, OverflowError) as exc:
                raise RuntimeError(f"handler result cannot be encoded: {exc}") from exc
        except (ProtocolError, ValueError, LookupError) as exc:
            self.errors += 1
            text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            out = encode_reply(ControlReply(False, error=str(text), id=request_id))
        except Exception as exc:
            self.errors += 1
            log.exception("control handler failed")
            out = encode_reply(ControlReply(False, error=f"internal error: {exc.__class__.__name__}: {exc}",
                                            id=request_id))
        return envelope + out

    async def serve(self) -> None:
        """Answer requests until cancelled or closed."""
        while not self._socket.closed:
            try:
                frames = await self._socket.recv_multipart()
            except zmq.ZMQError:
                if self._socket.closed:
                    return
                raise
            reply = await self.handle(frames)
            if reply is not None:
                try:
                    await self._socket.send_multipart(reply, flags=zmq.NOBLOCK)
                except zmq.Again:  # the peer is gone or not reading: its reply is dropped
                    log.debug("control reply dropped")

    def close(self) -> None:
        if not self._socket.closed:
            self._socket.close(linger=0)
        if self._own_context:
            self._context.term()

    async def __aenter__(self) -> "ControlServer":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

