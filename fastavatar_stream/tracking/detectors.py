"""Face detectors with 68 iBUG landmarks behind one interface (`LandmarkDetector`, `Face`), and two of them.

Backends (`backends.make_detector` picks one by name):
- `MediaPipeDetector` (mediapipe_backend.py): BlazeFace, the 478-point face mesh and a matte; the 68
  points come from the mesh. The default when mediapipe imports.
- `DlibDetector`: dlib's HOG face detector and the 68-point shape predictor whose model file ships in the
  registry package `face-recognition-models` (found by path; importing that package needs pkg_resources).
  Works offline on a fresh install; the fallback.
- `FaceAlignmentDetector`: the `face-alignment` package (FAN). Its weights are read from
  `$TORCH_HOME/hub/checkpoints`; we never let it download them and say which file is missing.

`detect(image)` finds faces; `landmarks(image, box)` places the 68 points inside a known box, which is
what the box tracker calls on frames where detection is skipped.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from engine.errors import InputError

log = logging.getLogger(__name__)

SHAPE_PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
FAN_FILE = "2DFAN4-11f355bf06.pth.tar"          # face_alignment 1.5.0 api.models_urls['2DFAN-4']
S3FD_FILE = "s3fd-619a316812.pth"               # face_alignment 1.5.0 detection.sfd models_urls['s3fd']


@dataclass
class Face:
    """box: (4,) x0, y0, x1, y1 pixels; landmarks: (68, 2) pixels; confidence in [0, 1];
    point_confidence: (68,) per-landmark confidence in [0, 1]; mesh: (478, 3) MediaPipe face mesh (x, y
    pixels, z as MediaPipe gives it) from backends that have one, else None."""

    box: np.ndarray
    landmarks: np.ndarray
    confidence: float
    point_confidence: np.ndarray
    mesh: np.ndarray | None = None

    @property
    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0.0) * max(self.box[3] - self.box[1], 0.0))


def landmark_box(points: np.ndarray) -> np.ndarray:
    """(4,) x0, y0, x1, y1 around (N, 2) points."""
    return np.concatenate([points.min(0), points.max(0)])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


class LandmarkDetector(Protocol):
    name: str

    def detect(self, image: np.ndarray) -> list[Face]:
        """All faces in an (H, W, 3) uint8 RGB image, largest first."""

    def landmarks(self, image: np.ndarray, box: np.ndarray, confidence: float = 1.0) -> Face:
        """The 68 landmarks of the face inside `box` (4,) x0, y0, x1, y1 pixels."""


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _downscale(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Image no larger than max_side (nearest-neighbour striding plus PIL for the rest) and its scale factor."""
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return image, 1.0
    from PIL import Image

    stride = max(1, int(1.0 / scale) // 2)          # cheap pre-shrink keeps huge frames fast
    small = image[::stride, ::stride]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    out = np.asarray(Image.fromarray(np.ascontiguousarray(small)).resize(size, Image.BILINEAR))
    return out, size[0] / w


def shape_predictor_path() -> Path:
    """The 68-point dlib model inside the installed `face-recognition-models` package (found without importing it)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the dlib landmark model is missing: install the registry package "
                         "'face-recognition-models' (pip install face-recognition-models)")
    for root in spec.submodule_search_locations:
        path = Path(root) / "models" / SHAPE_PREDICTOR_FILE
        if path.is_file():
            return path
    raise InputError(f"{SHAPE_PREDICTOR_FILE} not found under the face-recognition-models package; reinstall it")


class DlibDetector:
    """HOG face detector + 68-point shape predictor (dlib). Detection runs on a copy no larger than
    `detect_max_side` pixels; landmarks are placed on the full-resolution frame.

    confidence = sigmoid(2 · HOG score): dlib's threshold 0 maps to 0.5, clear frontal faces score 1-3."""

    name = "dlib"

    def __init__(self, detect_max_side: int = 640, upsample: int = 0, score_threshold: float = -0.3):
        import dlib

        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(shape_predictor_path()))
        self.detect_max_side = detect_max_side
        self.upsample = upsample
        self.score_threshold = score_threshold

    def detect(self, image: np.ndarray) -> list[Face]:
        small, scale = _downscale(image, self.detect_max_side)
        gray = np.ascontiguousarray(small.mean(axis=2).astype(np.uint8)) if small.ndim == 3 else small
        rects, scores, _ = self._detector.run(gray, self.upsample, self.score_threshold)
        faces = []
        for rect, score in zip(rects, scores):
            box = np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], dtype=np.float64) / scale
            faces.append(self.landmarks(image, box, _sigmoid(2.0 * score)))
        return sorted(faces, key=lambda f: -f.area)

    def landmarks(self, image: np.ndarray, box: np.ndarray, confidence: float = 1.0) -> Face:
        rect = self._dlib.rectangle(int(round(box[0])), int(round(box[1])), int(round(box[2])), int(round(box[3])))
        shape = self._predictor(np.ascontiguousarray(image), rect)
        pts = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
        return Face(np.asarray(box, dtype=np.float64), pts, float(confidence), np.full(68, float(confidence)))


def torch_hub_checkpoints() -> Path:
    """Where torch.hub (and face-alignment) look for weight files: $TORCH_HOME/hub/checkpoints."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
    return Path(torch_home) / "hub" / "checkpoints"


def face_alignment_available() -> bool:
    return importlib.util.find_spec("face_alignment") is not None and (torch_hub_checkpoints() / FAN_FILE).is_file()


class FaceAlignmentDetector:
    """FAN landmarks (`face-alignment`) with the S3FD detector when its file is present, else dlib's HOG.

    confidence: the mean FAN heatmap peak of the 68 points (per point in point_confidence)."""

    name = "face-alignment"

    def __init__(self, device: str = "cpu", detect_max_side: int = 640):
        folder = torch_hub_checkpoints()
        fan = folder / FAN_FILE
        if importlib.util.find_spec("face_alignment") is None:
            raise InputError("the face-alignment backend needs the 'face-alignment' package (pip install face-alignment)")
        if not fan.is_file():
            raise InputError(f"face-alignment weights missing: put {FAN_FILE} in {folder} "
                             f"(TORCH_HOME/hub/checkpoints), or use --detector dlib")
        import face_alignment

        detector = "sfd" if (folder / S3FD_FILE).is_file() else "dlib"
        log.info("face-alignment: FAN from %s, face detector %s", fan, detector)
        self._fa = face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, device=device,
                                                face_detector=detector, flip_input=False, compile=False)
        self.detect_max_side = detect_max_side

    def detect(self, image: np.ndarray) -> list[Face]:
        small, scale = _downscale(image, self.detect_max_side)
        boxes = self._fa.face_detector.detect_from_image(small.copy())
        faces = []
        for b in boxes:
            box = np.asarray(b[:4], dtype=np.float64) / scale
            det_conf = float(b[4]) if len(b) > 4 else 1.0
            face = self.landmarks(image, box, det_conf)
            faces.append(face)
        return sorted(faces, key=lambda f: -f.area)

    def landmarks(self, image: np.ndarray, box: np.ndarray, confidence: float = 1.0) -> Face:
        pts, scores, _ = self._fa.get_landmarks_from_image(image, detected_faces=[np.asarray(box, dtype=np.float64)],
                                                           return_bboxes=True, return_landmark_score=True)
        if pts is None:
            return Face(np.asarray(box, float), np.zeros((68, 2)), 0.0, np.zeros(68))
        point_conf = np.clip(np.asarray(scores[0], dtype=np.float64).reshape(68), 0.0, 1.0)
        return Face(np.asarray(box, float), np.asarray(pts[0], dtype=np.float64)[:, :2],
                    float(min(confidence, point_conf.mean())), point_conf)
