"""Train the full model and each paper ablation at one equal budget, for `benchmarks/quality_vs_views.py`.

    .venv/bin/python benchmarks/train_ablations.py --steps 2400 --out runs/ablations
    .venv/bin/python benchmarks/quality_vs_views.py --checkpoint runs/ablations/full --ablations runs/ablations \\
        --seed 0 --out runs/quality

Every variant trains with the same data, seed, step count, schedule and initial weights as far as the variant
allows (the trainer seeds the model from --seed), with the shipped default's settings (tiny, synthetic,
mixed samplers and backgrounds, 96 px, 500 identities, 20 views, a cache of 400 samples):
- full:                 the default recipe;
- no_global_attention:  ModelConfig(global_attention=False): no global blocks, every slot sees its own frame only;
- no_sliced_fusion:     TrainConfig(sliced_fusion=False): one render of all slots fused instead of single + sliced;
- no_tracking_loss:     loss weight track = 0;
- with_guidance:        ModelConfig(guidance=True): the paper's guidance token from the sample's cameras and FLAME
                        (the default has none, so this is the paper's "w/o guidance" row read backwards);
- no_pruning:           loss weight mask = 0 (and quality_vs_views evaluates it without the hard prune).
Each variant goes to OUT/<name>/ (a checkpoint plus trainer state and logs); a variant that already reached
--steps is skipped, one that stopped early is resumed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# run as a script, this folder comes first on sys.path and benchmarks/engine.py would hide the engine package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


@dataclass(frozen=True)
class Variant:
    """What one ablation changes: ModelConfig fields, TrainConfig fields and loss-weight overrides."""

    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    loss_weights: dict = field(default_factory=dict)


VARIANTS: dict[str, Variant] = {
    "full": Variant(),
    "no_global_attention": Variant(model={"global_attention": False}),
    "no_sliced_fusion": Variant(train={"sliced_fusion": False}),
    "no_tracking_loss": Variant(loss_weights={"track": 0.0}),
    "with_guidance": Variant(model={"guidance": True}),
    "no_pruning": Variant(loss_weights={"mask": 0.0}),
}


def base_config(args: argparse.Namespace):
    """The shared recipe (the shipped default's, see benchmarks/train_default.py) at this run's budget."""
    from engine.train.trainer import TrainConfig

    return TrainConfig(model=args.config, data="synthetic", steps=args.steps, resolution=args.resolution,
                       seed=args.seed, n_identities=500, sampler="mixed", background="mixed", n_views=20,
                       val_every=args.val_every, cache_samples=args.cache_samples, render_backend=args.backend,
                       init_from=args.init_from or "", loss_weights=dict(args.loss_weights))


def variant_configs(name: str, args: argparse.Namespace):
    """(TrainConfig, ModelConfig) of one variant."""
    from engine.model import get_config

    v = VARIANTS[name]
    cfg = base_config(args)
    for key, value in v.train.items():
        setattr(cfg, key, value)
    cfg.loss_weights = {**cfg.loss_weights, **v.loss_weights}
    return cfg, get_config(args.config).replace(**v.model)


def steps_done(folder: Path) -> int:
    meta = folder / "model.json"
    return int(json.loads(meta.read_text()).get("steps", 0)) if meta.is_file() else 0


def train_variant(name: str, args: argparse.Namespace, head=None) -> dict:
    """Train (or resume, or skip) one variant into OUT/name; returns its summary."""
    from engine.train.trainer import STATE_FILE, Trainer

    folder = Path(args.out) / name
    done = steps_done(folder)
    if done >= args.steps:
        return {"variant": name, "steps": done, "skipped": True}
    cfg, mcfg = variant_configs(name, args)
    command = f"benchmarks/train_ablations.py {name} --steps {args.steps} --seed {args.seed}"
    if args.init_from:
        command += f" --init-from {args.init_from}"
    if args.loss_weights:
        command += " --loss-weights " + ",".join(f"{k}={v}" for k, v in args.loss_weights.items())
    trainer = Trainer(cfg, folder, command=command, resume=(folder / STATE_FILE).is_file(), model_config=mcfg,
                      head=head, progress=not args.no_progress)
    t0 = time.perf_counter()
    result = trainer.fit()
    return {"variant": name, "steps": result["steps"], "wall_s": round(time.perf_counter() - t0, 1),
            "validation_psnr": result["validation"].get("psnr")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps of every variant (the equal budget)")
    ap.add_argument("--out", default=str(REPO / "runs" / "ablations"))
    ap.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants (default: all)")
    ap.add_argument("--config", default="tiny", help="model config of every variant (default tiny)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resolution", type=int, default=96)
    ap.add_argument("--val-every", type=int, default=300)
    ap.add_argument("--cache-samples", type=int, default=400)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--init-from", default=None, metavar="DIR",
                    help="every variant starts from this checkpoint (as far as its architecture allows) instead of "
                         "a fresh init: an equal fine-tuning budget")
    ap.add_argument("--loss-weights", default="", metavar="NAME=W,...",
                    help="loss-weight overrides of the shared recipe (a variant's own overrides win)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.loss_weights = {k: float(v) for k, v in (item.split("=") for item in args.loss_weights.split(",") if item)}
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or args.steps < 1:
        print(f"error: unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}" if unknown
              else "error: --steps must be at least 1", file=sys.stderr)
        return 2
    from engine.head import load_head

    head = load_head()
    summaries = []
    for name in names:
        summary = train_variant(name, args, head)
        summaries.append(summary)
        print(json.dumps(summary), flush=True)
    (Path(args.out) / "ablations.json").write_text(json.dumps(summaries, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
