"""Replay benchmark: the whole daemon pipeline on a real clip (issue 6, "Measured, not assumed").

    .venv/bin/python benchmarks/replay.py                          # default checkpoint, fast + realtime modes
    .venv/bin/python benchmarks/replay.py --weights DIR --max-frames 60 --modes fast
    .venv/bin/python benchmarks/replay.py --soak 600               # 10-minute looped live replay: RSS flat?

Modes:
  fast      every frame as fast as possible, every scheduled window processed (`replay` without --realtime)
  realtime  frames paced to the file's timestamps with live semantics: when the engine is slower than the frames
            the window stride grows (the strides used are recorded) and the reader drops frames it cannot hand on
  soak      (--soak SECONDS) the clip looped (VideoFileSource(loop=True)) in realtime for SECONDS through the
            daemon API, RSS sampled every --sample-every seconds; compares RSS in the first and last minute

Per mode: frames/s (frames tracked per wall second), real-time factor (media seconds per wall second),
per-stage p50/p95/p99, first-avatar latency (first publish minus capture of the first frame), capture ->
publish latency, memory (getrusage peak RSS and an RSS series sampled from /proc/self/statm), Gaussian count
per version, window wait (ready -> engine). Each mode runs in its own process so memory peaks do not mix.
Prints a table and writes JSON (`--out`, default benchmarks/results/replay.json).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# run as a script, this folder comes first on sys.path and benchmarks/engine.py would hide the engine package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from fastavatar_stream.report import json_safe  # noqa: E402

DEFAULT_VIDEO = REPO.parent / "shared" / "data" / "real" / "obama_address_512.mp4"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "replay.json"
MB = 1024 * 1024
TARGET_RTF = 1.0
TARGET_FIRST_AVATAR_S = 1.0
TARGET_RSS_DRIFT = 0.10


# ---------------------------------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc/self/statm: pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_mb() -> float:
    """Peak resident set size of this process so far (getrusage; kilobytes on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler(threading.Thread):
    """Samples RSS every `interval` seconds into `samples` [(seconds since start, MB)] until stopped."""

    def __init__(self, interval: float) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._halt = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while True:
            self.samples.append((round(time.monotonic() - self.t0, 3), round(rss_bytes() / MB, 2)))
            if self._halt.wait(self.interval):
                return

    def restart(self) -> None:
        """Drop the samples so far and count time from now."""
        self.t0 = time.monotonic()
        self.samples.clear()

    def stop(self) -> list[tuple[float, float]]:
        self._halt.set()
        self.join()
        self.samples.append((round(time.monotonic() - self.t0, 3), round(rss_bytes() / MB, 2)))
        return self.samples


def memory_summary(samples: list[tuple[float, float]]) -> dict:
    values = [mb for _, mb in samples]
    return {"maxrss_mb": round(maxrss_mb(), 1), "rss_start_mb": values[0], "rss_end_mb": values[-1],
            "rss_peak_sampled_mb": max(values), "rss_samples": [list(s) for s in samples]}


def drift(samples: list[tuple[float, float]], span: float) -> dict:
    """Median RSS over the first and the last `span` seconds of the samples and their relative change."""
    import numpy as np

    t_end = samples[-1][0]
    first = [mb for t, mb in samples if t <= span]
    last = [mb for t, mb in samples if t >= t_end - span]
    a, b = float(np.median(first)), float(np.median(last))
    change = (b - a) / a
    return {"span_s": span, "first_median_mb": round(a, 1), "last_median_mb": round(b, 1),
            "first_max_mb": max(first), "last_max_mb": max(last), "change": round(change, 4),
            "flat": abs(change) <= TARGET_RSS_DRIFT}


# ---------------------------------------------------------------------------------------------------- summaries
def _r(x, nd: int = 4):
    return None if x is None or not math.isfinite(float(x)) else round(float(x), nd)


def thin(pairs: list, limit: int = 400) -> list:
    """At most `limit` evenly spaced entries, always keeping the last one."""
    if len(pairs) <= limit:
        return pairs
    step = len(pairs) / limit
    out = [pairs[int(i * step)] for i in range(limit)]
    return out if out[-1] is pairs[-1] else out + [pairs[-1]]


def summarize(report: dict, wall_s: float | None = None) -> dict:
    """The benchmark's view of a replay report (SessionReport.to_dict() plus replay extras)."""
    extra = report.get("extra", {})
    wall = wall_s if wall_s is not None else report["wall_s"]
    versions = report.get("versions_published", report.get("versions", []))
    if isinstance(versions, int):
        versions = []
    counts = report.get("n_gaussians", [])
    return {
        "frames_read": report["frames_read"], "frames_tracked": report["frames_tracked"],
        "frames_dropped": report["frames_dropped"], "frames_unusable": report.get("frames_unusable", 0),
        "windows": report["windows"], "versions": len(counts),
        "wall_s": _r(wall, 3), "media_s": _r(report["media_s"], 3),
        "frames_per_s": _r(report["frames_tracked"] / wall if wall else 0.0, 2),
        "realtime_factor": _r(report["realtime_factor"], 3),
        "first_avatar_s": _r(report.get("first_avatar_s")),
        "latency": {k: _r(v) for k, v in report.get("latency", {}).items()},
        "stages": {name: {k: _r(st.get(k)) for k in ("n", "p50", "p95", "p99", "max", "total")}
                   for name, st in report.get("stages", {}).items()},
        "strides": report.get("strides", []),
        "window_wait": {k: _r(v) for k, v in extra.get("window_wait", {}).items()},
        "refine_bursts": extra.get("refine_bursts"),
        "gaussians": thin([[int(v), int(n)] for v, n in zip(versions or range(1, len(counts) + 1), counts)]),
        "refine_s": extra.get("session", {}).get("refine_s"),
        "errors": report.get("errors", []),
    }


# ---------------------------------------------------------------------------------------------------- modes
def run_mode(mode: str, args: argparse.Namespace) -> dict:
    """One mode in this process."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sampler = RssSampler(args.sample_every)
    sampler.start()
    t0 = time.perf_counter()
    if mode == "soak":
        result = asyncio.run(_soak(args, sampler))
    else:
        from fastavatar_stream.replay import ReplayOptions, run_replay

        out = Path(args.work) / mode
        opts = ReplayOptions(source=str(args.video), out=out, weights=args.weights, realtime=mode == "realtime",
                             refine_seconds=args.refine, budget=args.budget, max_frames=args.max_frames,
                             detector=args.detector, surface=args.surface, progress=False)
        report = asyncio.run(run_replay(opts))
        result = summarize(report)
        result["outputs"] = str(out)
    samples = sampler.stop()
    result["process_wall_s"] = _r(time.perf_counter() - t0, 3)
    result["torch_threads"] = torch.get_num_threads()
    result["memory"] = memory_summary(samples)
    if mode == "soak":
        span = min(args.soak_window, args.soak / 4)
        result["memory"]["drift"] = drift(samples, span)
    return result


async def _soak(args: argparse.Namespace, sampler: RssSampler) -> dict:
    """Loop the clip live through the daemon API for args.soak seconds."""
    from fastavatar_stream.daemon import Daemon, DaemonConfig
    from fastavatar_stream.replay import window_log
    from fastavatar_stream.session import SessionOptions
    from fastavatar_stream.sources import VideoFileSource

    t0 = time.perf_counter()
    daemon = Daemon(DaemonConfig(weights=args.weights))
    await daemon.start()
    print(f"soak: daemon started in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    try:
        source = VideoFileSource(args.video, realtime=True, loop=True)
        options = SessionOptions(live=True, budget=args.budget, refine_seconds=args.refine, detector=args.detector,
                                 surface=args.surface)
        sampler.restart()  # the series starts with the stream, after model loading and warm-up
        sid = await daemon.open_session(source, name=f"soak:{Path(args.video).name}", options=options)
        session = daemon.sessions[sid]
        t_end = time.monotonic() + args.soak
        while time.monotonic() < t_end and session.state == "running":
            await asyncio.sleep(1.0)
        ended_early = session.state != "running"
        t_close = time.perf_counter()
        await daemon.close_session(sid)
        print(f"soak: {args.soak:g} s done, session closed in {time.perf_counter() - t_close:.1f} s",
              file=sys.stderr, flush=True)
        report = session.report.to_dict()
        report["extra"] = {**report.get("extra", {}), **window_log(session), "session": session.stats()}
        report["frames_tracked"], report["windows"] = session.frames_tracked, session.windows_done
        result = summarize(report)
        result.update(soak_s=args.soak, ended_early=ended_early, state=session.state,
                      session_error=session.error, rss_at_session_start_mb=sampler.samples[0][1])
        return result
    finally:
        await daemon.shutdown()


def run_child(mode: str, args: argparse.Namespace, argv: list[str]) -> dict:
    """Run one mode in a fresh process (separate memory peak) and read its JSON back."""
    with tempfile.TemporaryDirectory(prefix="replay-bench-") as tmp:
        out = Path(tmp) / f"{mode}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--modes", mode, "--child-out", str(out),
               "--work", str(Path(args.work))]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        if proc.returncode != 0 or not out.is_file():
            return {"failed": f"mode {mode} failed with exit code {proc.returncode}"}
        return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------------- output
def targets(results: dict) -> dict:
    out = {}
    fast, live, soak = results.get("fast"), results.get("realtime"), results.get("soak")
    if fast and "failed" not in fast:
        out["fast_realtime_factor_ge_1"] = (fast["realtime_factor"] or 0) >= TARGET_RTF
    if live and "failed" not in live:
        out["realtime_first_avatar_le_1s"] = (live["first_avatar_s"] is not None
                                              and live["first_avatar_s"] <= TARGET_FIRST_AVATAR_S)
        out["realtime_no_frames_dropped"] = live["frames_dropped"] == 0
    if soak and "failed" not in soak:
        out["soak_rss_flat_10pct"] = soak["memory"]["drift"]["flat"]
    return out


def table(results: dict) -> str:
    modes = [m for m in ("fast", "realtime", "soak") if m in results and "failed" not in results[m]]

    def row(label: str, get) -> str:
        cells = []
        for m in modes:
            try:
                v = get(results[m])
            except (KeyError, TypeError, IndexError):
                v = None
            cells.append("-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
        return f"| {label} | " + " | ".join(cells) + " |"

    lines = ["| metric | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|",
             row("frames read / tracked / dropped", lambda r: f"{r['frames_read']} / {r['frames_tracked']} / "
                                                           f"{r['frames_dropped']}"),
             row("windows / versions", lambda r: f"{r['windows']} / {r['versions']}"),
             row("wall s", lambda r: r["wall_s"]),
             row("frames/s", lambda r: r["frames_per_s"]),
             row("real-time factor", lambda r: r["realtime_factor"]),
             row("first avatar s", lambda r: r["first_avatar_s"]),
             row("capture->publish p50 / p95 s", lambda r: f"{r['latency']['p50']:.3f} / {r['latency']['p95']:.3f}"),
             row("window wait p95 s", lambda r: r["window_wait"].get("p95")),
             row("strides used", lambda r: ",".join(str(s) for s in sorted(set(r["strides"]))) or None),
             row("Gaussians first -> last", lambda r: f"{r['gaussians'][0][1]} -> {r['gaussians'][-1][1]}"),
             row("peak RSS MB (getrusage)", lambda r: r["memory"]["maxrss_mb"]),
             row("RSS start -> end MB", lambda r: f"{r['memory']['rss_start_mb']:.0f} -> "
                                                  f"{r['memory']['rss_end_mb']:.0f}")]
    if "soak" in modes:
        lines.append(row("RSS first / last minute MB", lambda r: f"{r['memory']['drift']['first_median_mb']} / "
                                                                 f"{r['memory']['drift']['last_median_mb']} "
                                                                 f"({r['memory']['drift']['change']:+.1%})"))
    stages = sorted({s for m in modes for s in results[m]["stages"]})
    for s in stages:
        lines.append(row(f"stage {s} p50/p95/p99 ms",
                         lambda r, s=s: "/".join(f"{1000 * r['stages'][s][q]:.1f}" for q in ("p50", "p95", "p99"))))
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", type=Path, default=DEFAULT_VIDEO, help=f"clip to replay (default {DEFAULT_VIDEO})")
    ap.add_argument("--weights", help="checkpoint folder or official:DIR (default: the embedded default checkpoint)")
    ap.add_argument("--modes", nargs="+", choices=["fast", "realtime", "soak"], default=None,
                    help="modes to run (default: fast realtime, plus soak with --soak)")
    ap.add_argument("--realtime", action="store_true", help="shorthand for --modes realtime")
    ap.add_argument("--soak", type=float, default=0.0, metavar="SECONDS",
                    help="also run a looped live replay for this long (e.g. 600)")
    ap.add_argument("--soak-window", type=float, default=60.0,
                    help="span compared at the start and the end of the soak (default 60 s)")
    ap.add_argument("--sample-every", type=float, default=None,
                    help="RSS sampling interval in seconds (default 0.25, 2 in the soak)")
    ap.add_argument("--max-frames", type=int, help="stop the fast/realtime replays after this many frames")
    ap.add_argument("--refine", type=float, default=0.0,
                    help="per-session refinement budget in seconds (default 0: throughput of the feed-forward path)")
    ap.add_argument("--budget", type=int, default=60_000, help="Gaussian budget per avatar")
    ap.add_argument("--detector", "--landmarks", dest="detector", default="auto",
                    choices=["auto", "mediapipe", "dlib", "face-alignment"])
    ap.add_argument("--surface", action=argparse.BooleanOptionalAction, default=None,
                    help="paint a surface layer (default: the model's default, on for ours)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    ap.add_argument("--work", default=None, help="folder for the replays' outputs (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.modes is None:
        args.modes = ["realtime"] if args.realtime else ["fast", "realtime"] + (["soak"] if args.soak else [])
    if "soak" in args.modes and args.soak <= 0:
        ap.error("the soak mode needs --soak SECONDS")
    if args.sample_every is None:
        args.sample_every = 2.0 if args.modes == ["soak"] else 0.25
    if not args.video.is_file():
        ap.error(f"video not found: {args.video}")
    args.work = args.work or tempfile.mkdtemp(prefix="replay-bench-")
    return args


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse(raw)
    if args.child_out is not None:
        args.child_out.write_text(json.dumps(json_safe(run_mode(args.modes[0], args))))
        return 0
    passthrough = _without(raw, {"--modes", "--child-out", "--out", "--work"}, flags={"--realtime"})
    load_start = os.getloadavg()
    results = {m: run_child(m, args, passthrough) for m in args.modes}
    data = {
        "video": str(args.video), "weights": args.weights or "default", "refine_s": args.refine,
        "budget": args.budget, "max_frames": args.max_frames, "surface": args.surface,
        "command": "python benchmarks/replay.py " + " ".join(raw),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "targets": {"realtime_factor": TARGET_RTF, "first_avatar_s": TARGET_FIRST_AVATAR_S,
                    "rss_drift": TARGET_RSS_DRIFT},
        "met": targets(results), "modes": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(json_safe(data), indent=1) + "\n")
    print(table(results))
    print(f"targets met: {data['met']}")
    print(f"load average {load_start[0]:.2f} -> {os.getloadavg()[0]:.2f} (other work on the machine inflates "
          f"timings); JSON: {args.out}")
    return 0 if all("failed" not in r for r in results.values()) else 1


def _without(argv: list[str], options: set[str], flags: set[str] = frozenset()) -> list[str]:
    """argv minus the given options with their values (`--opt v...` and `--opt=v`) and the given flags."""
    out, skip = [], False
    for a in argv:
        if skip and not a.startswith("--"):
            continue
        skip = False
        if a in flags:
            continue
        if a.split("=", 1)[0] in options:
            skip = "=" not in a
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
