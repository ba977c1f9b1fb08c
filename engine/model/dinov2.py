"""A DINOv2 vision transformer with register tokens (SPEC.md §3).

Parameter names follow Meta's release (`dinov2_vitl14_reg4_pretrain.pth`): `cls_token`, `pos_embed`,
`register_tokens`, `patch_embed.proj.*`, `blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1,
mlp.fc2, ls2.gamma}`, `norm.*` (no `mask_token`: it is only used for masked training and dropped on load).
Widths are configurable so small members of the family share the same classes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """(B,3,H,W) -> (B, (H/p)*(W/p), C) tokens, row-major (y then x)."""

    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ViTAttention(nn.Module):
    """Multi-head self-attention with a biased fused qkv projection; (B,L,C) -> (B,L,C)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class ViTMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-norm block with LayerScale (LayerNorm eps 1e-6, GELU erf)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ViTAttention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ViTMlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2(nn.Module):
    """ViT with cls + register tokens; `intermediate(images, layers)` gives normed patch-token maps.

    images: (B,3,H,W) with H, W multiples of `patch`; the stored `pos_embed` covers `pos_grid`² patches
    (+cls) and is resized bicubically with antialias (offset 0) when the grid differs, as Meta's code does.
    """

    def __init__(self, *, patch: int, dim: int, depth: int, heads: int, mlp_ratio: float, registers: int,
                 pos_grid: int) -> None:
        super().__init__()
        self.patch = patch
        self.pos_grid = pos_grid
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_grid * pos_grid + 1, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim))
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.register_tokens, std=1e-6)

    @property
    def n_prefix(self) -> int:
        return 1 + self.register_tokens.shape[1]

    def position_table(self, gh: int, gw: int) -> torch.Tensor:
        """(1, 1+gh*gw, C) position embedding for a gh x gw grid."""
        m = self.pos_grid
        if gh == m and gw == m:
            return self.pos_embed
        table = self.pos_embed.float()
        cls, grid = table[:, :1], table[:, 1:]
        grid = grid.reshape(1, m, m, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=True, align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([cls, grid], dim=1).to(self.pos_embed.dtype)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) -> (B, 1+R+h*w, C): cls, registers, patches (position added before registers go in)."""
        b, _, h, w = images.shape
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + self.position_table(h // self.patch, w // self.patch).to(x.dtype)
        return torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1).to(x.dtype), x[:, 1:]], dim=1)

    def intermediate(self, images: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
        """Outputs of blocks `layers` (0-based), each through the final norm, prefix tokens dropped.

        Returns len(layers) tensors (B, h*w, C).
        """
        x = self.tokens(images)
        wanted = set(layers)
        taken: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks[: max(layers) + 1]):
            x = block(x)
            if i in wanted:
                taken[i] = self.norm(x)[:, self.n_prefix:]
        return [taken[i] for i in layers]


#: the encoder block type under a generic name (the trainer's gradient checkpointing looks it up)
Block = ViTBlock
