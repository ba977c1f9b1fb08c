"""Small scenes shared by the renderer tests (not a test module)."""
from __future__ import annotations

import math

import torch

from engine.types import intrinsics_from_fov, look_at


def cloud(n: int, seed: int = 0, dtype: torch.dtype = torch.float32, spread: float = 0.1,
          scale_range: tuple[float, float] = (0.003, 0.02), max_opacity: float = 0.95) -> list[torch.Tensor]:
    """means, quats, scales, opacities, colors of n random Gaussians around the origin."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * spread
    quats = torch.randn(n, 4, generator=g)
    lo, hi = scale_range
    scales = torch.exp(torch.empty(n, 3).uniform_(math.log(lo), math.log(hi), generator=g))
    opacities = torch.empty(n).uniform_(0.05, max_opacity, generator=g)
    colors = torch.rand(n, 3, generator=g)
    return [t.to(dtype) for t in (means, quats, scales, opacities, colors)]


def cameras(n: int, width: int, height: int, distance: float = 0.6, fov: float = 40.0,
            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """n cameras on an arc in front of the origin: viewmats (n,4,4), Ks (n,3,3)."""
    views, Ks = [], []
    for i in range(n):
        yaw = math.radians(-30 + 60 * i / max(n - 1, 1)) if n > 1 else 0.0
        eye = torch.tensor([distance * math.sin(yaw), 0.05 * i, distance * math.cos(yaw)])
        views.append(look_at(eye, torch.zeros(3)))
        K = intrinsics_from_fov(fov, width, width)
        K[1, 2] = height / 2
        Ks.append(K)
    return torch.stack(views).to(dtype), torch.stack(Ks).to(dtype)
