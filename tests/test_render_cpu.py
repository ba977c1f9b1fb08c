"""The compiled CPU renderer (numba) against the PyTorch reference: stage by stage on shared inputs, end to
end, forward and backward."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.render import cpu, reference, render
from render_scenes import cameras, cloud


@pytest.fixture(scope="module", autouse=True)
def compiled():
    """JIT-compile (or load from numba's cache) every kernel once, so tests time the work, not the compiler."""
    view, K = cameras(1, 8, 8)
    scene = [t.requires_grad_(True) for t in cloud(10)]
    render(*scene, view, K, 8, 8, backend="cpu")["rgb"].sum().backward()


def _projected_2d(n: int, width: int, height: int, seed: int = 0) -> list[torch.Tensor]:
    """Random 2D splats: mean2d, conic, opacities, features (r,g,b,z), depth, valid."""
    g = torch.Generator().manual_seed(seed)
    mean2d = torch.rand(n, 2, generator=g) * torch.tensor([width + 8.0, height + 8.0]) - 4
    L = torch.randn(n, 2, 2, generator=g) * 2.0
    cov = L @ L.transpose(1, 2) + 0.3 * torch.eye(2)
    inv = torch.linalg.inv(cov)
    conic = torch.stack([inv[:, 0, 0], inv[:, 0, 1], inv[:, 1, 1]], -1)
    opacities = torch.rand(n, generator=g)
    depth = torch.rand(n, generator=g) + 0.5
    features = torch.cat([torch.rand(n, 3, generator=g), depth[:, None]], -1)
    valid = torch.rand(n, generator=g) > 0.05
    return [mean2d, conic, opacities, features, depth, valid]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_2d_stage_images_and_gradients_match_the_reference_on_shared_inputs():
    W, H = 45, 37  # several tiles, ragged edges
    inputs = _projected_2d(400, W, H)
    weights = torch.randn(H, W, 4), torch.randn(H, W, 1)
    results = []
    for fn in (reference.rasterize, cpu.rasterize_cpu):
        diff = [t.clone().requires_grad_(True) for t in inputs[:4]]
        img, alpha = fn(*diff, *inputs[4:], W, H)
        ((img * weights[0]).sum() + (alpha * weights[1]).sum()).backward()
        results.append((img.detach(), alpha.detach(), [t.grad for t in diff]))
    (ref_img, ref_alpha, ref_grads), (img, alpha, grads) = results
    torch.testing.assert_close(img, ref_img, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(alpha, ref_alpha, atol=2e-5, rtol=1e-4)
    for name, g, r in zip(["mean2d", "conic", "opacities", "features"], grads, ref_grads):
        assert _rel(g, r) < 1e-4, name


def test_projection_stage_and_its_backward_match_the_reference():
    scene = cloud(500, seed=2)
    view, K = cameras(1, 64, 48)
    # a few Gaussians far off-axis exercise the clamped Jacobian; one behind the camera is culled
    scene[0][:5] += torch.tensor([0.6, -0.5, 0.0])
    scene[0][5] = torch.tensor([0.0, 0.0, 2.0])
    results = []
    for fn in (reference.project, cpu.project_cpu):
        diff = [t.clone().requires_grad_(True) for t in scene[:3]]
        out = fn(*diff, scene[3], view[0], K[0], 64, 48)
        mean2d, conic, depth, valid = (out.mean2d, out.conic, out.depth, out.valid) if isinstance(
            out, reference.Projection) else out
        g = torch.Generator().manual_seed(9)
        loss = sum((t * torch.randn(t.shape, generator=g) * valid.reshape(-1, *[1] * (t.dim() - 1))).sum()
                   for t in (mean2d, conic, depth))
        loss.backward()
        results.append((mean2d.detach(), conic.detach(), depth.detach(), valid, [t.grad for t in diff]))
    ref, fast = results
    assert torch.equal(fast[3], ref[3]) and not bool(fast[3][5])
    v = ref[3]
    for a, b in zip(fast[:3], ref[:3]):
        torch.testing.assert_close(a[v], b[v], rtol=1e-5, atol=1e-4)
    for name, g, r in zip(["means", "quats", "scales"], fast[4], ref[4]):
        assert _rel(g, r) < 1e-4, name


def test_end_to_end_images_agree_with_the_reference():
    W, H = 64, 48
    view, K = cameras(2, W, H)
    scene = cloud(2000, seed=4)
    fast = render(*scene, view, K, W, H, backend="cpu")
    ref = render(*scene, view, K, W, H, backend="torch")
    for key in ("rgb", "alpha"):
        diff = (fast[key] - ref[key]).abs()
        # projections differ by ~1e-6 px, which can flip a 1/255 or 1e-4 threshold at an odd pixel
        assert diff.mean() < 1e-5 and torch.quantile(diff.flatten(), 0.999) < 1e-3, key
    assert fast["alpha"].mean() > 0.2  # the scene is actually visible


def test_compiled_backward_matches_autograd_of_the_reference_on_a_tiny_scene():
    W, H = 20, 16
    view, K = cameras(2, W, H)
    scene = cloud(12, seed=6, spread=0.03, max_opacity=0.9)
    bg = torch.tensor([0.2, 0.1, 0.4])
    grads = {}
    for backend in ("cpu", "torch"):
        inputs = [t.clone().requires_grad_(True) for t in scene]
        out = render(*inputs, view, K, W, H, backend=backend, background=bg)
        g = torch.Generator().manual_seed(3)
        loss = sum((out[k] * torch.randn(out[k].shape, generator=g)).sum() for k in ("rgb", "alpha", "depth"))
        loss.backward()
        grads[backend] = [t.grad for t in inputs]
    for name, a, b in zip(["means", "quats", "scales", "opacities", "colors"], grads["cpu"], grads["torch"]):
        assert _rel(a, b) < 1e-4, name


def test_compiled_backward_agrees_with_the_reference_on_a_2k_scene():
    W, H = 64, 64
    view, K = cameras(1, W, H)
    scene = cloud(2000, seed=8)
    weights = torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(2))
    grads = {}
    for backend in ("cpu", "torch"):
        inputs = [t.clone().requires_grad_(True) for t in scene]
        out = render(*inputs, view, K, W, H, backend=backend)
        ((out["rgb"] * weights).sum() + out["alpha"].sum()).backward()
        grads[backend] = [t.grad for t in inputs]
    for name, a, b in zip(["means", "quats", "scales", "opacities", "colors"], grads["cpu"], grads["torch"]):
        assert _rel(a, b) < 1e-2, name


def test_depth_sort_is_stable_so_equal_depths_keep_index_order():
    n = 50
    mean2d = torch.full((n, 2), 8.0)
    conic = torch.tensor([[0.5, 0.0, 0.5]]).repeat(n, 1)
    opac = torch.full((n,), 0.5)
    depth = torch.tensor([1.0, 0.5] * (n // 2))
    valid = np.ones(n, np.uint8)
    _, offsets, ids = cpu._bin(mean2d.numpy(), conic.numpy(), opac.numpy(), depth.numpy(), valid, 16, 16, 16)
    expected = list(range(1, n, 2)) + list(range(0, n, 2))
    assert ids[offsets[0]:offsets[1]].tolist() == expected


def test_results_do_not_depend_on_the_thread_count():
    W, H = 48, 40
    view, K = cameras(1, W, H)
    scene = cloud(1500, seed=12)
    previous = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            inputs = [t.clone().requires_grad_(True) for t in scene]
            out = render(*inputs, view, K, W, H, backend="cpu")
            out["rgb"].sum().backward()
            outs.append((out["rgb"].detach(), [t.grad for t in inputs]))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))
