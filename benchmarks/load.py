"""Load benchmark (issue 18): many live sessions and subscribers at once, for minutes.

    .venv/bin/python benchmarks/load.py                      # 8 sessions, 20 subscribers, 300 s
    .venv/bin/python benchmarks/load.py --duration 120       # a shorter run

One daemon runs in this process with `--sessions` sessions, each a real clip looped and paced in real time
(live semantics: the window stride grows when the engine is behind, the reader drops frames it cannot hand on).
`--subscribers` subscriber processes (this script with --follow) follow the sessions round-robin over ZeroMQ:
subscriber 0 is slow (sleeps `--slow-s` after every version), subscriber 1 is killed with SIGKILL half-way and
started again. At the end the sessions are stopped, their final versions published, and every subscriber's
rebuilt avatar is compared (SHA-256 of its live arrays) with the daemon's final avatar of that session.

Reported: per subscriber versions applied, version gaps (snapshots re-requested), whether its final avatar equals
the daemon's; capture -> apply latency p50/p95 over the subscribers that keep up; daemon RSS in the first and the
last minute (sampled every 5 s); versions and windows per session. Writes JSON (`--out`, default
benchmarks/results/load.json).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# run as a script, this folder comes first on sys.path and benchmarks/engine.py would hide the engine package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

DEFAULT_VIDEO = REPO.parent / "shared" / "data" / "real" / "obama_address_512.mp4"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "load.json"
MB = 1024 * 1024
RSS_EVERY_S = 5.0
SETTLE_S = 8.0


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def avatar_digest(arrays: dict) -> str:
    """SHA-256 over the live arrays in slot order (ids and every field): equal digests, equal avatars."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(arrays[name].tobytes())
    return digest.hexdigest()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


# ---------------------------------------------------------------------------------------------- subscriber side
def follow(args: argparse.Namespace) -> None:
    """Subscriber process: follow one session until the stop file appears, then write what it saw."""
    from protocols.client import AvatarSubscriber

    latencies, applied, last = [], 0, None
    stop = Path(args.stop_file)
    with AvatarSubscriber(args.connect, args.control, session=args.follow) as sub:
        while not stop.exists():
            try:
                state = sub.next_version(timeout=0.5)
            except TimeoutError:
                continue
            applied += 1
            if last is not None and state.version < last.version:
                raise SystemExit(f"version went back from {last.version} to {state.version}")
            last = state
            if state.t_capture > 0:
                latencies.append(time.time() - state.t_capture)
            if args.slow_s:
                time.sleep(args.slow_s)
        stats = vars(sub.stats)
    Path(args.result).write_text(json.dumps({
        "session": args.follow, "versions_applied": applied, "last_version": last.version if last else None,
        "digest": avatar_digest(last.arrays) if last else None, "latencies_s": latencies, **stats}))


# ------------------------------------------------------------------------------------------------- daemon side
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Subscribers:
    def __init__(self, args: argparse.Namespace, pub: str, ctl: str, folder: Path, sessions: list[str]) -> None:
        self.args, self.pub, self.ctl, self.folder, self.sessions = args, pub, ctl, folder, sessions
        self.stop_file = folder / "stop"
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, index: int, tag: str = "") -> None:
        name = f"sub{index}{tag}"
        cmd = [sys.executable, __file__, "--follow", self.sessions[index % len(self.sessions)],
               "--connect", self.pub, "--control", self.ctl, "--stop-file", str(self.stop_file),
               "--result", str(self.folder / f"{name}.json")]
        if index == 0:
            cmd += ["--slow-s", str(self.args.slow_s)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.procs[name] = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait()

    def finish(self) -> dict[str, dict]:
        self.stop_file.touch()
        out = {}
        for name, proc in self.procs.items():
            try:
                _, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                err = "did not stop"
            path = self.folder / f"{name}.json"
            out[name] = json.loads(path.read_text()) if path.is_file() else {"error": (err or "").strip()[-300:],
                                                                              "returncode": proc.returncode}
        return out


async def run(args: argparse.Namespace) -> dict:
    from fastavatar_stream.daemon import Daemon, DaemonConfig
    from fastavatar_stream.session import SessionOptions
    from fastavatar_stream.sources import VideoFileSource

    pub, ctl = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    defaults = SessionOptions(refine_seconds=args.refine)
    daemon = Daemon(DaemonConfig(weights=args.weights, publish=pub, control=ctl, max_sessions=args.sessions,
                                 keep_ended=args.sessions, session_defaults=defaults))
    await daemon.start()
    folder = Path(tempfile.mkdtemp(prefix="fastavatar-load-"))
    rss: list[tuple[float, float]] = []
    try:
        sids = [await daemon.open_session(VideoFileSource(args.video, realtime=True, loop=True),
                                          options=SessionOptions(**vars(defaults)))
                for _ in range(args.sessions)]
        subs = Subscribers(args, pub, ctl, folder, sids)
        for i in range(args.subscribers):
            subs.start(i)
        t0 = time.monotonic()
        restarted = False
        while (elapsed := time.monotonic() - t0) < args.duration:
            rss.append((round(elapsed, 1), round(rss_mb(), 1)))
            if not restarted and elapsed >= args.duration / 2 and args.subscribers > 1:
                subs.kill("sub1")
                subs.start(1, "-restarted")
                restarted = True
            await asyncio.sleep(RSS_EVERY_S)
        for sid in sids:
            daemon.stop_reading(sid)
        for sid in sids:
            await daemon.wait_session(sid)
        await asyncio.sleep(SETTLE_S)  # subscribers apply the final versions
        final = {sid: {"version": daemon.buffers[sid].version,
                       "digest": avatar_digest(daemon.buffers[sid].live_arrays()),
                       **{k: daemon.sessions[sid].stats()[k] for k in ("frames_read", "windows", "gaussians")},
                       "versions_published": daemon.sessions[sid].report.versions_total}
                 for sid in sids}
        results = await asyncio.get_running_loop().run_in_executor(None, subs.finish)
    finally:
        await daemon.shutdown()
    return summarize(args, final, results, rss)


def summarize(args: argparse.Namespace, final: dict, results: dict, rss: list) -> dict:
    subscribers = {}
    keep_up = []
    for name, r in results.items():
        if "error" in r:
            subscribers[name] = r
            continue
        target = final[r["session"]]
        equal = r["last_version"] == target["version"] and r["digest"] == target["digest"]
        subscribers[name] = {k: r[k] for k in ("session", "versions_applied", "last_version", "gaps", "snapshots",
                                               "malformed", "resyncs")}
        subscribers[name]["final_equals_daemon"] = equal
        if name not in ("sub0", "sub1"):
            keep_up += r["latencies_s"]
    first = [v for t, v in rss if t < 60]
    last = [v for t, v in rss if t >= rss[-1][0] - 60] if rss else []
    alive = [s for n, s in subscribers.items() if n != "sub1" and "final_equals_daemon" in s]
    return {
        "command": "python benchmarks/load.py " + " ".join(sys.argv[1:]),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "note": "2-core host shared with other engineers' work while this ran"},
        "duration_s": args.duration, "sessions": args.sessions, "subscribers": args.subscribers,
        "video": str(args.video), "refine_s": args.refine, "weights": args.weights or "default",
        "final_equal": sum(s["final_equals_daemon"] for s in alive), "final_compared": len(alive),
        "gaps_total_excluding_slow": sum(s.get("gaps", 0) for n, s in subscribers.items() if n != "sub0"),
        "malformed_total": sum(s.get("malformed", 0) for s in subscribers.values()),
        "latency_s": {"p50": percentile(keep_up, 50), "p95": percentile(keep_up, 95), "n": len(keep_up)},
        "rss_mb": {"first_minute_mean": round(sum(first) / len(first), 1) if first else None,
                   "last_minute_mean": round(sum(last) / len(last), 1) if last else None, "series": rss},
        "sessions_final": final, "subscriber_results": subscribers,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    p.add_argument("--weights", default=None)
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load (default 300)")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--subscribers", type=int, default=20)
    p.add_argument("--refine", type=float, default=5.0, help="refinement seconds per session (default 5)")
    p.add_argument("--slow-s", type=float, default=0.5, help="subscriber 0 sleeps this long after each version")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    # subscriber-process mode (used by the benchmark itself)
    p.add_argument("--follow", help=argparse.SUPPRESS)
    p.add_argument("--connect", help=argparse.SUPPRESS)
    p.add_argument("--control", help=argparse.SUPPRESS)
    p.add_argument("--stop-file", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.follow:
        follow(args)
        return
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    result = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lat = result["latency_s"]
    print(f"{args.sessions} sessions x {args.duration:g} s, {args.subscribers} subscribers: final avatar equal "
          f"{result['final_equal']}/{result['final_compared']}, gaps (not the slow one) "
          f"{result['gaps_total_excluding_slow']}, malformed {result['malformed_total']}, latency p50 "
          f"{lat['p50']} s p95 {lat['p95']} s, RSS first minute {result['rss_mb']['first_minute_mean']} MB, last "
          f"minute {result['rss_mb']['last_minute_mean']} MB -> {args.out}")


if __name__ == "__main__":
    main()
