"""LGRT: the Large Gaussian Reconstruction Transformer, composed from its parts.

images -> ImageEncoder tokens; base frames = the first min(N, 16); FramePack compresses frames 16.. plus
the pool (or, with neither, all N frames again, as the official network does) into one extra slot;
the alternating transformer turns the point tokens of every slot into latents; the Gaussian head decodes
one Gaussian per point per slot.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from engine.model.config import ModelConfig
from engine.model.encoder import ImageEncoder
from engine.model.framepack import FramePack, compressed_grid, compressed_positions
from engine.model.gs_head import GaussianHead, GaussianHeadOutput
from engine.model.guidance import GuidanceEncoder
from engine.model.point_guidance import PointGuidance, colour_prior_logits
from engine.model.point_embed import PointEmbed
from engine.model.transformer import AlternatingTransformer, grid_positions


class LGRT(nn.Module):
    """The network. Submodules: `encoder` (`backbone` + `fusion`), `framepack`, `point_embed`, `transformer`,
    `gs_head`, `guidance` when `cfg.guidance`, `point_guidance` when `cfg.point_guidance`. `engine.checkpoints`
    maps the official names onto these.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = ImageEncoder(cfg)
        self.framepack = FramePack(cfg.dim, cfg.framepack_level)
        self.point_embed = PointEmbed(cfg.dim)
        self.transformer = AlternatingTransformer(cfg.dim, cfg.heads, cfg.layers, cfg.mlp_ratio, cfg.rope_base,
                                                  cfg.max_frame_index, cfg.qk_norm,
                                                  cfg.global_attention)
        self.gs_head = GaussianHead(cfg.dim, cfg.gs_hidden, cfg.offset_step, cfg.scale_clip)
        self.guidance = (GuidanceEncoder(cfg.dim, cfg.guidance_camera_dim, cfg.guidance_expr_dim,
                                         cfg.guidance_pose_dim) if cfg.guidance else None)
        self.point_guidance = PointGuidance(cfg.dim) if cfg.point_guidance else None

    # ---------------------------------------------------------------------------------------------- parts
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B,F,3,H,W) in [0,1] -> (B,F,T,C) tokens (encoded in chunks of cfg.encode_chunk frames), grid."""
        b, f = images.shape[:2]
        flat = images.reshape(b * f, *images.shape[2:])
        chunks, grid = [], (self.cfg.grid, self.cfg.grid)
        for start in range(0, b * f, self.cfg.encode_chunk):
            tokens, grid = self.encoder(flat[start:start + self.cfg.encode_chunk])
            chunks.append(tokens)
        tokens = torch.cat(chunks)
        return tokens.reshape(b, f, *tokens.shape[1:]), grid

    def transform(self, base: torch.Tensor, grid: tuple[int, int], pack_input: torch.Tensor,
                  points: torch.Tensor, guidance_tokens: torch.Tensor | None = None,
                  point_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token-level forward (used by the golden parity check too).

        base (B,N,T,C) base-frame tokens, pack_input (B,Fc,T,C) frames for FramePack, points (B,P,3),
        point_features (B,N,P,F) when the model has point guidance -> (B, N+1, P, C) latents.
        """
        fc = pack_input.shape[1]
        self.check_frame_count(base.shape[1], fc)
        compressed = self.framepack(pack_input, grid)
        point_tokens = self.point_embed(points)
        offsets = None
        if self.point_guidance is not None:
            if point_features is None or point_features.shape[:3] != (*base.shape[:2], points.shape[1]):
                got = None if point_features is None else tuple(point_features.shape)
                raise ValueError(f"this model takes point guidance: pass point_features (B,N,P,F) for the "
                                 f"{base.shape[1]} base frames and {points.shape[1]} points (got {got}); "
                                 "see engine.prompt_views.point_features")
            offsets = self.point_guidance(point_features)
        device = base.device
        return self.transformer(
            base, grid_positions(grid, device), compressed, fc,
            compressed_positions(grid, self.cfg.framepack_level, fc, device), point_tokens, guidance_tokens,
            offsets)

    def check_frame_count(self, n_base: int, n_packed: int) -> None:
        if n_base + n_packed > self.cfg.max_frame_index:
            raise ValueError(f"{n_base} base + {n_packed} pooled frames exceed the frame-index limit of "
                             f"{self.cfg.max_frame_index}; pass at most {self.cfg.max_frame_index - n_base} "
                             "pooled frames")

    def tokens_per_packed_frame(self) -> int:
        ch, cw = compressed_grid((self.cfg.grid, self.cfg.grid), self.cfg.framepack_level)
        return ch * cw

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor, points: torch.Tensor, pool_images: torch.Tensor | None = None,
                guidance: dict[str, torch.Tensor] | None = None,
                point_features: torch.Tensor | None = None) -> GaussianHeadOutput:
        """Per-slot Gaussians for one window.

        images:      (B,N,3,H,W) RGB in [0,1], N >= 1; frames 0..15 are base slots, frames 16.. go to FramePack
        points:      (B,P,3) or (P,3) canonical query points
        pool_images: (B,F,3,H,W) extra frames for FramePack, or None
        guidance:    per-base-frame dict (see GuidanceEncoder); required when cfg.guidance, ignored otherwise
        point_features: (B,N',P,F) projected point features of the frames (N' >= base frames; the first min(N,16)
                     are used); required when cfg.point_guidance, ignored otherwise
        returns      GaussianHeadOutput with (B, S, P, k) fields, S = min(N,16) + 1 (compressed slot last)
        Runs under bf16 autocast on CUDA; the Gaussian head always runs in float32.
        Frame order: everything is permutation-equivariant over base frames except the official sin/cos
        frame-index embedding added to frame i's tokens, so the order of `images` changes the result slightly;
        callers that want reproducible avatars should pass frames in a canonical order (e.g. by time).
        """
        if images.dim() != 5 or images.shape[2] != 3 or images.shape[1] < 1:
            raise ValueError(f"images must be (B,N,3,H,W) with N >= 1, got {tuple(images.shape)}")
        b, n = images.shape[:2]
        n_base = min(n, self.cfg.max_base_frames)
        n_pool = 0 if pool_images is None else pool_images.shape[1]
        n_packed = (n - n_base) + n_pool
        self.check_frame_count(n_base, n_packed if n_packed else n)
        if points.dim() == 2:
            points = points[None].expand(b, -1, -1)
        guidance_tokens = None
        if self.guidance is not None:
            if guidance is None:
                raise ValueError("this model was built with guidance (config 'paper'); pass guidance= "
                                 "camera, expression and pose per frame")
            guidance_tokens = self.guidance({k: v[:, :n_base] for k, v in guidance.items()}, b, n_base)

        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if images.is_cuda
                    else contextlib.nullcontext())
        with autocast:
            tokens, grid = self.encode(images)
            packed = [tokens[:, n_base:]] if n > n_base else []
            if n_pool:
                packed.append(self.encode(pool_images)[0])
            pack_input = torch.cat(packed, dim=1) if packed else tokens
            feats = None
            if self.point_guidance is not None and point_features is not None:  # (checked in transform)
                feats = point_features[:, :n_base]
            latents = self.transform(tokens[:, :n_base], grid, pack_input, points, guidance_tokens, feats)
        s = latents.shape[1]
        slot_points = points[:, None].expand(b, s, -1, -1)
        colour = None
        if feats is not None:  # the colour skip for base slots; the compressed slot gets none (logit 0)
            colour = colour_prior_logits(feats.float())
            colour = torch.cat([colour, colour.new_zeros(b, s - colour.shape[1], *colour.shape[2:])], dim=1)
        return self.gs_head(latents.float(), slot_points.float(), colour)


def build_model(name: str | ModelConfig, *, device: torch.device | str | None = None) -> LGRT:
    """A freshly initialised LGRT for a named config (`official`, `paper`, `tiny`, `micro`) or a ModelConfig.

    `device="meta"` builds it without allocating weights (for shape/key checks of the ~1B-parameter config).
    """
    from engine.model.config import get_config

    cfg = get_config(name) if isinstance(name, str) else name
    if device is None:
        return LGRT(cfg)
    with torch.device(device):
        return LGRT(cfg)
