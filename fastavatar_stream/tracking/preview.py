"""Draw the tracking result over a frame: the fitted mesh (wireframe edges or vertices), the tracker's face
mesh (yellow dots), the observed landmarks (green) and the fitted model's landmarks (red). Pillow only; a PyAV writer for preview videos."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fastavatar_stream.tracking.flame_fit import PinholeCamera


def mesh_edges(faces: np.ndarray) -> np.ndarray:
    """(F, 3) triangles -> (N, 2) unique undirected edges."""
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e = np.sort(e, axis=1)
    return np.unique(e, axis=0)


def draw_overlay(image: np.ndarray, landmarks: np.ndarray | None = None, model_landmarks: np.ndarray | None = None,
                 mesh_2d: np.ndarray | None = None, edges: np.ndarray | None = None,
                 face_mesh: np.ndarray | None = None, max_edges: int = 6000) -> np.ndarray:
    """(H, W, 3) uint8 copy of `image` with the overlay.

    landmarks: (68, 2) observed; model_landmarks: (68, 2) fitted, projected; mesh_2d: (V, 2) projected mesh
    vertices, drawn as edges when `edges` (N, 2) is given (subsampled to max_edges), else as dots;
    face_mesh: (478, 2) the tracker's face mesh (MediaPipe), drawn as dots.
    """
    canvas = Image.fromarray(np.ascontiguousarray(image[:, :, :3]))
    draw = ImageDraw.Draw(canvas)
    if mesh_2d is not None and len(mesh_2d):
        if edges is not None and len(edges):
            step = max(1, len(edges) // max_edges)
            for a, b in edges[::step]:
                draw.line([tuple(mesh_2d[a]), tuple(mesh_2d[b])], fill=(90, 160, 255), width=1)
        else:
            for x, y in mesh_2d[:: max(1, len(mesh_2d) // 4000)]:
                draw.point((float(x), float(y)), fill=(90, 160, 255))
    if face_mesh is not None:
        for x, y in face_mesh:
            draw.point((float(x), float(y)), fill=(255, 220, 0))
    radius = max(1.0, min(image.shape[:2]) / 256)
    for pts, colour in ((landmarks, (0, 230, 0)), (model_landmarks, (255, 40, 40))):
        if pts is None:
            continue
        for x, y in pts[:, :2]:
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    return np.asarray(canvas)


def project(points: np.ndarray, camera: PinholeCamera) -> np.ndarray:
    """(N, 3) world -> (N, 2) pixels (points behind the camera come out far off-screen)."""
    c = points @ camera.R.T + camera.t
    z = np.where(c[:, 2] > 1e-6, c[:, 2], 1e-6)
    return c[:, :2] / z[:, None] @ camera.K[:2, :2].T + camera.K[:2, 2]


class PreviewWriter:
    """Writes overlay frames to a video file with PyAV (H.264 when available, else MPEG-4)."""

    def __init__(self, path: str | Path, fps: float, width: int, height: int):
        import av
        from fractions import Fraction

        self._av = av
        self._container = av.open(str(path), mode="w")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self._stream = self._container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        self._stream.width, self._stream.height = width - width % 2, height - height % 2
        self._stream.pix_fmt = "yuv420p"

    def write(self, image: np.ndarray) -> None:
        h, w = self._stream.height, self._stream.width
        frame = np.zeros((h, w, 3), np.uint8)
        frame[: min(h, image.shape[0]), : min(w, image.shape[1])] = image[:h, :w, :3]
        for packet in self._stream.encode(self._av.VideoFrame.from_ndarray(frame, format="rgb24")):
            self._container.mux(packet)

    def close(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
