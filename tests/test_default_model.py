"""The shipped default: the embedded checkpoint loads, says how it was made, and runs the demo end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import engine


def test_default_checkpoint_is_shipped_with_its_provenance():
    folder = engine.default_checkpoint_dir()
    tensors, metas = list(folder.glob("*.safetensors")), list(folder.glob("*.json"))
    assert len(tensors) == 1 and len(metas) == 1, f"the default checkpoint is missing from {folder}"
    meta = json.loads(metas[0].read_text())
    for key in ("config", "command", "steps", "wall_s", "validation"):
        assert key in meta, key
    assert meta["config"]["name"] == "tiny" and meta["steps"] > 0
    assert set(meta["validation"]["psnr"]) >= {"1", "4", "8", "16"}
    assert tensors[0].stat().st_size < 20 * 2**20  # a few MB, shipped inside the package


def test_default_model_loads_with_its_point_prompts():
    from engine.avatar_model import AvatarModel

    model = AvatarModel.load()
    assert model.network.cfg.name == "tiny"
    assert model.prompts.v_template.shape[0] == model.network.cfg.n_points
    assert not model.network.training


def test_replay_demo_runs_the_main_job(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "fastavatar_stream", "replay", "--demo", "--out", str(out),
                             "--no-refine", "--max-frames", "20"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["frames_tracked"] == 20 and report["windows"] >= 3 and report["versions"] >= 3
    assert report["extra"]["weights"] == "default" and report["extra"]["model"] == "tiny"
    assert (out / "avatar.ply").stat().st_size > 10_000 and (out / "preview.png").is_file()


def test_the_shipped_model_gets_better_with_every_input_frame_on_held_out_people():
    """The paper's central claim, measured on the shipped checkpoint: novel-view PSNR of the fused avatar rises
    1 -> 4 -> 8 -> 16 input frames on synthetic people of the test split (never trained on), for a monocular video
    and a multi-view capture; the same network fused by plain concatenation does worse at 16 frames."""
    import importlib.util
    from pathlib import Path

    import numpy as np
    import torch

    from engine.avatar_model import AvatarModel
    from engine.head import load_head
    from engine.losses import psnr

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_vs_views.py"
    spec = importlib.util.spec_from_file_location("_bench_quality_default", path)
    quality = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = quality
    spec.loader.exec_module(quality)

    torch.set_num_threads(2)
    head = load_head()
    model = AvatarModel.load(head=head)
    cases = quality.make_cases(head, seed=1, identities=1, resolution=96, pool=0, backend="auto")
    scores: dict[str, dict[int, float]] = {}
    for fusion in ("visibility", "concat"):
        ev = quality.Evaluator(model, "auto", fusion)
        scores[fusion] = {n: float(np.mean([float(psnr(ev.fused(c, n).renders,
                                                       c.targets.targets.permute(0, 2, 3, 1)).mean())
                                            for c in cases])) for n in (1, 4, 8, 16)}
    ps = [scores["visibility"][n] for n in (1, 4, 8, 16)]
    assert all(b > a for a, b in zip(ps, ps[1:])), scores
    assert ps[-1] - ps[0] > 2.0, scores
    assert scores["visibility"][16] > scores["concat"][16] + 3.0, scores
