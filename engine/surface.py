"""The surface layer: small Gaussians tiled over the head's surface and painted with what the camera saw.

The network's Gaussians hang on P point prompts (1,024 for the embedded default, about 1 cm apart), at most 1 cm
wide and mostly faint, so on a real face the feed-forward avatar is about a centimetre blurry, and the small
model, trained on synthetic heads, guesses real colours poorly. The surface layer gives the avatar the detail the
frames hold instead: around every prompt point a hexagonal patch of thin discs in the point's tangent plane
(children of that point, so FLAME animates them like any Gaussian of the avatar), painted by `engine.color_fit`
from the frames of every window. The network still decides the colour of what no frame has shown yet (its
Gaussians' mean colour at each point seeds the children of that point).

A child's `importance` is the blending weight the frames have given it so far (in fully-blended pixels): it
ranks children for the budget like any importance, and it is the weight of the child's colour when the next
window paints it, so colours average over every frame that showed them. Its `frame` is the frame that showed it
most in the last window that showed it (SURFACE_FRAME until one does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from engine.color_fit import ColorFitConfig, fit_colors
from engine.gaussians import GaussianSet, matrix_to_quaternion
from engine.refine import RefineFrames

#: `frame` of a surface Gaussian no frame has painted yet
SURFACE_FRAME = -2
#: blending weight (fully-blended pixels) from which a window counts as having shown a Gaussian
SHOWN = 0.5


@dataclass
class SurfaceConfig:
    """rings: hexagonal rings of children around each point (1 + 3·rings·(rings+1) children a point);
    reach: radius of a point's patch in median point spacings (above 0.5 neighbouring patches overlap);
    thickness: standard deviation along the normal, metres; opacity: of every child;
    fit_frames: at most this many frames of a window (evenly spaced) paint the layer; fit: the colour fit;
    fill_unseen: children no frame has shown take the colour painted on their point's mirror image across the
    face, or else on the nearest painted point (a prior for the sides the camera never showed), instead of the
    network's."""

    rings: int = 2
    reach: float = 0.7
    thickness: float = 3e-4
    opacity: float = 0.9
    fit_frames: int = 4
    fit: ColorFitConfig = field(default_factory=ColorFitConfig)
    fill_unseen: bool = True


def surface_gaussians(prompts, config: SurfaceConfig | None = None, budget: int | None = None) -> GaussianSet:
    """The unpainted layer over `prompts` (needs their rest normals): P·K children, grey, importance 0. With a
    Gaussian `budget`, fewer rings (down to one child a point) keep the layer within it."""
    c = config or SurfaceConfig()
    if prompts.normals is None:
        raise ValueError("surface layer: the point prompts carry no normals")
    points = prompts.v_template
    rings = c.rings
    while rings > 0 and budget is not None and len(points) * len(hexagon(rings)) > budget:
        rings -= 1
    normals = torch.nn.functional.normalize(prompts.normals.to(points.dtype), dim=-1)
    radius = c.reach * median_spacing(points)
    disc = hexagon(rings).to(points.dtype) * radius                            # (K,2)
    t1, t2 = tangents(normals)
    offsets = disc[None, :, :1] * t1[:, None] + disc[None, :, 1:] * t2[:, None]  # (P,K,3)
    p, k = offsets.shape[:2]
    sigma = 0.6 * radius / max(rings, 1)
    disc_axes = matrix_to_quaternion(torch.stack([t1, t2, normals], dim=-1))  # local z (the thin axis) -> normal
    return GaussianSet.from_activated(
        anchor=torch.arange(p, device=points.device).repeat_interleave(k), offset=offsets.reshape(-1, 3),
        rotation=disc_axes.repeat_interleave(k, dim=0),
        scale=torch.tensor([sigma, sigma, c.thickness], dtype=points.dtype, device=points.device).expand(p * k, 3),
        opacity=torch.full((p * k,), c.opacity, dtype=points.dtype, device=points.device),
        color=torch.full((p * k, 3), 0.5, dtype=points.dtype, device=points.device),
        importance=torch.zeros(p * k, dtype=points.dtype, device=points.device), frame=SURFACE_FRAME)


def paint(layer: GaussianSet, network: GaussianSet, frames: RefineFrames, frame_ids: list[int], prompts, head,
          mirror: torch.Tensor, config: SurfaceConfig | None = None) -> tuple[GaussianSet, dict]:
    """Paint `layer` with `frames` (their stream ids `frame_ids`): children no frame has painted yet first take the
    colour the network gave their point (`network`: this window's Gaussians), then every child's colour is fitted
    with its accumulated weight as its prior. mirror: (P,) each point's mirror point
    (`engine.refine.mirror_anchors`, computed once per model). Returns the painted layer and stats."""
    c = config or SurfaceConfig()
    unpainted = layer.importance <= 0
    seeded = torch.where(unpainted[:, None], anchor_colors(network, len(prompts))[layer.anchor], layer.color)
    fit = fit_colors(replace(layer, color=seeded), frames, prompts, head, c.fit, prior=layer.importance)
    ids = torch.as_tensor(frame_ids, dtype=torch.long, device=layer.frame.device)
    frame = torch.where(fit.weight >= SHOWN, ids[fit.source.clamp_min(0)], layer.frame)
    painted = replace(fit.gaussians, importance=layer.importance + fit.weight, frame=frame)
    if c.fill_unseen:
        painted = fill_unseen(painted, prompts, mirror)
    stats = {"frames": len(frames), "painted": float((painted.importance >= 1).float().mean()),
             "residual_first": round(fit.residual_first, 5), "residual_last": round(fit.residual_last, 5)}
    return painted, stats


def fill_unseen(layer: GaussianSet, prompts, mirror: torch.Tensor) -> GaussianSet:
    """Children shown less than SHOWN take the importance-weighted colour of the shown children of their point's
    mirror point (`mirror`: (P,) index, across FLAME's left-right plane), or where that was not shown either, of
    the nearest point with shown children (unchanged while no child was shown)."""
    shown = layer.importance >= SHOWN
    if not shown.any() or shown.all():
        return layer
    points = prompts.v_template.to(layer.color.dtype)
    colour, mass = point_means(layer.anchor, layer.color, torch.where(shown, layer.importance, 0.0), len(points))
    painted = mass > 0
    fill = torch.where(painted[mirror], mirror, -1)
    lost = torch.nonzero(fill < 0).squeeze(1)  # neither the point nor its mirror shown
    candidates = torch.nonzero(painted).squeeze(1)
    fill[lost] = candidates[torch.cat([torch.cdist(points[lost[i:i + 2048]], points[candidates]).argmin(dim=1)
                                       for i in range(0, len(lost), 2048)])]
    return replace(layer, color=torch.where(shown[:, None], layer.color, colour[fill[layer.anchor]]))


def anchor_colors(gaussians: GaussianSet, n_points: int) -> torch.Tensor:
    """(n_points,3) opacity-weighted mean colour of the Gaussians of each point (grey where it has none)."""
    colour, mass = point_means(gaussians.anchor, gaussians.color.detach(), gaussians.opacities.detach(), n_points)
    return torch.where(mass[:, None] > 1e-6, colour, torch.full_like(colour, 0.5))


def point_means(anchor: torch.Tensor, color: torch.Tensor, weight: torch.Tensor,
                n_points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per point: the `weight`-weighted mean of the colours of its Gaussians (n_points,3; 0 where the weights sum
    to 0) and that sum of weights (n_points,)."""
    total = torch.zeros(n_points, 3, dtype=color.dtype, device=color.device)
    total = total.index_add(0, anchor, color * weight[:, None])
    mass = torch.zeros(n_points, dtype=weight.dtype, device=weight.device).index_add(0, anchor, weight)
    return total / mass.clamp_min(1e-12)[:, None], mass


def median_spacing(points: torch.Tensor, chunk: int = 2048) -> float:
    """Median distance from each point to its nearest other point."""
    nearest = []
    for i in range(0, len(points), chunk):
        d = torch.cdist(points[i:i + chunk], points)
        d[torch.arange(d.shape[0]), torch.arange(i, i + d.shape[0])] = float("inf")
        nearest.append(d.min(dim=1).values)
    return float(torch.cat(nearest).median())


def hexagon(rings: int) -> torch.Tensor:
    """(K,2) points of a hexagonal disc of radius 1: the centre and `rings` rings of 6·r points."""
    points = [(0.0, 0.0)]
    for r in range(1, rings + 1):
        for j in range(6 * r):
            angle = 2 * math.pi * j / (6 * r)
            points.append((r / rings * math.cos(angle), r / rings * math.sin(angle)))
    return torch.tensor(points)


def tangents(normals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two unit tangents (P,3) per unit normal, completing a right-handed frame (t1, t2, n)."""
    helper = torch.zeros_like(normals)
    helper[:, 0] = torch.where(normals[:, 0].abs() < 0.9, 1.0, 0.0)
    helper[:, 1] = 1.0 - helper[:, 0]
    t1 = torch.nn.functional.normalize(torch.cross(helper, normals, dim=-1), dim=-1)
    return t1, torch.cross(normals, t1, dim=-1)
