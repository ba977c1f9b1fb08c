"""Live-animation benchmark (issue 19): how fast a tracked frame's pose reaches subscribers while the engine works.

    .venv/bin/python benchmarks/animation.py                       # default checkpoint, real clip, 12 s each
    .venv/bin/python benchmarks/animation.py --seconds 20 --refine 20

Two scenarios, each with the daemon running the embedded default model on the real clip paced like a camera
(windows and refinement keep the engine busy the whole time):
  zeromq  the clip is a file source; a subscriber in another process (`AvatarSubscriber`, conflating motion socket)
          records every motion: capture (the daemon read the frame) -> motion applied by the subscriber
  webrtc  the clip is sent by an aiortc peer in another process (as a browser is) as its camera track; the peer
          records the motions arriving on its unordered, no-retransmit channel: capture (the frame arrived at the
          daemon) -> motion received
Per scenario: latency p50/p95/p99 (ms), motions received vs. frames tracked, motion and rig bytes per second per
subscriber, the engine's busy fraction and windows, and the size of the final rig (float32 and float16 basis).
Prints a summary and writes JSON (`--out`, default benchmarks/results/animation.json).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# run as a script, this folder comes first on sys.path and benchmarks/engine.py would hide the engine package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402

DEFAULT_VIDEO = REPO.parent / "shared" / "data" / "real" / "obama_address_512.mp4"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "animation.json"
TARGET_P95_MS = 100.0
TARGET_MOTION_BYTES = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stats_ms(values: list[float]) -> dict:
    arr = np.asarray(values, np.float64)
    if arr.size == 0:
        return {"n": 0}
    return {"n": int(arr.size), **{f"p{q}": round(float(np.percentile(arr, q)), 2) for q in (50, 95, 99)},
            "max": round(float(arr.max()), 2)}


# ----------------------------------------------------------------------------------- subscriber (own process)
def run_subscriber(connect: str, control: str, seconds: float, out: Path) -> None:
    """Record every motion a ZeroMQ subscriber applies for `seconds` (after the first)."""
    from protocols.animation import encode_motion
    from protocols.client import AvatarSubscriber

    records = []
    with AvatarSubscriber(connect, control) as sub:
        first = sub.next_pose(timeout=120)
        end = time.monotonic() + seconds
        posed = first
        while time.monotonic() < end:
            records.append((posed.motion.frame, posed.motion.t_capture, posed.t_received,
                            len(encode_motion(posed.motion)), posed.motion.t_publish))
            try:
                posed = sub.next_pose(timeout=max(end - time.monotonic(), 0.01))
            except TimeoutError:
                break
        rigs = sub.stats.rigs
    out.write_text(json.dumps({"records": records, "rigs": rigs}))


# ------------------------------------------------------------------------------------------------- scenarios
async def _daemon(args, publish: str | None = None, control: str | None = None):
    import torch

    from engine.avatar_model import AvatarModel
    from engine.refine import RefineConfig
    from fastavatar_stream.daemon import Daemon, DaemonConfig
    from fastavatar_stream.session import SessionOptions

    torch.set_num_threads(args.threads)
    config = DaemonConfig(publish=publish, control=control, engine_nice=args.engine_nice,
                          session_defaults=SessionOptions(refine_seconds=args.refine, budget=args.budget),
                          refine=RefineConfig())
    daemon = Daemon(config, model=AvatarModel.load(args.weights))
    return await daemon.start()


def _engine(daemon, session_id: str, wall_s: float) -> dict:
    session = daemon.sessions[session_id]
    return {"windows": session.windows_done, "versions": session.latest.version if session.latest else 0,
            "frames_tracked": session.frames_tracked, "engine_busy_fraction": round(daemon.worker.busy_s / wall_s, 3),
            "refine_s": round(session.refine_spent, 2)}


def _rig_sizes(rig) -> dict:
    from protocols.animation import Rig
    from protocols.wire import encode

    half = Rig(rig.session, rig.version, rig.shape_version,
               dict(rig.arrays, anchor_expression=rig.arrays["anchor_expression"].astype(np.float16)))
    size = lambda r: sum(len(f) for f in encode(r.message()))  # noqa: E731
    return {"gaussians": rig.n_gaussians, "anchors": int(rig.arrays["anchor_rest"].shape[0]),
            "expressions": rig.n_expression, "bytes_float32": size(rig), "bytes_float16_basis": size(half)}


async def zeromq(args) -> dict:
    from fastavatar_stream.sources import VideoFileSource

    pub, ctl = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    daemon = await _daemon(args, pub, ctl)
    out = Path(tempfile.mkdtemp(prefix="animation-bench-")) / "sub.json"
    sub = subprocess.Popen([sys.executable, __file__, "--subscriber", pub, ctl, str(args.seconds), str(out)],
                           env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    try:
        t0 = time.monotonic()
        session_id = await daemon.open_session(VideoFileSource(args.video, realtime=True, loop=True))
        await asyncio.get_running_loop().run_in_executor(None, sub.wait, args.seconds + 180)
        wall = time.monotonic() - t0
        engine = _engine(daemon, session_id, wall)
        track_stage = daemon.sessions[session_id].timer.stats().get("track", {})
        rig = daemon.animator.rig(session_id)
        counters = daemon.publisher.stats.per_kind
    finally:
        await daemon.shutdown()
    data = json.loads(out.read_text())
    records = data["records"]
    span = (records[-1][2] - records[0][2]) if len(records) > 1 else float("nan")
    latency = [1e3 * (received - captured) for _, captured, received, _, _ in records]
    frames = [r[0] for r in records]
    return {"motions_received": len(records), "frames_spanned": frames[-1] - frames[0] + 1 if frames else 0,
            "latency_ms": stats_ms(latency),
            "capture_to_publish_ms": stats_ms([1e3 * (r[4] - r[1]) for r in records]),
            "publish_to_subscriber_ms": stats_ms([1e3 * (r[2] - r[4]) for r in records]),
            "tracking_ms": {k: round(1e3 * v, 2) for k, v in track_stage.items() if k.startswith("p") or k == "mean"}, "motion_bytes_max": max((r[3] for r in records), default=0),
            "motion_bytes_per_s": round(sum(r[3] for r in records) / span, 1),
            "rigs_received": data["rigs"], "publisher": counters,
            "rig_bytes_per_s_published": round(counters.get("rig", {}).get("bytes", 0) / wall, 1),
            "engine": engine, "rig": _rig_sizes(rig) if rig else None}


def run_peer(url: str, clip: str, seconds: float, out: Path) -> None:
    """An aiortc peer in its own process (as a browser is): sends `clip` as its camera, records every motion."""
    from fastavatar_stream.webrtc_client import run_client
    from protocols.webrtc import loopback_ice

    with loopback_ice():
        result = asyncio.run(run_client(Path(clip), url, timeout=seconds + 120, settle=2.0))
    motions = [(m.t_capture, m.t_publish, received, nbytes) for m, received, nbytes in result.receiver.motions]
    out.write_text(json.dumps({"session": result.session, "frames_sent": result.frames_sent, "motions": motions,
                               "report": result.report()}))


async def webrtc(args) -> dict:
    from fastavatar_stream.webrtc_server import ServerConfig, start_http
    from protocols.webrtc import loopback_ice

    folder = Path(tempfile.mkdtemp(prefix="animation-bench-"))
    clip, out = folder / "clip.mp4", folder / "peer.json"
    _cut(args.video, clip, args.seconds)
    daemon = await _daemon(args)
    try:
        with loopback_ice():
            runner = await start_http(daemon, "127.0.0.1", 0, ServerConfig())
            try:
                url = f"http://127.0.0.1:{runner.addresses[0][1]}"
                t0 = time.monotonic()
                peer = subprocess.Popen([sys.executable, __file__, "--peer", url, str(clip), str(args.seconds),
                                         str(out)], env={**os.environ, "PYTHONPATH": str(REPO)})
                await asyncio.get_running_loop().run_in_executor(None, peer.wait, args.seconds + 180)
                wall = time.monotonic() - t0
                data = json.loads(out.read_text())
                engine = _engine(daemon, data["session"], wall)
            finally:
                await runner.cleanup()
    finally:
        await daemon.shutdown()
    motions, report = data["motions"], data["report"]
    latency = [1e3 * (received - captured) for captured, _, received, _ in motions]
    span = (motions[-1][2] - motions[0][2]) if len(motions) > 1 else float("nan")
    return {"motions_received": len(motions), "frames_sent": data["frames_sent"], "latency_ms": stats_ms(latency),
            "capture_to_publish_ms": stats_ms([1e3 * (published - captured) for captured, published, _, _ in motions]),
            "publish_to_peer_ms": stats_ms([1e3 * (received - published) for _, published, received, _ in motions]),
            "out_of_order": report["motion"]["out_of_order"],
            "motion_bytes_max": max((n for *_, n in motions), default=0),
            "motion_bytes_per_s": round(sum(n for *_, n in motions) / span, 1),
            "rigs_received": report["rigs_received"], "avatar_bytes_received": report["bytes_received"],
            "server": report["server_stats"], "engine": engine}


def _cut(video: Path, out: Path, seconds: float) -> None:
    """The first `seconds` of `video` re-encoded (the WebRTC peer sends a whole file)."""
    import av

    with av.open(str(video)) as src, av.open(str(out), "w") as dst:
        stream_in = src.streams.video[0]
        rate = stream_in.average_rate or 25
        stream = dst.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = stream_in.width, stream_in.height, "yuv420p"
        for i, frame in enumerate(src.decode(stream_in)):
            if i >= seconds * float(rate):
                break
            for packet in stream.encode(frame.reformat(format="yuv420p")):
                dst.mux(packet)
        for packet in stream.encode():
            dst.mux(packet)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("--subscriber", "--peer"):
        first, second, seconds, out = sys.argv[2:6]
        (run_subscriber if sys.argv[1] == "--subscriber" else run_peer)(first, second, float(seconds), Path(out))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    p.add_argument("--weights", default=None, help="checkpoint folder (default: the embedded default model)")
    p.add_argument("--seconds", type=float, default=12.0, help="seconds of motion recorded per scenario")
    p.add_argument("--refine", type=float, default=30.0, help="refinement budget: keeps the engine busy")
    p.add_argument("--budget", type=int, default=20_000)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the daemon")
    p.add_argument("--engine-nice", type=int, default=10, help="nice levels of the engine below the daemon")
    p.add_argument("--scenarios", default="zeromq,webrtc")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "host": platform.node(),
               "cpus": os.cpu_count(), "video": str(args.video.name), "seconds": args.seconds,
               "refine_s": args.refine, "targets": {"p95_ms": TARGET_P95_MS, "motion_bytes": TARGET_MOTION_BYTES},
               "engine_nice": args.engine_nice, "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
               "scenarios": {}}
    for name in args.scenarios.split(","):
        results["scenarios"][name] = asyncio.run({"zeromq": zeromq, "webrtc": webrtc}[name](args))
        r = results["scenarios"][name]
        print(f"{name}: {r['motions_received']} motions, capture->subscriber p50 {r['latency_ms'].get('p50')} ms "
              f"p95 {r['latency_ms'].get('p95')} ms, {r['motion_bytes_per_s']} B/s, max {r['motion_bytes_max']} B/motion, "
              f"engine busy {r['engine']['engine_busy_fraction']:.0%} ({r['engine']['windows']} windows)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
