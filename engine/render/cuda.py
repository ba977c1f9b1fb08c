"""gsplat dispatch for CUDA tensors, with the conventions of `engine.render` (gsplat is imported lazily so
that CPU-only use never touches its CUDA extension)."""
from __future__ import annotations

import torch


def render_gsplat(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, opacities: torch.Tensor,
                  colors: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int, *,
                  per_camera: bool, near_plane: float = 0.01, far_plane: float = 100.0,
                  eps2d: float = 0.3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared Gaussians (N,...) or, with per_camera, (C,N,...); viewmats (C,4,4), Ks (C,3,3).

    Returns rgb (C,H,W,3), alpha (C,H,W,1) and accumulated depth Σ w·z (C,H,W,1), before any background.
    gsplat's kernel clamps alpha at 0.999 where the CPU backends clamp at 0.99 (3DGS); they agree otherwise.
    """
    n_cams = viewmats.shape[0]
    n = means.shape[-2]
    if n == 0:
        # gsplat's kernels do not accept an empty scene; keep the graph connected for autograd
        zero = sum(t.sum() for t in (means, quats, scales, opacities, colors)) * 0
        blank = means.new_zeros(n_cams, height, width, 1) + zero
        return blank.expand(-1, -1, -1, 3).contiguous(), blank, blank.clone()

    from gsplat import rasterization

    kwargs = dict(near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, render_mode="RGB+D", packed=False,
                  rasterize_mode="classic", radius_clip=0.0)
    if per_camera:
        out, alpha, _ = rasterization(means, quats, scales, opacities, colors, viewmats[:, None], Ks[:, None],
                                      width, height, **kwargs)
        out, alpha = out[:, 0], alpha[:, 0]
    else:
        out, alpha, _ = rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                                      **kwargs)
    return out[..., :3], alpha, out[..., 3:4]
