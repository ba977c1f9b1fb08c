"""Image encoder: DINOv2 backbone + 4-layer 1x1-conv fusion head (SPEC.md §3).

Images go in as RGB in [0,1] with no mean/std normalisation (the official weights were trained that way);
they are resized to `image_size` (bilinear, antialiased) only when they differ from it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.config import ModelConfig
from engine.model.dinov2 import DinoV2


class FusionHead(nn.Module):
    """Fuses 4 token maps: each its own 1x1 conv, channel concat, 1x1 conv (official `fusion_head`).

    layers: 4 tensors (B, h*w, C_enc) row-major -> (B, h*w, C).
    """

    def __init__(self, enc_dim: int, dim: int, n_layers: int = 4) -> None:
        super().__init__()
        self.projects = nn.ModuleList(nn.Conv2d(enc_dim, dim, kernel_size=1) for _ in range(n_layers))
        self.output_conv = nn.Conv2d(dim * n_layers, dim, kernel_size=1)

    def forward(self, layers: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        maps = [proj(t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w))
                for proj, t in zip(self.projects, layers)]
        return self.output_conv(torch.cat(maps, dim=1)).flatten(2).transpose(1, 2)


class ImageEncoder(nn.Module):
    """(B,3,H,W) images in [0,1] -> (B, g*g, dim) tokens and the grid (g, g)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = DinoV2(patch=cfg.patch_size, dim=cfg.enc_dim, depth=cfg.enc_depth, heads=cfg.enc_heads,
                               mlp_ratio=cfg.enc_mlp_ratio, registers=cfg.enc_registers,
                               pos_grid=cfg.enc_pos_grid)
        self.fusion = FusionHead(cfg.enc_dim, cfg.dim, len(cfg.enc_layers))
        if cfg.enc_frozen:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> "ImageEncoder":
        super().train(mode)
        if self.cfg.enc_frozen:  # the frozen backbone always runs in eval mode, as upstream
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        size = self.cfg.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        layers = self.backbone.intermediate(images, self.cfg.enc_layers)
        grid = (size // self.cfg.patch_size, size // self.cfg.patch_size)
        return self.fusion(layers, grid), grid
