"""`fastavatar-stream train`: train an LGRT config on synthetic heads or tracked captures (engine.train.trainer)."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from engine.errors import InputError


def _weights(text: str) -> dict[str, float]:
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"loss weight {item!r} is not NAME=NUMBER") from None
    return out


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="train a model (default: the tiny config on synthetic heads)",
        description="Train the LGRT with the paper's losses (L1, SSIM, LPIPS when its weights are present, "
                    "landmark tracking, sliced fusion, pruning). Writes a checkpoint directory that "
                    "`replay --weights DIR` and the daemon accept. Multi-GPU: launch with torchrun.")
    p.add_argument("--config", default="tiny", help="model config: tiny, micro, paper, official (default tiny)")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' or the root of a tracked capture tree in the official layout")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps in total (default 1000)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--resume", action="store_true", help="continue from the trainer state in --out")
    p.add_argument("--batch", type=int, default=1, help="samples per step per process (default 1)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-4)")
    p.add_argument("--resolution", type=int, default=None, help="render/target size in pixels (default 64)")
    p.add_argument("--val-every", type=int, default=None, help="validate and checkpoint every N steps (default 200)")
    p.add_argument("--seed", type=int, default=0, help="data and initialisation seed (default 0)")
    p.add_argument("--identities", type=int, default=None, help="synthetic training identities (default 500)")
    p.add_argument("--val-identities", type=int, default=None, help="validation identities per sampler (default 2)")
    p.add_argument("--sampler", choices=["video", "multiview", "mixed"], default=None,
                   help="view groups: one video, one multi-camera instant, or both (default mixed)")
    p.add_argument("--background", choices=["plain", "textured", "mixed"], default=None,
                   help="synthetic input backgrounds (default mixed)")
    p.add_argument("--views", type=int, default=None, help="views per sample (default 20)")
    p.add_argument("--loss-weights", type=_weights, default=None, metavar="NAME=W,...",
                   help="override loss weights: rgb, ssim, lpips, track, mask, offset")
    p.add_argument("--cache-samples", type=int, default=None, metavar="N",
                   help="train on N distinct synthetic samples rendered once and kept in memory (default: a fresh "
                        "render every step)")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from the weights of this checkpoint folder (fine-tuning); modules it lacks, such "
                        "as point guidance added later, start from their fresh init")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def build_train_config(args: argparse.Namespace):
    from engine.train.trainer import TrainConfig

    cfg = TrainConfig(model=args.config, data=args.data, steps=args.steps, batch=args.batch, seed=args.seed)
    for attr, name in (("lr", "lr"), ("resolution", "resolution"), ("val_every", "val_every"),
                       ("identities", "n_identities"), ("val_identities", "val_identities"), ("sampler", "sampler"),
                       ("background", "background"), ("views", "n_views"), ("loss_weights", "loss_weights"),
                       ("cache_samples", "cache_samples"), ("init_from", "init_from")):
        value = getattr(args, attr, None)
        if value is not None:
            setattr(cfg, name, value)
    if cfg.steps < 1 or cfg.batch < 1:
        raise InputError("--steps and --batch must be at least 1")
    if cfg.resolution < 16 or cfg.resolution > 1024:
        raise InputError(f"--resolution must be in 16..1024, got {cfg.resolution}")
    if cfg.init_from and not Path(cfg.init_from).is_dir():
        raise InputError(f"--init-from {cfg.init_from}: no such checkpoint folder")
    if cfg.data != "synthetic" and not Path(cfg.data).is_dir():
        raise InputError(f"--data {cfg.data}: not 'synthetic' and not a folder")
    return cfg


def run(args: argparse.Namespace) -> int:
    from engine.model import get_config
    from engine.train.trainer import Trainer, init_distributed

    try:
        get_config(args.config)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    cfg = build_train_config(args)
    out = Path(args.out)
    if out.exists() and any(out.glob("*.safetensors")) and not args.resume:
        raise InputError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
    init_distributed()
    command = "fastavatar-stream " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:]))
    trainer = Trainer(cfg, out, command=command, resume=args.resume, progress=not args.no_progress)
    result = trainer.fit()
    if trainer.rank == 0:
        psnr = result["validation"].get("psnr", {})
        print(f"trained {result['steps']} steps in {trainer.wall_s:.0f} s; checkpoint: {out}; "
              f"validation PSNR by input frames: {psnr}")
    return 0
