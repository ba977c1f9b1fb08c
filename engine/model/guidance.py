"""The paper's guidance token (eq. 2): h_i = concat(x_i, MLP([pi_i, z_exp_i, z_pose_i])).

One token per base frame from a 2-layer GELU MLP (paper appendix: 2 layers, GELU) over the frame's camera
pose, FLAME expression and head pose. The token is appended to that frame's image tokens (it takes part in
the global and frame attention like them, with RoPE position (0, 0), i.e. no rotation, and gets its frame's
frame-index embedding added like the frame's image tokens). Pooled (FramePack) frames carry no guidance. The released v2
network has no guidance, so `official` turns it off; `paper` turns it on.
"""
from __future__ import annotations

import torch
from torch import nn

#: keys of the guidance dict and their per-frame layout
GUIDANCE_KEYS = ("camera", "expression", "pose")


def camera_features(camera: torch.Tensor) -> torch.Tensor:
    """(B,N,4,4) or (B,N,3,4) world-to-camera matrices, or (B,N,12) already flat -> (B,N,12): R rows then t."""
    if camera.shape[-1] == 12 and camera.dim() == 3:
        return camera
    rt = camera[..., :3, :4]
    return torch.cat([rt[..., :3].flatten(-2), rt[..., 3]], dim=-1)


class GuidanceEncoder(nn.Module):
    """guidance dict -> (B, N, 1, dim) tokens.

    guidance["camera"]:     (B,N,4,4) | (B,N,3,4) | (B,N,12) world-to-camera (OpenCV axes)
    guidance["expression"]: (B,N,E) FLAME expression coefficients (first `expr_dim` used, zero-padded if fewer)
    guidance["pose"]:       (B,N,15) global, neck, jaw axis-angles then the two eyes (FlameParams order)
    """

    def __init__(self, dim: int, camera_dim: int, expr_dim: int, pose_dim: int) -> None:
        super().__init__()
        self.expr_dim = expr_dim
        self.in_dim = camera_dim + expr_dim + pose_dim
        self.mlp = nn.Sequential(nn.Linear(self.in_dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, guidance: dict[str, torch.Tensor], batch: int, frames: int) -> torch.Tensor:
        missing = [k for k in GUIDANCE_KEYS if k not in guidance]
        if missing:
            raise ValueError(f"guidance is missing {missing}; it needs {list(GUIDANCE_KEYS)}")
        cam = camera_features(guidance["camera"])
        expr = guidance["expression"][..., : self.expr_dim]
        if expr.shape[-1] < self.expr_dim:
            expr = torch.nn.functional.pad(expr, (0, self.expr_dim - expr.shape[-1]))
        feats = torch.cat([cam, expr, guidance["pose"]], dim=-1)
        if feats.shape != (batch, frames, self.in_dim):
            raise ValueError(f"guidance features have shape {tuple(feats.shape)}, expected "
                             f"{(batch, frames, self.in_dim)} (one entry per base frame)")
        w = self.mlp[0].weight
        return self.mlp(feats.to(device=w.device, dtype=w.dtype))[:, :, None]
