"""Frame preparation: the official square crop, antialiased resize, K that follows the crop, matting."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from fastavatar_stream.frames import FlameFit, TrackedFrame
from fastavatar_stream.prepare import (CropBox, FramePreparer, crop_intrinsics, crop_resize, square_box,
                                       to_crop_pixels)


def blob_image(h: int, w: int, centres, sigma: float = 3.0) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w))
    for cx, cy in centres:
        img += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    out = np.zeros((h, w, 3), np.uint8)
    out[..., 1] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return out


def centroid(channel: np.ndarray) -> tuple[float, float]:
    yy, xx = np.mgrid[0:channel.shape[0], 0:channel.shape[1]]
    wgt = np.clip(channel - 0.05, 0, None)
    return float((xx * wgt).sum() / wgt.sum()), float((yy * wgt).sum() / wgt.sum())


def tracked(image, box, K=None, landmarks=None) -> TrackedFrame:
    fit = FlameFit(*(np.zeros(n, np.float32) for n in (10, 10, 3, 3, 3, 6, 3)))
    return TrackedFrame(image=image, pts=0.0, index=0, K=np.eye(3) if K is None else K, viewmat=np.eye(4),
                        flame=fit, landmarks=np.zeros((68, 3)) if landmarks is None else landmarks,
                        box=np.asarray(box, np.float64))


def test_square_box_follows_the_official_rule():
    crop = square_box(np.array([100, 50, 200, 250]), 1.65)  # w=100, h=200
    assert (crop.cx, crop.cy) == (150, 150)
    assert crop.side == pytest.approx(math.sqrt(100 * 200) * 1.65)
    np.testing.assert_allclose(crop.as_xyxy(), [150 - crop.side / 2, 150 - crop.side / 2,
                                                150 + crop.side / 2, 150 + crop.side / 2])
    with pytest.raises(ValueError):
        square_box(np.array([10, 10, 10, 20]))


def test_projected_point_lands_at_the_same_place_in_the_crop():
    K = np.array([[500.0, 0, 310.0], [0, 520.0, 245.0], [0, 0, 1]])
    points3d = np.array([[0.1, -0.08, 1.0], [-0.08, 0.06, 1.2], [0.0, 0.0, 0.9]])  # >= 40 px apart
    proj = (K @ points3d.T).T
    src_px = proj[:, :2] / proj[:, 2:]
    image = blob_image(480, 640, src_px)
    crop = CropBox(cx=300.3, cy=250.7, side=201.5)
    size = 128
    K2 = crop_intrinsics(K, crop, size)
    proj2 = (K2 @ points3d.T).T
    crop_px = proj2[:, :2] / proj2[:, 2:]
    np.testing.assert_allclose(crop_px, to_crop_pixels(src_px, crop, size), atol=1e-4)
    out = crop_resize(image, crop, size)
    assert out.shape == (size, size, 3) and out.dtype == np.float32 and 0 <= out.min() <= out.max() <= 1
    # the rendered blobs are where K2 says: check one at a time by masking around each
    for px in crop_px:
        x0, y0 = int(px[0]) - 8, int(px[1]) - 8
        patch = out[y0:y0 + 17, x0:x0 + 17, 1]
        cx, cy = centroid(patch)
        assert abs(x0 + cx - px[0]) < 0.15 and abs(y0 + cy - px[1]) < 0.15


def test_identity_crop_is_lossless_and_upscale_keeps_relative_position():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = crop_resize(img, CropBox(16.0 - 0.5, 16.0 - 0.5, 32.0), 32)  # edges at -0.5 .. 31.5
    np.testing.assert_allclose(out * 255, img, atol=0.51)
    K = np.array([[30.0, 0, 15.5], [0, 30.0, 15.5], [0, 0, 1]])
    np.testing.assert_allclose(crop_intrinsics(K, CropBox(15.5, 15.5, 32.0), 64),
                               [[60, 0, 31.5], [0, 60, 31.5], [0, 0, 1]], atol=1e-5)


def test_out_of_image_area_takes_the_background_colour():
    img = np.zeros((40, 40, 3), np.uint8)
    out = crop_resize(img, CropBox(-0.5, 19.5, 40.0), 40, fill=(255, 0, 0))  # left half outside
    np.testing.assert_allclose(out[:, :18], np.broadcast_to([1.0, 0, 0], (40, 18, 3)), atol=1e-6)
    np.testing.assert_allclose(out[:, 22:], 0.0, atol=1e-6)


def test_downscale_is_antialiased():
    stripes = np.zeros((256, 256, 3), np.uint8)
    stripes[:, ::2] = 255  # 1-pixel stripes alias badly when point-sampled
    out = crop_resize(stripes, CropBox(127.5, 127.5, 256.0), 32)
    assert abs(out.mean() - 0.5) < 0.02 and out.std() < 0.05


def test_preparer_output_and_smoothed_box():
    prep = FramePreparer(size=64, scale=1.65)
    img = blob_image(240, 320, [(160, 120)])
    landmarks = np.array([[160.0, 120.0, 0.9]] * 68)
    out = prep.prepare(tracked(img, [140, 100, 180, 140], landmarks=landmarks))
    assert out.image.shape == (3, 64, 64) and out.image.dtype == np.float32
    assert out.K.shape == (3, 3) and out.alpha is None
    np.testing.assert_allclose(out.landmarks[0], [31.5, 31.5, 0.9], atol=1e-4)  # the centre
    first = out.crop.side
    # a sudden jump is followed partially (smoothing), growth faster than shrinking
    prep.update_box(np.array([140, 100, 220, 180]))  # twice the size
    grown = prep.box.side
    assert first < grown < 2 * first and grown - first > 0.5 * first
    for _ in range(3):
        prep.update_box(np.array([140, 100, 180, 140]))  # back to the small box
    assert prep.box.side > first + 0.7 * (grown - first)  # shrinks slowly: union-ish
    for _ in range(200):
        prep.update_box(np.array([140, 100, 180, 140]))
    assert prep.box.side == pytest.approx(first, rel=1e-3)


def test_matting_composites_on_the_background_and_missing_matting_is_said_once(caplog):
    img = np.zeros((64, 64, 3), np.uint8)
    img[..., 2] = 255

    def matte(rgb):
        alpha = np.zeros(rgb.shape[:2], np.float32)
        alpha[:, : rgb.shape[1] // 2] = 1.0  # left half is "head"
        return alpha

    prep = FramePreparer(size=32, background=(255, 255, 255), matting=matte, expects_matted=True)
    out = prep.prepare(tracked(img, [16, 16, 48, 48]))
    np.testing.assert_allclose(out.image[:, :, :16], np.broadcast_to([[[0.0]], [[0.0]], [[1.0]]], (3, 32, 16)),
                               atol=1e-6)
    np.testing.assert_allclose(out.image[:, :, 16:], 1.0, atol=1e-6)  # white
    assert prep.notes == []
    with caplog.at_level(logging.WARNING, logger="fastavatar_stream.prepare"):
        plain = FramePreparer(size=32, expects_matted=True)
        plain.prepare(tracked(img, [16, 16, 48, 48]))
        plain.prepare(tracked(img, [16, 16, 48, 48]))
    msgs = [r.getMessage() for r in caplog.records if "matte" in r.getMessage()]
    assert len(msgs) == 1 and "no matte available" in msgs[0] and plain.notes == msgs
    assert FramePreparer(size=32).notes == []  # our default model copes without: nothing to say


def test_bad_matting_output_and_options_are_refused():
    from engine.errors import InputError

    with pytest.raises(InputError):
        FramePreparer(size=4)
    prep = FramePreparer(size=16, matting=lambda rgb: np.ones((8, 8)))
    with pytest.raises(ValueError, match="matting"):
        prep.prepare(tracked(np.zeros((32, 32, 3), np.uint8), [8, 8, 24, 24]))
