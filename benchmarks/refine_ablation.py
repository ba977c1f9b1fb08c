"""Refinement ablation: which refiner settings make the avatar more like the person on frames it never saw?

    .venv/bin/python benchmarks/refine_ablation.py                    # obama_address_512, 150 steps per variant
    .venv/bin/python benchmarks/refine_ablation.py --clip CLIP --steps 300 --variants base symmetry

One feed-forward replay with the tail hold-out (`replay CLIP --holdout-tail 0.25 --no-refine`) gives the
avatar, its kept frames and the held-out tail. Every variant then refines a copy of that same avatar on the same
kept frames for the same number of optimiser steps (`--steps`: the host is shared, so wall time is noisy;
seconds per step are reported too) or for the same wall time (`--seconds`, what a session's refinement budget
is; the steps it reached are reported) and is scored on the tail: PSNR/SSIM in the head region and dlib
identity distance. Writes benchmarks/results/refine_ablation.json.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

REAL = REPO.parent / "shared" / "data" / "real"
RESULTS = REPO / "benchmarks" / "results"

LEARNING_RATES = ("lr_color", "lr_opacity", "lr_log_scale", "lr_offset", "lr_rotation")


def scaled_learning_rates(factor: float) -> dict[str, float]:
    """Every learning rate of the shipped RefineConfig times `factor`."""
    from engine.refine import RefineConfig

    base = RefineConfig()
    return {name: getattr(base, name) * factor for name in LEARNING_RATES}


#: RefineConfig overrides per variant (the base is the shipped RefineConfig)
VARIANTS: dict[str, dict] = {
    "base": {},
    "batch1": {"batch_frames": 1},
    "batch4": {"batch_frames": 4},
    "lr_x2": scaled_learning_rates(2.0),
    "lr_x0.5": scaled_learning_rates(0.5),
    "symmetry": {"weight_symmetry": 0.5},
    "max_30k": {"max_gaussians": 30_000},
    "max_20k": {"max_gaussians": 20_000},
    "max_10k": {"max_gaussians": 10_000},
    "max_30k_lr_x2": {"max_gaussians": 30_000, **scaled_learning_rates(2.0)},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip", type=Path, default=REAL / "obama_address_512.mp4")
    ap.add_argument("--steps", type=int, default=150, help="optimiser steps per variant")
    ap.add_argument("--seconds", type=float, help="wall seconds per variant instead of a step count")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--max-frames", type=int)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=RESULTS / "refine_ablation.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from engine.fusion import AvatarState
    from engine.refine import RefineConfig, RefineSession
    from fastavatar_stream.replay import ReplayOptions, evaluate_holdout, holdout_samples, replay
    from fastavatar_stream.views import refine_frames

    load_start = os.getloadavg()
    opts = ReplayOptions(source=str(args.clip), out=Path("/tmp") / "refine_ablation_replay", holdout_tail=0.25,
                         refine_seconds=0.0, max_frames=args.max_frames, progress=False)
    result = asyncio.run(replay(opts))
    model, session = result.model, result.session
    avatar = session.latest
    targets = refine_frames(list(session.refine_pool), model)
    samples = holdout_samples(session, 48)
    metric_keys = ("psnr", "ssim", "identity_distance", "identity_pairs")
    rows = {"feedforward": {k: evaluate_holdout(model, samples, avatar)[k] for k in metric_keys}}
    print("feedforward", rows["feedforward"], flush=True)
    for name in args.variants:
        config = dataclasses.replace(RefineConfig(), **VARIANTS[name])
        refiner = RefineSession(avatar.gaussians, model.prompts, model.head, config)
        t0 = time.perf_counter()
        if args.seconds:
            steps = refiner.step(targets, seconds=args.seconds)["iterations"]
        else:
            steps = refiner.step(targets, iterations=args.steps)["iterations"]
        seconds = time.perf_counter() - t0
        refined = AvatarState(avatar.version + 1, refiner.gaussians(), avatar.shape, avatar.frames)
        scored = evaluate_holdout(model, samples, refined)
        rows[name] = {**{k: scored[k] for k in metric_keys}, "overrides": VARIANTS[name], "steps": steps,
                      "seconds": round(seconds, 2), "seconds_per_step": round(seconds / steps, 4),
                      "gaussians": len(refined.gaussians)}
        print(name, rows[name], flush=True)
    out = {"clip": args.clip.name, "steps": None if args.seconds else args.steps, "seconds": args.seconds, "kept_frames": len(targets), "held_out_scored": len(samples),
           "gaussians": len(avatar.gaussians), "variants": rows,
           "command": "python benchmarks/refine_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads,
                       "loadavg_start": [round(x, 2) for x in load_start],
                       "loadavg_end": [round(x, 2) for x in os.getloadavg()]}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
