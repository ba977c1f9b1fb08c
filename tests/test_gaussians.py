"""GaussianSet: fusion, pruning, animation to world space, publishing arrays; incremental fusion."""
from __future__ import annotations

import math
import pytest
import torch

from engine.fusion import POOL_FRAME, IncrementalFuser
from engine.gaussians import GaussianSet, matrix_to_quaternion, quaternion_to_matrix
from engine.types import FlameParams
from linear_head import RigidHead, axis_angle_matrix, make_prompts


def random_set(m: int, frame: int = 0, seed: int = 0, n_anchors: int = 10) -> GaussianSet:
    g = torch.Generator().manual_seed(seed)
    return GaussianSet.from_activated(
        anchor=torch.randint(0, n_anchors, (m,), generator=g),
        offset=0.01 * torch.randn(m, 3, generator=g),
        rotation=torch.randn(m, 4, generator=g),
        scale=0.001 + 0.004 * torch.rand(m, 3, generator=g),
        opacity=torch.rand(m, generator=g),
        color=torch.rand(m, 3, generator=g),
        importance=torch.randn(m, generator=g),
        frame=frame,
    )


def test_from_activated_round_trips_activations():
    s = random_set(50)
    assert torch.allclose(s.opacities, torch.sigmoid(s.opacity_logit))
    assert torch.allclose(s.rotation.norm(dim=-1), torch.ones(50), atol=1e-6)
    assert (s.scales > 0.0009).all() and (s.scales < 0.0051).all()
    assert (s.frame == 0).all()


def test_fuse_concatenates_in_order():
    a, b = random_set(5, frame=1, seed=1), random_set(7, frame=2, seed=2)
    f = GaussianSet.fuse([a, b])
    assert len(f) == 12
    assert torch.equal(f.offset[:5], a.offset) and torch.equal(f.offset[5:], b.offset)
    assert f.frame.tolist() == [1] * 5 + [2] * 7


def test_prune_threshold_and_budget_keep_the_most_important_in_order():
    s = random_set(200, seed=4)
    kept = s.prune(threshold=0.0)
    assert (kept.importance > 0).all()
    assert len(kept) == int((s.importance > 0).sum())
    top = s.prune(threshold=float("-inf"), budget=20)
    assert len(top) == 20
    assert top.importance.min() >= torch.topk(s.importance, 20).values.min()
    index = torch.nonzero(torch.isin(s.importance, top.importance)).squeeze(1)
    assert torch.equal(s.importance[index], top.importance)  # relative order preserved


def test_to_world_at_rest_is_canonical_plus_offset_plus_translation():
    prompts, head = make_prompts(), RigidHead()
    s = random_set(30, seed=5)
    params = FlameParams.zeros(1, 4, 2)
    params.translation[:] = torch.tensor([0.1, -0.2, 0.3])
    world = s.to_world(prompts, head, params)
    expected = prompts.v_template[s.anchor] + s.offset + params.translation
    assert torch.allclose(world["means"][0], expected, atol=1e-6)
    assert torch.allclose(world["quats"][0], s.rotation, atol=1e-6)


def test_to_world_rigid_rotation_moves_means_and_turns_gaussians():
    prompts, head = make_prompts(), RigidHead()
    s = random_set(30, seed=6)
    params = FlameParams.zeros(2, 4, 2)
    params.shape[:] = torch.randn(2, 4)
    params.expression[:] = torch.randn(2, 2)
    params.rotation[1] = torch.tensor([0.0, math.pi / 2, 0.0])
    world = s.to_world(prompts, head, params)
    local = prompts.canonical(params.shape) + prompts.expression_offsets(params.expression)
    r = axis_angle_matrix(params.rotation[1])
    expected = (r @ (local[1, s.anchor] + s.offset).T).T
    assert torch.allclose(world["means"][1], expected, atol=1e-6)
    turned = quaternion_to_matrix(world["quats"][1])
    assert torch.allclose(turned, r @ quaternion_to_matrix(s.rotation), atol=1e-5)
    unrotated = s.to_world(prompts, head, params, rotate=False)
    assert torch.allclose(unrotated["quats"][1], s.rotation)


def test_to_world_gradients_reach_all_attributes():
    prompts, head = make_prompts(), RigidHead()
    s = random_set(20, seed=7)
    for name in ("offset", "rotation", "log_scale", "opacity_logit", "color"):
        getattr(s, name).requires_grad_(True)
    params = FlameParams.zeros(1, 4, 2)
    params.rotation[0, 0] = 0.3
    world = s.to_world(prompts, head, params)
    loss = sum((v * torch.randn_like(v)).sum() for v in world.values())
    loss.backward()
    for name in ("offset", "rotation", "log_scale", "opacity_logit", "color"):
        assert getattr(s, name).grad is not None and getattr(s, name).grad.abs().sum() > 0, name


def test_to_arrays_gives_float32_numpy_world_arrays():
    arrays = random_set(12).to_arrays(make_prompts(), RigidHead())
    assert set(arrays) == {"means", "quats", "scales", "opacities", "colors"}
    assert arrays["means"].shape == (12, 3) and arrays["opacities"].shape == (12,)
    assert all(a.dtype.name == "float32" for a in arrays.values())


def test_matrix_quaternion_round_trip_including_half_turns():
    q = torch.nn.functional.normalize(torch.randn(500, 4), dim=-1)
    q = torch.cat([q, torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])])
    q = torch.where(q[:, :1] < 0, -q, q)
    back = matrix_to_quaternion(quaternion_to_matrix(q))
    same = torch.minimum((back - q).abs().amax(-1), (back + q).abs().amax(-1))
    assert same.max() < 1e-5


def test_incremental_fuser_replaces_overlap_frames_and_keeps_newest_pool():
    fuser = IncrementalFuser(budget=10_000, threshold=float("-inf"))
    w1 = [random_set(10, frame=f, seed=f) for f in range(4)] + [random_set(5, frame=POOL_FRAME, seed=99)]
    v1 = fuser.add_window(w1)
    assert v1.version == 1 and len(v1.gaussians) == 45 and v1.frames == [0, 1, 2, 3]
    w2 = [random_set(10, frame=f, seed=100 + f) for f in (2, 3, 4, 5)] + [random_set(5, frame=POOL_FRAME, seed=7)]
    v2 = fuser.add_window(w2)
    assert v2.version == 2 and v2.frames == [0, 1, 2, 3, 4, 5]
    assert len(v2.gaussians) == 6 * 10 + 5
    frame2 = v2.gaussians.select(v2.gaussians.frame == 2)
    assert torch.equal(frame2.offset, w2[0].offset)  # the newer window's prediction won
    pool = v2.gaussians.select(v2.gaussians.frame == POOL_FRAME)
    assert torch.equal(pool.offset, w2[-1].offset)


def test_incremental_fuser_respects_budget_and_versions_increase():
    fuser = IncrementalFuser(budget=25)
    versions = []
    for w in range(5):
        v = fuser.add_window([random_set(20, frame=w * 10 + f, seed=w * 10 + f) for f in range(3)])
        assert len(v.gaussians) <= 25
        assert (v.gaussians.importance > 0).all()
        versions.append(v.version)
    refined = fuser.replace(fuser.avatar.clone())
    versions.append(refined.version)
    assert versions == sorted(set(versions))


def test_incremental_fuser_rejects_nonpositive_budget():
    with pytest.raises(ValueError):
        IncrementalFuser(budget=0)


def test_fuser_hands_out_stable_unique_uids():
    fuser = IncrementalFuser(budget=1000, threshold=float("-inf"))
    v1 = fuser.add_window([random_set(10, frame=f, seed=f) for f in range(3)])
    assert v1.gaussians.uid is not None and len(set(v1.gaussians.uid.tolist())) == 30
    v2 = fuser.add_window([random_set(10, frame=f, seed=f + 50) for f in (2, 3)])
    kept_old = v2.gaussians.select(v2.gaussians.frame < 2)
    assert torch.equal(kept_old.uid, v1.gaussians.select(v1.gaussians.frame < 2).uid)
    new = v2.gaussians.select(v2.gaussians.frame >= 2).uid
    assert new.min() >= 30  # replaced frames get fresh identities
    refined = fuser.replace(v2.gaussians.clone())
    assert torch.equal(refined.gaussians.uid, v2.gaussians.uid)
