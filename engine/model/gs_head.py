"""Gaussian head (SPEC.md §7): point latent -> one Gaussian, with the official activations.

`mlp_net`: Linear(C,H) SiLU Linear(H,H) SiLU Linear(H,C) (keys `layers.0/2/4`); `gs_net.out_layers.<name>`:
shs (3, sigmoid -> RGB), scaling (3, exp clamped to [0, scale_clip]), xyz (3, offset (sigmoid-0.5)*step),
opacity (1, sigmoid), rotation (4, L2-normalised wxyz), importance (1, raw logit).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

HEAD_SIZES = {"shs": 3, "scaling": 3, "xyz": 3, "opacity": 1, "rotation": 4, "importance": 1}


@dataclass
class GaussianHeadOutput:
    """Per-slot Gaussians; every field is (B, S, P, k) (S = slots: base frames then the compressed slot).

    xyz:        canonical point + offset (metres, FLAME canonical space)
    offset:     (sigmoid(v) - 0.5) * offset_step, in (-step/2, step/2)
    scale:      linear scale exp(v) clamped to [0, scale_clip]
    opacity:    sigmoid, k = 1
    rotation:   unit quaternion, real part first (w, x, y, z)
    rgb:        sigmoid colour in [0, 1]
    importance: raw importance logit, k = 1 (pruning: see engine.reconstruct.prune_mask)
    """

    xyz: torch.Tensor
    offset: torch.Tensor
    scale: torch.Tensor
    opacity: torch.Tensor
    rotation: torch.Tensor
    rgb: torch.Tensor
    importance: torch.Tensor

    @property
    def n_slots(self) -> int:
        return int(self.xyz.shape[1])

    def map(self, fn) -> "GaussianHeadOutput":
        return GaussianHeadOutput(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})


class GaussianMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                    nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GaussianLayers(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_layers = nn.ModuleDict({name: nn.Linear(dim, k) for name, k in HEAD_SIZES.items()})
        self.reset_biases()

    def reset_biases(self) -> None:
        """The official training init of the head biases (scale -5, opacity 0.1, identity rotation, importance 3)."""
        with torch.no_grad():
            layers = self.out_layers
            layers["scaling"].bias.fill_(-5.0)
            layers["opacity"].bias.fill_(math.log(0.1 / 0.9))
            layers["rotation"].bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
            layers["importance"].bias.fill_(3.0)
            layers["xyz"].bias.zero_()


class GaussianHead(nn.Module):
    """(…, C) latents + (…, 3) canonical points -> GaussianHeadOutput fields of the same leading shape."""

    def __init__(self, dim: int, hidden: int, offset_step: float, scale_clip: float) -> None:
        super().__init__()
        self.offset_step = offset_step
        self.scale_clip = scale_clip
        self.mlp_net = GaussianMLP(dim, hidden)
        self.gs_net = GaussianLayers(dim)

    def forward(self, latents: torch.Tensor, points: torch.Tensor,
                colour_logits: torch.Tensor | None = None) -> GaussianHeadOutput:
        """`colour_logits` (…, 3), optional, is added to the colour logits (point guidance's colour skip)."""
        hidden = self.mlp_net(latents)
        return self.activate(hidden, points, colour_logits)

    def activate(self, hidden: torch.Tensor, points: torch.Tensor,
                 colour_logits: torch.Tensor | None = None) -> GaussianHeadOutput:
        raw = {name: layer(hidden).float() for name, layer in self.gs_net.out_layers.items()}
        if colour_logits is not None:
            raw["shs"] = raw["shs"] + colour_logits.float()
        offset = (torch.sigmoid(raw["xyz"]) - 0.5) * self.offset_step
        return GaussianHeadOutput(
            xyz=points.float() + offset,
            offset=offset,
            scale=torch.exp(raw["scaling"]).clamp(0.0, self.scale_clip),
            opacity=torch.sigmoid(raw["opacity"]),
            rotation=F.normalize(raw["rotation"], dim=-1),
            rgb=torch.sigmoid(raw["shs"]),
            importance=raw["importance"],
        )
