"""Test-wide setup: caches live in a temp dir, never in the user's home; shared data paths."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_CACHE_ROOT = Path(tempfile.mkdtemp(prefix="fastavatar-test-cache-"))
for var, sub in (("TORCH_HOME", "torch"), ("TORCH_EXTENSIONS_DIR", "torch_extensions"),
                 ("XDG_CACHE_HOME", "xdg"), ("MPLCONFIGDIR", "mpl")):
    os.environ.setdefault(var, str(_CACHE_ROOT / sub))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = (REPO_ROOT / ".." / "shared").resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"../shared is missing next to the checkout ({SHARED}); tests need its reference data")
    return SHARED


@pytest.fixture(scope="session")
def real_clip(shared_dir: Path) -> Path:
    return shared_dir / "data" / "real" / "obama_address_512.mp4"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA; runs when a GPU is present")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
