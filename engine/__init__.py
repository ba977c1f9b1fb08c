"""Pure compute: head model, Gaussian sets, rendering, the LGRT model, training. No I/O beyond loading files.

Public names are imported lazily so that `import engine` stays cheap and each part can be used alone.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_head": "engine.head",
    "HeadModel": "engine.head",
    "FlameParams": "engine.types",
    "Cameras": "engine.types",
    "GaussianSet": "engine.gaussians",
    "render": "engine.render",
    "build_model": "engine.model",
    "load_official": "engine.checkpoints",
    "load_checkpoint": "engine.checkpoints",
    "save_checkpoint": "engine.checkpoints",
    "default_checkpoint_dir": "engine.checkpoints",
    "InputError": "engine.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
