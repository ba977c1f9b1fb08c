"""Choosing a landmark backend by name: `make_detector("auto" | "mediapipe" | "dlib" | "face-alignment")`."""
from __future__ import annotations

import logging

from engine.errors import InputError
from fastavatar_stream.tracking.detectors import (FAN_FILE, DlibDetector, FaceAlignmentDetector, LandmarkDetector,
                                                  face_alignment_available, torch_hub_checkpoints)
from fastavatar_stream.tracking.mediapipe_backend import MediaPipeDetector

log = logging.getLogger(__name__)

LANDMARK_BACKENDS = ("auto", "mediapipe", "dlib", "face-alignment")


def make_detector(name: str = "auto", static_mesh: bool = False, **kwargs) -> LandmarkDetector:
    """'auto' (mediapipe when it imports, else face-alignment when its weights are present, else dlib),
    'mediapipe', 'dlib' or 'face-alignment'. static_mesh goes to the mediapipe backend, kwargs to the others."""
    if name == "auto":
        try:
            return MediaPipeDetector(static_mesh=static_mesh)
        except InputError as err:
            log.info("landmark detector: not mediapipe: %s", err)
        name = "face-alignment" if face_alignment_available() else "dlib"
        log.info("landmark detector: %s%s", name, "" if name != "dlib" else
                 f" (face-alignment weights {FAN_FILE} not in {torch_hub_checkpoints()})")
    if name == "mediapipe":
        return MediaPipeDetector(static_mesh=static_mesh)
    if name == "dlib":
        return DlibDetector(**kwargs)
    if name in ("face-alignment", "face_alignment", "fan"):
        return FaceAlignmentDetector(**kwargs)
    raise InputError(f"unknown landmark backend {name!r}: use {', '.join(LANDMARK_BACKENDS)}")
