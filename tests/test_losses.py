"""Training losses: SSIM, L1, regularizers, landmark tracking, sliced selection, LPIPS gating."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from engine import losses
from engine.types import intrinsics_from_fov, look_at


def test_ssim_of_identical_images_is_one():
    img = torch.rand(2, 32, 40, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(losses.ssim(img, img), torch.ones(2), atol=1e-6)
    assert losses.ssim_loss(img, img).abs() < 1e-6


def test_ssim_of_constant_images_matches_closed_form():
    # Constant images have zero variance: SSIM = (2ab + C1) / (a² + b² + C1).
    a, b = 0.2, 0.7
    x = torch.full((1, 24, 24, 3), a)
    y = torch.full((1, 24, 24, 3), b)
    expected = (2 * a * b + losses.SSIM_C1) / (a * a + b * b + losses.SSIM_C1)
    assert losses.ssim(x, y).item() == pytest.approx(expected, rel=1e-3)  # float32 variance


def test_ssim_drops_with_noise_and_is_symmetric():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 32, 32, 3, generator=g)
    small = (img + 0.05 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    large = (img + 0.3 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    s_small, s_large = losses.ssim(img, small).item(), losses.ssim(img, large).item()
    assert 1.0 > s_small > s_large
    assert losses.ssim(small, img).item() == pytest.approx(s_small, abs=1e-6)


def test_l1_and_psnr_known_values():
    x = torch.zeros(1, 4, 4, 3)
    y = torch.full((1, 4, 4, 3), 0.1)
    assert losses.l1_loss(x, y).item() == pytest.approx(0.1)
    assert losses.psnr(x, y).item() == pytest.approx(20.0, abs=1e-4)  # mse 0.01 -> 20 dB


def test_offset_regularizer_is_zero_inside_the_margin_and_linear_outside():
    inside = torch.tensor([[0.01, 0.0, 0.0], [0.0, 0.05, 0.0]])
    assert losses.offset_regularizer(inside).item() == 0.0
    outside = torch.tensor([[0.0, 0.0, 0.1], [0.0, 0.0, 0.0]])
    assert losses.offset_regularizer(outside).item() == pytest.approx((0.1 - losses.OFFSET_MARGIN) / 2)


def test_pruning_regularizer_is_squared_mean_keep_probability():
    importance = torch.tensor([0.0, 0.0, math.log(3.0)])  # sigmoid: 0.5, 0.5, 0.75
    assert losses.pruning_regularizer(importance).item() == pytest.approx(((0.5 + 0.5 + 0.75) / 3) ** 2)


def test_soft_prune_keeps_confident_gaussians_and_removes_unwanted_ones():
    g = torch.Generator().manual_seed(0)
    opacity = torch.ones(2000)
    high = losses.soft_prune_opacity(opacity, torch.full((2000,), 8.0), generator=g)
    low = losses.soft_prune_opacity(opacity, torch.full((2000,), -8.0), generator=g)
    assert high.mean() > 0.95 and low.mean() < 0.05
    mid = losses.soft_prune_opacity(opacity, torch.zeros(2000), generator=g)
    assert abs(mid.mean().item() - 0.5) < 0.05  # logistic noise has median 0


def _camera():
    view = look_at(torch.tensor([0.0, 0.0, 1.0]), torch.zeros(3))
    return view[None], intrinsics_from_fov(30.0, 64, 64)[None]


def test_projection_puts_the_target_at_the_principal_point():
    view, K = _camera()
    uv = losses.project_points(torch.zeros(1, 1, 3), view, K)
    assert torch.allclose(uv, torch.tensor([[[32.0, 32.0]]]), atol=1e-5)


def test_tracking_loss_is_zero_at_the_truth_and_its_gradient_points_to_the_landmark():
    view, K = _camera()
    truth = torch.tensor([[[0.02, -0.03, 0.0], [-0.04, 0.01, 0.05]]])
    landmarks = losses.project_points(truth, view, K)
    landmarks = torch.cat([landmarks, torch.ones(1, 2, 1)], dim=-1)
    at_truth = truth.clone().requires_grad_(True)
    assert losses.landmark_tracking_loss(losses.project_points(at_truth, view, K), landmarks, 64).item() < 1e-6

    moved = (truth + torch.tensor([0.01, 0.0, 0.0])).requires_grad_(True)
    loss = losses.landmark_tracking_loss(losses.project_points(moved, view, K), landmarks, 64)
    assert loss.item() > 0
    loss.backward()
    # The point sits too far along +x; descending the gradient must move it back (-x).
    assert (moved.grad[0, :, 0] > 0).all()
    stepped = moved.detach() - 1e-3 * moved.grad / moved.grad.norm()
    assert losses.landmark_tracking_loss(losses.project_points(stepped, view, K), landmarks, 64) < loss


def test_tracking_loss_ignores_zero_confidence_landmarks():
    pred = torch.tensor([[[10.0, 10.0], [50.0, 50.0]]])
    obs = torch.tensor([[[10.0, 10.0, 1.0], [0.0, 0.0, 0.0]]])
    assert losses.landmark_tracking_loss(pred, obs, 64).item() == 0.0


def test_landmark_anchors_are_nearest_points():
    points = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    lmk = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.8, 0.0], [0.0, 0.0, 0.1]])
    assert losses.landmark_anchors(points, lmk).tolist() == [1, 2, 0]


@pytest.mark.parametrize("n_base", [1, 2, 5, 16])
def test_sliced_selection_picks_fewer_than_all_frames(n_base):
    g = torch.Generator().manual_seed(n_base)
    for _ in range(20):
        single, sliced = losses.sliced_selection(n_base, 8, g)
        assert 0 <= single < n_base
        assert sliced == sorted(set(sliced)) and all(0 <= s < n_base for s in sliced)
        assert len(sliced) == 1 if n_base == 1 else 1 <= len(sliced) < n_base and len(sliced) <= 8


def test_loss_weights_default_to_the_paper_and_accept_overrides():
    w = losses.LossWeights()
    assert (w.rgb, w.ssim, w.lpips, w.track, w.mask) == (0.8, 0.1, 0.1, 0.1, 0.0005)
    assert losses.LossWeights.from_overrides({"track": 0.5}).track == 0.5
    with pytest.raises(ValueError):
        losses.LossWeights.from_overrides({"nope": 1.0})


def test_lpips_is_skipped_with_a_warning_when_weights_are_absent(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert losses.LPIPS.from_local(tmp_path / "no_vgg.pth", tmp_path / "no_lin.pth") is None
    assert any("LPIPS" in r.message for r in caplog.records)


def test_lpips_from_local_files_is_zero_for_identical_images(tmp_path):
    # A randomly initialised backbone in the torchvision layout stands in for the real file.
    torch.manual_seed(0)
    vgg = losses.LPIPS.__new__(losses.LPIPS)
    torch.nn.Module.__init__(vgg)
    state = {}
    in_ch, idx = 3, 0
    for item in losses._VGG_CFG:
        if item == "M":
            idx += 1
            continue
        state[f"features.{idx}.weight"] = torch.randn(item, in_ch, 3, 3) * 0.1
        state[f"features.{idx}.bias"] = torch.zeros(item)
        in_ch, idx = item, idx + 2
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(losses._LPIPS_CHANNELS)}
    torch.save(state, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "vgg.pth")
    model = losses.LPIPS.from_local(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
    assert model is not None
    a = torch.rand(1, 32, 32, 3)
    b = torch.rand(1, 32, 32, 3)
    assert model(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert model(a, b).item() > 0
