"""`engine.render`: one entry point that splats 3D Gaussians into a batch of cameras.

Backends: "gsplat" (CUDA), "cpu" (compiled numba kernels, forward and backward), "torch" (the pure-PyTorch
reference, differentiable by autograd, float64 capable), and "auto" (gsplat for CUDA tensors, else "cpu").
"""
from __future__ import annotations

import torch

from engine.render.reference import ALPHA_MAX, ALPHA_MIN, T_MIN, TILE

BACKENDS = ("auto", "cpu", "torch", "gsplat")

__all__ = ["render", "BACKENDS", "ALPHA_MIN", "ALPHA_MAX", "T_MIN", "TILE"]


def _check(name: str, t: torch.Tensor, tail: tuple[int, ...], n_cams: int, per_camera: bool) -> None:
    lead = 2 if per_camera else 1
    if t.dim() != lead + len(tail) or tuple(t.shape[lead:]) != tail or (per_camera and t.shape[0] != n_cams):
        want = ("C," if per_camera else "") + ",".join(["N", *map(str, tail)])
        raise ValueError(f"render: {name} must have shape ({want}) with C={n_cams} cameras, got {tuple(t.shape)}")


def render(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, opacities: torch.Tensor,
           colors: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int,
           backend: str = "auto", background: torch.Tensor | None = None, near_plane: float = 0.01,
           far_plane: float = 100.0, eps2d: float = 0.3) -> dict[str, torch.Tensor]:
    """Render N Gaussians into C pinhole cameras (gsplat's conventions).

    means (N,3) world positions; quats (N,4) wxyz, normalized here; scales (N,3) linear standard deviations;
    opacities (N,) in [0,1]; colors (N,3). Each may instead carry a leading camera axis ((C,N,3), (C,N), ...)
    to give every camera its own Gaussians (an animated avatar has one pose per frame): then all five must.
    viewmats (C,4,4) world-to-camera, OpenCV axes (x right, y down, z forward); Ks (C,3,3) in pixels.
    background: optional (3,) or (C,3), composited as rgb + (1 - alpha) * background.

    Returns {"rgb": (C,H,W,3), "alpha": (C,H,W,1), "depth": (C,H,W,1)} where depth is the expected depth
    Σ wᵢ zᵢ / alpha (gsplat's "ED"; 0 where nothing was drawn). Gradients reach means, quats, scales,
    opacities, colors and background on every backend; the "torch" and "gsplat" backends also give
    gradients to viewmats and Ks, the "cpu" backend does not.
    """
    if backend not in BACKENDS:
        raise ValueError(f"render: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if viewmats.dim() != 3 or viewmats.shape[1:] != (4, 4):
        raise ValueError(f"render: viewmats must be (C,4,4), got {tuple(viewmats.shape)}")
    n_cams = viewmats.shape[0]
    if Ks.shape != (n_cams, 3, 3):
        raise ValueError(f"render: Ks must be ({n_cams},3,3) to match viewmats, got {tuple(Ks.shape)}")
    width, height = int(width), int(height)
    if width < 1 or height < 1:
        raise ValueError(f"render: image size must be at least 1x1, got {width}x{height}")
    per_camera = means.dim() == 3
    for name, t, tail in (("means", means, (3,)), ("quats", quats, (4,)), ("scales", scales, (3,)),
                          ("opacities", opacities, ()), ("colors", colors, (3,))):
        _check(name, t, tail, n_cams, per_camera)
    n = means.shape[-2]
    if not all(t.shape[-1 - len(tail)] == n for t, tail in ((quats, (4,)), (scales, (3,)), (opacities, ()),
                                                           (colors, (3,)))):
        raise ValueError("render: means, quats, scales, opacities and colors must hold the same N Gaussians")

    if backend == "auto":
        backend = "gsplat" if means.is_cuda else "cpu"
    settings = dict(near_plane=float(near_plane), far_plane=float(far_plane), eps2d=float(eps2d))
    if backend == "gsplat":
        if not means.is_cuda:
            raise ValueError("render: backend 'gsplat' needs CUDA tensors; use 'cpu' or 'auto' for CPU tensors")
        from engine.render.cuda import render_gsplat

        rgb, alpha, depth_sum = render_gsplat(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                                              per_camera=per_camera, **settings)
    else:
        if not per_camera:
            means, quats, scales, opacities, colors = (t.unsqueeze(0).expand(n_cams, *t.shape)
                                                       for t in (means, quats, scales, opacities, colors))
        if backend == "cpu":
            from engine.render.cpu import render_cpu

            dtype = torch.float32
            rgb, alpha, depth_sum = render_cpu(*(t.to(dtype) for t in (means, quats, scales, opacities, colors,
                                                                        viewmats, Ks)), width, height, **settings)
            rgb, alpha, depth_sum = (t.to(means.device) for t in (rgb, alpha, depth_sum))
        else:
            from engine.render.reference import render_torch

            rgb, alpha, depth_sum = render_torch(means, quats, scales, opacities, colors, viewmats.to(means.dtype),
                                                 Ks.to(means.dtype), width, height, **settings)

    depth = depth_sum / alpha.clamp_min(1e-10)
    if background is not None:
        bg = background.to(rgb.dtype)
        if bg.shape == (3,):
            bg = bg.expand(n_cams, 3)
        if bg.shape != (n_cams, 3):
            raise ValueError(f"render: background must be (3,) or ({n_cams},3), got {tuple(background.shape)}")
        rgb = rgb + (1 - alpha) * bg[:, None, None, :]
    return {"rgb": rgb, "alpha": alpha, "depth": depth}
