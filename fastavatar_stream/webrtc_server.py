"""The daemon's HTTP side: the browser page at `/`, its static files, and WebRTC signaling at `POST /offer`.

One peer connection = one session. The browser's camera track feeds a `LatestFrameRelay` (one-frame
slot, pts-stamped); a `RelaySource` turns it into the `FrameSource`-like object the hub reads with
`async for frame in source.aiter()`. Avatar versions the hub publishes go back on the peer's data
channel through a `DataChannelSender` (snapshot, then conflated deltas, back-pressure on
bufferedAmount); a stats message goes out every `stats_interval` seconds.

Everything here runs on the event loop and only moves bytes: frame conversion happens in a worker
thread (`LatestFrameRelay.next`), tracking and the model live behind the hub.

Peer lifecycle: an offer that is not valid JSON/SDP, has no video or no data channel is answered with
400 and a one-line reason, and nothing is kept. A peer whose connection fails or closes, or that has
not connected `ice_timeout` seconds after its offer, is closed and its session ended. Connection
state changes are logged. `/offer` answers 503 when `max_peers` are connected.

Who may offer: `/offer` takes only `Content-Type: application/json` (415 otherwise, so a plain HTML form on
another site cannot post one), and a request carrying an `Origin` must come from the page this server serves
(its bound address; the loopback names when bound to loopback or every interface; on an every-interface bind
also the host the request was addressed to, as such a bind needs a token or --insecure) or from an origin the
operator added (`allow_origins`); anything else is 403. Clients that are not browsers send no Origin. With a
`token`, every offer must carry it in the `X-Fastavatar-Token` header (the page takes it from its own URL,
`/?token=...`), else 403.

Third-party browser modules (three.js, Spark) are served from `static/node_modules` at `/vendor/...`;
`fastavatar-stream setup-web` (npm ci) installs them. Without them the page still connects, shows the
camera and counters, and says how to install the 3D view.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Protocol

from aiohttp import web

from fastavatar_stream.sources import SourceFrame
from protocols.avatar_buffer import AvatarBuffer
from protocols.errors import ProtocolError
from protocols.webrtc import (DEFAULT_MAX_BUFFERED, MAX_SDP_BYTES, MOTION_CHANNEL_LABEL, AnimationSender,
                              DataChannelSender, LatestFrameRelay, PacedChannel, make_rtc_config, validate_offer)

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
NODE_MODULES = STATIC_DIR / "node_modules"
#: URL prefix -> folder under node_modules (only these packages are served)
VENDOR = {"three": "three", "spark": "@sparkjsdev/spark"}


class SessionHub(Protocol):
    """What the server needs of the daemon (implemented by `fastavatar_stream.daemon.Daemon`)."""

    async def open_session(self, source: Any, *, name: str | None = None) -> str:
        """Start a session reading `source` (`async for f in source.aiter()`, `source.close()`); its id."""

    async def close_session(self, session_id: str) -> None:
        """End a session (stop its source, drop its queued work)."""

    def subscribe(self, session_id: str, callback: Callable[[AvatarBuffer, dict], None]) -> Callable[[], None]:
        """Call `callback(buffer, stats)` on the event loop after each new version; returns unsubscribe."""

    def session_stats(self, session_id: str) -> dict:
        """Counters for the page: frames, windows, gaussians, ..."""


class RelaySource:
    """A camera track as a frame source: `aiter()` yields `SourceFrame`s from a `LatestFrameRelay`."""

    live = True

    def __init__(self, relay: LatestFrameRelay, name: str) -> None:
        self.relay = relay
        self.name = name
        self.frames_read = 0
        self.error: str | None = None

    async def aiter(self) -> AsyncIterator[SourceFrame]:
        while True:
            frame = await self.relay.next()
            if frame is None:
                self.error = self.relay.error
                return
            self.frames_read += 1
            yield SourceFrame(image=frame.image, pts=frame.pts, index=frame.index, t_capture=frame.t_capture)

    def __aiter__(self) -> AsyncIterator[SourceFrame]:
        return self.aiter()

    def close(self) -> None:
        self.relay.close()


@dataclass
class ServerConfig:
    """Knobs of the HTTP/WebRTC side (defaults suit a daemon on one machine)."""

    ice_servers: list[str] = field(default_factory=list)  # STUN/TURN URLs for peers behind NAT
    ice_timeout: float = 30.0  # seconds from offer to "connected" before the peer is dropped
    max_peers: int = 8
    max_sdp_bytes: int = MAX_SDP_BYTES
    max_buffered: int = DEFAULT_MAX_BUFFERED
    stats_interval: float = 0.5
    static_dir: Path = STATIC_DIR
    node_modules: Path = NODE_MODULES
    allow_origins: list[str] = field(default_factory=list)  # browser origins allowed besides the served one
    token: str | None = None  # when set, every offer carries it in the X-Fastavatar-Token header


TOKEN_HEADER = "X-Fastavatar-Token"
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def served_origins(host: str, port: int) -> set[str]:
    """Origins of the page served on host:port (a wildcard bind is reached through loopback names here)."""
    names = {f"[{host}]" if ":" in host else host}
    if host in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::", ""):
        names.update(_LOOPBACK_NAMES)
    names.discard("0.0.0.0")
    names.discard("[::]")
    return {f"{scheme}://{name}:{port}" for name in names for scheme in ("http", "https")}


class Peer:
    """One browser/client: its peer connection, camera relay, session and data-channel sender."""

    def __init__(self, server: "WebRTCServer", pc: Any, peer_id: str) -> None:
        self.server = server
        self.pc = pc
        self.id = peer_id
        self.relay = LatestFrameRelay()
        self.session_id: str | None = None
        self.sender: DataChannelSender | None = None
        self.animation = AnimationSender(max_buffered=server.config.max_buffered)
        self.closed = False
        self._unsubscribe: Callable[[], None] | None = None
        self._tasks: list[asyncio.Task] = []

    def start_task(self, coro) -> None:
        self._tasks.append(asyncio.ensure_future(coro))

    def on_version(self, buffer: AvatarBuffer, stats: dict) -> None:
        if self.sender is not None and not self.closed:
            try:
                self.sender.publish(buffer, float(stats.get("t_capture", 0.0) or 0.0), stats)
            except Exception:  # one peer's send failure must not break the hub's publish loop
                log.exception("peer %s: sending version %s failed", self.id, buffer.version)

    def attach_channel(self, channel: Any) -> None:
        if channel.label == MOTION_CHANNEL_LABEL:
            self.animation.attach_motion(channel)
            log.info("peer %s: motion channel (ordered=%s, maxRetransmits=%s)", self.id, channel.ordered,
                     channel.maxRetransmits)
            return
        if self.sender is not None:
            channel.send(json.dumps({"type": "error", "error": "only one data channel per peer"}))
            return
        channel = PacedChannel(channel)  # motions on the other channel must not queue behind avatar megabytes
        self.sender = DataChannelSender(channel, max_buffered=self.server.config.max_buffered, on_end=self.relay.end)
        channel.on("message", self._on_control)
        self.animation.attach_avatar(channel)
        log.info("peer %s: data channel %r", self.id, channel.label)

    def _on_control(self, data: bytes | str) -> None:
        self.sender.handle_control(data)
        if isinstance(data, str) and '"snapshot"' in data:
            self.animation.resend_rig()  # a peer that starts over needs the rig again

    async def stats_loop(self) -> None:
        while not self.closed:
            await asyncio.sleep(self.server.config.stats_interval)
            if self.sender is None or self.session_id is None:
                continue
            try:
                stats = dict(self.server.hub.session_stats(self.session_id))
            except Exception as exc:  # the session may have ended on the hub side
                stats = {"error": f"{exc.__class__.__name__}: {exc}"}
            stats.update(self.relay.counters)
            stats["versions_sent"] = self.sender.stats.messages
            stats["versions_skipped"] = self.sender.stats.skipped
            stats["motions_sent"] = self.animation.stats.motions
            stats["motions_dropped"] = self.animation.stats.motions_dropped
            stats["rigs_sent"] = self.animation.stats.rigs
            self.sender.send_json({"type": "stats", "session": self.session_id, **stats})
            self.sender.flush()

    async def ice_watchdog(self) -> None:
        await asyncio.sleep(self.server.config.ice_timeout)
        if not self.closed and self.pc.connectionState != "connected":
            log.warning("peer %s: no connection %.0f s after the offer (state %s); closing",
                        self.id, self.server.config.ice_timeout, self.pc.connectionState)
            await self.close()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.peers.pop(self.id, None)
        if self._unsubscribe is not None:
            self._unsubscribe()
        self.relay.close()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        if self.session_id is not None:
            try:
                await self.server.hub.close_session(self.session_id)
            except Exception:
                log.exception("peer %s: closing session %s failed", self.id, self.session_id)
        await self.pc.close()
        log.info("peer %s closed (session %s)", self.id, self.session_id)


class WebRTCServer:
    """Signaling + peers for one hub; `routes()` for the aiohttp app, `close_all()` on shutdown."""

    def __init__(self, hub: SessionHub, config: ServerConfig | None = None) -> None:
        self.hub = hub
        self.config = config or ServerConfig()
        self.peers: dict[str, Peer] = {}
        self.origins: set[str] = {o.rstrip("/") for o in self.config.allow_origins}
        self.any_interface = False  # bound to every interface: the page may be reached under any host name

    def refuse(self, request: web.Request) -> web.Response | None:
        """The response refusing an offer from someone who may not make one, or None."""
        if request.content_type != "application/json":
            return _error(415, "an offer is sent as Content-Type: application/json")
        origin = request.headers.get("Origin")
        addressed = {f"{scheme}://{request.host}" for scheme in ("http", "https")} if self.any_interface else set()
        if origin is not None and origin.rstrip("/") not in self.origins | addressed:
            log.warning("refused an offer from origin %r (allowed: the served page, --allow-origin)", origin)
            return _error(403, "this origin may not start sessions here (the daemon allows its own page and "
                               "--allow-origin)")
        token = self.config.token
        if token and not hmac.compare_digest(request.headers.get(TOKEN_HEADER, "").encode(), token.encode()):
            return _error(403, f"a valid {TOKEN_HEADER} header is needed (open the page as /?token=...)")
        return None

    async def offer(self, request: web.Request) -> web.Response:
        from aiortc import RTCPeerConnection, RTCSessionDescription

        refused = self.refuse(request)
        if refused is not None:
            return refused
        try:
            body = await request.json(loads=json.loads)
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the request body must be JSON {\"type\": \"offer\", \"sdp\": \"...\"}")
        try:
            info = validate_offer(body, self.config.max_sdp_bytes)
        except ProtocolError as exc:
            log.info("rejected offer from %s: %s", request.remote, exc)
            return _error(400, str(exc))
        if len(self.peers) >= self.config.max_peers:
            return _error(503, f"server is at its limit of {self.config.max_peers} peers; try again later")

        pc = RTCPeerConnection(make_rtc_config(self.config.ice_servers))
        peer = Peer(self, pc, uuid.uuid4().hex[:12])
        self.peers[peer.id] = peer
        video_seen = False

        @pc.on("track")
        def on_track(track) -> None:
            nonlocal video_seen
            if track.kind == "video" and not video_seen:
                video_seen = True
                peer.relay.attach(track)

        @pc.on("datachannel")
        def on_datachannel(channel) -> None:
            peer.attach_channel(channel)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            log.info("peer %s (%s): connection %s", peer.id, request.remote, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                await peer.close()

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=info.sdp, type="offer"))
            if not video_seen:
                raise ProtocolError("the offer has no video track the server can receive (codec not supported?)")
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
        except ProtocolError as exc:
            await peer.close()
            return _error(400, str(exc))
        except Exception as exc:  # aiortc rejects offers it cannot answer with assorted errors
            await peer.close()
            log.info("offer from %s failed: %s: %s", request.remote, exc.__class__.__name__, exc)
            return _error(400, f"cannot answer this offer: {exc.__class__.__name__}: {exc}")
        try:
            peer.session_id = await self.hub.open_session(RelaySource(peer.relay, f"webrtc-{peer.id}"),
                                                          name=f"webrtc-{peer.id}")
        except Exception as exc:
            await peer.close()
            log.warning("peer %s: the hub refused a session: %s", peer.id, exc)
            return _error(503, f"cannot start a session: {exc}")
        if peer.closed:  # ICE failed while the session was opening
            return _error(400, "the peer connection closed during signaling")
        peer._unsubscribe = self.hub.subscribe(peer.session_id, peer.on_version)
        subscribe_animation = getattr(self.hub, "subscribe_animation", None)
        if subscribe_animation is not None:  # a hub that animates: rigs and motions to this peer too
            stop_versions = peer._unsubscribe
            stop_animation = subscribe_animation(peer.session_id, peer.animation.send_rig, peer.animation.send_motion)
            peer._unsubscribe = lambda: (stop_versions(), stop_animation())
        peer.start_task(peer.ice_watchdog())
        peer.start_task(peer.stats_loop())
        log.info("peer %s (%s): session %s", peer.id, request.remote, peer.session_id)
        return web.json_response({"type": pc.localDescription.type, "sdp": pc.localDescription.sdp,
                                  "session": peer.session_id, "peer": peer.id})

    async def close_all(self, _app: web.Application | None = None) -> None:
        await asyncio.gather(*(peer.close() for peer in list(self.peers.values())), return_exceptions=True)

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(self.config.static_dir / "index.html", headers=_NO_CACHE)

    async def vendor_status(self, request: web.Request) -> web.Response:
        missing = [pkg for pkg in VENDOR.values() if not (self.config.node_modules / pkg / "package.json").is_file()]
        return web.json_response({"ok": not missing, "missing": missing,
                                  "hint": "run `fastavatar-stream setup-web` (npm ci) to install the 3D viewer"
                                  if missing else ""})


_NO_CACHE = {"Cache-Control": "no-cache"}
#: the app's WebRTCServer (peers, config): `app[WEBRTC_KEY]`
WEBRTC_KEY = web.AppKey("webrtc", WebRTCServer)


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


def _content_security_policy(index_html: Path) -> str:
    """The page's CSP: own scripts plus the hash of its inline import map; Spark needs blob: workers
    and WebAssembly compiled from bytes."""
    hashes = ""
    try:
        for body in re.findall(r'<script type="importmap">(.*?)</script>', index_html.read_text(), re.S):
            hashes += f" 'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
    except OSError:
        pass
    return (f"default-src 'self'; script-src 'self' 'wasm-unsafe-eval'{hashes}; worker-src 'self' blob:; "
            "img-src 'self' data: blob:; media-src 'self' blob: mediastream:; connect-src 'self' data: blob:; "
            "style-src 'self' 'unsafe-inline'")


def _security_headers(csp: str):
    @web.middleware
    async def middleware(request: web.Request, handler):
        response = await handler(request)
        response.headers.setdefault("Content-Security-Policy", csp)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    return middleware


def make_app(hub: SessionHub, config: ServerConfig | None = None) -> web.Application:
    """The aiohttp application: `/` (page), `/static/...`, `/vendor/{three,spark}/...`, `POST /offer`."""
    server = WebRTCServer(hub, config)
    cfg = server.config
    app = web.Application(client_max_size=cfg.max_sdp_bytes + 4096, middlewares=[_security_headers(_content_security_policy(cfg.static_dir / "index.html"))])
    app[WEBRTC_KEY] = server
    app.router.add_get("/", server.index)
    app.router.add_post("/offer", server.offer)
    app.router.add_get("/vendor/status", server.vendor_status)
    app.router.add_static("/static/", cfg.static_dir, follow_symlinks=False)
    for prefix, package in VENDOR.items():
        folder = cfg.node_modules / package
        if folder.is_dir():
            app.router.add_static(f"/vendor/{prefix}/", folder, follow_symlinks=False)
        else:
            log.warning("browser module %s is not installed (%s); the page will show no 3D view until "
                        "`fastavatar-stream setup-web` runs", package, folder)
    app.on_shutdown.append(server.close_all)
    return app


async def start_http(hub: SessionHub, host: str = "127.0.0.1", port: int = 8080,
                     config: ServerConfig | None = None) -> web.AppRunner:
    """Serve `make_app(hub)` on host:port (port 0 picks one); returns the started runner.

    `runner.addresses` lists the bound (host, port); `await runner.cleanup()` closes peers and sessions.
    """
    runner = web.AppRunner(make_app(hub, config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        from fastavatar_stream.errors import UserError

        raise UserError(f"cannot listen on http://{host}:{port}: {exc.strerror or exc}") from None
    bound_port = runner.addresses[0][1]
    server = runner.app[WEBRTC_KEY]
    server.origins |= served_origins(host, bound_port)
    server.any_interface = host in ("0.0.0.0", "::", "")
    log.info("serving the page and WebRTC signaling on http://%s:%d/", *runner.addresses[0][:2])
    return runner
