"""Helpers shared by the CLI subcommands (modules starting with '_' are not subcommands)."""
from __future__ import annotations

import argparse
from pathlib import Path

from fastavatar_stream.errors import UserError


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
