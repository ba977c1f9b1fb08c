"""Visibility-weighted fusion: each anchor's copies weigh by how squarely their frames saw it."""
from __future__ import annotations

import math

import pytest
import torch

from engine.fusion import POOL_FRAME, UNSEEN, IncrementalFuser, view_weights
from engine.gaussians import GaussianSet
from engine.model.point_guidance import FACING, INSIDE, N_POINT_FEATURES


def copies(anchors: list[int], seen: list[float] | None, frame: int, importance: float = 3.0,
           opacity: float = 0.8) -> GaussianSet:
    m = len(anchors)
    return GaussianSet.from_activated(
        anchor=torch.tensor(anchors), offset=torch.zeros(m, 3), rotation=torch.tensor([[1.0, 0, 0, 0]]).repeat(m, 1),
        scale=torch.full((m, 3), 0.01), opacity=torch.full((m,), opacity), color=torch.rand(m, 3),
        importance=torch.full((m,), importance), frame=frame,
        seen=None if seen is None else torch.tensor(seen))


def test_a_single_frame_keeps_its_opacities_and_copies_share_one_anchors_coverage_by_seen():
    one = copies([0, 1, 2], [0.9, 0.2, UNSEEN], frame=0)
    torch.testing.assert_close(one.opacities, torch.full((3,), 0.8))
    two = GaussianSet.fuse([copies([0, 1], [0.8, 0.1], frame=0), copies([0, 1], [0.2, 0.4], frame=1)])
    torch.testing.assert_close(two.fusion_share(), torch.tensor([0.8, 0.2, 0.2, 0.8]))
    torch.testing.assert_close(two.relative_seen(), torch.tensor([1.0, 0.25, 0.25, 1.0]))
    torch.testing.assert_close(two.opacities, 1 - 0.2 ** torch.tensor([0.8, 0.2, 0.2, 0.8]))
    # together the copies of an anchor let as much through as one copy: (1 - a1)(1 - a2) = 1 - 0.8
    transmit = (1 - two.opacities).reshape(2, 2).prod(dim=0)
    torch.testing.assert_close(transmit, torch.full((2,), 0.2))
    unweighted = GaussianSet.fuse([copies([0], None, 0), copies([0], None, 1)])
    torch.testing.assert_close(unweighted.opacities, torch.full((2,), 0.8))


def test_pruning_drops_copies_another_frame_saw_at_least_twice_as_well():
    fused = GaussianSet.fuse([copies([0, 1, 2], [0.9, 0.9, 0.9], frame=0, importance=2.0),
                              copies([0, 1, 2], [0.9 * math.exp(-3), 0.9, 0.6], frame=1, importance=2.0)])
    kept = fused.prune(0.0)
    assert kept.frame.tolist() == [0, 0, 0, 1, 1] and kept.anchor.tolist() == [0, 1, 2, 1, 2]
    logit = fused.keep_logit()
    torch.testing.assert_close(logit[3], torch.tensor(math.log(2) - 3))        # log(e^-3 / 0.5)
    torch.testing.assert_close(logit[:3], torch.full((3,), math.log(2)))       # best copies: capped at log 2
    unimportant = GaussianSet.fuse([copies([0], [0.9], 0, importance=-1.0), copies([0], [0.8], 1)])
    assert unimportant.prune(0.0).frame.tolist() == [1]                         # the importance still counts


def test_view_weights_from_point_features():
    f = torch.zeros(4, N_POINT_FEATURES)
    f[:, FACING] = torch.tensor([1.0, 0.5, -0.7, 1.0])
    f[:, INSIDE] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    torch.testing.assert_close(view_weights(f, gamma=2.0), torch.tensor([1.0, 0.25, UNSEEN, UNSEEN]))


def test_the_fuser_reweighs_old_copies_when_a_later_frame_sees_the_anchor_better():
    fuser = IncrementalFuser(budget=100)
    fuser.add_window([copies([0, 1], [0.6, 0.6], frame=0), copies([0, 1, 2], [UNSEEN] * 3, frame=POOL_FRAME)])
    first = fuser.avatar
    assert first.relative_seen()[first.frame == 0].tolist() == [1.0, 1.0]
    # the FramePack copies of anchors a frame saw weigh ~0 and are pruned; where no frame looked they stay
    assert first.anchor[first.frame == POOL_FRAME].tolist() == [2]
    fuser.add_window([copies([0], [1.0], frame=5)])                     # frame 5 faces anchor 0 squarely
    avatar = fuser.avatar
    w = avatar.relative_seen()
    old = (avatar.frame == 0) & (avatar.anchor == 0)
    assert avatar.seen is not None and float(w[old]) == pytest.approx(0.6)
    assert float(w[(avatar.frame == 0) & (avatar.anchor == 1)]) == 1.0   # nobody saw anchor 1 better
    assert float(w[avatar.frame == POOL_FRAME]) == 1.0
