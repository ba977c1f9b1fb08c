"""What a remote peer may ask the daemon to open: the operator's source policy and the checks of a `start`.

The operator decides, at `serve` time, which folders remote `start` requests may read (`--allow-source DIR`,
repeatable; none by default, so remote `start` is refused) and whether cameras may be opened
(`--allow-device`). A peer names a source and may set only the options in `PEER_OPTIONS`; it never chooses
FFmpeg formats, filters, protocols, frame-size limits or looping. Sources named by peers are opened
`restricted` (local files and plain video demuxers only, see `sources.SAFE_DEMUXERS`).

A refusal is a `SourceRefused` (a ProtocolError, so the control socket answers `{"ok": false, "error": ...}`).
Paths outside the allowed folders are refused with one fixed sentence whether or not they exist, so the
replies never tell a peer which paths exist; inside an allowed folder the operator has granted read access
and the reply may say that a file is missing or unreadable.
"""
from __future__ import annotations

import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fastavatar_stream.sources import DEVICE_PREFIX
from protocols.errors import ProtocolError

#: option -> (type, description). The only options a `start` request may carry.
PEER_OPTIONS: dict[str, tuple[type, str]] = {
    "realtime": (bool, "pace a file to its timestamps like a live stream"),
    "max_frames": (int, "stop after this many frames (1..MAX_PEER_FRAMES)"),
    "fps": (float, "frame rate of an image folder (0 < fps <= 240)"),
}
MAX_PEER_FRAMES = 1_000_000
MAX_SOURCE_CHARS = 4096
#: camera names a peer may give: an index or a /dev/videoN node, nothing FFmpeg would parse further
_DEVICE_NAME = re.compile(r"^(\d{1,2}|/dev/video\d{1,2})$")

OUTSIDE_ROOTS = "source refused: it is not under a folder this daemon allows (serve --allow-source DIR)"
NO_REMOTE_START = "remote start is disabled: the daemon allows no source folders (serve --allow-source DIR)"
NO_DEVICES = "camera sources are disabled for remote start (serve --allow-device)"


class SourceRefused(ProtocolError):
    """A remote `start` the policy does not allow; its text is the one-line reply to the peer."""


@dataclass(frozen=True)
class SourcePolicy:
    """roots: folders (resolved, symlinks followed) whose files and sub-folders peers may open.
    allow_device: peers may open cameras (`device:N` or `device:/dev/videoN`)."""

    roots: tuple[Path, ...] = ()
    allow_device: bool = False

    @classmethod
    def from_folders(cls, folders: list[str | Path], allow_device: bool = False) -> "SourcePolicy":
        roots = []
        for folder in folders:
            path = Path(folder)
            if not path.is_dir():
                raise ValueError(f"--allow-source {folder}: not a folder")
            roots.append(Path(os.path.realpath(path)))
        return cls(tuple(roots), allow_device)


@dataclass
class RemoteStart:
    """A `start` request the policy accepted: what to open and how."""

    spec: str
    source_options: dict[str, Any] = field(default_factory=dict)
    max_frames: int | None = None


def check_start(source: Any, options: Any, policy: SourcePolicy) -> RemoteStart:
    """Validate a peer's `start {source, options}` against `policy`; SourceRefused says why not."""
    peer_options = _peer_options(options)
    if not isinstance(source, str) or not 0 < len(source) <= MAX_SOURCE_CHARS or not source.isprintable():
        raise SourceRefused(f"'source' must be a printable path of 1..{MAX_SOURCE_CHARS} characters")
    max_frames = peer_options.pop("max_frames", None)
    if source.startswith(DEVICE_PREFIX):
        return RemoteStart(_device(source, policy), {}, max_frames)
    if peer_options.get("fps") is not None:
        peer_options["fps"] = float(peer_options["fps"])
    return RemoteStart(str(_path_under_roots(source, policy)), peer_options, max_frames)


def _peer_options(options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise SourceRefused("'options' must be a map")
    unknown = sorted(str(k) for k in options if k not in PEER_OPTIONS)
    if unknown:
        raise SourceRefused(f"options {unknown} are not allowed; a peer may set only {sorted(PEER_OPTIONS)}")
    out: dict[str, Any] = {}
    for name, value in options.items():
        kind = PEER_OPTIONS[name][0]
        if kind is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise SourceRefused(f"option {name!r} must be {kind.__name__}")
        out[name] = value
    if "max_frames" in out and not 1 <= out["max_frames"] <= MAX_PEER_FRAMES:
        raise SourceRefused(f"option 'max_frames' must be in 1..{MAX_PEER_FRAMES}")
    if "fps" in out and not (math.isfinite(out["fps"]) and 0 < out["fps"] <= 240):
        raise SourceRefused("option 'fps' must be in (0, 240]")
    return out


def _device(source: str, policy: SourcePolicy) -> str:
    if not policy.allow_device:
        raise SourceRefused(NO_DEVICES)
    name = source[len(DEVICE_PREFIX):]
    if not _DEVICE_NAME.match(name):
        raise SourceRefused("a camera is device:N or device:/dev/videoN")
    return source


def _path_under_roots(source: str, policy: SourcePolicy) -> Path:
    if not policy.roots:
        raise SourceRefused(NO_REMOTE_START)
    path = Path(source)
    if not path.is_absolute() or "\x00" in source:
        raise SourceRefused(OUTSIDE_ROOTS)
    real = Path(os.path.realpath(path))  # symlinks followed: a link inside a root may not lead outside it
    if not any(real == root or real.is_relative_to(root) for root in policy.roots):
        raise SourceRefused(OUTSIDE_ROOTS)
    try:
        mode = os.stat(real).st_mode  # never opens: a FIFO or device node cannot block here
    except OSError:
        raise SourceRefused(f"source not found or not readable under the allowed folders: {source}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise SourceRefused("source refused: only regular files and folders can be opened")
    return real
