"""Per-session face tracker: frame -> TrackedFrame (box, 68 landmarks, face mesh and matte where the backend
gives them, FLAME fit, quality flags).

With a mesh backend (MediaPipe) and a head that has a MediaPipe embedding, FLAME is fitted to the embedded
mesh vertices (the dense fit); otherwise to the 68 landmarks. Eye poses come from the irises where there is a
mesh (zero otherwise).

Monocular: a fixed camera (intrinsics from `fov_degrees` across the larger image side, or the user's K)
at the world origin with world-to-camera diag(1, -1, -1) (see flame_fit); the head moves.
Identity β is re-solved jointly over the usable frames gathered so far when their count reaches
2, 4, 8 and `identity_frames`, then held until `reestimate_identity()`; frames before that carry the
provisional β (`identity_refits()` gives those frames' poses again under the final β).
"""
from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from engine.errors import InputError
from fastavatar_stream.frames import (EXTREME_POSE, FIT_FAILED, LOW_CONFIDENCE, NO_FACE, SEVERAL_FACES, UNUSABLE,
                                      FlameFit, TrackedFrame)
from fastavatar_stream.tracking.box_tracker import BoxTracker
from fastavatar_stream.tracking.backends import make_detector
from fastavatar_stream.tracking.detectors import LandmarkDetector, landmark_box
from fastavatar_stream.tracking.flame_fit import (FitConfig, FitResult, HeadPose, LandmarkFitter, PinholeCamera, View,
                                                  intrinsics_from_larger_side_fov)
from fastavatar_stream.tracking.landmark_model import LandmarkModel
from fastavatar_stream.tracking.mesh_landmarks import eye_poses_from_mesh
from fastavatar_stream.tracking.rotations import rotation_matrix

log = logging.getLogger(__name__)

MIN_SIDE = 16                  # frames smaller than this cannot hold a face
MAX_SIDE = 16384               # larger frames are refused (memory), not silently processed


@dataclass
class TrackerConfig:
    """detector: the landmark backend, auto | mediapipe | dlib | face-alignment; redetect_every: run the detector every K frames (and when lost);
    fov_degrees: default horizontal-or-larger-side field of view when K is not given (40 deg: a webcam at arm's
    length); identity_frames: usable frames over which β is solved before it is held;
    min_confidence: below it a frame is LOW_CONFIDENCE; max_yaw/max_pitch (deg): beyond, EXTREME_POSE;
    max_fit_error: rms landmark error / face size above which the fit failed; lost_fit_error: above it on a
    tracked (not detected) frame the track is dropped and the frame re-detected; matte: compute a matte on
    every frame with a face (backends that have one); mesh_tracking: MediaPipe's face mesh follows the face from
    its previous mesh (False: from a fresh detection every frame)."""

    detector: str = "auto"
    redetect_every: int = 10
    fov_degrees: float = 40.0
    K: np.ndarray | None = None
    identity_frames: int = 12
    min_confidence: float = 0.35
    max_yaw_degrees: float = 60.0
    max_pitch_degrees: float = 50.0
    max_fit_error: float = 0.05
    lost_fit_error: float = 0.03
    detect_max_side: int = 640
    matte: bool = True
    mesh_tracking: bool = True
    fit: FitConfig = field(default_factory=FitConfig)


def as_rgb_frame(image) -> np.ndarray | None:
    """Validate a frame: (H, W, 3) uint8 RGB out; grey (H, W) and RGBA are converted; None for frames too small
    to hold a face (empty, 1x1). Raises InputError for things that are not images or are too large."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"a frame must be a numpy array (H, W, 3) uint8, got {type(image).__name__}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise InputError(f"a frame must be (H, W, 3) RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        if image.size and np.issubdtype(image.dtype, np.floating) and float(np.nanmax(image)) <= 1.0:
            image = np.nan_to_num(image) * 255.0
        image = np.clip(np.nan_to_num(image), 0, 255).astype(np.uint8)
    if image.shape[0] > MAX_SIDE or image.shape[1] > MAX_SIDE:
        raise InputError(f"frame of {image.shape[1]}x{image.shape[0]} pixels is larger than {MAX_SIDE} on a side")
    if image.shape[0] < MIN_SIDE or image.shape[1] < MIN_SIDE:
        return None
    return image[:, :, :3]


def head_angles(rotation_cam: np.ndarray) -> tuple[float, float]:
    """(yaw, pitch) degrees of a head rotation in camera axes (0, 0 = facing the camera)."""
    f = rotation_matrix(rotation_cam) @ np.array([0.0, 0.0, -1.0])       # where the face points, camera axes
    yaw = math.degrees(math.atan2(-f[0], -f[2]))
    pitch = math.degrees(math.asin(max(-1.0, min(1.0, f[1]))))
    return yaw, pitch


class FaceTracker:
    """One stream's tracker. `track(image, pts, index)` -> TrackedFrame; never raises for a bad frame's content
    (it flags it), only for frames that are not images (InputError)."""

    def __init__(self, model: LandmarkModel | None = None, config: TrackerConfig | None = None,
                 detector: LandmarkDetector | None = None, mesh_model: LandmarkModel | None = None):
        """model: the 68-point model; mesh_model: the head's MediaPipe-embedding model, fitted instead when the
        backend gives a mesh (both from the embedded head when model is None)."""
        self.config = config or TrackerConfig()
        if model is None:
            import engine

            head = engine.load_head()
            model, mesh_model = LandmarkModel.from_head(head), LandmarkModel.mesh_from_head(head)
        self.detector = detector or make_detector(self.config.detector, detect_max_side=self.config.detect_max_side,
                                                  static_mesh=not self.config.mesh_tracking)
        dense = getattr(self.detector, "mesh_points", 0) and mesh_model is not None
        self.model = mesh_model if dense else model
        self.fitter = LandmarkFitter(self.model, self.config.fit)
        self.boxes = BoxTracker(self.detector, self.config.redetect_every)
        self.shape = np.zeros(model.n_shape)
        self.counts: Counter = Counter()
        self._previous: HeadPose | None = None
        self._identity: list[tuple[int, list[View], HeadPose]] = []
        self._identity_done = False
        self._identity_refits: dict[int, HeadPose] = {}
        self._camera: PinholeCamera | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ API
    def camera_for(self, width: int, height: int) -> PinholeCamera:
        K = self.config.K if self.config.K is not None else intrinsics_from_larger_side_fov(self.config.fov_degrees, width, height)
        if self._camera is None or self.config.K is None and not np.allclose(self._camera.K, K):
            self._camera = PinholeCamera(np.asarray(K, dtype=np.float64))
        return self._camera

    def reestimate_identity(self) -> None:
        """Solve β again over the next `identity_frames` usable frames."""
        self._identity, self._identity_done, self._identity_refits = [], False, {}

    def identity_refits(self) -> dict[int, HeadPose]:
        """Frame index -> pose re-solved jointly with the held β (the frames that carried a provisional β)."""
        return dict(self._identity_refits)

    def fit_points(self, face) -> np.ndarray | None:
        """(N, 2) the observed points the FLAME fit matches: the embedded mesh vertices for the dense fit, else
        the 68 landmarks; None when the dense fit has no mesh for this face. `face`: a Face or TrackedFrame."""
        if self.model.mesh_indices is None:
            return np.asarray(face.landmarks[:, :2], dtype=np.float64)
        if face.mesh is None:
            return None
        return np.asarray(face.mesh[self.model.mesh_indices, :2], dtype=np.float64)

    def close(self) -> None:
        """Release the backend's resources (MediaPipe's graphs and threads); waits for a track() in flight."""
        with self._lock:
            if hasattr(self.detector, "close"):
                self.detector.close()

    def track(self, image, pts: float, index: int, t_capture: float = 0.0) -> TrackedFrame:
        with self._lock:
            return self._track(image, pts, index, t_capture)

    def _track(self, image, pts: float, index: int, t_capture: float) -> TrackedFrame:
        frame = as_rgb_frame(image)
        if frame is None:
            self.counts[NO_FACE] += 1
            empty = np.zeros((0, 0, 3), np.uint8) if image.size == 0 else np.asarray(image)
            return self._frame(empty, pts, index, t_capture, None, np.zeros((68, 3)), np.zeros(4),
                               frozenset({NO_FACE}), np.eye(3))
        h, w = frame.shape[:2]
        camera = self.camera_for(w, h)
        obs = self.boxes.update(frame)
        if obs is None:
            self._previous = None
            self.counts[NO_FACE] += 1
            return self._frame(frame, pts, index, t_capture, None, np.zeros((68, 3)), np.zeros(4),
                               frozenset({NO_FACE}), camera.K)
        result = self._fit(camera, obs.face)
        if not obs.detected and (result is None or result.rms_rel > self.config.lost_fit_error):
            self.boxes.mark_lost()                                   # drifted: detect again on this frame
            self._previous = None
            obs = self.boxes.update(frame)
            if obs is None:
                self.counts[NO_FACE] += 1
                return self._frame(frame, pts, index, t_capture, None, np.zeros((68, 3)), np.zeros(4),
                                   frozenset({NO_FACE}), camera.K)
            result = self._fit(camera, obs.face)
        face = obs.face
        matte = self._matte(frame, face)
        flags = set()
        if obs.n_faces > 1:
            flags.add(SEVERAL_FACES)
        if face.confidence < self.config.min_confidence:
            flags.add(LOW_CONFIDENCE)
        landmarks = np.concatenate([face.landmarks, face.point_confidence[:, None]], axis=1)
        if result is None or not np.isfinite(result.rms_rel) or result.rms_rel > self.config.max_fit_error:
            flags.add(FIT_FAILED)
            self._previous = None
            self.boxes.mark_lost()
            self.counts[FIT_FAILED] += 1
            return self._frame(frame, pts, index, t_capture, None, landmarks, face.box, frozenset(flags), camera.K,
                               face.mesh, matte)
        rotation_cam, _ = result.pose.in_camera(self.model, self.shape, camera)
        yaw, pitch = head_angles(rotation_cam)
        if abs(yaw) > self.config.max_yaw_degrees or abs(pitch) > self.config.max_pitch_degrees:
            flags.add(EXTREME_POSE)
        self._previous = result.pose
        if not (flags & UNUSABLE):
            self._collect_identity(index, [self._view(camera, face)], result.pose)
        for f in flags:
            self.counts[f] += 1
        self.counts["usable" if not flags & UNUSABLE else "unusable"] += 1
        eyes = eye_poses_from_mesh(face.mesh) if face.mesh is not None else np.zeros(6)
        return self._frame(frame, pts, index, t_capture, self._flame(result.pose, eyes), landmarks, face.box,
                           frozenset(flags), camera.K, face.mesh, matte)

    # ------------------------------------------------------------------------------------------ internals
    def _view(self, camera: PinholeCamera, face) -> View:
        weights = face.point_confidence if self.model.mesh_indices is None else None
        return View(camera, self.fit_points(face), weights)

    def _fit(self, camera: PinholeCamera, face) -> FitResult | None:
        points = self.fit_points(face)
        if points is None or not np.all(np.isfinite(points)) or np.ptp(points, axis=0).min() < 4:
            return None
        return self.fitter.fit_frame([self._view(camera, face)], self.shape, previous=self._previous)

    def _matte(self, frame: np.ndarray, face) -> np.ndarray | None:
        if not self.config.matte or not hasattr(self.detector, "matte"):
            return None
        outline = face.mesh[:, :2] if face.mesh is not None else face.landmarks
        if not np.all(np.isfinite(outline)) or np.ptp(outline, axis=0).min() < 4:
            return None
        return self.detector.matte(frame, landmark_box(outline))

    def _collect_identity(self, index: int, views: list[View], pose: HeadPose) -> None:
        if self._identity_done:
            return
        self._identity.append((index, views, pose))
        n = len(self._identity)
        if n in (2, 4, 8) or n >= self.config.identity_frames:
            shape, results = self.fitter.fit_identity([v for _, v, _ in self._identity], self.shape,
                                                      [p for _, _, p in self._identity])
            self.shape = shape
            self._identity_refits = {i: r.pose for (i, _, _), r in zip(self._identity, results)}
            self._previous = results[-1].pose
            if n >= self.config.identity_frames:
                self._identity_done = True
                log.debug("identity held after %d frames", n)

    def _flame(self, pose: HeadPose, eyes: np.ndarray) -> FlameFit:
        e = np.zeros(self.model.n_expression, np.float32)
        e[:len(pose.expression)] = pose.expression
        return FlameFit(shape=self.shape.astype(np.float32), expression=e, rotation=pose.rotation.astype(np.float32),
                        neck=np.zeros(3, np.float32), jaw=pose.jaw.astype(np.float32), eyes=eyes.astype(np.float32),
                        translation=pose.translation.astype(np.float32))

    def _frame(self, image, pts, index, t_capture, flame, landmarks, box, flags, K, mesh=None,
               matte=None) -> TrackedFrame:
        viewmat = self._camera.viewmat if self._camera is not None else PinholeCamera(np.eye(3)).viewmat
        return TrackedFrame(image=image, pts=float(pts), index=int(index), K=np.asarray(K, np.float32),
                            viewmat=viewmat.astype(np.float32), flame=flame, landmarks=landmarks.astype(np.float32),
                            box=np.asarray(box, np.float32), flags=flags, t_capture=t_capture,
                            mesh=None if mesh is None else mesh.astype(np.float32), matte=matte)
