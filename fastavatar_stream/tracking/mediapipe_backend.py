"""The MediaPipe landmark backend: BlazeFace detection, the 478-point face mesh (irises included) and a
head-and-shoulders matte, all from the models inside the `mediapipe==0.10.14` wheel (legacy `mp.solutions`).

The face mesh runs in tracking mode: MediaPipe follows the face from its own previous mesh, so the box the
box tracker predicts is not needed by it; the detector runs at the box tracker's re-detections to count the
faces and score the one the mesh follows. The 68 iBUG landmarks come from the mesh (`mesh_landmarks`).
"""
from __future__ import annotations

import warnings

import numpy as np

from engine.errors import InputError
from fastavatar_stream.tracking.detectors import Face, iou, landmark_box
from fastavatar_stream.tracking.mesh_landmarks import MESH_POINTS, ibug_from_mesh

MEDIAPIPE_VERSION = "0.10.14"


def import_mediapipe():
    """The mediapipe module, or InputError naming the fallback when it is missing or cannot load."""
    warnings.filterwarnings("ignore", message="SymbolDatabase.GetPrototype")   # protobuf 4 vs mediapipe's calls
    try:
        import mediapipe as mp

        mp.solutions.face_mesh.FaceMesh                               # noqa: B018 - the legacy API must be there
    except Exception as err:  # noqa: BLE001 - any failure to load is the same for the user
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"the mediapipe landmark backend cannot load ({detail}); install "
                         f"mediapipe=={MEDIAPIPE_VERSION} or use --landmarks dlib") from None
    return mp


class MediaPipeDetector:
    """Face detection, face mesh and matte for one stream (the mesh keeps per-stream tracking state).

    static_mesh: run the face mesh on every frame from a fresh detection instead of from the previous mesh
    (slower; no feedback from one frame's mesh into the next one's crop, so closer to mirror-equivariant).

    Face.mesh is (478, 3): x, y in pixels, z as MediaPipe gives it (relative depth, about the scale of x
    in image-width units, smaller is nearer). confidence: BlazeFace's score at the last detection."""

    name = "mediapipe"
    mesh_points = MESH_POINTS

    def __init__(self, min_detection_confidence: float = 0.5, min_tracking_confidence: float = 0.5,
                 static_mesh: bool = False):
        mp = import_mediapipe()
        self._detector = mp.solutions.face_detection.FaceDetection(
            model_selection=0, min_detection_confidence=min_detection_confidence)
        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=static_mesh, max_num_faces=1, refine_landmarks=True,
            min_detection_confidence=min_detection_confidence, min_tracking_confidence=min_tracking_confidence)
        # the landscape model (144 x 256 input): cheaper than the general one (../shared/ENVIRONMENT.md measures
        # both), and the matte only needs the person around one face
        self._segmenter = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=1)
        self._solutions = (self._detector, self._mesh, self._segmenter)

    def detect(self, image: np.ndarray) -> list[Face]:
        """The face the mesh follows first (with the detection box that matches it), then any other detected
        faces (no landmarks). Empty when the mesh finds no face."""
        h, w = image.shape[:2]
        boxes, scores = self._detections(image)
        mesh = self.mesh(image)
        if mesh is None:
            return []
        mesh_box = landmark_box(mesh[:, :2])
        overlaps = [iou(mesh_box, b) for b in boxes]
        match = int(np.argmax(overlaps)) if overlaps and max(overlaps) > 0.3 else -1
        confidence = scores[match] if match >= 0 else 0.5
        box = boxes[match] if match >= 0 else mesh_box
        faces = [self._face(mesh, box, confidence)]
        for k, (b, s) in enumerate(zip(boxes, scores)):
            if k != match:
                faces.append(Face(b, np.zeros((68, 2)), s, np.zeros(68)))
        return faces

    def landmarks(self, image: np.ndarray, box: np.ndarray, confidence: float = 1.0) -> Face:
        mesh = self.mesh(image)
        if mesh is None:
            return Face(np.asarray(box, float), np.zeros((68, 2)), 0.0, np.zeros(68))
        return self._face(mesh, np.asarray(box, float), confidence)

    def mesh(self, image: np.ndarray) -> np.ndarray | None:
        """(478, 3) mesh of the tracked face, or None."""
        result = self._mesh.process(np.ascontiguousarray(image[:, :, :3]))
        if not result.multi_face_landmarks:
            return None
        h, w = image.shape[:2]
        pts = np.array([(p.x, p.y, p.z) for p in result.multi_face_landmarks[0].landmark], dtype=np.float64)
        return pts * np.array([w, h, 1.0])

    def matte(self, image: np.ndarray, face_box: np.ndarray) -> np.ndarray:
        """(H, W) float32 in [0, 1]: the person segmentation kept only around the head and shoulders of the face
        in `face_box` (x0, y0, x1, y1 of its landmarks)."""
        mask = self._segmenter.process(np.ascontiguousarray(image[:, :, :3])).segmentation_mask
        return np.clip(mask, 0.0, 1.0).astype(np.float32) * head_and_shoulders(image.shape[:2], face_box)

    def close(self) -> None:
        """Stop MediaPipe's graphs (their threads and models); the detector is unusable afterwards."""
        for solution in self._solutions:
            solution.close()
        self._solutions = ()

    def _detections(self, image: np.ndarray) -> tuple[list[np.ndarray], list[float]]:
        h, w = image.shape[:2]
        result = self._detector.process(np.ascontiguousarray(image[:, :, :3]))
        boxes, scores = [], []
        for d in result.detections or []:
            r = d.location_data.relative_bounding_box
            boxes.append(np.array([r.xmin * w, r.ymin * h, (r.xmin + r.width) * w, (r.ymin + r.height) * h]))
            scores.append(float(d.score[0]))
        return boxes, scores

    @staticmethod
    def _face(mesh: np.ndarray, box: np.ndarray, confidence: float) -> Face:
        return Face(np.asarray(box, float), ibug_from_mesh(mesh[:, :2]), float(confidence),
                    np.full(68, float(confidence)), mesh=mesh)


def head_and_shoulders(size: tuple[int, int], face_box: np.ndarray) -> np.ndarray:
    """(H, W) float32 weight: 1 over the region a head and its shoulders take around a face, 0 far from it.

    The region spans 1.6 face widths each side of the face centre, 0.8 face heights above its top (hair)
    and 1.2 below its bottom (neck, shoulders), with soft edges a tenth of a face width wide."""
    h, w = size
    x0, y0, x1, y1 = (float(v) for v in face_box)
    fw, fh = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    cx = 0.5 * (x0 + x1)
    ramp = 0.1 * fw
    xs = np.arange(w, dtype=np.float32) + 0.5
    ys = np.arange(h, dtype=np.float32) + 0.5
    wx = np.clip((1.6 * fw - np.abs(xs - cx)) / ramp, 0.0, 1.0)
    wy = np.clip(np.minimum(ys - (y0 - 0.8 * fh), (y1 + 1.2 * fh) - ys) / ramp, 0.0, 1.0)
    return (wy[:, None] * wx[None, :]).astype(np.float32)
