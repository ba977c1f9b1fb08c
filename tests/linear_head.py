"""A tiny linear stand-in for the head model and point prompts, for testing animation maths alone."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.gaussians import quaternion_to_matrix
from engine.types import FlameParams


@dataclass
class LinearPrompts:
    """A stand-in for PointPrompts: P points, linear shape/expression dirs, rigid LBS weights."""

    v_template: torch.Tensor
    shapedirs: torch.Tensor
    exprdirs: torch.Tensor
    lbs_weights: torch.Tensor

    def canonical(self, shape):
        return self.v_template + torch.einsum("pks,bs->bpk", self.shapedirs, shape)

    def expression_offsets(self, expression):
        return torch.einsum("pke,be->bpk", self.exprdirs, expression)


class RigidHead:
    """joint_transforms: every joint gets the global rotation (so skinning is a rigid motion)."""

    def joint_transforms(self, params: FlameParams) -> torch.Tensor:
        b = params.batch_size
        out = torch.eye(4).repeat(b, 5, 1, 1)
        out[:, :, :3, :3] = axis_angle_matrix(params.rotation).unsqueeze(1)
        return out


def axis_angle_matrix(aa: torch.Tensor) -> torch.Tensor:
    angle = aa.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    axis = aa / angle
    half = angle / 2
    q = torch.cat([half.cos(), axis * half.sin()], dim=-1)
    return quaternion_to_matrix(q)


def make_prompts(p: int = 10) -> LinearPrompts:
    g = torch.Generator().manual_seed(3)
    w = torch.zeros(p, 5)
    w[:, 1] = 1.0
    return LinearPrompts(torch.randn(p, 3, generator=g) * 0.1, torch.randn(p, 3, 4, generator=g) * 0.01,
                         torch.randn(p, 3, 2, generator=g) * 0.01, w)
