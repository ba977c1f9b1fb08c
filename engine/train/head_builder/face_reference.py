"""MediaPipe's canonical face mesh (Apache-2.0, shipped next to this file) placed in FLAME's axes.

The mesh is a measured mean adult face in centimetres, y up, looking along +z, with the subject's
right side at -x (its right eye outer corner, vertex 33, has x < 0). We symmetrise it, convert to
metres and move it so that the head's centre sits near the origin.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

OBJ_PATH = Path(__file__).with_name("canonical_face_model.obj")

# Where MediaPipe's (cm) frame sits in ours: world = 0.01 * (mediapipe - ORIGIN_CM).
ORIGIN_CM = np.array([0.0, 1.5, -3.0])

# Face-mesh vertex ids used as anatomical anchors (MediaPipe Face Mesh numbering).
FACE_OVAL = [10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152,
             148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109]
RIGHT_EYE_LOOP = [33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246]
LEFT_EYE_LOOP = [263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466]
UPPER_INNER_LIP = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308]
LOWER_INNER_LIP = [78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308]


@dataclass
class FaceReference:
    vertices: np.ndarray  # (468,3) metres, FLAME axes, mirror-symmetric
    faces: np.ndarray  # (898,3)

    def __getitem__(self, idx) -> np.ndarray:
        return self.vertices[idx]


def _read_obj(path: Path) -> tuple[np.ndarray, np.ndarray]:
    verts, faces = [], []
    for line in path.read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "v":
            verts.append([float(x) for x in parts[1:4]])
        elif parts[0] == "f":
            faces.append([int(x.split("/")[0]) - 1 for x in parts[1:4]])
    return np.array(verts), np.array(faces, dtype=np.int64)


def load_face_reference(path: Path = OBJ_PATH) -> FaceReference:
    verts, faces = _read_obj(path)
    mirrored = verts * np.array([-1.0, 1.0, 1.0])
    # Each vertex's mirror partner is the vertex nearest to its reflection.
    d = np.linalg.norm(verts[:, None, :] - mirrored[None, :, :], axis=2)
    partner = np.argmin(d, axis=0)
    sym = 0.5 * (verts + mirrored[partner])
    sym[np.abs(verts[:, 0]) < 1e-6, 0] = 0.0
    return FaceReference(vertices=0.01 * (sym - ORIGIN_CM), faces=faces)
