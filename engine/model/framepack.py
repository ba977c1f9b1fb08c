"""FramePack compressor (paper §4.5, SPEC.md §4): many frames -> one extra token "frame".

Each frame's token map is replicate-padded right/bottom to a multiple of the level, then an LxL/stride-L
conv turns it into ceil(h/L)*ceil(w/L) tokens. The conv output (F, C, h', w') is read back with a plain
reshape (channel-major memory taken as tokens), exactly like the official code: the released weights were
trained with that layout, so a permute would be "cleaner" but wrong.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def compressed_grid(grid: tuple[int, int], level: int) -> tuple[int, int]:
    return math.ceil(grid[0] / level), math.ceil(grid[1] / level)


def compressed_positions(grid: tuple[int, int], level: int, n_frames: int, device=None) -> torch.Tensor:
    """(n_frames*h'*w', 2) float (y, x) RoPE positions of compressed tokens: (L*i + (L-1)/2, L*j + (L-1)/2)."""
    ch, cw = compressed_grid(grid, level)
    centre = (level - 1) / 2.0
    ys = torch.arange(ch, dtype=torch.float32, device=device) * level + centre
    xs = torch.arange(cw, dtype=torch.float32, device=device) * level + centre
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=-1).repeat(n_frames, 1)


class FramePack(nn.Module):
    """(B, F, h*w, C) frame tokens -> (B, F*h'*w', C) compressed tokens (raw reshape, see module doc)."""

    def __init__(self, dim: int, level: int) -> None:
        super().__init__()
        self.level = level
        self.proj = nn.Conv2d(dim, dim, kernel_size=level, stride=level)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, f, n, c = tokens.shape
        h, w = grid
        maps = tokens.reshape(b * f, h, w, c).permute(0, 3, 1, 2)
        pad_h, pad_w = (-h) % self.level, (-w) % self.level
        if pad_h or pad_w:
            maps = F.pad(maps, (0, pad_w, 0, pad_h), mode="replicate")
        out = self.proj(maps)  # (B*F, C, h', w')
        per_frame = out.shape[2] * out.shape[3]
        return out.reshape(b, f * per_frame, c)
