"""The likeness benchmark end to end on a random `micro` checkpoint and two short PyAV-encoded clips (issue 16's
contract: per clip `tail` {feedforward, live_end, refine_20s}, `cross_video` {refine_20s}, `novel_views` {angle:
{detected, identity_distance}}, and the comparison pictures). The pipeline is under test, not the likeness."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from engine.checkpoints import save_checkpoint
from engine.model import build_model
from fastavatar_stream.demo import make_demo_clip

REPO = Path(__file__).resolve().parents[1]


def test_likeness_benchmark_writes_every_score_of_the_contract(tmp_path):
    torch.manual_seed(0)
    weights = save_checkpoint(tmp_path / "micro", build_model("micro"), metadata={"test": True})
    clips = [make_demo_clip(tmp_path / f"clip{i}.mp4", n_frames=20, size=160) for i in range(2)]
    out, summary = tmp_path / "out", tmp_path / "likeness.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "likeness.py"), "--clips", *map(str, clips),
                           "--weights", str(weights), "--refine", "1", "--linger", "1", "--threads", "1",
                           "--out-dir", str(out), "--json", str(summary)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = json.loads(summary.read_text())
    assert set(results["clips"]) == {"clip0", "clip1"}
    for name, clip in results["clips"].items():
        assert clip["tail_from_frame"] == 15
        for run in ("feedforward", "live_end", "refine_20s"):
            scores = clip["tail"][run]
            assert scores["psnr"] > 0 and -1 <= scores["ssim"] <= 1, (name, run, scores)
            assert scores["identity_distance"] is None or scores["identity_distance"] >= 0
        assert clip["cross_video"]["refine_20s"]["psnr"] > 0
        assert set(clip["novel_views"]) >= {"yaw-40", "yaw-20", "yaw+20", "yaw+40", "pitch-15", "pitch+15"}
        for view in clip["novel_views"].values():
            assert 0 <= view["detected"] <= 1 and view["renders"] >= 1
        assert clip["live"]["engine_split"]["refine_s"] >= 0
        assert set(clip["targets_met"]) >= {"live_end_at_most_0.45", "novel_20deg_detected_at_least_0.9"}
        folder = out / name
        with Image.open(folder / "comparison.png") as grid:
            assert grid.width > 5 * grid.height / 6  # six columns of crops beside each other
        assert (folder / "novel_views.png").is_file() and (folder / "tail_live" / "holdout.png").is_file()
