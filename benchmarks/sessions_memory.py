"""Memory over many short sessions (issue 18, "bounded memory"): does a daemon give back what a session used?

    .venv/bin/python benchmarks/sessions_memory.py                       # 200 sessions, default model
    .venv/bin/python benchmarks/sessions_memory.py --sessions 40 --refine 0.5

Runs one daemon in this process (the default embedded model unless --weights) and, one after another, `--sessions`
short sessions on the first `--frames` frames of a real clip, each with `--refine` seconds of refinement (so the
engine worker builds a refiner and refinement frames for it), and records this process's RSS after each one
(/proc/self/statm). Target: RSS after the last session within +100 MB of RSS after the 10th. Prints a summary
and writes JSON (`--out`, default benchmarks/results/sessions_memory.json).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# run as a script, this folder comes first on sys.path and benchmarks/engine.py would hide the engine package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

DEFAULT_VIDEO = REPO.parent / "shared" / "data" / "real" / "obama_address_512.mp4"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "sessions_memory.json"
MB = 1024 * 1024
TARGET_GROWTH_MB = 100.0
BASELINE_SESSION = 10


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


async def run(args: argparse.Namespace) -> dict:
    from fastavatar_stream.daemon import Daemon, DaemonConfig
    from fastavatar_stream.session import SessionOptions
    from fastavatar_stream.sources import VideoFileSource

    daemon = Daemon(DaemonConfig(weights=args.weights))
    await daemon.start()
    series, versions, t0 = [], [], time.perf_counter()
    try:
        for i in range(args.sessions):
            options = SessionOptions(max_frames=args.frames, refine_seconds=args.refine)
            sid = await daemon.open_session(VideoFileSource(args.video), options=options)
            session = await daemon.wait_session(sid)
            versions.append(session.latest.version if session.latest else 0)
            del session
            gc.collect()
            series.append(round(rss_mb(), 1))
            if (i + 1) % 10 == 0:
                print(f"{i + 1} sessions: RSS {series[-1]:.0f} MB, in memory {len(daemon.sessions)} sessions, "
                      f"worker {len(daemon.worker._sessions)}", flush=True)
        held = {"daemon_sessions": len(daemon.sessions), "daemon_buffers": len(daemon.buffers),
                "worker_sessions": len(daemon.worker._sessions), "worker_engines": len(daemon.worker._engines)}
    finally:
        await daemon.shutdown()
    base = series[min(BASELINE_SESSION, len(series)) - 1]
    growth = series[-1] - base
    return {
        "command": "python benchmarks/sessions_memory.py " + " ".join(sys.argv[1:]),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "note": "2-core host shared with other engineers' work while this ran"},
        "video": str(args.video), "sessions": args.sessions, "frames": args.frames, "refine_s": args.refine,
        "weights": args.weights or "default", "wall_s": round(time.perf_counter() - t0, 1),
        "rss_mb_after_each_session": series, "versions_per_session": versions,
        f"rss_mb_after_{BASELINE_SESSION}": base, "rss_mb_after_last": series[-1],
        "growth_mb": round(growth, 1), "target_growth_mb": TARGET_GROWTH_MB,
        "within_target": growth <= TARGET_GROWTH_MB, "held_at_end": held,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    p.add_argument("--weights", default=None)
    p.add_argument("--sessions", type=int, default=200)
    p.add_argument("--frames", type=int, default=8, help="frames per session")
    p.add_argument("--refine", type=float, default=0.3, help="refinement seconds per session")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    if args.sessions < BASELINE_SESSION:
        p.error(f"--sessions must be at least {BASELINE_SESSION}")
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    result = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"RSS after {BASELINE_SESSION} sessions {result[f'rss_mb_after_{BASELINE_SESSION}']:.0f} MB, after "
          f"{args.sessions}: {result['rss_mb_after_last']:.0f} MB (growth {result['growth_mb']:+.0f} MB, target "
          f"<= +{TARGET_GROWTH_MB:.0f}); held at end {result['held_at_end']} -> {args.out}")


if __name__ == "__main__":
    main()
