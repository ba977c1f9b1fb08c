"""Fourier point embedding of the canonical query points (SPEC.md §5)."""
from __future__ import annotations

import math

import torch
from torch import nn


def fourier_basis(n_freqs: int = 8) -> torch.Tensor:
    """(3, 3*n_freqs) basis: row r holds 2^k*pi (k = 0..n_freqs-1) in columns r*n_freqs .. r*n_freqs+n_freqs-1."""
    basis = torch.zeros(3, 3 * n_freqs)
    freqs = (2.0 ** torch.arange(n_freqs, dtype=torch.float32)) * math.pi
    for r in range(3):
        basis[r, r * n_freqs:(r + 1) * n_freqs] = freqs
    return basis


class PointEmbed(nn.Module):
    """(..., 3) points -> (..., dim): LayerNorm(Linear([sin(p B), cos(p B), p]))."""

    def __init__(self, dim: int, n_freqs: int = 8) -> None:
        super().__init__()
        self.register_buffer("basis", fourier_basis(n_freqs))
        self.mlp = nn.Linear(6 * n_freqs + 3, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        proj = points @ self.basis.to(points.dtype)
        return self.norm(self.mlp(torch.cat([proj.sin(), proj.cos(), points], dim=-1)))
