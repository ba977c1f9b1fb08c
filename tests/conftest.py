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


@pytest.fixture(scope="session")
def micro_weights(tmp_path_factory) -> Path:
    """A randomly initialised `micro` checkpoint (seed 0): the daemon's pipeline under test, not its likeness."""
    import torch

    from engine.checkpoints import save_checkpoint
    from engine.model import build_model

    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("micro"), build_model("micro"), metadata={"test": True})


@pytest.fixture(scope="session")
def clip(tmp_path_factory) -> Path:
    """A short PyAV-encoded face clip (24 frames, 256 px) made from a public-domain portrait."""
    from fastavatar_stream.demo import make_demo_clip

    return make_demo_clip(tmp_path_factory.mktemp("clip") / "face.mp4", n_frames=24, size=256)


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
