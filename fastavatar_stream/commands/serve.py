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
    add_landmarks_option(p)
    p.add_argument("--max-sessions", type=int, default=8, help="concurrent sessions (default 8)")
    p.add_argument("--max-batch", type=int, default=None, metavar="N",
                   help="most ready windows of different sessions run in one forward (default: 4 on CUDA, 1 on CPU)")
    p.add_argument("--snapshot-dir", type=Path, help="write each session's final avatar here as PLY")
    p.add_argument("--ray", metavar="ADDRESS", help="run the engine on Ray actors: 'local' (a Ray instance of this "
                                                     "daemon's own), 'auto' (the cluster this machine joined with "
                                                     "'ray start') or a cluster address; each session is placed on "
                                                     "the least loaded actor and moves when its actor dies")
    p.add_argument("--engine-actors", type=int, metavar="N",
                   help="with --ray: engine actors to run (default: one per GPU of the cluster, 1 without GPUs)")
    p.set_defaults(func=run)
    return p


def _endpoint(value: str | None) -> str | None:
    return None if value in (None, "", "none") else value


def parse_http(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--http needs HOST:PORT, e.g. 127.0.0.1:8080, got {value!r}")
    return host, int(port)


async def serve(args: argparse.Namespace) -> None:
    from fastavatar_stream.daemon import Daemon, DaemonConfig
    from fastavatar_stream.session import SessionOptions
    from fastavatar_stream.sources import open_source

    defaults = SessionOptions(budget=args.budget, refine_seconds=max(args.refine, 0.0), fusion=args.fusion,
                              detector=args.landmarks)
    config = DaemonConfig(weights=args.weights, device=resolve_device(args.device),
                          publish=_endpoint(args.publish), control=_endpoint(args.control),
                          max_sessions=args.max_sessions, max_batch=args.max_batch, snapshot_dir=args.snapshot_dir,
                          session_defaults=defaults, ray=args.ray, engine_actors=args.engine_actors)
    http = parse_http(args.http) if args.http else None
    sources = [open_source(s, realtime=args.realtime) for s in args.source]
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
            from fastavatar_stream.webrtc_server import start_http

            runner = await start_http(daemon, *http)
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
    if args.max_sessions < 1 or args.budget < 1 or (args.max_batch is not None and args.max_batch < 1):
        raise InputError("--max-sessions, --max-batch and --budget must be positive")
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
