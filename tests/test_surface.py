"""The surface layer tiles the head with thin discs, and the colour fit paints them with what the frames show."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

from engine.color_fit import ColorFitConfig, fit_colors
from engine.gaussians import GaussianSet, quaternion_to_matrix
from engine.refine import RefineConfig, RefineFrames, RefineSession
from engine.refine import mirror_anchors
from engine.surface import SHOWN, SURFACE_FRAME, SurfaceConfig, fill_unseen, hexagon, paint, surface_gaussians
from engine.types import FlameParams, orbit_cameras
from linear_head import LinearPrompts, RigidHead, make_prompts
from test_refine import make_frames, scene


@dataclass
class SpherePrompts(LinearPrompts):
    """Points on a 10 cm sphere with their outward normals."""

    normals: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.v_template.shape[0])


def sphere_prompts(n: int = 200) -> SpherePrompts:
    i = torch.arange(n, dtype=torch.float32) + 0.5
    polar, azimuth = torch.acos(1 - 2 * i / n), torch.pi * (1 + 5 ** 0.5) * i  # Fibonacci sphere
    normals = torch.stack([polar.sin() * azimuth.cos(), polar.sin() * azimuth.sin(), polar.cos()], dim=1)
    w = torch.zeros(n, 5)
    w[:, 1] = 1.0
    return SpherePrompts(0.1 * normals, torch.zeros(n, 3, 4), torch.zeros(n, 3, 2), w, normals)


def frames_of(target: GaussianSet, prompts, n: int = 4, size: int = 64, yaw: float = 60.0) -> RefineFrames:
    """n frames of `target` from cameras within +-yaw/2 of the front (the back is never shown)."""
    cams = orbit_cameras(n, radius=0.5, width=size, height_px=size, yaw_range_degrees=yaw,
                         start_yaw_degrees=-yaw / 2)
    frames = RefineFrames(torch.zeros(n, size, size, 3), cams, FlameParams.zeros(n, 4, 2))
    with torch.no_grad():
        renderer = RefineSession(target, prompts, RigidHead(), RefineConfig(backend="cpu"))
        frames.images = renderer.render_frames(frames, torch.arange(n), target)["rgb"]
    return frames


def test_children_tile_each_points_tangent_plane_as_thin_discs():
    prompts = sphere_prompts()
    layer = surface_gaussians(prompts, SurfaceConfig(rings=2, reach=0.7, thickness=3e-4))
    assert len(layer) == len(prompts) * len(hexagon(2)) == 200 * 19
    normal = prompts.normals[layer.anchor]
    assert (layer.offset * normal).sum(-1).abs().max() < 1e-6        # in the tangent plane
    thin_axis = quaternion_to_matrix(layer.rotation)[..., :, 2]       # the disc's local z in canonical axes
    assert torch.allclose(thin_axis, normal, atol=1e-5)
    assert torch.allclose(layer.scales[:, 2], torch.full((len(layer),), 3e-4))
    assert (layer.importance == 0).all() and (layer.frame == SURFACE_FRAME).all()
    # neighbouring patches overlap: every point's nearest neighbour is within two patch radii
    reach = layer.offset.norm(dim=-1).max()
    d = torch.cdist(prompts.v_template, prompts.v_template) + torch.eye(len(prompts))
    assert d.min(dim=1).values.max() < 2 * reach


def test_a_layer_needs_normals():
    with pytest.raises(ValueError, match="normals"):
        surface_gaussians(dataclasses.replace(sphere_prompts(), normals=None))


def test_colour_fit_recovers_the_colours_the_frames_show():
    prompts, head = make_prompts(), RigidHead()
    target = scene(1)
    frames = make_frames(target, prompts, head)
    grey = dataclasses.replace(target, color=torch.full_like(target.color, 0.5))
    fit = fit_colors(grey, frames, prompts, head, ColorFitConfig(iterations=3, backend="cpu"))
    seen = fit.weight > 1.0
    assert seen.sum() > 50
    before = (grey.color - target.color)[seen].abs().mean()
    after = (fit.gaussians.color - target.color)[seen].abs().mean()
    assert after < 0.75 * before, (before, after)       # fewer pixels than colours: not all of it
    assert fit.residual_last < 0.6 * fit.residual_first
    assert ((fit.source >= 0) == (fit.weight > 0)).all() and int(fit.source.max()) < len(frames)


def test_a_gaussian_no_frame_shows_keeps_its_colour():
    prompts, head = make_prompts(), RigidHead()
    target = scene(2)
    frames = make_frames(target, prompts, head)
    behind = dataclasses.replace(target, offset=target.offset.clone(), color=torch.rand(len(target), 3))
    behind.offset[0] = torch.tensor([0.0, 0.0, 50.0])  # far outside every camera's view
    fit = fit_colors(behind, frames, prompts, head, ColorFitConfig(backend="cpu"))
    assert fit.weight[0] == 0 and fit.source[0] == -1
    assert torch.equal(fit.gaussians.color[0], behind.color[0])


def test_a_large_prior_holds_a_colour_in_place():
    prompts, head = make_prompts(), RigidHead()
    target = scene(3)
    frames = make_frames(target, prompts, head)
    grey = dataclasses.replace(target, color=torch.full_like(target.color, 0.5))
    free = fit_colors(grey, frames, prompts, head, ColorFitConfig(iterations=1, backend="cpu"))
    held = fit_colors(grey, frames, prompts, head, ColorFitConfig(iterations=1, backend="cpu"),
                      prior=torch.full((len(grey),), 1e6))
    assert (held.gaussians.color - 0.5).abs().max() < 1e-3
    assert (free.gaussians.color - 0.5).abs().max() > 0.1


def test_painting_makes_the_layer_look_like_the_frames_and_remembers_them():
    prompts, head = sphere_prompts(), RigidHead()
    truth = surface_gaussians(prompts)
    g = torch.Generator().manual_seed(0)
    truth = dataclasses.replace(truth, color=torch.rand(len(prompts), 3, generator=g)[truth.anchor])
    frames = frames_of(truth, prompts)
    network = GaussianSet.from_activated(
        anchor=torch.arange(len(prompts)), offset=torch.zeros(len(prompts), 3),
        rotation=torch.tensor([[1.0, 0, 0, 0]]).expand(len(prompts), 4), scale=torch.full((len(prompts), 3), 0.01),
        opacity=torch.full((len(prompts),), 0.5), color=torch.tensor([[0.2, 0.4, 0.6]]).expand(len(prompts), 3),
        importance=torch.ones(len(prompts)), frame=0)
    config = SurfaceConfig(fit=ColorFitConfig(iterations=3, backend="cpu"), fill_unseen=False)
    layer = surface_gaussians(prompts, config)
    mirror = mirror_anchors(prompts.v_template)
    painted, stats = paint(layer, network, frames, [10, 11, 12, 13], prompts, head, mirror, config)

    renderer = RefineSession(painted, prompts, head, RefineConfig(backend="cpu"))
    error = lambda g: (renderer.render_frames(frames, torch.arange(len(frames)), g)["rgb"]  # noqa: E731
                       - frames.images).abs().mean()
    seeded = dataclasses.replace(layer, color=torch.tensor([0.2, 0.4, 0.6]).expand(len(layer), 3))
    assert error(painted) < 0.4 * error(seeded)
    back = prompts.v_template[painted.anchor][:, 2] < -0.08          # cameras look at the front (+z) side
    # the network's colour there (light through the translucent front layer moves it a little)
    assert torch.allclose(painted.color[back], torch.tensor([0.2, 0.4, 0.6]), atol=0.08)
    assert (painted.importance[back] < 0.2).all() and (painted.frame[back] == SURFACE_FRAME).all()
    shown = painted.importance > 1
    assert shown.float().mean() > 0.2 and set(painted.frame[shown].tolist()) <= {10, 11, 12, 13}
    assert stats["frames"] == 4 and stats["residual_last"] < stats["residual_first"]

    # the next window's frames weigh against everything painted before: a black frame barely darkens a child
    # painted by four frames, but fully paints one no frame had shown
    first = torch.tensor([0])
    dark = dataclasses.replace(frames, images=torch.zeros_like(frames.images[:1]),
                               cameras=frames.cameras.index(first), params=frames.params.index(first))
    again, _ = paint(painted, network, dark, [20], prompts, head, mirror, config)
    fresh, _ = paint(layer, network, dark, [20], prompts, head, mirror, config)
    both = (again.importance - painted.importance > 1) & shown
    assert both.sum() > 10
    assert again.color[both].mean() > 2 * fresh.color[both].mean()


def test_a_small_budget_gets_fewer_rings():
    prompts = sphere_prompts()
    assert len(surface_gaussians(prompts, SurfaceConfig(rings=2), budget=200 * 19)) == 200 * 19
    assert len(surface_gaussians(prompts, SurfaceConfig(rings=2), budget=200 * 19 - 1)) == 200 * 7
    assert len(surface_gaussians(prompts, SurfaceConfig(rings=2), budget=50)) == 200  # one a point, pruned later


def test_unseen_children_take_their_mirror_points_colour_or_the_nearest_painted_one():
    prompts = sphere_prompts()
    layer = surface_gaussians(prompts, SurfaceConfig(rings=0))          # one child a point
    x = prompts.v_template[:, 0]
    shown = x > 0.02                                                      # the camera saw the +x side only
    colour = torch.stack([prompts.v_template[:, 1] * 5 + 0.5, torch.full_like(x, 0.2), torch.rand(len(x))], 1)
    layer = dataclasses.replace(layer, color=torch.where(shown[:, None], colour, torch.zeros(3)),
                                importance=torch.where(shown, 4.0, 0.1 * SHOWN))
    mirror = mirror_anchors(prompts.v_template)
    filled = fill_unseen(layer, prompts, mirror)
    assert torch.equal(filled.color[shown], layer.color[shown])          # what was shown stays
    across = (x < -0.02) & shown[mirror]
    assert across.sum() > 50
    assert torch.allclose(filled.color[across], layer.color[mirror[across]])
    middle = ~shown & ~shown[mirror]
    assert middle.any()
    nearest_shown = torch.cdist(prompts.v_template[middle], prompts.v_template[shown]).argmin(dim=1)
    assert torch.allclose(filled.color[middle], layer.color[shown][nearest_shown])
    unpainted = surface_gaussians(prompts)
    assert torch.equal(fill_unseen(unpainted, prompts, mirror).color, unpainted.color)


def test_with_mattes_only_the_persons_pixels_paint():
    prompts, head = make_prompts(), RigidHead()
    target = scene(4)
    frames = make_frames(target, prompts, head)
    grey = dataclasses.replace(target, color=torch.full_like(target.color, 0.5))
    left = torch.zeros(len(frames), 48, 48, 1)
    left[:, :, :24] = 1.0                                                 # the person is the left half
    fit = fit_colors(grey, dataclasses.replace(frames, mattes=left), prompts, head, ColorFitConfig(backend="cpu"))
    everywhere = fit_colors(grey, frames, prompts, head, ColorFitConfig(backend="cpu"))
    assert 0 < fit.weight.sum() < 0.8 * everywhere.weight.sum()
    nobody = fit_colors(grey, dataclasses.replace(frames, mattes=torch.zeros_like(left)), prompts, head,
                        ColorFitConfig(backend="cpu"))
    assert nobody.weight.abs().max() == 0 and torch.equal(nobody.gaussians.color, grey.color)
