"""Train the `tiny` config on synthetic heads with the settings of the shipped default checkpoint's recipe.

    .venv/bin/python benchmarks/train_default.py --steps 2400            # train into runs/default, then install
    .venv/bin/python benchmarks/train_default.py --steps 600 --init-from runs/default --work runs/stage2
                                                                         # one fine-tuning stage on top of it

What this does: one training run, or one fine-tuning stage with --init-from, with the shipped recipe's data and
loss settings; the trainer writes each checkpoint's `history` (every stage's command, steps, time and validation,
the --init-from parent's stages first) and its totals, and `install` copies weights and metadata into the package
as float16.
What it does not do: reproduce the checkpoint shipped today bit for bit. That one was made in six stages while the
model code changed between them (point guidance, colour skip, fusion rule), one stage started from weights edited
by hand (the Gaussian head's colour layer zeroed), and its `history` was written by hand at the time
(`history_note` in its model.json says so). Checkpoints made with this script from now on carry a history written
by the trainer.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# run as a script, this folder comes first on sys.path and benchmarks/engine.py would hide the engine package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--work", default=str(REPO / "runs" / "default"))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--resolution", type=int, default=96)
    ap.add_argument("--val-every", type=int, default=300)
    ap.add_argument("--cache-samples", type=int, default=400,
                    help="distinct synthetic samples rendered once and reused (0: a fresh render every step)")
    ap.add_argument("--no-install", action="store_true", help="do not copy the result into the package")
    ap.add_argument("--init-from", default=None, metavar="DIR", help="start from this checkpoint (fine-tuning)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the trainer's 3e-4)")
    ap.add_argument("--loss-weights", default=None, metavar="NAME=W,...", help="loss weight overrides")
    args = ap.parse_args(argv)

    from engine.checkpoints import default_checkpoint_dir
    from fastavatar_stream.cli import main as cli

    cmd = ["train", "--config", "tiny", "--data", "synthetic", "--steps", str(args.steps), "--out", args.work,
           "--resolution", str(args.resolution), "--val-every", str(args.val_every), "--sampler", "mixed",
           "--background", "mixed", "--identities", "500", "--views", "20", "--seed", "0",
           "--cache-samples", str(args.cache_samples)]
    if args.resume:
        cmd.append("--resume")
    if args.init_from:
        cmd += ["--init-from", args.init_from]
    if args.lr is not None:
        cmd += ["--lr", str(args.lr)]
    if args.loss_weights:
        cmd += ["--loss-weights", args.loss_weights]
    rc = cli(cmd)
    if rc or args.no_install:
        return rc
    dest = default_checkpoint_dir()
    dest.mkdir(parents=True, exist_ok=True)
    for old in list(dest.glob("*.safetensors")) + list(dest.glob("*.json")):
        old.unlink()
    install(Path(args.work), dest)
    print(f"installed {dest}", file=sys.stderr)
    return 0


def install(work: Path, dest: Path) -> None:
    """Copy the trained weights into the package as float16 (half the size; loading casts back to float32)."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(work / "model.safetensors"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(dest / "model.safetensors"))
    meta = json.loads((work / "model.json").read_text())
    meta["stored_dtype"] = "float16"
    (dest / "model.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    del torch


if __name__ == "__main__":
    raise SystemExit(main())
