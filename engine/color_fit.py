"""Colours from the frames: each Gaussian's colour solved from the pixels it is blended into.

An avatar's render is linear in its colours once geometry and opacity are fixed: pixel p of frame f is
Σᵢ wᵢ(p) cᵢ + (1 - α(p)) · background, with wᵢ(p) Gaussian i's blending weight (its alpha times the
transmittance in front of it). `fit_colors` runs a few SART-style iterations of that linear least-squares
problem: every Gaussian moves by the blending-weighted mean of the residuals of the pixels it paints,

    cᵢ ← cᵢ + Σ_f,p wᵢ(p) r(p) / (Σ_f,p wᵢ(p) + priorᵢ),

so a Gaussian the frames saw takes the colour they showed, one hidden behind others or facing away (Σ w ≈ 0)
keeps the colour it had, and its prior says how many fully-blended pixels its current colour counts as. With
mattes, both sums run over the person's pixels only (weighted by the matte). Both sums are vector-Jacobian
products of one render, so the fit runs on any `engine.render` backend.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from engine.gaussians import GaussianSet
from engine.refine import RefineFrames
from engine.render import render


@dataclass
class ColorFitConfig:
    """iterations: SART steps over all frames; prior: weight of a Gaussian's current colour, in fully-blended
    pixels (added to any per-Gaussian prior); frames_per_render: frames rendered at once."""

    iterations: int = 2
    prior: float = 0.5
    frames_per_render: int = 4
    backend: str = "auto"


@dataclass
class ColorFit:
    """gaussians: the set with fitted colours; weight (M,): Σ_f,p wᵢ(p), how many fully-blended pixels of the
    frames each Gaussian paints; source (M,): position in the frames of the frame it paints most (-1: none);
    residual_first / residual_last: mean |image - render| over the frames before the first and before the last step."""

    gaussians: GaussianSet
    weight: torch.Tensor
    source: torch.Tensor
    residual_first: float
    residual_last: float


@torch.no_grad()
def fit_colors(gaussians: GaussianSet, frames: RefineFrames, prompts, head, config: ColorFitConfig | None = None,
               prior: torch.Tensor | None = None) -> ColorFit:
    """The avatar with its colours fitted to `frames` (images composited on `frames.background` like the renders;
    with mattes the images are the matted heads). prior: optional (M,) extra weight of each current colour."""
    c = config or ColorFitConfig()
    if len(frames) == 0:
        raise ValueError("fit_colors: no frames")
    if c.iterations < 1:
        raise ValueError(f"fit_colors: iterations must be at least 1, got {c.iterations}")
    colors = gaussians.color.clone()
    keep = torch.full_like(gaussians.opacity_logit, c.prior) if prior is None else prior + c.prior
    residuals = []
    for _ in range(c.iterations):
        numerator, per_frame, residual = _weighted_residuals(gaussians, colors, frames, prompts, head, c)
        residuals.append(residual)
        weight = per_frame.sum(0)
        colors = (colors + numerator / (weight + keep)[:, None]).clamp(0, 1)
    source = torch.where(weight > 0, per_frame.argmax(0), torch.full_like(weight, -1, dtype=torch.long))
    return ColorFit(replace(gaussians, color=colors), weight, source, residuals[0], residuals[-1])


def _weighted_residuals(gaussians: GaussianSet, colors: torch.Tensor, frames: RefineFrames, prompts, head,
                        config: ColorFitConfig) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Σ_f,p wᵢ(p) r(p) (M,3), Σ_p wᵢ(p) per frame (N,M) and the mean |r| over all frames, r = image - render."""
    m = len(gaussians)
    numerator = torch.zeros(m, 3, device=colors.device)
    per_frame = []
    total, count = 0.0, 0
    for start in range(0, len(frames), config.frames_per_render):
        index = torch.arange(start, min(start + config.frames_per_render, len(frames)), device=colors.device)
        world = gaussians.to_world(prompts, head, frames.params.index(index))
        cams = frames.cameras.index(index)
        per_camera = colors.unsqueeze(0).expand(len(index), m, 3).clone().requires_grad_(True)
        with torch.enable_grad():
            rgb = render(world["means"], world["quats"], world["scales"], world["opacities"], per_camera,
                         cams.viewmats, cams.Ks, cams.width, cams.height, backend=config.backend,
                         background=frames.background)["rgb"]
            residual = frames.images[index] - rgb.detach()
            # with mattes only the person's pixels paint: a Gaussian seen edge-on at the silhouette would
            # otherwise take the background's colour and show it when the head turns
            trust = torch.ones_like(rgb) if frames.mattes is None else frames.mattes[index].expand_as(rgb)
            (num,) = torch.autograd.grad(rgb, per_camera, grad_outputs=residual * trust, retain_graph=True)
            (blend,) = torch.autograd.grad(rgb, per_camera, grad_outputs=trust)
        total += float(residual.abs().sum())
        count += residual.numel()
        numerator += num.sum(0)
        per_frame.append(blend[..., 0])
    return numerator, torch.cat(per_frame), total / max(count, 1)
