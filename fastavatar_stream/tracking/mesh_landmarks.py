"""What the tracker reads off MediaPipe's 478-point face mesh: the 68 iBUG landmarks (a fixed index map) and
the eye poses (from the irises).

Each iBUG point is a blend of two mesh vertices, (1 - w) * mesh[a] + w * mesh[b] (w = 0: mesh[a] itself).
The map follows the default head's own 68-point embedding (engine/train/head_builder/landmarks.py), so
the points mean the same on the mesh as on the head:

- 0-16 jaw line: the face oval from just below the eye corners (6 mm under them on MediaPipe's canonical
  face) to the chin (152), resampled at 9 equal arc-length steps per side; the blends below are those
  steps measured on the canonical face (right side 127 -> 234 -> 93 -> 132 -> 58 -> 172 -> 136 -> 150 ->
  149 -> 176 -> 148 -> 152, the left side its mirror);
- 17-26 brows: midpoints of the brow's upper and lower edge vertices, outer to inner;
- 27-30 nose bridge 168, 197, 5, 4; 31-35 nose bottom 98, 97, 2, 326, 327;
- 36-47 eyes: 33, 160, 158, 133, 153, 144 and 362, 385, 387, 263, 373, 380;
- 48-59 outer lips 61, 40, 37, 0, 267, 270, 291, 321, 314, 17, 84, 91;
- 60-67 inner lips 78, 82, 13, 312, 308, 317, 14, 87.

It also reads the eye poses off the irises (`eye_poses_from_mesh`).
"""
from __future__ import annotations

import numpy as np

MESH_POINTS = 478                # 468 face vertices + 5 per iris (468-472 subject's right, 473-477 left)
RIGHT_IRIS_CENTRE, LEFT_IRIS_CENTRE = 468, 473

_RIGHT_JAW = [(127, 234, 0.866), (93, 132, 0.06), (132, 58, 0.155), (58, 172, 0.178), (172, 136, 0.241),
              (136, 150, 0.373), (150, 149, 0.716), (176, 148, 0.346)]
_MIRROR = {127: 356, 234: 454, 93: 323, 132: 361, 58: 288, 172: 397, 136: 365, 150: 379, 149: 378, 176: 400,
           148: 377}
_LEFT_JAW = [(_MIRROR[a], _MIRROR[b], w) for a, b, w in reversed(_RIGHT_JAW)]
_RIGHT_BROW = [(70, 46), (63, 53), (105, 52), (66, 65), (107, 55)]          # outer -> inner, upper/lower edge
_LEFT_BROW = [(336, 285), (296, 295), (334, 282), (293, 283), (300, 276)]    # inner -> outer
_SINGLE = [168, 197, 5, 4, 98, 97, 2, 326, 327, 33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
           61, 40, 37, 0, 267, 270, 291, 321, 314, 17, 84, 91, 78, 82, 13, 312, 308, 317, 14, 87]

IBUG_FROM_MESH: list[tuple[int, int, float]] = (
    _RIGHT_JAW + [(152, 152, 0.0)] + _LEFT_JAW + [(a, b, 0.5) for a, b in _RIGHT_BROW + _LEFT_BROW]
    + [(i, i, 0.0) for i in _SINGLE])


def _blend_matrix() -> np.ndarray:
    m = np.zeros((68, MESH_POINTS))
    for row, (a, b, w) in enumerate(IBUG_FROM_MESH):
        m[row, a] += 1.0 - w
        m[row, b] += w
    return m


IBUG_BLEND = _blend_matrix()     # (68, 478): ibug = IBUG_BLEND @ mesh


def ibug_from_mesh(mesh: np.ndarray) -> np.ndarray:
    """(478, D) mesh points -> (68, D) iBUG landmarks."""
    return IBUG_BLEND @ mesh


# Eye poses from the irises. Per eye: the iris centre, the eye corners (outer, inner) and the eyelid loop.
_EYES = (  # FLAME order: the subject's left eye (image right) first
    (LEFT_IRIS_CENTRE, 263, 362, [263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466]),
    (RIGHT_IRIS_CENTRE, 33, 133, [33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246]),
)
EYEBALL_RADIUS_PER_EYE_WIDTH = 0.4     # ~12 mm eyeball radius over a ~30 mm corner-to-corner eye opening
MAX_EYE_ANGLE = np.radians(30.0)


def eye_poses_from_mesh(mesh: np.ndarray) -> np.ndarray:
    """(6,) FLAME eye poses (axis-angle, left eye then right eye, relative to the head) from a (478, 2+) mesh.

    Each eye turns about FLAME's y axis by asin(horizontal iris offset / eyeball radius) and about x by
    asin(vertical offset / radius), clipped to 30 degrees. The horizontal offset is the iris centre's distance
    from the corners' midpoint along the corner line, the vertical one its distance from the eyelid loop's
    centroid across it (image down = looking down = positive x rotation); the eyeball radius is 0.4 eye widths.
    """
    poses = np.zeros(6)
    for k, (iris, outer, inner, loop) in enumerate(_EYES):
        a, b = mesh[outer, :2], mesh[inner, :2]
        width = float(np.linalg.norm(b - a))
        if width < 1e-6:
            continue
        along = (b - a) / width if b[0] > a[0] else (a - b) / width       # image left -> right
        across = np.array([-along[1], along[0]])                             # image down when the eye is level
        radius = EYEBALL_RADIUS_PER_EYE_WIDTH * width
        horizontal = float((mesh[iris, :2] - 0.5 * (a + b)) @ along)
        vertical = float((mesh[iris, :2] - mesh[loop, :2].mean(0)) @ across)
        yaw = np.arcsin(np.clip(horizontal / radius, -1.0, 1.0))
        pitch = np.arcsin(np.clip(vertical / radius, -1.0, 1.0))
        poses[3 * k:3 * k + 2] = np.clip([pitch, yaw], -MAX_EYE_ANGLE, MAX_EYE_ANGLE)
    return poses
