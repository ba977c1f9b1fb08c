"""Online face tracking: detection + landmarks (MediaPipe's face mesh or 68 points), a matte, box tracking, and a
per-frame FLAME fit to the landmarks.

    tracker = FaceTracker()                      # embedded head, auto-picked landmark backend
    tracked = tracker.track(image, pts, index)   # -> fastavatar_stream.frames.TrackedFrame
"""
from fastavatar_stream.tracking.box_tracker import BoxObservation, BoxTracker
from fastavatar_stream.tracking.backends import make_detector
from fastavatar_stream.tracking.detectors import DlibDetector, Face, FaceAlignmentDetector, LandmarkDetector
from fastavatar_stream.tracking.mediapipe_backend import MediaPipeDetector
from fastavatar_stream.tracking.flame_fit import (FitConfig, FitResult, HeadPose, LandmarkFitter, PinholeCamera, View,
                                                  intrinsics_from_larger_side_fov)
from fastavatar_stream.tracking.landmark_model import LandmarkModel
from fastavatar_stream.tracking.tracker import FaceTracker, TrackerConfig, as_rgb_frame, head_angles

__all__ = ["BoxObservation", "BoxTracker", "DlibDetector", "Face", "FaceAlignmentDetector", "FaceTracker", "FitConfig",
           "FitResult", "HeadPose", "LandmarkDetector", "LandmarkFitter", "LandmarkModel", "MediaPipeDetector", "PinholeCamera",
           "TrackerConfig", "View", "as_rgb_frame", "head_angles", "intrinsics_from_larger_side_fov", "make_detector"]
