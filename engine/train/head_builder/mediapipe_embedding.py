"""The default head's MediaPipe face-mesh landmark embedding (the dense correspondence the tracker fits).

Our head is built around MediaPipe's canonical face, so the correspondence exists by construction: each
embedded mesh vertex is the canonical vertex itself, projected along a ray from the head's centre onto our
skin (the same projection as the 68 iBUG points). Inner-lip vertices go onto the lip line's upper or lower
copy so they separate when the jaw opens; the mouth corners are the lip line's end vertices.

The layout is the one FLAME users know from `mediapipe_landmark_embedding.npz`: `lmk_face_idx` (N,),
`lmk_b_coords` (N, 3) and `landmark_indices` (N,), the MediaPipe mesh vertex each row stands for.
"""
from __future__ import annotations

import numpy as np

from .face_reference import FaceReference
from .geometry import STAR_CENTRE, HeadGeometry
from .landmarks import _on_slit, _vertex_face
from .meshops import ray_mesh

# MediaPipe face-mesh vertex ids we embed, by region (subject's right side first, then left).
FACE_OVAL = [10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152,
             148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109]
EYES = [33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246,
        263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466]
BROWS = [70, 63, 105, 66, 107, 46, 53, 52, 65, 55, 300, 293, 334, 296, 336, 276, 283, 282, 295, 285]
NOSE = [168, 6, 197, 195, 5, 4, 1, 19, 94, 2, 98, 97, 326, 327, 64, 294, 129, 358, 49, 279]
OUTER_LIPS = [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146]
CHEEKS = [50, 280, 205, 425, 123, 352, 117, 346, 187, 411]
UPPER_INNER_LIPS = [191, 80, 81, 82, 13, 312, 311, 310, 415]
LOWER_INNER_LIPS = [95, 88, 178, 87, 14, 317, 402, 318, 324]
MOUTH_CORNERS = [78, 308]                       # inner lip corners: the lip line's end vertices (right, left)
ON_SKIN = FACE_OVAL + EYES + BROWS + NOSE + OUTER_LIPS + CHEEKS
EMBEDDED = ON_SKIN + UPPER_INNER_LIPS + LOWER_INNER_LIPS + MOUTH_CORNERS


def embed_mediapipe(face: FaceReference, geo: HeadGeometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """lmk_face_idx (N,) int64, lmk_b_coords (N, 3) on geo's faces and landmark_indices (N,) mesh vertex ids."""
    skin = np.nonzero(np.all(geo.part[geo.faces] == 0, axis=1))[0]
    dirs = face[ON_SKIN] - STAR_CENTRE
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    _, hit, bary = ray_mesh(STAR_CENTRE, dirs, geo.vertices, geo.faces[skin], farthest=True)
    if np.any(hit < 0):
        missed = [ON_SKIN[i] for i in np.nonzero(hit < 0)[0]]
        raise RuntimeError(f"mesh vertices {missed} miss the skin")
    face_idx, coords = list(skin[hit]), list(bary)
    for slit, ids in ((geo.upper_slit, UPPER_INNER_LIPS), (geo.lower_slit, LOWER_INNER_LIPS)):
        for mp_id in ids:
            fi, b = _on_slit(geo, slit, float(face[mp_id][0]), upper=slit is geo.upper_slit)
            face_idx.append(fi)
            coords.append(b)
    for end in (0, -1):
        fi, b = _vertex_face(geo, int(geo.upper_slit[end]))
        face_idx.append(fi)
        coords.append(b)
    return np.array(face_idx, np.int64), np.array(coords, np.float64), np.array(EMBEDDED, np.int64)
