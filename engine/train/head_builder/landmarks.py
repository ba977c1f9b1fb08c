"""The default head's 68-point iBUG landmark embedding (faces + barycentric coordinates).

Convention: iBUG 300-W order as seen in a frontal image. Image-left is the subject's right side,
which in FLAME's axes (y up, face along +z) is -x. So landmark 0 (jawline start), 36 (right eye
outer corner) and 48 (right mouth corner) have x < 0; 16, 45 and 54 have x > 0.

Points come from anatomical vertices of MediaPipe's mean face (listed below), projected along rays
from the head's centre onto our skin. The jawline (0-16) is the frontal-view face contour: the
reference face's outline from just below eye level to the chin, pulled 12 mm forward so the points
lie on the visible cheek and jaw rather than on the silhouette behind it. The inner lip points
(60-67) lie exactly on the lip line: 61-63 on the upper lip's copy, 65-67 on the lower lip's copy,
so they separate when the jaw opens.
"""
from __future__ import annotations

import numpy as np

from .face_reference import FaceReference
from .geometry import STAR_CENTRE, HeadGeometry
from .meshops import ray_mesh

RIGHT_JAW_OVAL = [127, 234, 93, 132, 58, 172, 136, 150, 149, 176, 148, 152]
RIGHT_BROW = [(70, 46), (63, 53), (105, 52), (66, 65), (107, 55)]  # outer -> inner, upper/lower edge pairs
NOSE_BRIDGE = [168, 197, 5, 4]
NOSE_BOTTOM = [98, 97, 2, 326, 327]
RIGHT_EYE = [33, 160, 158, 133, 153, 144]
LEFT_EYE = [362, 385, 387, 263, 373, 380]
OUTER_LIPS = [61, 40, 37, 0, 267, 270, 291, 321, 314, 17, 84, 91]
INNER_UPPER = [82, 13, 312]  # landmarks 61, 62, 63
INNER_LOWER = [317, 14, 87]  # landmarks 65, 66, 67
JAW_START_Y = -0.006  # metres, just below the eye corners


def _jaw_points(face: FaceReference) -> np.ndarray:
    line = face[RIGHT_JAW_OVAL]
    # Cut the outline where it crosses JAW_START_Y, then resample 9 points by arc length down to the chin.
    k = int(np.nonzero(line[:, 1] < JAW_START_Y)[0][0])
    a, b = line[k - 1], line[k]
    start = a + (JAW_START_Y - a[1]) / (b[1] - a[1]) * (b - a)
    poly = np.concatenate([start[None], line[k:]])
    seg = np.linalg.norm(np.diff(poly, axis=0), axis=1)
    s = np.concatenate([[0], np.cumsum(seg)])
    targets = np.linspace(0, s[-1], 9)
    right = np.stack([np.interp(targets, s, poly[:, d]) for d in range(3)], 1)
    right[:, 2] += 0.012 * (1 - targets / s[-1])
    left = right[:-1][::-1] * np.array([-1, 1, 1])
    return np.concatenate([right, left])


def landmark_targets(face: FaceReference) -> np.ndarray:
    """(68,3) anatomical target points (before projection onto the skin)."""
    mirror = np.array([-1.0, 1.0, 1.0])
    brow_r = np.array([0.5 * (face[u] + face[lo]) for u, lo in RIGHT_BROW])
    pts = [_jaw_points(face), brow_r, brow_r[::-1] * mirror, face[NOSE_BRIDGE], face[NOSE_BOTTOM],
           face[RIGHT_EYE], face[LEFT_EYE], face[OUTER_LIPS]]
    inner = np.zeros((8, 3))
    pts.append(inner)
    out = np.concatenate(pts)
    assert out.shape == (68, 3)
    return out


def embed_landmarks(face: FaceReference, geo: HeadGeometry) -> tuple[np.ndarray, np.ndarray]:
    """lmk_face_idx (68,) int64 and lmk_b_coords (68,3) on geo's faces."""
    targets = landmark_targets(face)
    skin = np.nonzero(np.all(geo.part[geo.faces] == 0, axis=1))[0]
    dirs = targets[:60] - STAR_CENTRE
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    _, f, bary = ray_mesh(STAR_CENTRE, dirs, geo.vertices, geo.faces[skin], farthest=True)
    if np.any(f < 0):
        raise RuntimeError("a landmark ray missed the skin")
    face_idx = list(skin[f])
    bary = list(bary)
    # Inner lips: on the lip line itself, on the upper or lower copy.
    for slit, mp_ids, positions in ((geo.upper_slit, INNER_UPPER, (61, 62, 63)),
                                    (geo.lower_slit, INNER_LOWER, (65, 66, 67))):
        for mp, _pos in zip(mp_ids, positions):
            fi, b = _on_slit(geo, slit, float(face[mp][0]), upper=slit is geo.upper_slit)
            face_idx.append(fi)
            bary.append(b)
    # Corners 60 and 64 are the slit's end vertices (inserted in iBUG order).
    corner_r = _vertex_face(geo, int(geo.upper_slit[0]))
    corner_l = _vertex_face(geo, int(geo.upper_slit[-1]))
    face_idx = face_idx[:60] + [corner_r[0]] + face_idx[60:63] + [corner_l[0]] + face_idx[63:66]
    bary = bary[:60] + [corner_r[1]] + bary[60:63] + [corner_l[1]] + bary[63:66]
    return np.array(face_idx, dtype=np.int64), np.array(bary, dtype=np.float64)


def _vertex_face(geo: HeadGeometry, vid: int) -> tuple[int, np.ndarray]:
    fi = int(np.nonzero(np.any(geo.faces == vid, axis=1) & np.all(geo.part[geo.faces] == 0, axis=1))[0][0])
    b = (geo.faces[fi] == vid).astype(np.float64)
    return fi, b


def _on_slit(geo: HeadGeometry, slit: np.ndarray, x: float, *, upper: bool) -> tuple[int, np.ndarray]:
    xs = geo.vertices[slit, 0]
    k = int(np.clip(np.searchsorted(xs, x) - 1, 0, len(xs) - 2))
    t = float(np.clip((x - xs[k]) / (xs[k + 1] - xs[k]), 0, 1))
    a, b = int(slit[k]), int(slit[k + 1])
    has = np.any(geo.faces == a, axis=1) & np.any(geo.faces == b, axis=1) & np.all(geo.part[geo.faces] == 0, axis=1)
    for fi in np.nonzero(has)[0]:
        third = [v for v in geo.faces[fi] if v not in (a, b)][0]
        if (geo.vertices[third, 1] > geo.vertices[a, 1]) == upper:
            w = np.zeros(3)
            w[list(geo.faces[fi]).index(a)] = 1 - t
            w[list(geo.faces[fi]).index(b)] = t
            return int(fi), w
    raise RuntimeError("no skin face along the lip line")
