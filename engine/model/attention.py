"""Attention blocks of the alternating transformer (SPEC.md §6).

* `rope2d`: the official 2-D RoPE *float branch*, which every token takes because base and compressed
  positions are concatenated into one float tensor. Per head the dims split into a y-half and an x-half;
  inside a half of size h, dim d uses frequency base^(-d/h) (h distinct frequencies, not paired) and
  out = t*cos + rot(t)*sin with rot(t) = [-t[h/2:], t[:h/2]]. Not a true rotation; the weights expect it.
* `GlobalBlock`: pre-LN self-attention (qkv without bias, RoPE on q/k) + GELU(erf) MLP over all image tokens.
* `JointBlock`: SD3 MM-DiT block without modulation: point tokens x and image tokens c attend jointly
  ([x ; c] order) with per-head RMSNorm on q/k; both streams are updated.
All attention goes through `torch.nn.functional.scaled_dot_product_attention`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rope_frequencies(half: int, base: float, device=None) -> torch.Tensor:
    """(half,) frequencies base^(-d/half), d = 0..half-1."""
    return 1.0 / (base ** (torch.arange(half, dtype=torch.float32, device=device) / half))


def _rope_half(t: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    quarter = t.shape[-1] // 2
    rotated = torch.cat([-t[..., quarter:], t[..., :quarter]], dim=-1)
    return t * angles.cos().to(t.dtype) + rotated * angles.sin().to(t.dtype)


def rope2d(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """x (B,H,L,D), positions (L,2) float (y, x) -> (B,H,L,D) with the float-branch 2-D RoPE."""
    half = x.shape[-1] // 2
    freqs = rope_frequencies(half, base, device=x.device)
    pos = positions.to(device=x.device, dtype=torch.float32)
    ang_y = pos[:, 0:1] * freqs  # (L, half)
    ang_x = pos[:, 1:2] * freqs
    return torch.cat([_rope_half(x[..., :half], ang_y), _rope_half(x[..., half:], ang_x)], dim=-1)


def frame_index_table(n: int, dim: int) -> torch.Tensor:
    """(n, dim) 1-D sin/cos table: first dim/2 columns sin(i*w_k), last dim/2 cos(i*w_k), w_k = 1e4^(-k/(dim/2))."""
    half = dim // 2
    omega = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float64) / half))
    ang = torch.arange(n, dtype=torch.float64)[:, None] * omega[None]
    return torch.cat([ang.sin(), ang.cos()], dim=1).float()


class GlobalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope_base: float) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k = rope2d(q, positions, rope_base), rope2d(k, positions, rope_base)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class GlobalBlock(nn.Module):
    """(B, L, C) image tokens of all slots, (L, 2) positions -> (B, L, C). Keys match `global_attn_layers.N`."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, rope_base: float) -> None:
        super().__init__()
        self.rope_base = rope_base
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attn = GlobalSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        # indices 0..3 keep the official key names (mlp.0, mlp.3); 2 is the (zero) dropout slot
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Identity(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), positions, self.rope_base)
        return x + self.mlp(self.norm2(x))


class RMSNorm(nn.Module):
    """RMSNorm over the last dim computed in float32 (as diffusers does), learned gain."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class JointAttention(nn.Module):
    """Joint attention of x (B,Lx,C) and c (B,Lc,C) -> updated (x, c) outputs before the residual.

    Names follow diffusers' `Attention` (to_q/k/v, add_*_proj, norm_q/k, norm_added_q/k, to_out.0, to_add_out).
    """

    def __init__(self, dim: int, heads: int, qk_norm: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.qk_norm = qk_norm
        head_dim = dim // heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_add_out = nn.Linear(dim, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        return t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lx = x.shape[1]
        q, k = self._heads(self.to_q(x)), self._heads(self.to_k(x))
        cq, ck = self._heads(self.add_q_proj(c)), self._heads(self.add_k_proj(c))
        if self.qk_norm:  # the weights exist either way; diffusers < 0.31 ignored them
            q, k, cq, ck = self.norm_q(q), self.norm_k(k), self.norm_added_q(cq), self.norm_added_k(ck)
        q, k = torch.cat([q, cq], 2), torch.cat([k, ck], 2)
        v = torch.cat([self._heads(self.to_v(x)), self._heads(self.add_v_proj(c))], 2)
        out = F.scaled_dot_product_attention(q, k, v)
        b, h, n, d = out.shape
        out = out.transpose(1, 2).reshape(b, n, h * d)
        return self.to_out[0](out[:, :lx]), self.to_add_out(out[:, lx:])


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear with diffusers' key names (`net.0.proj`, `net.2`)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, hidden)
        self.net = nn.ModuleList([proj, nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class JointBlock(nn.Module):
    """x (B,Lx,C) point tokens, c (B,Lc,C) image tokens -> both updated. Keys match `frame_attn.layers.N`."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool = True) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.norm1_context = nn.LayerNorm(dim, eps=1e-5)
        self.attn = JointAttention(dim, heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.norm2_context = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.ff = FeedForward(dim, hidden)
        self.ff_context = FeedForward(dim, hidden)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ax, ac = self.attn(self.norm1(x), self.norm1_context(c))
        x = x + ax
        c = c + ac
        x = x + self.ff(self.norm2(x))
        c = c + self.ff_context(self.norm2_context(c))
        return x, c


def scaled_init_(module: nn.Module) -> None:
    """Default init for the transformer's linears (trunc-normal 0.02, zero bias); LayerNorm/RMSNorm stay 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


__all__ = ["rope2d", "rope_frequencies", "frame_index_table", "GlobalBlock", "JointBlock", "RMSNorm",
           "JointAttention", "FeedForward", "scaled_init_"]
