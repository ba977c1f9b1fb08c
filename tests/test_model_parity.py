"""Our LGRT modules reproduce the official network on golden files (README_golden.md format)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.checkpoints import ours_to_official
from engine.model import MICRO, build_model
from engine.train.parity import forward_golden

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def golden(shared_dir: Path) -> Path:
    return shared_dir / "reference" / "golden_tiny_fastavatar.npz"


def test_golden_file_reproduced_for_every_output(golden: Path) -> None:
    ref = np.load(golden)
    expected = sorted(k for k in ref.files if k.startswith("out_"))
    ours = forward_golden(golden)
    assert sorted(ours) == expected
    for name in expected:
        assert ours[name].shape == ref[name].shape, name
        err = float(np.abs(ours[name] - ref[name]).max())
        assert err < TOLERANCE, f"{name}: max abs error {err:.2e}"


def _write_golden_format(path: Path, *, n_frames: int, grid: int, n_points: int, seed: int,
                         feats: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A golden-format file from a randomly initialised reduced model (dim 128, 2 heads, 1 layer, level 4)."""
    cfg = MICRO.replace(dim=128, heads=2, layers=1, framepack_level=4, gs_hidden=48, enc_dim=96, enc_heads=1)
    torch.manual_seed(seed)
    model = build_model(cfg)
    arrays: dict[str, np.ndarray] = {}
    for key, value in model.state_dict().items():
        official = ours_to_official(key)
        if official is not None and not official.startswith("encoder.model."):
            arrays["w/" + official] = value.numpy()
    gen = np.random.default_rng(seed)
    tokens = grid * grid
    arrays["in_image_feats"] = (feats if feats is not None
                                else gen.standard_normal((1, n_frames, tokens, 128)).astype(np.float32))
    arrays["in_query_points"] = (gen.standard_normal((1, 1, n_points, 3)) * 0.1).astype(np.float32)
    arrays["in_dino_layers"] = gen.standard_normal((4, 1, tokens, 96)).astype(np.float32)
    np.savez(path, **arrays)
    return arrays


def test_more_than_16_frames_only_frames_16_on_go_to_framepack(tmp_path: Path) -> None:
    long = _write_golden_format(tmp_path / "long.npz", n_frames=19, grid=10, n_points=17, seed=3)
    out = forward_golden(tmp_path / "long.npz")
    # 16 base slots + 1 compressed slot; 3 pooled frames of ceil(10/4)^2 = 9 tokens each
    assert out["out_latent"].shape == (1, 17, 17, 128)
    assert out["out_compressed_cond"].shape == (1, 1, 27, 128)
    assert out["out_gs_rgb"].shape == (17 * 17, 1, 3)
    assert out["out_fusion_tokens"].shape == (1, 100, 128)
    # the same weights fed only frames 16..18 (3 <= 16 frames: all of them are compressed) give the same pack
    _write_golden_format(tmp_path / "tail.npz", n_frames=3, grid=10, n_points=17, seed=3,
                         feats=long["in_image_feats"][:, 16:])
    tail = forward_golden(tmp_path / "tail.npz")
    np.testing.assert_allclose(tail["out_compressed_cond"], out["out_compressed_cond"], atol=1e-6)
    for name, value in out.items():
        assert np.isfinite(value).all(), name


def test_framepack_reads_conv_output_as_raw_channel_major_memory(tmp_path: Path) -> None:
    _write_golden_format(tmp_path / "g.npz", n_frames=2, grid=8, n_points=5, seed=4)
    data = np.load(tmp_path / "g.npz")
    out = forward_golden(tmp_path / "g.npz")
    w = torch.from_numpy(data["w/framepack_compressor.proj.weight"])
    b = torch.from_numpy(data["w/framepack_compressor.proj.bias"])
    maps = torch.from_numpy(data["in_image_feats"])[0].reshape(2, 8, 8, 128).permute(0, 3, 1, 2)
    conv = torch.nn.functional.conv2d(maps, w, b, stride=4)            # (2, 128, 2, 2)
    tokens = conv.reshape(2, -1)                                         # channel-major memory per frame
    expected = tokens.reshape(2, 4, 128).reshape(1, 8, 128)              # 128 consecutive values = 1 token
    np.testing.assert_allclose(out["out_compressed_cond"][0, 0], expected[0].numpy(), atol=1e-5)
    permuted = conv.permute(0, 2, 3, 1).reshape(8, 128)
    assert np.abs(out["out_compressed_cond"][0, 0] - permuted.numpy()).max() > 1e-2
