"""Landmark backends, the box tracker and the tracker's handling of bad frames (offline dlib backend)."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from engine.errors import InputError
from fastavatar_stream.frames import NO_FACE, SEVERAL_FACES
from fastavatar_stream.tracking.box_tracker import BoxTracker
from fastavatar_stream.tracking.backends import make_detector
from fastavatar_stream.tracking.detectors import FAN_FILE, DlibDetector, FaceAlignmentDetector, shape_predictor_path
from fastavatar_stream.tracking.flame_fit import FitConfig
from fastavatar_stream.tracking.landmark_model import LandmarkModel
from fastavatar_stream.tracking.tracker import FaceTracker, TrackerConfig


@pytest.fixture(scope="module")
def clip_frames(real_clip) -> list[np.ndarray]:
    import av

    with av.open(str(real_clip)) as c:
        return [f.to_ndarray(format="rgb24") for _, f in zip(range(30), c.decode(video=0))]


@pytest.fixture(scope="module")
def dlib_detector() -> DlibDetector:
    return DlibDetector()


class CountingDetector:
    """Wraps a detector and counts full detections."""

    def __init__(self, inner):
        self.inner, self.name, self.calls = inner, inner.name, 0

    def detect(self, image):
        self.calls += 1
        return self.inner.detect(image)

    def landmarks(self, image, box, confidence=1.0):
        return self.inner.landmarks(image, box, confidence)


def test_shape_predictor_ships_in_the_registry_package():
    path = shape_predictor_path()
    assert path.is_file() and path.stat().st_size > 50e6


def test_dlib_finds_the_face_with_ibug_landmarks(dlib_detector, clip_frames):
    faces = dlib_detector.detect(clip_frames[0])
    assert len(faces) == 1
    face = faces[0]
    x0, y0, x1, y1 = face.box
    assert face.landmarks.shape == (68, 2) and 0.5 < face.confidence <= 1.0
    inside = (face.landmarks[:, 0] > x0 - 20) & (face.landmarks[:, 0] < x1 + 20) & (face.landmarks[:, 1] > y0 - 20)
    assert inside.all()
    lm = face.landmarks
    assert lm[36, 0] < lm[45, 0] and lm[27, 1] < lm[33, 1] < lm[51, 1] < lm[8, 1]   # iBUG order: eyes, nose, mouth, chin


def test_detection_is_downscaled_for_huge_frames(dlib_detector, clip_frames):
    big = np.repeat(np.repeat(clip_frames[0], 4, axis=0), 4, axis=1)               # 2048 x 2048
    face = dlib_detector.detect(big)[0]
    small = dlib_detector.detect(clip_frames[0])[0]
    assert np.median(np.linalg.norm(face.landmarks / 4 - small.landmarks, axis=1)) < 3.0


def test_box_tracker_detects_every_k_frames_and_follows_the_landmarks(dlib_detector, clip_frames):
    counting = CountingDetector(dlib_detector)
    boxes = BoxTracker(counting, redetect_every=10)
    errors = []
    for image in clip_frames:
        tracked = boxes.update(image).face.landmarks
        reference = dlib_detector.detect(image)[0].landmarks
        errors.append(np.median(np.linalg.norm(tracked - reference, axis=1)))
    assert counting.calls == 3
    assert np.median(errors) < 2.0 and max(errors) < 5.0


def test_auto_picks_mediapipe_when_it_imports():
    detector = make_detector("auto")
    assert detector.name == "mediapipe"
    detector.close()


def test_auto_picks_dlib_without_mediapipe_and_face_alignment_weights(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "mediapipe", None)                          # `import mediapipe` fails
    with caplog.at_level("INFO"):
        detector = make_detector("auto")
    assert detector.name == "dlib" and "dlib" in caplog.text and "mediapipe" in caplog.text


def test_face_alignment_names_the_missing_weight_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(InputError) as err:
        FaceAlignmentDetector()
    assert FAN_FILE in str(err.value) and str(tmp_path / "hub" / "checkpoints") in str(err.value)
    assert not (tmp_path / "hub" / "checkpoints" / FAN_FILE).exists()            # nothing was fetched
    with pytest.raises(InputError):
        make_detector("no-such-backend")


@pytest.fixture(scope="module")
def synthetic_tracker(dlib_detector) -> FaceTracker:
    model = LandmarkModel.synthetic(10, 10)
    return FaceTracker(model, TrackerConfig(fit=FitConfig(n_shape=10, n_expression=10)), detector=dlib_detector)


@pytest.fixture(scope="module")
def mediapipe_tracker() -> FaceTracker:
    model = LandmarkModel.synthetic(10, 10)
    return FaceTracker(model, TrackerConfig(detector="mediapipe", fit=FitConfig(n_shape=10, n_expression=10)))


@pytest.mark.parametrize("name,image", [
    ("empty", np.zeros((0, 0, 3), np.uint8)),
    ("1x1", np.zeros((1, 1, 3), np.uint8)),
    ("grey", np.full((480, 640, 3), 128, np.uint8)),
    ("noise", np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)),
    ("8000x8000", np.zeros((8000, 8000, 3), np.uint8)),
    ("grey single channel", np.full((64, 64), 10, np.uint8)),
])
@pytest.mark.parametrize("backend", ["synthetic_tracker", "mediapipe_tracker"])
def test_bad_frames_are_flagged_not_crashes(request, backend, name, image):
    frame = request.getfixturevalue(backend).track(image, 0.0, 0)
    assert NO_FACE in frame.flags and not frame.usable and frame.flame is None and frame.matte is None


def test_non_images_are_clear_errors(synthetic_tracker):
    for bad in (None, np.zeros((4, 4, 3, 2), np.uint8), np.zeros((10, 10, 7), np.uint8)):
        with pytest.raises(InputError):
            synthetic_tracker.track(bad, 0.0, 0)


def test_several_faces_pick_the_largest_and_flag(dlib_detector, clip_frames):
    face = clip_frames[0]
    small = face[::2, ::2]
    canvas = np.full((512, 768, 3), 255, np.uint8)
    canvas[:, :512] = face
    canvas[128:384, 512:768] = small
    tracker = FaceTracker(LandmarkModel.synthetic(10, 10), TrackerConfig(fit=FitConfig(n_shape=10, n_expression=10)),
                          detector=dlib_detector)
    frame = tracker.track(canvas, 0.0, 0)
    assert SEVERAL_FACES in frame.flags
    assert frame.box[2] <= 520                      # the big face on the left
