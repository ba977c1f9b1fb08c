"""Quality benchmark: the ablation switches of model and trainer, the ablation trainer, and the quality script end
to end on micro checkpoints (JSON structure, finite numbers, determinism, pictures)."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.train.trainer import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]
QUALITY = REPO / "benchmarks" / "quality_vs_views.py"
ABLATIONS = REPO / "benchmarks" / "train_ablations.py"


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def run_script(path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run a benchmark the documented way (`python benchmarks/x.py`), which must not pick up benchmarks/engine.py."""
    proc = subprocess.run([sys.executable, str(path), *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def head():
    from engine.head import load_head

    return load_head()


def tiny_train_config(**changes) -> TrainConfig:
    cfg = TrainConfig(model="micro", steps=1, resolution=32, n_identities=1, groups_per_identity=1, sampler="video",
                      background="plain", n_views=4, n_targets=2, max_inputs=2, max_pool=1, val_every=0,
                      val_identities=1, warmup_steps=0, render_backend="cpu")
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg


# -- switches in the shared modules --------------------------------------------------------------------------------
def _slot_latents(model, images: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(B,S,P,C) transformer output of one forward."""
    seen = []
    handle = model.transformer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    feats = None
    if model.cfg.point_guidance:  # the same features for both runs: only the images differ
        from engine.model.point_guidance import N_POINT_FEATURES

        feats = torch.rand(1, images.shape[1], points.shape[0], N_POINT_FEATURES,
                           generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model(images, points, point_features=feats)
    handle.remove()
    return seen[0]


def test_without_global_attention_the_model_has_no_global_blocks_and_slots_do_not_talk():
    from engine.model import build_model, get_config

    torch.manual_seed(0)
    isolated = build_model(get_config("micro").replace(global_attention=False)).eval()
    connected = build_model("micro").eval()
    assert not any(k.startswith("transformer.global_attn_layers") for k in isolated.state_dict())
    assert any(k.startswith("transformer.global_attn_layers") for k in connected.state_dict())
    images, points = torch.rand(1, 3, 3, 56, 56), torch.rand(64, 3) * 0.1
    changed = images.clone()
    changed[0, 2] = torch.rand(3, 56, 56)
    change = lambda m: [float((x - y).abs().max()) for x, y in  # noqa: E731
                        zip(_slot_latents(m, images, points).unbind(1), _slot_latents(m, changed, points).unbind(1))]
    # slots 0 and 1 see their own frame only: changing frame 2 leaves them exactly alone; slot 2 and the FramePack
    # slot (which sees every frame) change
    iso = change(isolated)
    assert iso[0] == 0 and iso[1] == 0 and iso[2] > 1e-5 and iso[3] > 1e-5, iso
    # with global attention (residual branches start small) every slot hears of the change
    con = change(connected)
    assert min(con) > 1e-7, con


def test_trainer_without_sliced_fusion_renders_one_fused_set(head, tmp_path):
    trainer = Trainer(tiny_train_config(sliced_fusion=False), tmp_path, head=head, progress=False)
    sample = trainer.train_set[0]
    terms = trainer.sample_loss(sample, torch.Generator().manual_seed(0))
    assert "rgb_fused" in terms and "rgb_single" not in terms and "rgb_sliced" not in terms
    assert math.isfinite(float(terms["loss"].detach()))


def test_trainer_feeds_guidance_to_a_guidance_model(head, tmp_path):
    from engine.model import get_config

    mcfg = get_config("micro").replace(guidance=True)
    trainer = Trainer(tiny_train_config(), tmp_path, head=head, model_config=mcfg, progress=False)
    before = trainer.model.guidance.mlp[0].weight.detach().clone()
    logs = trainer.train_step([trainer.train_set[0]])
    assert math.isfinite(logs["loss"])
    assert not torch.equal(before, trainer.model.guidance.mlp[0].weight), "guidance got no gradient"
    assert set(trainer.validate(save_png=False)["psnr"]) >= {"1"}


# -- the scripts ---------------------------------------------------------------------------------------------------
def test_ablation_names_agree_between_trainer_and_benchmark():
    quality, ablations = load_script(QUALITY), load_script(ABLATIONS)
    assert set(ablations.VARIANTS) == {"full", *quality.ABLATIONS}


def _finite_metrics(entry: dict) -> None:
    assert math.isfinite(entry["psnr"]) and 3 < entry["psnr"] < 60, entry
    assert math.isfinite(entry["ssim"]) and -1 <= entry["ssim"] <= 1, entry
    assert entry["gaussians"] > 0 and entry["seconds"] >= 0
    assert set(entry["by_sampler"]) == {"video", "multiview"}


def test_quality_benchmark_end_to_end(tmp_path):
    from PIL import Image

    from engine.checkpoints import save_checkpoint
    from engine.model import build_model, get_config

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "full", build_model("micro"), get_config("micro"), {"steps": 0})
    # two ablations trained for one step at the equal budget (covers guidance and no sliced fusion end to end)
    assert load_script(ABLATIONS).main(["--steps", "1", "--config", "micro", "--resolution", "32", "--val-every",
                                        "0", "--cache-samples", "1", "--out", str(tmp_path / "abl"), "--no-progress",
                                        "--only", "no_sliced_fusion,with_guidance"]) == 0
    assert json.loads((tmp_path / "abl" / "with_guidance" / "model.json").read_text())["config"]["guidance"]
    out = tmp_path / "out"
    common = ["--checkpoint", str(tmp_path / "full"), "--seed", "3", "--identities", "1", "--resolution", "32",
              "--fps-sizes", "48", "--fps-repeats", "1"]
    run_script(QUALITY, *common, "--out", str(out), "--pool", "4", "--ablations", str(tmp_path / "abl"),
               "--baseline-iterations", "2,4", "--baseline-frames", "4,16")
    result = json.loads((out / "quality.json").read_text())

    assert set(result["full"]) == {"1", "4", "8", "16"}
    for row in ("full", "naive_fusion", "no_sliced_fusion", "with_guidance"):
        assert set(result[row]) == {"1", "4", "8", "16"}, row
        for entry in result[row].values():
            _finite_metrics(entry)
    assert set(result["full_pool4"]) == {"16"}
    for it in (2, 4):
        assert set(result[f"optimisation_{it}"]) == {"4", "16"}
        for entry in result[f"optimisation_{it}"].values():
            _finite_metrics(entry)
    assert result["optimisation_4"]["16"]["seconds"] > result["optimisation_2"]["16"]["seconds"]
    assert result["meta"]["missing_ablations"] == ["no_global_attention", "no_tracking_loss", "no_pruning"]
    # naive fusion of n one-frame avatars holds n times the one-frame Gaussians before pruning (n * 2 slots)
    # at one frame, LAM* (a one-frame window, plain concatenation) is the full model with concatenation
    assert result["full_concat"]["1"]["psnr"] == pytest.approx(result["naive_fusion"]["1"]["psnr"], abs=1e-4)
    assert set(result["full_concat"]) == {"1", "4", "8", "16"}
    for n, p in result["pruning"].items():
        assert p["gaussians_unpruned"] == (min(int(n), 16) + 1) * 64
        assert 0 < p["kept_fraction"] <= 1 and p["gaussians_pruned"] <= p["gaussians_unpruned"]
    for entry in result["render_fps"].values():
        assert entry["48"] > 0
    assert set(result["render_fps"]) == {"video pruned", "video unpruned", "multiview pruned", "multiview unpruned"}
    md = (out / "quality.md").read_text()
    assert "| full |" in md and "naive_fusion" in md and "## Targets" in md
    for name in ("plot_psnr_vs_views.png", "plot_quality_vs_time.png", "preview_video.png", "preview_multiview.png"):
        with Image.open(out / name) as img:
            assert img.size[0] > 100 and img.size[1] > 30, name

    # deterministic: a second, smaller run over seeds 3 and 4 reproduces seed 3's full-model figures exactly
    again = tmp_path / "again"
    assert load_script(QUALITY).main([*common, "--seeds", "3,4", "--out", str(again), "--pool", "0", "--frames",
                                      "1,4", "--baseline-iterations", ""]) == 0
    second = json.loads((again / "seed_3" / "quality.json").read_text())
    other = json.loads((again / "seed_4" / "quality.json").read_text())
    for n in ("1", "4"):
        assert second["full"][n]["psnr"] == result["full"][n]["psnr"]
        assert second["full"][n]["ssim"] == result["full"][n]["ssim"]
    assert second["meta"]["missing_ablations"] == list(load_script(QUALITY).ABLATIONS)
    assert "optimisation_2" not in second and "full_pool4" not in second
    # seed 4 shows other people; the spread file holds both seeds' values in seed order
    assert other["full"]["1"]["psnr"] != second["full"]["1"]["psnr"]
    spread = json.loads((again / "quality_seeds.json").read_text())
    assert spread["meta"]["seeds"] == [3, 4] and len(spread["meta"]["targets_per_seed"]) == 2
    psnr = spread["full"]["4"]["psnr"]
    assert psnr["values"] == [second["full"]["4"]["psnr"], other["full"]["4"]["psnr"]]
    assert psnr["min"] <= psnr["mean"] <= psnr["max"] and psnr["std"] > 0
    assert "± " in (again / "quality_seeds.md").read_text()


def test_spread_over_seeds_summarises_every_shared_number_and_skips_the_rest():
    spread = load_script(QUALITY).spread_over_seeds(
        [{"full": {"1": {"psnr": 20.0}}, "label": "a", "only_here": 1.0}, {"full": {"1": {"psnr": 24.0}}, "label": "b"}])
    assert spread == {"full": {"1": {"psnr": {"mean": 22.0, "std": pytest.approx(2 ** 1.5), "min": 20.0,
                                              "max": 24.0, "values": [20.0, 24.0]}}}}


def test_quality_benchmark_refuses_repeated_seeds(tmp_path, capsys):
    assert load_script(QUALITY).main(["--seeds", "1,1", "--out", str(tmp_path)]) == 2
    assert "distinct" in capsys.readouterr().err
