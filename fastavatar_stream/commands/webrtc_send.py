"""`fastavatar-stream webrtc-send VIDEO --url http://127.0.0.1:PORT --out DIR [--timeout S]`.

Streams a video file to a serving daemon as a WebRTC camera track, receives the avatar on the data
channel, and writes `DIR/avatar.ply` (the last version received) and `DIR/report.json`
(versions_received, frames_sent, latency p50/p95, ...).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path
from urllib.parse import urlparse

from fastavatar_stream.commands._common import output_dir
from fastavatar_stream.errors import UserError

log = logging.getLogger(__name__)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "webrtc-send", help="stream a video file to the daemon over WebRTC and save the avatar it sends back",
        description="Send VIDEO as a camera track to a daemon serving WebRTC (fastavatar-stream serve --http), "
                    "receive avatar versions on the data channel, and write DIR/avatar.ply (last version) and "
                    "DIR/report.json (versions_received, frames_sent, latency p50/p95).")
    p.add_argument("video", metavar="VIDEO", help="video file to send (paced like a camera)")
    p.add_argument("--url", required=True, help="the daemon's HTTP address, e.g. http://127.0.0.1:8080")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="stop after S seconds in all (default 300)")
    p.add_argument("--settle", type=float, default=5.0, metavar="S",
                   help="after the clip ends, stop once nothing new arrived for S seconds (default 5)")
    p.add_argument("--max-frames", type=int, default=None, metavar="N", help="send at most N frames")
    p.add_argument("--token", default=None, help="the daemon's offer token (serve --token)")
    p.add_argument("--ice-server", action="append", default=[], metavar="URL",
                   help="STUN/TURN server URL (repeatable; default none)")
    p.set_defaults(func=run)
    return p


def _check(args) -> Path:
    url = urlparse(args.url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise UserError(f"--url {args.url!r} is not an http(s) address; use e.g. http://127.0.0.1:8080")
    if not args.timeout > 0:
        raise UserError(f"--timeout {args.timeout} must be a positive number of seconds")
    if not args.settle >= 0:
        raise UserError(f"--settle {args.settle} must be >= 0 seconds")
    if args.max_frames is not None and args.max_frames < 1:
        raise UserError(f"--max-frames {args.max_frames} must be >= 1")
    if not Path(args.video).is_file():
        raise UserError(f"video file not found: {args.video}; check the path")
    return output_dir(args.out)


def run(args) -> int:
    from fastavatar_stream.webrtc_client import run_client
    from protocols.ply import save_ply
    from protocols.webrtc import make_rtc_config

    out = _check(args)
    result = asyncio.run(run_client(args.video, args.url, timeout=args.timeout, settle=args.settle,
                                    max_frames=args.max_frames, rtc_config=make_rtc_config(args.ice_server),
                                    token=args.token))
    report = result.report()
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if result.buffer is None:
        raise UserError(f"no avatar version arrived within {args.timeout:g} s after sending {result.frames_sent} "
                        f"frames (connection {result.connection_state}); report in {out / 'report.json'}")
    path = save_ply(out / "avatar.ply", result.buffer.live_arrays())
    lat = report["latency_ms"]
    print(f"session={report['session']} versions={report['versions_received']} frames_sent={report['frames_sent']} "
          f"gaussians={report['gaussians']} capture_to_receipt p50={lat['capture_to_receipt_p50']} ms "
          f"p95={lat['capture_to_receipt_p95']} ms -> {path}", flush=True)
    return 0
