"""Helpers shared by the CLI subcommands (modules starting with '_' are not subcommands)."""
from __future__ import annotations

import argparse
import re
import ipaddress
import math
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from fastavatar_stream.errors import UserError

WEIGHTS_HELP = ("model weights: our checkpoint folder, or official:DIR for a copy of the authors' FastAvatar "
                "release (a folder holding the release's files is recognised without the prefix; "
                "`check-weights DIR` lists what it needs). Default: the embedded default model")
DEVICE_HELP = "where the model runs: auto (CUDA when available, else CPU; default), cpu, cuda or cuda:N"


def output_dir(path: str | Path, option: str = "--out") -> Path:
    """Create the output folder and check that files can be written there, or raise one clear UserError."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out} exists and is not a folder; choose a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to {option} folder {out}: {exc.strerror or exc}") from None
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
def number(value: float, option: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> float:
    """A finite number within the bounds, or one clear UserError naming the option."""
    bad = not math.isfinite(value)
    bad = bad or (low is not None and (value <= low if low_open else value < low))
    bad = bad or (high is not None and (value >= high if high_open else value > high))
    if bad:
        lo = "" if low is None else f"{'(' if low_open else '['}{low:g}"
        hi = "" if high is None else f"{high:g}{')' if high_open else ']'}"
        raise UserError(f"{option} must be a finite number in {lo or '(-inf'}, {hi or 'inf)'}, got {value}")
    return value


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def zmq_endpoint_is_local(endpoint: str) -> bool:
    """True for ipc:// and inproc:// endpoints and tcp:// endpoints on a loopback address."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    parsed = urlparse(endpoint)
    host = endpoint[len("tcp://"):].rpartition(":")[0] if parsed.scheme == "tcp" else ""
    return is_loopback_host(host)
