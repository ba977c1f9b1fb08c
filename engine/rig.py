"""The avatar as a subscriber poses it by itself: canonical Gaussians plus the part of the head rig they use.

`rig_arrays` turns a fused `GaussianSet` (and the identity shape baked into it) into plain numpy arrays that hold
everything `GaussianSet.to_world` uses, restricted to the anchors in use: posing them with FLAME expression and
joint rotations (`protocols.animation.pose`, numpy only) gives the engine's own world-space Gaussians. The names
and shapes are the `rig` message's (see `protocols.wire`); this module only computes them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # annotations only: engine.prompts/head pull in smplx
    from engine.gaussians import GaussianSet
    from engine.prompts import PointPrompts


def rig_arrays(gaussians: "GaussianSet", prompts: "PointPrompts", head, shape: torch.Tensor | None,
               expression_dtype: np.dtype | str = np.float16) -> dict[str, np.ndarray]:
    """The `rig` arrays of an avatar (M Gaussians over A anchors in use, J joints, E expression coefficients).

    Per Gaussian: ids (M,) uint32 (the fuser's uid; 0.. when unfused), anchor (M,) uint32 index into the anchor
    arrays, offset (M,3), rotation (M,4) wxyz (canonical, as stored), scales (M,3), opacities (M,), colors (M,3).
    Per anchor: anchor_point (A,) uint32 (which point prompt), anchor_rest (A,3) canonical position with `shape`,
    anchor_expression (A,3,E) in `expression_dtype`, anchor_weights (A,J) LBS weights.
    Per joint: joint_rest (J,3) with `shape` at zero expression, joint_expression (J,3,E), parents (J,) int32.
    """
    n_shape = prompts.shapedirs.shape[-1]
    n_expression = prompts.exprdirs.shape[-1]
    beta = torch.zeros(1, n_shape)
    if shape is not None:
        s = torch.as_tensor(shape, dtype=torch.float32).reshape(-1)[:n_shape]
        beta[0, : s.numel()] = s
    with torch.no_grad():
        beta = beta.to(prompts.v_template)
        used, anchor = torch.unique(gaussians.anchor, return_inverse=True)
        rest = prompts.canonical(beta)[0][used]
        joint_rest, joint_expression, parents = head.joint_basis(beta[0], n_expression)
        uid = gaussians.uid if gaussians.uid is not None else torch.arange(len(gaussians))

        def f32(t: torch.Tensor) -> np.ndarray:
            return t.detach().cpu().float().numpy().copy()

        return {
            "ids": uid.cpu().numpy().astype(np.uint32),
            "anchor": anchor.cpu().numpy().astype(np.uint32),
            "offset": f32(gaussians.offset),
            "rotation": f32(gaussians.rotation),
            "scales": f32(gaussians.scales),
            "opacities": f32(gaussians.opacities),
            "colors": f32(gaussians.color),
            "anchor_point": used.cpu().numpy().astype(np.uint32),
            "anchor_rest": f32(rest),
            "anchor_expression": prompts.exprdirs[used].detach().cpu().numpy().astype(expression_dtype),
            "anchor_weights": f32(prompts.lbs_weights[used]),
            "joint_rest": f32(joint_rest),
            "joint_expression": f32(joint_expression),
            "parents": parents.cpu().numpy().astype(np.int32),
        }
