"""The per-session refiner fits an avatar to its frames and keeps Gaussians near their anchors."""
from __future__ import annotations

import torch

from engine.gaussians import GaussianSet
from engine.refine import RefineConfig, RefineFrames, RefineSession, refine
from engine.types import FlameParams, orbit_cameras
from linear_head import RigidHead, make_prompts


def scene(seed: int, m: int = 400) -> GaussianSet:
    g = torch.Generator().manual_seed(seed)
    return GaussianSet.from_activated(
        anchor=torch.randint(0, 10, (m,), generator=g), offset=0.02 * torch.randn(m, 3, generator=g),
        rotation=torch.randn(m, 4, generator=g), scale=0.004 + 0.006 * torch.rand(m, 3, generator=g),
        opacity=0.6 + 0.3 * torch.rand(m, generator=g), color=torch.rand(m, 3, generator=g),
        importance=torch.ones(m), frame=0)


def make_frames(target: GaussianSet, prompts, head, n: int = 4) -> RefineFrames:
    cams = orbit_cameras(n, radius=0.8, width=48, height_px=48, yaw_range_degrees=90, start_yaw_degrees=-45)
    params = FlameParams.zeros(n, 4, 2)
    params.expression[:] = torch.linspace(-1, 1, n).unsqueeze(1)
    frames = RefineFrames(torch.zeros(n, 48, 48, 3), cams, params)
    with torch.no_grad():
        session = RefineSession(target, prompts, head, RefineConfig(backend="cpu"))
        frames.images = session.render_frames(frames, torch.arange(n), target)["rgb"]
    return frames


def test_refinement_recovers_colours_and_raises_psnr():
    prompts, head = make_prompts(), RigidHead()
    target = scene(1)
    start = target.clone()
    start.color = torch.full_like(start.color, 0.5)
    frames = make_frames(target, prompts, head)
    session = RefineSession(start, prompts, head, RefineConfig(backend="cpu", batch_frames=2))
    before = session.evaluate(frames)["psnr"]
    stats = session.step(frames, iterations=60)
    after = session.evaluate(frames)["psnr"]
    assert stats["iterations"] == 60
    assert after > before + 3.0, (before, after)


def test_regulariser_keeps_offsets_near_their_anchor():
    prompts, head = make_prompts(), RigidHead()
    target = scene(2)
    target.offset = target.offset + 0.2  # ground truth far from the anchors
    frames = make_frames(target, prompts, head)
    refined, _ = refine(scene(2), frames, prompts, head, iterations=40,
                        config=RefineConfig(backend="cpu", lr_offset=5e-3, weight_offset=100.0))
    assert refined.offset.norm(dim=-1).max() < 0.2


def test_time_budget_stops_and_state_carries_over():
    prompts, head = make_prompts(), RigidHead()
    frames = make_frames(scene(3), prompts, head)
    session = RefineSession(scene(4), prompts, head, RefineConfig(backend="cpu"))
    first = session.step(frames, seconds=0.05)
    second = session.step(frames, iterations=2)
    assert first["iterations"] >= 1 and first["seconds"] < 2.0
    assert second["total_steps"] == first["iterations"] + 2
    refined = session.gaussians()
    assert len(refined) == 400 and torch.equal(refined.anchor, scene(4).anchor)


def test_refined_set_keeps_identities():
    prompts, head = make_prompts(), RigidHead()
    start = scene(5)
    start.uid = torch.arange(100, 100 + len(start))
    refined, _ = refine(start, make_frames(scene(6), prompts, head), prompts, head, iterations=1,
                        config=RefineConfig(backend="cpu"))
    assert torch.equal(refined.uid, start.uid)


def test_with_mattes_refinement_fits_the_render_alpha_to_the_matte():
    prompts, head = make_prompts(), RigidHead()
    target = scene(7)
    frames = make_frames(target, prompts, head)
    with torch.no_grad():
        frames.mattes = RefineSession(target, prompts, head, RefineConfig(backend="cpu")).render_frames(
            frames, torch.arange(len(frames)), target)["alpha"]
    start = target.clone()
    start.opacity_logit = torch.full_like(start.opacity_logit, -2.0)  # far too transparent
    session = RefineSession(start, prompts, head, RefineConfig(backend="cpu", weight_l1=0.0, weight_ssim=0.0,
                                                               weight_silhouette=1.0))

    def silhouette_error() -> float:
        with torch.no_grad():
            alpha = session.render_frames(frames, torch.arange(len(frames)))["alpha"]
        return float((alpha - frames.mattes).abs().mean())

    before = silhouette_error()
    session.step(frames.to("cpu"), iterations=40)  # as the daemon hands them over: moved to the engine's device
    assert silhouette_error() < 0.5 * before


def test_off_the_matte_the_refined_avatar_turns_transparent_not_the_background_colour():
    prompts, head = make_prompts(), RigidHead()
    grey = scene(8)
    grey.color = torch.full_like(grey.color, 0.5)
    frames = make_frames(grey, prompts, head)
    frames.images = torch.ones_like(frames.images)  # the tracker matted everything out: nothing but background
    frames.mattes = torch.zeros(*frames.images.shape[:3], 1)
    # the photometric terms alone: on the targets' white background, painting the Gaussians white would do too
    session = RefineSession(grey, prompts, head, RefineConfig(backend="cpu", weight_silhouette=0.0))

    def on_black() -> float:
        """How bright the avatar shows on another background (a white bib, or nothing)."""
        with torch.no_grad():
            return float(session.render_frames(frames, torch.arange(len(frames)), background=torch.zeros(3))
                         ["rgb"].mean())

    before = on_black()
    session.step(frames, iterations=60)
    assert before > 0.02 and on_black() < 0.3 * before


def test_mirror_anchors_pair_each_point_with_its_reflection():
    from engine.refine import mirror_anchors

    left = torch.tensor([[0.05, 0.01, 0.02], [0.07, -0.03, 0.00], [0.00, 0.05, 0.09]])
    points = torch.cat([left, left * torch.tensor([-1.0, 1.0, 1.0])])
    mirror = mirror_anchors(points)
    assert mirror.tolist()[:2] == [3, 4] and mirror.tolist()[3:5] == [0, 1]
    assert mirror[2] in (2, 5)  # a point on the plane is its own mirror (or its duplicate)


def test_symmetry_prior_paints_an_unseen_side_like_the_seen_one():
    from linear_head import LinearPrompts

    base = make_prompts(2)
    prompts = LinearPrompts(torch.tensor([[0.05, 0.0, 0.0], [-0.05, 0.0, 0.0]]), base.shapedirs, base.exprdirs,
                            base.lbs_weights)
    head = RigidHead()
    red, green = torch.tensor([0.9, 0.1, 0.1]), torch.tensor([0.1, 0.9, 0.1])
    avatar = GaussianSet.from_activated(
        anchor=torch.tensor([0, 0, 1, 1]), offset=torch.zeros(4, 3), rotation=torch.tensor([[1.0, 0, 0, 0]] * 4),
        scale=torch.full((4, 3), 0.005), opacity=torch.full((4,), 0.8),
        color=torch.stack([red, red, green, green]), importance=torch.ones(4), frame=0,
        seen=torch.tensor([1.0, 0.9, 0.1, 0.05]))  # anchor 0 was seen squarely, its mirror anchor 1 barely
    frames = make_frames(avatar, prompts, head, n=2)
    config = RefineConfig(backend="cpu", weight_l1=0.0, weight_ssim=0.0, weight_symmetry=1.0)
    session = RefineSession(avatar, prompts, head, config)
    session.step(frames, iterations=150)
    colors = session.gaussians().color
    assert torch.allclose(colors[:2], avatar.color[:2], atol=1e-3)  # the seen side keeps its colour
    assert (colors[2:] - red).abs().max() < (green - red).abs().max() / 2  # the unseen side moved towards it


def test_a_refiner_budget_keeps_the_best_ranked_gaussians():
    prompts, head = make_prompts(), RigidHead()
    start = scene(8)
    start.importance = torch.linspace(-2, 2, len(start))  # the last ones rank highest
    session = RefineSession(start, prompts, head, RefineConfig(backend="cpu", max_gaussians=100))
    refined = session.gaussians()
    assert len(refined) == 100
    assert torch.equal(refined.importance, start.importance[-100:])
