"""Golden-file parity: run our modules on a `golden_tiny_fastavatar.npz`-format file (README_golden.md).

The file holds official-named weights (`w/<key>`) at reduced sizes and inputs (`in_*`). Every size is read
from the shapes: width from `pcl_embed.mlp`, head dim from the q RMSNorm gain, layer count from the
`global_attn_layers.N` keys, MLP widths, FramePack level from its kernel, frame count / grid / points from
the inputs. Weights go through the same key map as `load_official`.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from engine.checkpoints import check_and_load, map_official_state_dict
from engine.model.config import ModelConfig
from engine.model.lgrt import LGRT


def golden_config(weights: dict[str, torch.Tensor], grid: int) -> ModelConfig:
    """The reduced ModelConfig implied by official-named `weights` and the token-grid side `grid`."""
    dim = weights["pcl_embed.mlp.weight"].shape[0]
    head_dim = weights["transformer.frame_attn.layers.0.attn.norm_q.weight"].shape[0]
    layers = 1 + max(int(m.group(1)) for k in weights
                     if (m := re.match(r"transformer\.global_attn_layers\.(\d+)\.", k)))
    mlp_hidden = weights["transformer.global_attn_layers.0.mlp.0.weight"].shape[0]
    ff_hidden = weights["transformer.frame_attn.layers.0.ff.net.0.proj.weight"].shape[0]
    if mlp_hidden != ff_hidden:
        raise ValueError(f"global MLP width {mlp_hidden} != frame FF width {ff_hidden}; not one config")
    n_fused = len([k for k in weights if re.fullmatch(r"encoder\.fusion_head\.projects\.\d+\.weight", k)])
    # The golden file carries no DINOv2 backbone (its inputs are the backbone outputs), so the encoder is a
    # minimal stand-in whose grid matches the inputs; its weights are never loaded nor used.
    return ModelConfig(
        name="golden", image_size=grid, patch_size=1, enc_dim=weights["encoder.fusion_head.projects.0.weight"].shape[1],
        enc_depth=n_fused, enc_heads=1, enc_pos_grid=grid, enc_layers=tuple(range(n_fused)), enc_frozen=False,
        dim=dim, heads=dim // head_dim, layers=layers, mlp_ratio=mlp_hidden / dim,
        framepack_level=weights["framepack_compressor.proj.weight"].shape[-1],
        gs_hidden=weights["renderer.mlp_net.layers.0.weight"].shape[0],
    )


def forward_golden(npz_path: str | Path) -> dict[str, np.ndarray]:
    """Every `out_*` array of a golden file, recomputed by our modules (float32, CPU)."""
    data = np.load(str(npz_path))
    official = {k[2:]: torch.from_numpy(np.array(data[k])) for k in data.files if k.startswith("w/")}
    feats = torch.from_numpy(np.array(data["in_image_feats"]))      # (B, N, T, C)
    points = torch.from_numpy(np.array(data["in_query_points"]))    # (B, 1, P, 3)
    dino = torch.from_numpy(np.array(data["in_dino_layers"]))       # (L, B, T, C_enc)
    side = math.isqrt(feats.shape[2])
    if side * side != feats.shape[2]:
        raise ValueError(f"in_image_feats has {feats.shape[2]} tokens per frame, not a square grid")
    grid = (side, side)

    mapped = map_official_state_dict(official)
    if mapped.unexpected:
        raise ValueError(f"golden file has keys outside the network: {mapped.unexpected[:5]}")
    model = LGRT(golden_config(official, side)).eval()
    check_and_load(model, mapped.weights, source=str(npz_path), allow_missing=("encoder.backbone.",))

    b, n = feats.shape[:2]
    n_base = min(n, model.cfg.max_base_frames)
    pack_input = feats[:, n_base:] if n > n_base else feats
    pts = points[:, 0]
    with torch.inference_mode():
        dino_side = math.isqrt(dino.shape[2])
        fusion = model.encoder.fusion(list(dino), (dino_side, dino_side))
        compressed = model.framepack(pack_input, grid)
        point_tokens = model.point_embed(pts)
        latents = model.transform(feats[:, :n_base], grid, pack_input, pts)
        s, p, c = latents.shape[1:]
        flat_points = pts[:, None].expand(b, s, p, 3).reshape(-1, 3)
        hidden = model.gs_head.mlp_net(latents.reshape(-1, c))
        gs = model.gs_head.activate(hidden, flat_points)
    out = {
        "out_fusion_tokens": fusion,
        "out_compressed_cond": compressed[:, None],
        "out_point_tokens": point_tokens[:, None].expand(b, s, p, c),
        "out_latent": latents,
        "out_mlp_hidden": hidden,
        "out_gs_xyz": gs.xyz,
        "out_gs_offset": gs.offset,
        "out_gs_scaling": gs.scale,
        "out_gs_opacity": gs.opacity,
        "out_gs_rotation": gs.rotation,
        "out_gs_rgb": gs.rgb[:, None, :],
        "out_gs_importance_logit": gs.importance,
    }
    return {k: v.detach().float().numpy().copy() for k, v in out.items()}
