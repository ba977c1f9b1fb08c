"""`fastavatar-stream replay`: run a recorded stream through the whole pipeline in one process."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
from pathlib import Path

from engine.errors import InputError
from fastavatar_stream.commands._common import (DEVICE_HELP, WEIGHTS_HELP, add_landmarks_option, number,
                                               output_dir, resolve_device)

log = logging.getLogger(__name__)

#: refinement budget of the demo: keeps `replay --demo` well under two minutes on 2 CPU cores
DEMO_REFINE_SECONDS = 20.0
#: field of view a camera may have (degrees): the tracker's projection needs 0 < fov < 180 and is only
#: meaningful for real lenses well inside that
FOV_RANGE = (5.0, 160.0)
#: exit codes of an interrupted replay (128 + the signal number, as a shell reports it)
EXIT_ON_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "replay", help="reconstruct an avatar from a video file or image folder",
        description="Replay a video file (anything FFmpeg reads), an image folder or a multi-view capture folder "
                    "through tracking, sliding windows, the LGRT engine, fusion and refinement. Writes "
                    "DIR/avatar.ply, DIR/report.json and DIR/preview.png.")
    p.add_argument("source", nargs="?", help="video file, image folder or multi-view folder (omit with --demo)")
    p.add_argument("--demo", action="store_true",
                   help="replay the built-in demo clip (made on the fly from a public-domain portrait)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--weights", help=WEIGHTS_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--realtime", action="store_true",
                   help="pace frames to the file's timestamps and behave like a live stream (stride grows when "
                        "the engine is slower than the frames)")
    p.add_argument("--publish", metavar="ENDPOINT", help="publish avatar versions on this ZeroMQ PUB endpoint, "
                                                         "e.g. tcp://127.0.0.1:5555")
    p.add_argument("--control", metavar="ENDPOINT", help="answer snapshot/control requests on this ZeroMQ "
                                                         "ROUTER endpoint, e.g. tcp://127.0.0.1:5556")
    p.add_argument("--holdout", type=int, default=0, metavar="K",
                   help="keep every K-th frame out of reconstruction and refinement and evaluate on it")
    p.add_argument("--holdout-tail", type=float, default=0.0, metavar="FRACTION",
                   help="keep the last FRACTION of the frames (e.g. 0.25) out of reconstruction and refinement and "
                        "evaluate on them: the avatar is scored on a stretch of the stream it never saw")
    refine = p.add_mutually_exclusive_group()
    refine.add_argument("--refine", type=float, metavar="SECONDS", default=None,
                        help=f"per-session refinement time budget (default: {DEMO_REFINE_SECONDS:g} s)")
    refine.add_argument("--no-refine", action="store_true", help="feed-forward avatar only")
    p.add_argument("--budget", type=int, default=60_000, help="most Gaussians the avatar keeps (default 60000)")
    p.add_argument("--fusion", choices=["visibility", "concat"], default=None,
                   help="how per-frame Gaussians combine: visibility (each anchor's copies weighted by how squarely "
                        "their frames saw it; default for our models) or concat (the paper's plain concatenation "
                        "and importance pruning; default for the official weights)")
    p.add_argument("--surface", action=argparse.BooleanOptionalAction, default=None,
                   help="tile the avatar's surface with small Gaussians painted by the frames (default: on for our "
                        "models, off for the official weights)")
    p.add_argument("--max-frames", type=int, help="stop after this many frames")
    add_landmarks_option(p)
    p.add_argument("--fov", type=float, default=40.0,
                   help=f"horizontal field of view of the camera in degrees ({FOV_RANGE[0]:g}..{FOV_RANGE[1]:g}; "
                        f"default 40)")
    p.add_argument("--linger", type=float, default=0.0, metavar="SECONDS",
                   help="after the stream's last window, keep the session open this long: refinement goes on "
                        "while its budget lasts and late subscribers still get snapshots; with a hold-out the "
                        "avatar is scored at the stream's end and every 10 s of lingering")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.epilog = "exit codes: 0 done, 2 bad input, 130 SIGINT, 143 SIGTERM (what was built is written)"
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from fastavatar_stream.replay import ReplayOptions, run_replay

    if args.demo == bool(args.source):
        raise InputError("give a SOURCE to replay or --demo (not both)")
    if args.budget <= 0:
        raise InputError(f"--budget must be positive, got {args.budget}")
    if args.holdout < 0 or args.holdout == 1:
        raise InputError("--holdout K needs K >= 2 (every K-th frame is held out)")
    if not (0.0 <= args.holdout_tail < 1.0):
        raise InputError(f"--holdout-tail must be a fraction in [0, 1), got {args.holdout_tail:g}")
    if args.max_frames is not None and args.max_frames < 1:
        raise InputError(f"--max-frames must be >= 1, got {args.max_frames}")
    number(args.fov, "--fov", low=FOV_RANGE[0], high=FOV_RANGE[1])
    number(args.linger, "--linger", low=0)
    if args.refine is not None:
        number(args.refine, "--refine", low=0)
    source = args.source
    if args.demo:
        from fastavatar_stream.demo import make_demo_clip

        source = str(make_demo_clip(Path(tempfile.mkdtemp(prefix="fastavatar-demo-")) / "demo.mp4"))
    elif not Path(source).exists() and not str(source).startswith("device:"):
        raise InputError(f"{source} does not exist")
    device = resolve_device(args.device)
    output_dir(args.out)
    refine = 0.0 if args.no_refine else (DEMO_REFINE_SECONDS if args.refine is None else args.refine)
    opts = ReplayOptions(source=source, out=args.out, weights=args.weights, realtime=args.realtime,
                         publish=args.publish, control=args.control, holdout=args.holdout,
                         holdout_tail=args.holdout_tail, refine_seconds=refine,
                         budget=args.budget, max_frames=args.max_frames, detector=args.landmarks,
                         fov_degrees=args.fov, progress=not args.no_progress and sys.stderr.isatty(),
                         linger_s=args.linger, fusion=args.fusion, surface=args.surface, device=device)
    report = asyncio.run(run_replay(opts))
    summary = {k: report.get(k) for k in ("frames_read", "frames_tracked", "windows", "versions", "wall_s",
                                          "realtime_factor", "first_avatar_s", "n_gaussians_final")}
    if report.get("holdout"):
        summary["holdout"] = {k: report["holdout"].get(k) for k in ("psnr", "ssim", "identity_distance")}
    print(json.dumps(summary))
    if report.get("interrupted"):
        print(f"fastavatar-stream replay: interrupted by {report['signal']}; wrote what was built to {args.out}",
              file=sys.stderr)
        return EXIT_ON_SIGNAL[report["signal"]]
    log.info("wrote %s", ", ".join(str(args.out / n) for n in ("avatar.ply", "report.json", "preview.png")))
    return 0
