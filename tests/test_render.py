"""engine.render: the contract every backend honours (shapes, conventions, gradients, edge cases)."""
from __future__ import annotations

import math

import pytest
import torch

from engine.render import render
from engine.render.reference import ALPHA_MIN
from render_scenes import cameras, cloud

CPU_BACKENDS = ["cpu", "torch"]


def _camera(width: int, height: int, f: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity pose (camera at the origin looking along +z) and a pinhole with its centre in the image."""
    K = torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])
    return torch.eye(4)[None], K[None]


def _one(mean, scale=0.01, opacity=0.8, color=(1.0, 0.5, 0.25)) -> list[torch.Tensor]:
    return [torch.tensor([mean]), torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.full((1, 3), scale),
            torch.tensor([opacity]), torch.tensor([color])]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_single_gaussian_lands_at_its_projection_with_the_analytic_footprint(backend):
    W, H = 41, 31
    view, K = _camera(W, H)
    x, y, z, s, o = 0.02, -0.01, 1.0, 0.015, 0.8
    out = render(*_one((x, y, z), s, o), view, K, W, H, backend=backend)
    u, v = 100 * x / z + W / 2, 100 * y / z + H / 2  # projected centre in pixels
    # EWA: an isotropic 3D Gaussian projects to s² J Jᵀ (J the perspective Jacobian) plus the eps2d low-pass
    J = torch.tensor([[100 / z, 0.0, -100 * x / z**2], [0.0, 100 / z, -100 * y / z**2]])
    conic = torch.linalg.inv(s**2 * J @ J.T + 0.3 * torch.eye(2))
    dx = (torch.arange(W) + 0.5)[None, :] - u  # pixel centres sit at +0.5
    dy = (torch.arange(H) + 0.5)[:, None] - v
    sigma = 0.5 * (conic[0, 0] * dx**2 + 2 * conic[0, 1] * dx * dy + conic[1, 1] * dy**2)
    expected = o * torch.exp(-sigma)
    expected = torch.where(expected >= ALPHA_MIN, expected, torch.zeros_like(expected))
    alpha = out["alpha"][0, ..., 0]
    torch.testing.assert_close(alpha, expected, atol=2e-6, rtol=1e-4)
    peak = int(alpha.argmax())
    assert (peak % W, peak // W) == (int(u), int(v))
    torch.testing.assert_close(out["rgb"][0], alpha[..., None] * torch.tensor([1.0, 0.5, 0.25]), atol=2e-6, rtol=1e-4)
    drawn = alpha > 0
    torch.testing.assert_close(out["depth"][0, ..., 0][drawn], torch.full((int(drawn.sum()),), z))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_the_nearer_gaussian_occludes_the_farther_one(backend):
    W, H = 16, 16
    view, K = _camera(W, H)
    near = _one((0.0, 0.0, 1.0), 0.03, 0.98, (1.0, 0.0, 0.0))
    far = _one((0.0, 0.0, 2.0), 0.06, 0.98, (0.0, 0.0, 1.0))
    for first, second, colour, z in ((near, far, 0, 1.0), (far, near, 0, 1.0)):  # input order must not matter
        scene = [torch.cat([a, b]) for a, b in zip(first, second)]
        out = render(*scene, view, K, W, H, backend=backend)
        centre = out["rgb"][0, H // 2, W // 2]
        assert centre[colour] > 0.95 and centre[2] < 0.05
        assert abs(float(out["depth"][0, H // 2, W // 2, 0]) - z) < 0.05


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradients_reach_every_input_and_the_background(backend):
    scene = [t.requires_grad_(True) for t in cloud(60, seed=3)]
    view, K = cameras(2, 24, 20)
    background = torch.tensor([0.2, 0.3, 0.4], requires_grad=True)
    out = render(*scene, view, K, 24, 20, backend=backend, background=background)
    (out["rgb"].square().sum() + out["alpha"].sum() + out["depth"].sum()).backward()
    for name, t in zip(["means", "quats", "scales", "opacities", "colors", "background"], [*scene, background]):
        assert t.grad is not None and torch.isfinite(t.grad).all(), name
        assert t.grad.abs().sum() > 0, name


def test_outputs_have_the_contract_shapes_and_dtype():
    view, K = cameras(3, 20, 12)
    out = render(*cloud(30), view, K, 20, 12, backend="cpu")
    assert out["rgb"].shape == (3, 12, 20, 3)
    assert out["alpha"].shape == (3, 12, 20, 1)
    assert out["depth"].shape == (3, 12, 20, 1)
    assert all(t.dtype == torch.float32 for t in out.values())
    assert out["alpha"].min() >= 0 and out["alpha"].max() <= 1


def test_background_is_composited_under_the_image():
    view, K = cameras(2, 16, 16)
    scene = cloud(40)
    plain = render(*scene, view, K, 16, 16, backend="cpu")
    bg = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.5]])
    per_camera = render(*scene, view, K, 16, 16, backend="cpu", background=bg)
    torch.testing.assert_close(per_camera["rgb"], plain["rgb"] + (1 - plain["alpha"]) * bg[:, None, None, :])
    shared = render(*scene, view, K, 16, 16, backend="cpu", background=bg[1])
    torch.testing.assert_close(shared["rgb"][1], per_camera["rgb"][1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_camera_gaussians_match_rendering_each_camera_alone(backend):
    view, K = cameras(2, 20, 16)
    poses = [cloud(30, seed=s) for s in (1, 2)]
    batched = render(*[torch.stack(parts) for parts in zip(*poses)], view, K, 20, 16, backend=backend)
    for i, scene in enumerate(poses):
        alone = render(*scene, view[i:i + 1], K[i:i + 1], 20, 16, backend=backend)
        for key in ("rgb", "alpha", "depth"):
            torch.testing.assert_close(batched[key][i], alone[key][0])
    shared = render(*poses[0], view, K, 20, 16, backend=backend)
    expanded = render(*[t.expand(2, *t.shape) for t in poses[0]], view, K, 20, 16, backend=backend)
    torch.testing.assert_close(shared["rgb"], expanded["rgb"])


def test_quaternions_are_normalized_inside():
    view, K = cameras(1, 16, 16)
    means, quats, scales, opacities, colors = cloud(20)
    a = render(means, quats, scales, opacities, colors, view, K, 16, 16, backend="cpu")
    b = render(means, 3.5 * quats, scales, opacities, colors, view, K, 16, 16, backend="cpu")
    torch.testing.assert_close(a["rgb"], b["rgb"])


def test_bad_arguments_are_refused_with_value_errors():
    view, K = cameras(1, 8, 8)
    scene = cloud(5)
    with pytest.raises(ValueError, match="unknown backend"):
        render(*scene, view, K, 8, 8, backend="vulkan")
    with pytest.raises(ValueError, match="quats"):
        render(scene[0], scene[1][:, :3], *scene[2:], view, K, 8, 8)
    with pytest.raises(ValueError, match="Ks"):
        render(*scene, view, K[0], 8, 8)
    with pytest.raises(ValueError, match="background"):
        render(*scene, view, K, 8, 8, background=torch.zeros(4))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            render(*scene, view, K, 8, 8, backend="gsplat")


# ------------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gaussians_behind_the_camera_or_off_screen_draw_nothing(backend):
    view, K = _camera(16, 16)
    behind = _one((0.0, 0.0, -1.0), 0.05)
    off_screen = _one((5.0, 0.0, 1.0), 0.01)
    scene = [torch.cat([a, b]).requires_grad_(True) for a, b in zip(behind, off_screen)]
    out = render(*scene, view, K, 16, 16, backend=backend)
    assert out["alpha"].abs().max() == 0 and out["rgb"].abs().max() == 0 and out["depth"].abs().max() == 0
    out["rgb"].sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in scene)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_scales_render_as_the_low_pass_blob_and_zero_opacity_as_nothing(backend):
    view, K = _camera(9, 9)
    point = [t.requires_grad_(True) for t in _one((0.0, 0.0, 1.0), scale=0.0, opacity=0.5)]
    out = render(*point, view, K, 9, 9, backend=backend)
    alpha = out["alpha"].detach()
    assert abs(float(alpha[0, 4, 4, 0]) - 0.5) < 1e-5  # centre pixel, variance eps2d only
    assert float(alpha[0, 4, 5, 0]) == pytest.approx(0.5 * math.exp(-0.5 / 0.3), rel=1e-4)
    out["rgb"].sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in point)
    invisible = _one((0.0, 0.0, 1.0), scale=0.05, opacity=0.0)
    assert render(*invisible, view, K, 9, 9, backend=backend)["alpha"].max() == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_an_empty_scene_gives_the_background(backend):
    view, K = cameras(2, 7, 5)
    empty = [torch.zeros(0, 3), torch.zeros(0, 4), torch.zeros(0, 3), torch.zeros(0), torch.zeros(0, 3)]
    out = render(*empty, view, K, 7, 5, backend=backend, background=torch.tensor([0.1, 0.2, 0.3]))
    assert out["alpha"].abs().max() == 0 and out["depth"].abs().max() == 0
    torch.testing.assert_close(out["rgb"], torch.tensor([0.1, 0.2, 0.3]).expand(2, 5, 7, 3))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_one_pixel_image(backend):
    view, K = _camera(1, 1, f=1.0)
    out = render(*_one((0.0, 0.0, 1.0), 0.5, 0.7), view, K, 1, 1, backend=backend)
    assert out["rgb"].shape == (1, 1, 1, 3)
    assert float(out["alpha"]) == pytest.approx(0.7, rel=1e-4)  # the pixel centre is the projected centre


@pytest.mark.parametrize("size", [(37, 19), (19, 37)])
def test_non_square_images_agree_between_backends(size):
    W, H = size
    view, K = cameras(2, W, H)
    scene = cloud(80, seed=5)
    a = render(*scene, view, K, W, H, backend="cpu")
    b = render(*scene, view, K, W, H, backend="torch")
    for key in ("rgb", "alpha"):
        assert a[key].shape[1:3] == (H, W)
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4)


def test_reference_passes_float64_gradcheck_on_a_tiny_scene():
    scene = cloud(4, seed=11, dtype=torch.float64, spread=0.02, scale_range=(0.01, 0.02), max_opacity=0.8)
    view, K = cameras(1, 8, 6, dtype=torch.float64)
    bg = torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64)

    def fn(means, quats, scales, opacities, colors, background):
        out = render(means, quats, scales, opacities, colors, view, K, 8, 6, backend="torch", background=background)
        return out["rgb"], out["alpha"], out["depth"]

    inputs = [t.clone().requires_grad_(True) for t in (*scene, bg)]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-7, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
def test_gsplat_on_cuda_matches_the_cpu_backend():
    W, H = 64, 48
    view, K = cameras(2, W, H)
    scene = cloud(2000, seed=7, max_opacity=0.9)
    cpu = render(*[t.requires_grad_(True) for t in scene], view, K, W, H, backend="cpu")
    gpu_in = [t.detach().cuda().requires_grad_(True) for t in scene]
    gpu = render(*gpu_in, view.cuda(), K.cuda(), W, H, backend="auto")
    for key in ("rgb", "alpha"):
        diff = (gpu[key].cpu() - cpu[key]).abs()
        assert diff.mean() < 1e-3 and diff.max() < 0.05, key
    weights = torch.rand(2, H, W, 3)
    (cpu["rgb"] * weights).sum().backward()
    (gpu["rgb"] * weights.cuda()).sum().backward()
    for name, a, b in zip(["means", "quats", "scales", "opacities", "colors"], scene, gpu_in):
        cos = torch.nn.functional.cosine_similarity(a.grad.flatten(), b.grad.cpu().flatten(), dim=0)
        assert cos > 0.98, name
