"""Alternating global/frame transformer (SPEC.md §6; official `AlternatingCrossAttn`).

Slots: each base frame is one slot; all compressed (FramePack) tokens form one extra slot with its own
weights (`compressed_frame_attn`). Every slot carries its own copy of the point tokens. Per layer pair: a
global block over the image tokens of all slots, then the per-slot joint blocks (all base slots batched).
"""
from __future__ import annotations

import torch
from torch import nn

from engine.model.attention import GlobalBlock, JointBlock, frame_index_table, scaled_init_


class FrameStack(nn.Module):
    """Joint blocks + the token input projection (+ final norm) of one slot family (`frame_attn.*`)."""

    def __init__(self, dim: int, heads: int, layers: int, mlp_ratio: float, qk_norm: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(JointBlock(dim, heads, mlp_ratio, qk_norm) for _ in range(layers))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.linear_cond_proj = nn.Linear(dim, dim)


def grid_positions(grid: tuple[int, int], device=None) -> torch.Tensor:
    """(h*w, 2) float (y, x) patch indices, row-major."""
    ys, xs = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device),
                            indexing="ij")
    return torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=-1).float()


class AlternatingTransformer(nn.Module):
    """Image tokens of N base frames + Fc compressed frames and point tokens -> per-slot point latents.

    Weights: `frame_attn`, `compressed_frame_attn` (FrameStack each; the latter's `norm` is unused, as in
    the official network), `global_attn_layers.N`. `frame_idx_emb` is a non-persistent sin/cos table.
    With `global_attention=False` there are no global blocks (an ablation): every slot then only ever attends
    to its own frame's tokens, so nothing registers the slots with each other.
    """

    def __init__(self, dim: int, heads: int, layers: int, mlp_ratio: float, rope_base: float,
                 max_frame_index: int, qk_norm: bool = True, global_attention: bool = True) -> None:
        super().__init__()
        self.frame_attn = FrameStack(dim, heads, layers, mlp_ratio, qk_norm)
        self.compressed_frame_attn = FrameStack(dim, heads, layers, mlp_ratio, qk_norm)
        self.global_attn_layers = nn.ModuleList(GlobalBlock(dim, heads, mlp_ratio, rope_base)
                                                for _ in range(layers if global_attention else 0))
        self.max_frame_index = max_frame_index
        self.register_buffer("frame_idx_emb", frame_index_table(max_frame_index, dim), persistent=False)
        scaled_init_(self)

    def rebuild_buffers(self, dtype: torch.dtype = torch.float32) -> None:
        """Recompute the non-persistent frame-index table (after building on the meta device)."""
        dim = self.frame_attn.norm.normalized_shape[0]
        self.frame_idx_emb = frame_index_table(self.max_frame_index, dim).to(dtype)

    def forward(self, base: torch.Tensor, base_positions: torch.Tensor, compressed: torch.Tensor,
                n_compressed_frames: int, compressed_positions: torch.Tensor, points: torch.Tensor,
                guidance: torch.Tensor | None = None, point_offsets: torch.Tensor | None = None) -> torch.Tensor:
        """Run all layer pairs.

        base:                 (B, N, T, C) encoder tokens of the N base frames
        base_positions:       (T, 2) RoPE positions of one base frame's tokens
        compressed:           (B, Fc*t, C) FramePack tokens (Fc frames of t tokens)
        compressed_positions: (Fc*t, 2)
        points:               (B, P, C) embedded query points (same for every slot)
        guidance:             (B, N, G, C) extra per-frame tokens appended to each base frame (RoPE position 0)
        point_offsets:        (B, N, P, C) added to base slot n's copy of the point tokens (point guidance)
        returns               (B, N+1, P, C) normed point latents, base slots then the compressed slot
        """
        b, n, t, c = base.shape
        fc = n_compressed_frames
        if n + fc > self.max_frame_index:
            raise ValueError(f"{n} base + {fc} pooled frames exceed the frame-index limit of "
                             f"{self.max_frame_index}; pass fewer pooled frames")
        p = points.shape[1]
        emb = self.frame_idx_emb.to(base.dtype)
        base = self.frame_attn.linear_cond_proj(base) + emb[:n].view(1, n, 1, c)
        comp = self.compressed_frame_attn.linear_cond_proj(compressed)
        comp = (comp.view(b, fc, -1, c) + emb[n:n + fc].view(1, fc, 1, c)).reshape(b, -1, c)
        if guidance is not None:
            base = torch.cat([base, guidance.to(base.dtype) + emb[:n].view(1, n, 1, c)], dim=2)
            g = guidance.shape[2]
            base_positions = torch.cat([base_positions, base_positions.new_zeros(g, 2)])
        tb = base.shape[2]
        positions = torch.cat([base_positions.repeat(n, 1), compressed_positions.to(base_positions)])

        x_base = points[:, None].expand(b, n, p, c)
        if point_offsets is not None:
            x_base = x_base + point_offsets.to(x_base.dtype)
        x_base = x_base.reshape(b * n, p, c)
        x_comp = points
        c_base = base.reshape(b * n, tb, c)
        c_comp = comp
        for i, (frame, cframe) in enumerate(zip(self.frame_attn.layers, self.compressed_frame_attn.layers)):
            if i < len(self.global_attn_layers):
                tokens = self.global_attn_layers[i](torch.cat([c_base.reshape(b, n * tb, c), c_comp], dim=1),
                                                    positions)
                c_base = tokens[:, :n * tb].reshape(b * n, tb, c)
                c_comp = tokens[:, n * tb:]
            x_base, c_base = frame(x_base, c_base)
            x_comp, c_comp = cframe(x_comp, c_comp)
        latents = torch.cat([x_base.reshape(b, n, p, c), x_comp[:, None]], dim=1)
        return self.frame_attn.norm(latents)
