"""`fastavatar-stream serve`: the long-running daemon."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from engine.errors import InputError
from fastavatar_stream.commands._common import DEVICE_HELP, WEIGHTS_HELP, add_landmarks_option, resolve_device

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve", help="run the daemon: sessions from the control API, --source or WebRTC peers",
        description="Run the reconstruction daemon. Sessions start from --source, from 'start' requests on the "
                    "ZeroMQ control socket, or from browsers/peers over WebRTC (--http). Every avatar version is "
                    "published on the ZeroMQ PUB socket and to WebRTC peers of the session.")
    p.add_argument("--publish", default="tcp://127.0.0.1:5555", metavar="ENDPOINT",
                   help="ZeroMQ PUB endpoint for avatar deltas (default tcp://127.0.0.1:5555; 'none' to disable)")
    p.add_argument("--control", default="tcp://127.0.0.1:5556", metavar="ENDPOINT",
                   help="ZeroMQ ROUTER endpoint for snapshots and control (default tcp://127.0.0.1:5556; 'none')")
    p.add_argument("--http", metavar="HOST:PORT", help="serve the browser page and WebRTC signaling here, "
                                                       "e.g. 127.0.0.1:8080")
    p.add_argument("--source", action="append", default=[],
                   help="start a session from this file/folder/device:NAME at start-up (repeatable)")
    p.add_argument("--weights", help=WEIGHTS_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--realtime", action="store_true", help="pace file sources to their timestamps")
    p.add_argument("--refine", type=float, default=30.0, metavar="SECONDS",
                   help="per-session refinement budget (default 30; 0 disables)")
    p.add_argument("--budget", type=int, default=60_000, help="most Gaussians per avatar (default 60000)")
    p.add_argument("--fusion", choices=["visibility", "concat"], default=None,
                   help="how per-frame Gaussians combine (default: visibility for our models, concat = the paper's "
                        "concatenation and importance pruning for the official weights)")
    p.add_argument("--surface", action=argparse.BooleanOptionalAction, default=None,
                   help="tile the avatar's surface with small Gaussians painted by the frames (default: on for our "
                        "models, off for the official weights)")
    add_landmarks_option(p)
    p.add_argument("--max-sessions", type=int, default=8, help="concurrent sessions (default 8)")
    p.add_argument("--max-batch", type=int, default=None, metavar="N",
                   help="most ready windows of different sessions run in one forward (default: 4 on CUDA, 1 on CPU)")
    p.add_argument("--engine-nice", type=int, default=10, metavar="N",
                   help="run the engine N nice levels below the daemon (default 10; 0: the same), so tracking and "
                        "motion keep the camera's rate while windows and refinement compute (Linux)")
    p.add_argument("--snapshot-dir", type=Path,
                   help="keep each session's newest avatar here as PLY (every few seconds and at its end); after "
                        "a restart the daemon serves these snapshots to 'snapshot' and 'list' requests")
    p.add_argument("--ray", metavar="ADDRESS", help="run the engine on Ray actors: 'local' (a Ray instance of this "
                                                     "daemon's own), 'auto' (the cluster this machine joined with "
                                                     "'ray start') or a cluster address; each session is placed on "
                                                     "the least loaded actor and moves when its actor dies")
    p.add_argument("--engine-actors", type=int, metavar="N",
                   help="with --ray: engine actors to run (default: one per GPU of the cluster, 1 without GPUs)")
    security = p.add_argument_group(
        "who may do what", "Remote 'start' requests open only files and folders under --allow-source folders "
        "(none by default: remote start is refused) and cameras only with --allow-device; a peer may set only "
        "the options realtime, max_frames and fps.")
    security.add_argument("--allow-source", action="append", default=[], metavar="DIR",
                          help="folder whose files and sub-folders remote 'start' requests may open (repeatable)")
    security.add_argument("--allow-device", action="store_true",
                          help="let remote 'start' requests open cameras (device:N or device:/dev/videoN)")
    security.add_argument("--curve-keys", metavar="DIR", type=Path,
                          help="ZeroMQ CURVE: encrypt both sockets and admit only clients whose public key is in "
                               "DIR (made by `fastavatar-stream keys DIR`)")
    security.add_argument("--insecure", action="store_true",
                          help="allow binding ZeroMQ to a non-loopback address without --curve-keys, or HTTP "
                               "without --token")
    security.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                          help="browser origin (e.g. https://viewer.example) that may post offers besides the "
                               "served page (repeatable)")
    security.add_argument("--token", default=None,
                          help="every WebRTC offer must carry this token (open the page as /?token=TOKEN)")
    p.set_defaults(func=run)
    return p


def _endpoint(value: str | None) -> str | None:
    return None if value in (None, "", "none") else value


def check(args: argparse.Namespace) -> None:
    """Every option validated before anything starts (one clear line, exit 2)."""
    from fastavatar_stream.commands._common import (is_loopback_host, number, output_dir,
                                                     zmq_endpoint_is_local)

    if args.max_sessions < 1 or args.budget < 1 or (args.max_batch is not None and args.max_batch < 1):
        raise InputError("--max-sessions, --max-batch and --budget must be positive")
    if not 0 <= args.engine_nice <= 19:
        raise InputError(f"--engine-nice must be 0 to 19, got {args.engine_nice}")
    number(args.refine, "--refine", low=0)
    if args.snapshot_dir is not None:
        output_dir(args.snapshot_dir, "--snapshot-dir")
    for folder in args.allow_source:
        if not Path(folder).is_dir():
            raise InputError(f"--allow-source {folder}: not a folder")
    if args.curve_keys is not None:
        for name in ("server.key", "server.key_secret"):
            if not (args.curve_keys / name).is_file():
                raise InputError(f"--curve-keys {args.curve_keys}: no {name}; make keys with "
                                 f"`fastavatar-stream keys DIR`")
    exposed = [e for e in (_endpoint(args.publish), _endpoint(args.control)) if e and not zmq_endpoint_is_local(e)]
    if exposed and args.curve_keys is None and not args.insecure:
        raise InputError(f"{exposed[0]} is not a loopback address: give --curve-keys DIR (see "
                         f"`fastavatar-stream keys`) or --insecure")
    if args.http:
        host, _ = parse_http(args.http)
        if not is_loopback_host(host) and not args.token and not args.insecure:
            raise InputError(f"--http {args.http} is not a loopback address: give --token TOKEN or --insecure")
    if args.token is not None and not 8 <= len(args.token) <= 256:
        raise InputError("--token must be 8..256 characters")


def parse_http(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--http needs HOST:PORT, e.g. 127.0.0.1:8080, got {value!r}")
    return host, int(port)


async def serve(args: argparse.Namespace) -> None:
    from fastavatar_stream.authority import SourcePolicy
    from fastavatar_stream.daemon import Daemon, DaemonConfig
    from fastavatar_stream.session import SessionOptions
    from fastavatar_stream.sources import open_source
    from protocols.zmq_transport import CurveServer

    defaults = SessionOptions(budget=args.budget, refine_seconds=args.refine, fusion=args.fusion, surface=args.surface,
                              detector=args.landmarks)
    policy = SourcePolicy.from_folders(args.allow_source, allow_device=args.allow_device)
    http = parse_http(args.http) if args.http else None
    sources = [open_source(s, realtime=args.realtime) for s in args.source]
    config = DaemonConfig(weights=args.weights, device=resolve_device(args.device),
                          publish=_endpoint(args.publish), control=_endpoint(args.control),
                          max_sessions=args.max_sessions, max_batch=args.max_batch, snapshot_dir=args.snapshot_dir,
                          session_defaults=defaults, ray=args.ray, engine_actors=args.engine_actors,
                          source_policy=policy, engine_nice=args.engine_nice,
                          zmq_security=CurveServer(args.curve_keys) if args.curve_keys else None)
    daemon = Daemon(config)
    await daemon.start()
    runner = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        if http is not None:
            from fastavatar_stream.webrtc_server import ServerConfig, start_http

            runner = await start_http(daemon, *http, ServerConfig(allow_origins=args.allow_origin, token=args.token))
            log.info("browser page and WebRTC signaling on http://%s:%d/", *http)
        for source in sources:
            await daemon.open_session(source)
        log.info("daemon ready (Ctrl-C to stop)")
        await stop.wait()
    finally:
        log.info("shutting down")
        if runner is not None:
            await runner.cleanup()
        await daemon.shutdown()


def run(args: argparse.Namespace) -> int:
    check(args)
    if args.engine_actors is not None and (args.ray is None or args.engine_actors < 1):
        raise InputError("--engine-actors needs --ray and a positive count")
    if args.ray not in (None, "local", "auto"):  # before the model loads: a wrong address fails at once
        try:
            from fastavatar_stream.ray_engine import check_reachable
        except ImportError as exc:
            raise InputError(f"--ray needs Ray ({exc}); install it with pip install 'fastavatar-stream[ray]'") from None
        check_reachable(args.ray)
    asyncio.run(serve(args))
    return 0
