"""`fastavatar-stream subscribe --connect tcp://127.0.0.1:P1 --control tcp://127.0.0.1:P2 --out DIR`.

Follows one avatar session published by a daemon (clone pattern: snapshot, then deltas; see
`protocols.client`), writes `DIR/v<version>.ply` for every applied version and prints one line per
version on stdout. Without `--session` it follows the first session that arrives.

With `--animate OUT.mp4 --seconds S` it renders the live-driven avatar instead: the newest rig posed by the newest
motion (`AvatarSubscriber.next_pose`), seen from a fixed camera in front of the face, `--fps` frames per second
for S seconds from the first pose (a frame repeats the last pose when no new motion came in time).
"""
from __future__ import annotations

import argparse
import logging
import re
import time

import numpy as np
from pathlib import Path

from fastavatar_stream.commands._common import output_dir
from fastavatar_stream.errors import UserError

log = logging.getLogger(__name__)

_ENDPOINT = re.compile(r"^(tcp://[^\s:]+:\d{1,5}|ipc://\S+)$")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "subscribe", help="receive avatar versions over ZeroMQ and write a PLY per version",
        description="Connect to a daemon's avatar publisher (PUB) and control (ROUTER) sockets, rebuild the avatar "
                    "from a snapshot plus deltas, and write DIR/v<version>.ply (standard 3DGS PLY) for every "
                    "version applied.")
    p.add_argument("--connect", required=True, metavar="ENDPOINT",
                   help="the daemon's publish endpoint, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--control", required=True, metavar="ENDPOINT",
                   help="the daemon's control endpoint (snapshots), e.g. tcp://127.0.0.1:5556")
    p.add_argument("--out", metavar="DIR", help="folder for v<version>.ply files (created)")
    p.add_argument("--animate", type=Path, metavar="OUT.mp4",
                   help="render the live-driven avatar to this video instead of writing PLY files")
    p.add_argument("--seconds", type=float, default=10.0, metavar="S", help="--animate: seconds to record (default 10)")
    p.add_argument("--fps", type=float, default=25.0, help="--animate: frames per second (default 25)")
    p.add_argument("--size", type=int, default=256, help="--animate: video width and height in pixels (default 256)")
    p.add_argument("--count", type=int, default=0, metavar="N", help="exit after N versions (default: run until Ctrl-C)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="give up after S seconds without a new version (exit 2 if none arrived at all)")
    p.add_argument("--session", default=None, help="follow this session (default: the first one that arrives)")
    p.add_argument("--curve-keys", metavar="DIR", default=None,
                   help="the daemon runs with CURVE keys: DIR holds server.key and client.key_secret "
                        "(`fastavatar-stream keys DIR`)")
    p.set_defaults(func=run)
    return p


def _check(args) -> Path:
    for flag, value in (("--connect", args.connect), ("--control", args.control)):
        if not _ENDPOINT.match(value):
            raise UserError(f"{flag} {value!r} is not a ZeroMQ endpoint; use tcp://HOST:PORT (e.g. tcp://127.0.0.1:5555)")
    if args.count < 0:
        raise UserError(f"--count {args.count} must be >= 0 (0: no limit)")
    if args.timeout is not None and not args.timeout > 0:
        raise UserError(f"--timeout {args.timeout} must be a positive number of seconds")
    if args.session is not None and not 0 < len(args.session) <= 128:
        raise UserError("--session must be 1..128 characters")
    if args.animate is not None:
        if not (args.seconds > 0 and 1 <= args.fps <= 120 and 16 <= args.size <= 2048):
            raise UserError("--animate needs --seconds > 0, --fps in 1..120 and --size in 16..2048")
        return args.animate
    if args.out is None:
        raise UserError("give --out DIR (PLY per version) or --animate OUT.mp4")
    return output_dir(args.out)


def run(args) -> int:
    from protocols.client import AvatarSubscriber
    from protocols.ply import save_ply
    from protocols.zmq_transport import CurveClient

    out = _check(args)
    if args.animate is not None:
        return animate(args)
    security = CurveClient(args.curve_keys) if args.curve_keys else None
    written = 0
    session = args.session
    with AvatarSubscriber(args.connect, args.control, session=session, security=security) as sub:
        while not args.count or written < args.count:
            try:
                state = sub.next_version(timeout=args.timeout)
            except TimeoutError:
                if written == 0:
                    raise UserError(f"no avatar version arrived within {args.timeout:g} s from {args.connect} "
                                    f"(control {args.control}); is the daemon running and publishing"
                                    f"{' session ' + repr(session) if session else ''}?") from None
                log.warning("no new version for %g s; stopping after %d versions", args.timeout, written)
                break
            if session is None:
                session = state.session
                log.info("following session %s", session)
            elif state.session != session:
                continue
            path = save_ply(out / f"v{state.version}.ply", state.arrays)
            written += 1
            latency = f"{(time.time() - state.t_capture) * 1e3:.0f} ms" if state.t_capture > 0 else "n/a"
            print(f"session={state.session} version={state.version} via={state.kind} "
                  f"gaussians={state.arrays['means'].shape[0]} slots={state.n_slots} "
                  f"capture_to_apply={latency} -> {path}", flush=True)
    log.info("wrote %d versions to %s (gaps %d, snapshots %d, malformed %d)", written, out,
             sub.stats.gaps, sub.stats.snapshots, sub.stats.malformed)
    return 0


def animate(args) -> int:
    """`--animate`: render the newest pose at a steady frame rate for --seconds."""
    from fastavatar_stream.avatar_video import front_camera, render_arrays
    from fastavatar_stream.tracking.preview import PreviewWriter
    from protocols.client import AvatarSubscriber

    args.animate.parent.mkdir(parents=True, exist_ok=True)
    timeout = args.timeout if args.timeout is not None else 60.0
    n_frames = max(1, round(args.seconds * args.fps))
    distinct = 0
    with AvatarSubscriber(args.connect, args.control, session=args.session) as sub:
        try:
            latest = sub.next_pose(timeout=timeout)
        except TimeoutError:
            raise UserError(f"no pose arrived within {timeout:g} s from {args.connect} (control {args.control}); "
                            f"is the daemon tracking a face?") from None
        camera_rig, camera = None, None
        origin = latest.motion.translation.copy()  # keep the head in view: translation relative to the first pose
        writer = PreviewWriter(args.animate, args.fps, args.size, args.size)
        start, image, shown = time.monotonic(), None, None
        latencies = []
        try:
            for k in range(n_frames):
                due = start + k / args.fps
                while time.monotonic() < due:
                    try:
                        latest = sub.next_pose(timeout=max(due - time.monotonic(), 0.0))
                    except TimeoutError:
                        break
                if (latest.session, latest.version) != camera_rig:
                    camera_rig = (latest.session, latest.version)
                    camera = front_camera(sub.rig(latest.session), args.size)
                if image is None or (latest.frame, latest.version) != shown:
                    arrays = dict(latest.arrays, means=latest.arrays["means"] - origin)
                    image = render_arrays(arrays, *camera, args.size, args.size)
                    shown = (latest.frame, latest.version)
                    distinct += 1
                    latencies.append(latest.t_received - latest.motion.t_capture)
                writer.write(image)
        finally:
            writer.close()
    p50 = f"{np.median(latencies) * 1e3:.0f} ms" if latencies else "n/a"
    print(f"frames={n_frames} poses={distinct} capture_to_receive_p50={p50} -> {args.animate}", flush=True)
    return 0
