"""WebRTC into the real daemon: two aiortc peers on loopback, a real face clip as the camera track, the daemon's
avatar versions on the data channel decode to exactly the avatar the daemon holds."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

from fastavatar_stream.demo import make_demo_clip


def test_a_browser_like_peer_receives_the_daemons_avatar(tmp_path, micro_weights):
    from engine.avatar_model import AvatarModel
    from fastavatar_stream.daemon import Daemon, DaemonConfig
    from fastavatar_stream.session import SessionOptions
    from fastavatar_stream.webrtc_client import run_client
    from fastavatar_stream.webrtc_server import ServerConfig, start_http
    from protocols.webrtc import loopback_ice

    clip = make_demo_clip(tmp_path / "face.mp4", n_frames=20, size=192, fps=10)

    async def scenario():
        config = DaemonConfig(session_defaults=SessionOptions(refine_seconds=0.0))
        daemon = Daemon(config, model=AvatarModel.load(micro_weights))
        await daemon.start()
        with loopback_ice():
            runner = await start_http(daemon, "127.0.0.1", 0, ServerConfig())
            url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            try:
                result = await run_client(clip, url, timeout=90, settle=4.0)
                session = daemon.sessions[result.session]
                await daemon.wait_session(result.session)
                return result, session, daemon.buffers[result.session]
            finally:
                await runner.cleanup()
                await daemon.shutdown()

    result, session, buffer = asyncio.run(scenario())
    assert result.frames_sent == 20
    assert session.frames_tracked >= 15 and session.windows_done >= 3
    assert result.buffer is not None and result.buffer.version == buffer.version
    assert result.buffer.equals(buffer), "the peer's avatar differs from the daemon's"
    report = result.report()
    assert report["versions_received"] >= 3 and report["malformed_messages"] == 0


def test_the_latency_benchmark_measures_capture_and_transport_latency_per_run(tmp_path, micro_weights):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "webrtc_latency.py"
    spec = importlib.util.spec_from_file_location("_bench_webrtc_latency", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    clip = make_demo_clip(tmp_path / "face.mp4", n_frames=12, size=192, fps=10)
    out = tmp_path / "latency.json"

    assert bench.main(["--video", str(tmp_path / "missing.mp4"), "--out", str(out)]) == 2 and not out.exists()
    assert bench.main(["--video", str(clip), "--weights", str(micro_weights), "--max-frames", "12", "--runs", "1",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    run = result["per_run"][0]
    assert run["frames_sent"] == 12 and run["versions_received"] >= 1 and run["windows"] >= 1
    over = result["latency_ms_over_runs"]
    # a version is published after its newest frame was captured, and received after it was published
    assert over["capture_to_receipt_p50"]["median"] > over["publish_to_receipt_p50"]["median"] > 0
    assert over["capture_to_receipt_p50"]["values"] == [run["latency_ms"]["capture_to_receipt_p50"]]
