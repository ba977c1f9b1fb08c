"""Detect a face every K frames (or when the track is lost); in between, carry the box from the last landmarks.

Landmark predictors are trained on their detector's boxes, so a box drawn around the landmarks is mapped
back to the detector's convention with the offset and scale measured at the last detection.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastavatar_stream.tracking.detectors import Face, LandmarkDetector, iou, landmark_box


@dataclass
class BoxObservation:
    """One frame's face: face (box, landmarks, confidence); detected: whether the detector ran and found it;
    n_faces: faces seen at the last detection (>1: the largest or the tracked one was picked)."""

    face: Face
    detected: bool
    n_faces: int


class BoxTracker:
    """Per-stream box tracking. `update(image)` -> BoxObservation or None when no face is found."""

    def __init__(self, detector: LandmarkDetector, redetect_every: int = 10, min_face_px: float = 20.0):
        self.detector = detector
        self.redetect_every = max(1, int(redetect_every))
        self.min_face_px = min_face_px
        self._last: Face | None = None
        self._since_detection = 0
        self._n_faces = 0
        # detector box relative to the landmark box: centre offset (x, y) and size ratio (w, h)
        self._box_map = np.array([0.0, 0.1, 1.15, 1.15])

    @property
    def tracking(self) -> bool:
        return self._last is not None

    def mark_lost(self) -> None:
        """Forget the track: the next update runs the detector."""
        self._last = None

    def update(self, image: np.ndarray, force_detect: bool = False) -> BoxObservation | None:
        if self._last is not None and not force_detect and self._since_detection < self.redetect_every:
            face = self._track(image)
            if face is not None:
                self._since_detection += 1
                self._last = face
                return BoxObservation(face, False, self._n_faces)
        return self._detect(image)

    def _detect(self, image: np.ndarray) -> BoxObservation | None:
        faces = self.detector.detect(image)
        self._since_detection = 1
        self._n_faces = len(faces)
        if not faces:
            self._last = None
            return None
        face = faces[0]                          # largest first
        if self._last is not None and len(faces) > 1:
            prev = landmark_box(self._last.landmarks)
            overlaps = [iou(prev, f.box) for f in faces]
            if max(overlaps) > 0.3:              # keep following the same person
                face = faces[int(np.argmax(overlaps))]
        self._learn_box_map(face)
        self._last = face
        return BoxObservation(face, True, len(faces))

    def _learn_box_map(self, face: Face) -> None:
        lb = landmark_box(face.landmarks)
        lw, lh = max(lb[2] - lb[0], 1.0), max(lb[3] - lb[1], 1.0)
        b = face.box
        measured = np.array([((b[0] + b[2]) - (lb[0] + lb[2])) / 2 / lw, ((b[1] + b[3]) - (lb[1] + lb[3])) / 2 / lh,
                             (b[2] - b[0]) / lw, (b[3] - b[1]) / lh])
        if np.all(np.isfinite(measured)) and 0.5 < measured[2] < 3.0 and 0.5 < measured[3] < 3.0:
            self._box_map = 0.5 * self._box_map + 0.5 * measured

    def _track(self, image: np.ndarray) -> Face | None:
        h, w = image.shape[:2]
        lb = landmark_box(self._last.landmarks)
        lw, lh = lb[2] - lb[0], lb[3] - lb[1]
        if lw < self.min_face_px or lh < self.min_face_px:
            return None
        cx = (lb[0] + lb[2]) / 2 + self._box_map[0] * lw
        cy = (lb[1] + lb[3]) / 2 + self._box_map[1] * lh
        bw, bh = self._box_map[2] * lw, self._box_map[3] * lh
        box = np.array([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
        visible = (min(box[2], w) - max(box[0], 0)) * (min(box[3], h) - max(box[1], 0))
        if min(box[2], w) <= max(box[0], 0) or visible < 0.5 * bw * bh:
            return None                          # the face left the frame
        return self.detector.landmarks(image, box, self._last.confidence)
