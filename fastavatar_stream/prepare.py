"""Frame preparation for the model: a square head crop, resized, with the intrinsics that go with it.

The official pipeline (SPEC.md §2) takes one *union* head box over all input frames, makes it square
with side = sqrt(w * h) * 1.65 around the same centre, crops (out-of-image area filled), resizes with
antialiasing, mattes the head and composites it on white. A stream has no "all frames": each session
keeps a smoothed box instead. Its centre follows the tracked box with an exponential moving average;
its side grows fast (so a head moving towards the camera is not cut) and shrinks slowly ("union-ish":
it behaves like a union over the recent past). Notice the box type matters: 1.65 is the official factor
for a whole-head box; a tight 68-landmark face box needs a larger `scale` for the same framing. For the
official weights the box is `views.HeadBox`: the tracked FLAME head above the chin, posed and projected, which is
what the official head detector boxes (the whole head, without the neck).

Matting: a model trained on matted heads (`expects_matted`, the official one) gets each crop composited on
white through the tracker's matte (`TrackedFrame.matte`, cropped like the image) or a `matting` model; when
neither is there the crop keeps its own background and a note says so once per session.

Pixel convention: OpenCV, the centre of pixel i is at coordinate i. A crop covering the continuous
range [a, a + side) resized to S pixels maps u -> (u - a) * S / side - 0.5, which is how K is updated.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

from engine.errors import InputError

from .frames import TrackedFrame

log = logging.getLogger(__name__)

Matting = Callable[[np.ndarray], np.ndarray]
"""(S, S, 3) float32 RGB in [0, 1] -> (S, S) float alpha in [0, 1] (1 = head)."""


@dataclass
class CropBox:
    """Square crop in source pixels: centre (cx, cy) and side; continuous edges at centre -+ side / 2."""

    cx: float
    cy: float
    side: float

    @property
    def origin(self) -> tuple[float, float]:
        return self.cx - self.side / 2, self.cy - self.side / 2

    def as_xyxy(self) -> np.ndarray:
        x0, y0 = self.origin
        return np.array([x0, y0, x0 + self.side, y0 + self.side], np.float64)


def square_box(box: np.ndarray, scale: float = 1.65) -> CropBox:
    """The official square: same centre as box (x0, y0, x1, y1), side = sqrt(w * h) * scale."""
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = x1 - x0, y1 - y0
    if not (w > 0 and h > 0 and math.isfinite(w * h)):
        raise ValueError(f"box must have positive finite width and height, got {box}")
    return CropBox((x0 + x1) / 2, (y0 + y1) / 2, math.sqrt(w * h) * scale)


def crop_intrinsics(K: np.ndarray, crop: CropBox, size: int) -> np.ndarray:
    """(3, 3) intrinsics of the crop resized to size x size, from the source (3, 3) K."""
    s = size / crop.side
    a, b = crop.origin
    T = np.array([[s, 0, -a * s - 0.5], [0, s, -b * s - 0.5], [0, 0, 1]], np.float64)
    # K maps to pixel coordinates; the +0.5 / -0.5 follow the pixel-centre convention of the module doc
    return (T @ np.asarray(K, np.float64)).astype(np.float32)


def to_crop_pixels(points: np.ndarray, crop: CropBox, size: int) -> np.ndarray:
    """(N, 2+) source pixel coordinates -> crop pixel coordinates (extra columns kept)."""
    out = np.array(points, np.float64, copy=True)
    s = size / crop.side
    a, b = crop.origin
    out[:, 0] = (out[:, 0] - a) * s - 0.5
    out[:, 1] = (out[:, 1] - b) * s - 0.5
    return out


def crop_resize(image: np.ndarray, crop: CropBox, size: int,
                fill: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Crop a square region (may leave the image; that area is `fill`) and resize with antialiasing.

    image: (H, W, 3) uint8 RGB. Returns (size, size, 3) float32 in [0, 1].
    """
    h, w = image.shape[:2]
    a, b = crop.origin
    # PIL's box coordinates put pixel i on [i, i+1): our continuous origin a is PIL's a + 0.5
    left, top, right, bottom = a + 0.5, b + 0.5, a + 0.5 + crop.side, b + 0.5 + crop.side
    pad_l = max(0, math.ceil(-left) + 1)
    pad_t = max(0, math.ceil(-top) + 1)
    pad_r = max(0, math.ceil(right - w) + 1)
    pad_b = max(0, math.ceil(bottom - h) + 1)
    if pad_l or pad_t or pad_r or pad_b:
        canvas = np.empty((h + pad_t + pad_b, w + pad_l + pad_r, 3), np.uint8)
        canvas[:] = np.asarray(fill, np.uint8)
        canvas[pad_t:pad_t + h, pad_l:pad_l + w] = image
        image = canvas
    pil = Image.fromarray(np.ascontiguousarray(image))
    box = (left + pad_l, top + pad_t, right + pad_l, bottom + pad_t)
    out = pil.resize((size, size), resample=Image.Resampling.BICUBIC, box=box, reducing_gap=None)
    return np.asarray(out, np.float32) / 255.0


@dataclass
class PreparedFrame:
    """A frame ready for the model.

    image:     (3, S, S) float32 RGB in [0, 1]
    K:         (3, 3) float32 intrinsics of the crop, pixels of the S x S image
    crop:      the crop box in source pixels
    landmarks: (68, 3) x, y in crop pixels and confidence
    alpha:     (S, S) float32 matte when a matting model ran, else None
    """

    image: np.ndarray
    K: np.ndarray
    crop: CropBox
    landmarks: np.ndarray
    alpha: np.ndarray | None = None


@dataclass
class FramePreparer:
    """Per-session frame preparation (one instance per session: it keeps the smoothed crop box).

    size: model input side in pixels. scale: crop side / sqrt(box area). background: RGB 0..255 used for
    out-of-image area and for compositing a matte. matting: optional matting model (see `Matting`).
    expects_matted: the model was trained on matted heads (the official weights are): crops are composited on
    `background` through the frame's matte (or `matting`); without either that is noted once per session.
    head_box: TrackedFrame -> (4,) box the crop is measured on (None: the tracker's landmark box `frame.box`).
    center_alpha: EMA weight of a new box centre; grow_alpha /
    shrink_alpha: EMA weights of the side when it grows / shrinks.
    """

    size: int = 512
    scale: float = 1.65
    background: tuple[int, int, int] = (255, 255, 255)
    matting: Matting | None = None
    expects_matted: bool = False
    center_alpha: float = 0.3
    grow_alpha: float = 0.7
    shrink_alpha: float = 0.05
    head_box: Callable[[TrackedFrame], np.ndarray] | None = None
    box: CropBox | None = None
    notes: list[str] = field(default_factory=list)
    mattes_used: int = 0

    def __post_init__(self) -> None:
        if self.size < 8:
            raise InputError(f"model input size must be at least 8 pixels, got {self.size}")
        if self.scale <= 0:
            raise InputError(f"crop scale must be positive, got {self.scale}")
        for name in ("center_alpha", "grow_alpha", "shrink_alpha"):
            if not 0 < getattr(self, name) <= 1:
                raise InputError(f"{name} must be in (0, 1], got {getattr(self, name)}")

    def update_box(self, face_box: np.ndarray) -> CropBox:
        """Fold a tracked (4,) x0, y0, x1, y1 box into the session's smoothed square crop."""
        target = square_box(face_box, self.scale)
        if self.box is None:
            self.box = target
        else:
            c = self.center_alpha
            k = self.grow_alpha if target.side > self.box.side else self.shrink_alpha
            self.box = CropBox(self.box.cx + c * (target.cx - self.box.cx),
                               self.box.cy + c * (target.cy - self.box.cy),
                               self.box.side + k * (target.side - self.box.side))
        return self.box

    def prepare(self, frame: TrackedFrame, update: bool = True) -> PreparedFrame:
        """Crop, resize, optionally matte one tracked frame. update=False reuses the current box."""
        if update or self.box is None:
            self.update_box(frame.box if self.head_box is None else self.head_box(frame))
        crop = self.box
        rgb = crop_resize(frame.image, crop, self.size, self.background)
        alpha = self._alpha(frame, rgb, crop)
        if alpha is not None:
            bg = np.asarray(self.background, np.float32) / 255.0
            rgb = alpha[..., None] * rgb + (1.0 - alpha[..., None]) * bg
        return PreparedFrame(image=np.ascontiguousarray(rgb.transpose(2, 0, 1), np.float32),
                             K=crop_intrinsics(frame.K, crop, self.size), crop=crop,
                             landmarks=to_crop_pixels(frame.landmarks, crop, self.size).astype(np.float32),
                             alpha=alpha)

    def _alpha(self, frame: TrackedFrame, rgb: np.ndarray, crop: CropBox) -> np.ndarray | None:
        """(S, S) matte of the crop: from the matting model, else (for a model that expects matted heads) the
        tracker's full-frame matte cropped like the image; None when there is none."""
        if self.matting is not None:
            alpha = np.asarray(self.matting(rgb), np.float32)
            if alpha.shape != (self.size, self.size):
                raise ValueError(f"matting model returned shape {alpha.shape}, expected ({self.size}, {self.size})")
            return np.clip(alpha, 0.0, 1.0)
        if not self.expects_matted:
            return None
        matte = getattr(frame, "matte", None)
        if matte is None:
            if NO_MATTE_NOTE not in self.notes:
                self.notes.append(NO_MATTE_NOTE)
                log.warning(NO_MATTE_NOTE)
            return None
        self.mattes_used += 1
        return crop_matte(np.asarray(matte, np.float32), crop, self.size)


NO_MATTE_NOTE = ("no matte available (the tracker gave none for a frame): this model was trained on heads matted on "
                 "white, so those crops keep their own background and quality may drop")


def crop_matte(matte: np.ndarray, crop: CropBox, size: int) -> np.ndarray:
    """A full-frame (H, W) matte in [0, 1] cropped and resized like `crop_resize` crops the image (outside: 0)."""
    grey = (np.clip(matte, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    out = crop_resize(np.repeat(grey[:, :, None], 3, axis=2), crop, size, fill=(0, 0, 0))
    return np.ascontiguousarray(out[:, :, 0])
