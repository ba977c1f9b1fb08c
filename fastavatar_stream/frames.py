"""Data that travels through the daemon: tracked frames and windows (numpy; the engine converts to torch)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Quality flags a tracker may set on a frame. Frames with any UNUSABLE flag never reach a window.
NO_FACE = "no_face"
SEVERAL_FACES = "several_faces"      # the largest face was picked
LOW_CONFIDENCE = "low_confidence"
EXTREME_POSE = "extreme_pose"
FIT_FAILED = "fit_failed"
UNUSABLE = frozenset({NO_FACE, LOW_CONFIDENCE, EXTREME_POSE, FIT_FAILED})


@dataclass
class FlameFit:
    """Per-frame FLAME parameters (numpy float32). Axis-angle in FLAME world axes unless stated.

    shape (S,), expression (E,), rotation (3,), neck (3,), jaw (3,), eyes (6,), translation (3,) metres.
    """

    shape: np.ndarray
    expression: np.ndarray
    rotation: np.ndarray
    neck: np.ndarray
    jaw: np.ndarray
    eyes: np.ndarray
    translation: np.ndarray


@dataclass
class TrackedFrame:
    """One frame after tracking.

    image:      (H, W, 3) uint8 RGB, the full source frame
    pts:        presentation time in seconds; t_capture: wall-clock time (time.time()) when it was read
    index:      frame number within the stream; camera_id: which camera of a multi-view capture
    K:          (3, 3) intrinsics in pixels; viewmat: (4, 4) world-to-camera, OpenCV axes
    flame:      FLAME fit, or None when tracking failed
    landmarks:  (68, 3) x, y in pixels and confidence; box: (4,) x0, y0, x1, y1 pixels
    flags:      quality flags (see UNUSABLE)
    mesh:       (478, 3) float32 MediaPipe face mesh (x, y pixels, z as MediaPipe gives it), None from
                backends without a mesh
    matte:      (H, W) float32 in [0, 1], the person (head, hair, neck, shoulders) around the tracked face
                against 0 for everything else; None from backends without one or without a face
    """

    image: np.ndarray
    pts: float
    index: int
    K: np.ndarray
    viewmat: np.ndarray
    flame: FlameFit | None
    landmarks: np.ndarray
    box: np.ndarray
    flags: frozenset = field(default_factory=frozenset)
    camera_id: int = 0
    t_capture: float = 0.0
    mesh: np.ndarray | None = None
    matte: np.ndarray | None = None

    @property
    def usable(self) -> bool:
        return self.flame is not None and not (self.flags & UNUSABLE)


@dataclass
class Window:
    """Up to 16 sparse frames for one LGRT pass plus a FramePack pool of other frames.

    overlap: indices into `frames` of frames shared with the previous window.
    coverage_gain: fraction of its new frames whose head pose no earlier window covered.
    """

    session: str
    index: int
    frames: list[TrackedFrame]
    overlap: list[int] = field(default_factory=list)
    pool: list[TrackedFrame] = field(default_factory=list)
    stride: int = 0
    coverage_gain: float = 1.0
