"""Behaviour of the CPU-sized LGRT: slot layout, frame order, FramePack pool, guidance, limits, pruning.

The official network's behaviour is checked on `tiny` without its point guidance (that option has its own tests
in test_point_guidance.py), so these tests say what the released architecture does at a CPU size.
"""
from __future__ import annotations

import pytest
import torch

from engine.model import TINY, build_model
from engine.reconstruct import NetworkInputs, forward, prune_mask, slot_sets

SIDE = TINY.image_size
PLAIN = TINY.replace(name="tiny-plain", point_guidance=False)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(PLAIN).eval()


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    return torch.rand(1, 20, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def points() -> torch.Tensor:
    return torch.randn(48, 3, generator=torch.Generator().manual_seed(2)) * 0.08


@pytest.mark.parametrize("n", [1, 16])
def test_one_slot_per_base_frame_plus_the_compressed_slot(tiny, frames, points, n: int) -> None:
    with torch.inference_mode():
        out = tiny(frames[:, :n], points)
    s = n + 1
    assert out.xyz.shape == (1, s, 48, 3) and out.rotation.shape == (1, s, 48, 4)
    assert out.opacity.shape == out.importance.shape == (1, s, 48, 1)
    assert out.offset.abs().max() < TINY.offset_step / 2
    assert torch.allclose(out.xyz, points + out.offset)
    assert (out.scale > 0).all() and (out.scale <= TINY.scale_clip).all()
    assert torch.allclose(out.rotation.norm(dim=-1), torch.ones(1, s, 48), atol=1e-5)
    assert ((out.opacity > 0) & (out.opacity < 1)).all() and ((out.rgb >= 0) & (out.rgb <= 1)).all()


def test_images_of_another_size_are_resized_to_the_model_input(tiny, frames, points) -> None:
    big = torch.nn.functional.interpolate(frames[0, :2], size=(2 * SIDE, 2 * SIDE), mode="nearest")[None]
    with torch.inference_mode():
        out = tiny(big, points)
    assert out.xyz.shape == (1, 3, 48, 3) and torch.isfinite(out.rgb).all()


def test_base_frame_order_matters_only_through_the_frame_index_embedding(frames, points) -> None:
    """The official network adds a per-position frame-index embedding, so it is not order-free as is.

    Everything else (global attention with per-frame RoPE, per-slot frame blocks, FramePack slot) is
    permutation-equivariant: with the index table made constant, permuting base frames permutes the base
    slots and leaves the compressed slot (the same set of frames) unchanged, so the fused avatar is the same.
    """
    torch.manual_seed(0)
    model = build_model(PLAIN).eval()
    perm = torch.tensor([2, 0, 3, 1])
    x = frames[:, :4]
    with torch.inference_mode():
        with_index = model(x, points).xyz, model(x[:, perm], points).xyz
        model.transformer.frame_idx_emb[:] = model.transformer.frame_idx_emb[3]
        a, b = model(x, points), model(x[:, perm], points)
    assert not torch.allclose(with_index[0][:, perm], with_index[1][:, :4], atol=1e-4)
    for name in ("xyz", "scale", "opacity", "rotation", "rgb", "importance"):
        ta, tb = getattr(a, name), getattr(b, name)
        torch.testing.assert_close(ta[:, perm], tb[:, :4], atol=2e-5, rtol=1e-4)  # base slots permuted
        torch.testing.assert_close(ta[:, 4], tb[:, 4], atol=2e-5, rtol=1e-4)      # compressed slot equal
    fused_a = torch.sort(a.xyz.reshape(-1, 3)[:, 0]).values
    fused_b = torch.sort(b.xyz.reshape(-1, 3)[:, 0]).values
    torch.testing.assert_close(fused_a, fused_b, atol=2e-5, rtol=1e-4)


def test_frames_past_the_base_limit_and_pool_frames_both_feed_framepack(tiny, frames, points) -> None:
    """Official rule with the base limit lowered from 16 to 4 to keep the test fast (same code path)."""
    model = build_model(PLAIN.replace(max_base_frames=4)).eval()
    model.load_state_dict(tiny.state_dict())
    with torch.inference_mode():
        long = model(frames[:, :7], points)                           # 7 frames: 4 base + 3 packed
        pooled = model(frames[:, :4], points, pool_images=frames[:, 4:7])
        plain = model(frames[:, :4], points)                          # no pool: all 4 are packed again
        official_limit = tiny(frames[:, :4], points)
    assert long.xyz.shape[1] == 5
    torch.testing.assert_close(long.xyz, pooled.xyz)
    torch.testing.assert_close(long.importance, pooled.importance)
    torch.testing.assert_close(plain.xyz, official_limit.xyz)
    assert not torch.allclose(plain.importance[:, 4], pooled.importance[:, 4], atol=1e-6)


def test_pool_past_the_frame_index_limit_is_a_clear_error(tiny, frames, points) -> None:
    huge_pool = frames[:, :1].expand(1, 1000 - 16 + 1, 3, SIDE, SIDE)  # a view: no memory, fails before encoding
    with pytest.raises(ValueError, match="frame-index limit of 1000"):
        tiny(frames[:, :16], points, pool_images=huge_pool)


def _guidance(n: int, scale: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    camera = torch.eye(4).repeat(1, n, 1, 1)
    camera[..., :3, 3] = torch.tensor([0.0, 0.0, 1.0])
    return {"camera": camera, "expression": torch.randn(1, n, 50, generator=gen) * scale,
            "pose": torch.randn(1, n, 15, generator=gen) * 0.1 * scale}


def test_guidance_token_conditions_the_output(frames, points) -> None:
    torch.manual_seed(0)
    model = build_model(PLAIN.replace(name="tiny-guided", guidance=True)).eval()
    x = frames[:, :3]
    with torch.inference_mode():
        a = model(x, points, guidance=_guidance(3, 1.0))
        b = model(x, points, guidance=_guidance(3, 2.0))
        again = model(x, points, guidance=_guidance(3, 1.0))
        with pytest.raises(ValueError, match="guidance"):
            model(x, points)
    assert torch.equal(a.importance, again.importance)   # deterministic, so any difference is the guidance
    assert (a.importance - b.importance).abs().max() > 1e-6
    assert (a.rotation - b.rotation).abs().max() > 1e-6


def test_forward_gives_one_set_per_slot_tagged_with_its_frame(tiny, frames, points) -> None:
    inputs = NetworkInputs(guidance=None, point_features=None, seen=None)
    with torch.inference_mode():
        out = forward(tiny, frames[0, :2], points, inputs, pool=frames[0, 2:5])
    sets = slot_sets(out, [0, 1, 2], [7, 9, -1])
    assert out.n_slots == 3 and [len(s) for s in sets] == [48, 48, 48]
    assert [int(s.frame[0]) for s in sets] == [7, 9, -1]
    assert torch.equal(sets[0].anchor, torch.arange(48))
    torch.testing.assert_close(sets[2].color, out.rgb[0, 2])
    torch.testing.assert_close(torch.sigmoid(sets[1].opacity_logit), out.opacity[0, 1, :, 0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="frame ids"):
        slot_sets(out, [0, 1], [7])


def test_pruning_rules() -> None:
    logits = torch.tensor([-2.0, -0.1, 0.0, 0.1, 5.0])
    assert prune_mask(logits).tolist() == [False, False, False, True, True]
    draws = [prune_mask(logits.repeat(2000), "stochastic", torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    kept = draws[0].reshape(2000, 5).float().mean(0)          # P(keep) = sigmoid(logit) under logistic noise
    torch.testing.assert_close(kept, torch.sigmoid(logits), atol=0.04, rtol=0)
    soft = prune_mask(logits, "soft", torch.Generator().manual_seed(3))
    assert soft.dtype == torch.float32 and ((soft > 0) & (soft < 1)).all()
    with pytest.raises(ValueError, match="pruning mode"):
        prune_mask(logits, "median")


@pytest.mark.gpu
def test_cuda_bf16_autocast_matches_cpu_float32(frames, points) -> None:
    torch.manual_seed(0)
    model = build_model(PLAIN).eval()
    with torch.inference_mode():
        ref = model(frames[:, :4], points)
        gpu = model.cuda()(frames[:, :4].cuda(), points.cuda())
    assert gpu.xyz.dtype == torch.float32
    torch.testing.assert_close(gpu.xyz.cpu(), ref.xyz, atol=5e-3, rtol=0)
    torch.testing.assert_close(gpu.rgb.cpu(), ref.rgb, atol=5e-2, rtol=0)
