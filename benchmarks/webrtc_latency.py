"""WebRTC latency on loopback: a real clip streamed by the Python client into the real daemon, avatars back.

    .venv/bin/python benchmarks/webrtc_latency.py [--video PATH] [--max-frames 75] [--runs 3] [--threads 1]
        [--weights DIR] [--out benchmarks/results/webrtc_latency.json]

Each run starts the daemon (default checkpoint, refinement off, no ZeroMQ) with its HTTP/WebRTC server on
127.0.0.1, and `fastavatar_stream.webrtc_client.run_client` sends the clip as a paced VP8 camera track and
collects the avatar versions from the data channel. Per version the client records two latencies:
- capture -> receipt: from the newest frame in that version (its `t_capture`) to its arrival at the client;
  this includes tracking, the window schedule and the engine;
- publish -> receipt: from the daemon handing the version to the WebRTC server to its arrival (the transport:
  encoding, 16 KiB data-channel chunks, decoding).
Prints per run p50/p95 and their spread over runs, and writes JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# run as a script, this folder comes first on sys.path and benchmarks/engine.py would hide the engine package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VIDEO = REPO.parent / "shared" / "data" / "real" / "obama_address_512.mp4"
LATENCIES = ("capture_to_receipt_p50", "capture_to_receipt_p95", "publish_to_receipt_p50", "publish_to_receipt_p95")


async def one_run(video: Path, weights: str | None, max_frames: int) -> dict:
    """One daemon + one client peer; the client's report (latencies in ms) and the daemon's session counts."""
    from fastavatar_stream.daemon import Daemon, DaemonConfig
    from fastavatar_stream.session import SessionOptions
    from fastavatar_stream.webrtc_client import run_client
    from fastavatar_stream.webrtc_server import ServerConfig, start_http
    from protocols.webrtc import loopback_ice

    config = DaemonConfig(weights=weights, session_defaults=SessionOptions(refine_seconds=0.0))
    daemon = Daemon(config)
    await daemon.start()
    with loopback_ice():  # aioice offers no loopback candidate by itself
        runner = await start_http(daemon, "127.0.0.1", 0, ServerConfig())
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            result = await run_client(video, url, timeout=max_frames + 120.0, settle=3.0, max_frames=max_frames)
            session = daemon.sessions[result.session]
            await daemon.wait_session(result.session)
            report = result.report()
            report["frames_tracked"] = session.frames_tracked
            report["windows"] = session.windows_done
            return report
        finally:
            await runner.cleanup()
            await daemon.shutdown()


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    ap.add_argument("--weights", default=None, help="checkpoint folder (default: the shipped one)")
    ap.add_argument("--max-frames", type=int, default=75, help="frames streamed per run (default 75, 3 s)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "webrtc_latency.json")
    args = ap.parse_args(argv)
    if not args.video.is_file() or args.max_frames < 1 or args.runs < 1:
        print("error: --video must be a file, --max-frames and --runs at least 1", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    runs = []
    for k in range(args.runs):
        t0 = time.perf_counter()
        report = asyncio.run(one_run(args.video, args.weights, args.max_frames))
        report["run_wall_s"] = round(time.perf_counter() - t0, 2)
        lat = report["latency_ms"]
        print(f"run {k + 1}: {report['versions_received']} versions, capture->receipt p50/p95 "
              f"{lat['capture_to_receipt_p50']} / {lat['capture_to_receipt_p95']} ms, publish->receipt p50/p95 "
              f"{lat['publish_to_receipt_p50']} / {lat['publish_to_receipt_p95']} ms", flush=True)
        runs.append(report)
    summary = {name: spread([r["latency_ms"][name] for r in runs if r["latency_ms"][name] is not None])
               for name in LATENCIES if any(r["latency_ms"][name] is not None for r in runs)}
    payload = {"benchmark": "webrtc_latency", "video": str(args.video), "weights": args.weights or "default",
               "max_frames": args.max_frames, "runs": args.runs, "torch_threads": args.threads, "refine_s": 0.0,
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_start": load_start,
                           "loadavg_end": os.getloadavg()},
               "latency_ms_over_runs": summary, "per_run": runs}
    for name, s in summary.items():
        print(f"{name}: median {s['median']:.1f} ms over {len(s['values'])} runs "
              f"(min {s['min']:.1f}, max {s['max']:.1f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
