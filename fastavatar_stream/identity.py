"""Identity distance between face images with dlib's 128-d face descriptor (offline: the model file ships in
the registry package `face-recognition-models`). dlib's own same-person threshold is 0.6."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from engine.errors import InputError

DESCRIPTOR_FILE = "dlib_face_recognition_resnet_model_v1.dat"
SAME_PERSON_THRESHOLD = 0.6


def _model_file(name: str) -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "models" / name
        if path.is_file():
            return path
    raise InputError(f"{name} is missing: install the registry package 'face-recognition-models'")


class FaceIdentity:
    """descriptor(image) -> (128,) or None when no face is found; distance(a, b) -> float or None."""

    def __init__(self, upsample: int = 1) -> None:
        import dlib

        from fastavatar_stream.tracking.detectors import shape_predictor_path

        self._detector = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(str(shape_predictor_path()))
        self._encoder = dlib.face_recognition_model_v1(str(_model_file(DESCRIPTOR_FILE)))
        self.upsample = upsample

    def descriptor(self, image: np.ndarray) -> np.ndarray | None:
        image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
        faces = self._detector(image, self.upsample)
        if len(faces) == 0:
            return None
        face = max(faces, key=lambda r: r.width() * r.height())
        shape = self._shape(image, face)
        return np.asarray(self._encoder.compute_face_descriptor(image, shape), np.float64)

    def distance(self, a: np.ndarray, b: np.ndarray) -> float | None:
        da, db = self.descriptor(a), self.descriptor(b)
        if da is None or db is None:
            return None
        return float(np.linalg.norm(da - db))
