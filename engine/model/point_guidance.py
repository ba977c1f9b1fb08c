"""Projected point-prompt guidance: what each base frame shows of each point prompt, as a per-slot token offset.

The paper's guidance (eq. 2, `engine.model.guidance`) gives the network each frame's camera, expression and head
pose as one token, and leaves it to learn where every FLAME-anchored query point lands in that frame. A network
as small as `tiny`, trained for hours on a CPU, does not learn that projection; then no slot's Gaussians are
grounded in what its frame saw, and more frames cannot help. This option hands the projection over explicitly:
the tracked FLAME fit and camera pose every point prompt into every base frame, and the point's copy in that
frame's slot gets an embedding of
  - the image colour under the projected point (bilinear), and that colour times how squarely the frame sees it,
  - the projected position (normalised to [-1, 1], plus sin/cos features), inside-the-image flag,
  - the facing term cos(normal, direction to the camera) and the depth relative to the head's median depth.
The Gaussian head also adds `colour_prior_logits` (the colour the frame shows at the point, faded to grey where it
does not see it) to its colour output, a skip path: a small CPU-trained network without it learns a mean head whose
colours hardly depend on the input images (benchmarks/RESULTS.md); the skip makes a slot's colours start from what
its frame saw.
Off in `official` and `paper` (the released weights have no such input); on in `tiny`. The compressed
(FramePack) slot gets none. The embedding MLP's last layer starts at zero, so only the colour skip changes what a
checkpoint trained without the option computes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

FOURIER_OCTAVES = 4
#: rgb (3) + rgb*facing (3) + uv (2) + fourier (2*2*octaves) + facing cos (1) + inside (1) + relative depth (1)
N_POINT_FEATURES = 3 + 3 + 2 + 4 * FOURIER_OCTAVES + 3
FACING, INSIDE = N_POINT_FEATURES - 3, N_POINT_FEATURES - 2   # feature columns


def projected_point_features(images: torch.Tensor, means: torch.Tensor, normals: torch.Tensor,
                             viewmats: torch.Tensor, Ks: torch.Tensor) -> torch.Tensor:
    """Per-frame, per-point guidance features.

    images (N,3,H,W) in [0,1] (intrinsics `Ks` in pixels of this H, W); means, normals (N,P,3) posed world
    positions and unit normals of the point prompts in each frame; viewmats (N,4,4) world-to-camera (OpenCV axes);
    returns (N,P,N_POINT_FEATURES) float32.
    """
    n, _, h, w = images.shape
    rot, trans = viewmats[:, :3, :3].float(), viewmats[:, :3, 3].float()
    cam = torch.einsum("nij,npj->npi", rot, means.float()) + trans[:, None]
    z = cam[..., 2:3]
    uv = torch.einsum("nij,npj->npi", Ks.float(), cam / z.clamp_min(1e-3))[..., :2]
    size = torch.tensor([w, h], dtype=uv.dtype, device=uv.device)
    uvn = 2.0 * uv / size - 1.0                                       # pixel edges at ±1 (align_corners=False)
    inside = ((uvn.abs() <= 1).all(-1, keepdim=True) & (z > 1e-3)).float()
    normal_cam = torch.einsum("nij,npj->npi", rot, normals.float())
    facing = (F.normalize(normal_cam, dim=-1) * F.normalize(-cam, dim=-1)).sum(-1, keepdim=True)
    rgb = F.grid_sample(images.float(), uvn.clamp(-1.5, 1.5)[:, :, None], mode="bilinear",
                        padding_mode="zeros", align_corners=False)[..., 0].transpose(1, 2) * inside
    seen = facing.clamp_min(0) * inside
    freqs = math.pi * 2.0 ** torch.arange(FOURIER_OCTAVES, dtype=uv.dtype, device=uv.device)
    angles = (uvn.clamp(-1.5, 1.5)[..., None] * freqs).flatten(-2)
    depth = (z - z.median(dim=1, keepdim=True).values) / 0.1
    return torch.cat([rgb, rgb * seen, uvn.clamp(-1.5, 1.5), angles.sin(), angles.cos(), facing, inside,
                      depth.clamp(-3, 3)], dim=-1)


def colour_prior_logits(features: torch.Tensor) -> torch.Tensor:
    """(..., P, F) projected point features -> (..., P, 3) logits of the colour a frame shows at each point.

    The sampled colour where the frame faces the point (cos >= 1/3), fading to grey (logit 0) towards edge-on
    views and grey where the frame sees the point from behind or not at all. The Gaussian head adds these logits to
    its colour output, so a slot's colours start from what its frame saw and the network predicts the correction
    (and the unseen parts). A surface seen at a slant still shows its own colour, so the fade is steep: with a
    linear fade the top of the head, seen obliquely from the front, was mostly grey and the network filled it with
    the training set's mean hair colour.
    """
    weight = ((3 * features[..., FACING]).clamp(0, 1) * features[..., INSIDE])[..., None]
    prior = weight * features[..., 0:3] + (1 - weight) * 0.5
    return torch.logit(prior.clamp(0.02, 0.98))


class PointGuidance(nn.Module):
    """(B,N,P,F) projected point features -> (B,N,P,dim) offsets added to the point tokens of base slot n."""

    def __init__(self, dim: int, n_features: int = N_POINT_FEATURES) -> None:
        super().__init__()
        self.n_features = n_features
        self.mlp = nn.Sequential(nn.Linear(n_features, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.n_features:
            raise ValueError(f"point guidance needs {self.n_features} features per point, got {features.shape[-1]}")
        w = self.mlp[0].weight
        return self.mlp(features.to(device=w.device, dtype=w.dtype))
