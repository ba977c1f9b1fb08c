"""Synthetic multi-view heads: determinism, identity splits, shapes, landmarks, both samplers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.errors import InputError
from engine.train.samples import HeadSample, collate_samples
from engine.train.synthetic import SPLIT_BASE, SyntheticConfig, make_dataset

RES = 48


@pytest.fixture(scope="module")
def head():
    from engine.head import load_head

    return load_head()


def _small(n_views: int = 5, background: str = "plain") -> SyntheticConfig:
    return SyntheticConfig(n_views=n_views, background=background, samples_per_face=1)


@pytest.mark.parametrize("sampler", ["video", "multiview"])
def test_sample_has_images_cameras_flame_and_landmarks(head, sampler):
    ds = make_dataset(0, "train", 3, sampler, RES, head=head, config=_small())
    s = ds[0]
    assert isinstance(s, HeadSample) and s.sampler == sampler
    v = 5
    assert s.images.shape == (v, 3, RES, RES) and s.targets.shape == (v, 3, RES, RES)
    assert s.masks.shape == (v, 1, RES, RES) and s.bg_colors.shape == (v, 3)
    assert s.images.min() >= 0 and s.images.max() <= 1
    assert len(s.cameras) == v and s.cameras.width == RES and s.cameras.height == RES
    assert s.flame.shape.shape == (v, head.n_shape) and s.flame.expression.shape == (v, head.n_expression)
    assert torch.equal(s.flame.shape[0], s.flame.shape[-1])  # one identity
    assert s.landmarks.shape == (v, 68, 3)
    # the head covers a good part of the image but not all of it
    coverage = s.masks.mean(dim=(1, 2, 3))
    assert (coverage > 0.08).all() and (coverage < 0.9).all()


@pytest.mark.parametrize("sampler", ["video", "multiview"])
def test_landmarks_project_inside_the_face(head, sampler):
    s = make_dataset(1, "train", 2, sampler, RES, head=head, config=_small())[1]
    xy = s.landmarks[..., :2]
    assert ((xy >= 0) & (xy < RES)).all()
    # every landmark falls on (or right next to) the rendered head
    ix = xy.round().long().clamp(0, RES - 1)
    for view in range(s.n_views):
        mask = torch.nn.functional.max_pool2d(s.masks[view:view + 1], 3, 1, 1)[0, 0]
        assert (mask[ix[view, :, 1], ix[view, :, 0]] > 0.5).float().mean() > 0.95
    # the eyes sit above the mouth in the image (y grows downwards)
    eyes_y = xy[:, 36:48, 1].mean(dim=1)
    mouth_y = xy[:, 48:68, 1].mean(dim=1)
    assert (eyes_y < mouth_y).all()


def test_samplers_differ_in_what_moves(head):
    video = make_dataset(0, "train", 1, "video", RES, head=head, config=_small())[0]
    multi = make_dataset(0, "train", 1, "multiview", RES, head=head, config=_small())[0]
    # video: one fixed camera, the expression changes; multiview: one instant, cameras differ
    assert torch.allclose(video.cameras.viewmats, video.cameras.viewmats[:1].expand_as(video.cameras.viewmats))
    assert not torch.allclose(video.flame.expression[0], video.flame.expression[1])
    assert torch.allclose(multi.flame.expression, multi.flame.expression[:1].expand_as(multi.flame.expression))
    assert not torch.allclose(multi.cameras.viewmats[0], multi.cameras.viewmats[1])
    # at most 12 cameras in the multiview sampler
    many = make_dataset(0, "train", 1, "multiview", 24, head=head, config=_small(n_views=20))[0]
    assert many.n_views == 12


def test_deterministic_by_seed(head):
    a = make_dataset(7, "train", 2, "video", RES, head=head, config=_small())[1]
    b = make_dataset(7, "train", 2, "video", RES, head=head, config=_small())[1]
    c = make_dataset(8, "train", 2, "video", RES, head=head, config=_small())[1]
    assert torch.equal(a.images, b.images) and torch.equal(a.flame.shape, b.flame.shape)
    assert not torch.equal(a.flame.shape, c.flame.shape)


def test_splits_hold_disjoint_identities(head):
    ids = {}
    for split in SPLIT_BASE:
        ds = make_dataset(0, split, 3, "video", RES, head=head, config=_small(n_views=2))
        ids[split] = {ds.identity_id(i) for i in range(len(ds))}
        shapes = {tuple(ds.person(i).shape.tolist()) for i in range(3)}
        assert len(shapes) == 3  # different people within a split
    assert not (ids["train"] & ids["validation"]) and not (ids["train"] & ids["test"])
    assert not (ids["validation"] & ids["test"])
    train_shape = make_dataset(0, "train", 1, "video", RES, head=head, config=_small(n_views=2)).person(0).shape
    val_shape = make_dataset(0, "validation", 1, "video", RES, head=head, config=_small(n_views=2)).person(0).shape
    assert not torch.equal(train_shape, val_shape)


def test_textured_backgrounds_change_inputs_not_targets(head):
    s = make_dataset(0, "train", 1, "video", RES, head=head, config=_small(background="textured"))[0]
    bg = s.masks < 0.01
    assert (bg.float().mean() > 0.1)
    expected = s.bg_colors[:, :, None, None].expand_as(s.targets)
    assert torch.allclose(s.targets.masked_select(bg.expand_as(s.targets)),
                          expected.masked_select(bg.expand_as(s.targets)), atol=0.011)
    spread = s.images.masked_select(bg.expand_as(s.images)).std()
    assert spread > 0.05  # not a plain colour
    assert set(np.unique(s.bg_colors.numpy()).tolist()) <= {0.0, 0.5, 1.0}


def test_works_with_a_dataloader_and_rejects_bad_arguments(head):
    ds = make_dataset(0, "train", 2, "mixed", 32, head=head, config=_small(n_views=2), groups_per_identity=2)
    assert len(ds) == 4
    batches = list(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_samples))
    assert [len(b) for b in batches] == [2, 2] and all(isinstance(s, HeadSample) for s in batches[0])
    with pytest.raises(InputError):
        make_dataset(0, "holdout", 2, "video", 32, head=head)
    with pytest.raises(InputError):
        make_dataset(0, "train", 2, "orbit", 32, head=head)
