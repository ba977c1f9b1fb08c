"""Helpers shared by the CLI subcommands (modules starting with '_' are not subcommands)."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from fastavatar_stream.errors import UserError

WEIGHTS_HELP = ("model weights: our checkpoint folder, or official:DIR for a copy of the authors' FastAvatar "
                "release (a folder holding the release's files is recognised without the prefix; "
                "`check-weights DIR` lists what it needs). Default: the embedded default model")
DEVICE_HELP = "where the model runs: auto (CUDA when available, else CPU; default), cpu, cuda or cuda:N"


def output_dir(path: str | Path, option: str = "--out") -> Path:
    """Create the output folder, or raise one clear UserError when it cannot be one."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out} exists and is not a folder; choose a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {option} folder {out}: {exc.strerror or exc}") from None
    return out


def add_landmarks_option(parser: argparse.ArgumentParser) -> None:
    """`--landmarks auto|mediapipe|dlib|face-alignment` (`--detector` is its older name)."""
    parser.add_argument("--landmarks", "--detector", dest="landmarks", default="auto",
                        choices=["auto", "mediapipe", "dlib", "face-alignment"],
                        help="landmark backend: mediapipe (478-point face mesh and a matte), dlib or face-alignment "
                             "(68 points); auto (default): mediapipe when it imports, else face-alignment when its "
                             "weights are in $TORCH_HOME, else dlib")
def resolve_device(text: str) -> str:
    """`auto` -> "cuda" when a CUDA device is visible, else "cpu"; `cpu`, `cuda`, `cuda:N` checked against what the
    machine has. One clear UserError otherwise."""
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return text
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {text!r}")
    if not torch.cuda.is_available():
        raise UserError(f"--device {text}: this machine has no CUDA device (PyTorch {torch.__version__}); "
                        "use --device cpu")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) here")
    return text
