"""FLAME's skeleton for the default head: joints, kinematic tree, LBS weights and joint regressor.

Joints in FLAME order: 0 global (low in the neck), 1 neck (skull base), 2 jaw (between the two jaw
hinges), 3 left eye (+x), 4 right eye (-x). Parents: neck <- global; jaw, eyes <- neck.
"""
from __future__ import annotations

import numpy as np

from .geometry import HeadGeometry
from .meshops import ray_mesh, smoothstep

PARENTS = np.array([-1, 0, 1, 1, 1])
JAW_JOINT = np.array([0.0, -0.020, 0.006])
NECK_JOINT = np.array([0.0, -0.045, -0.022])
GLOBAL_JOINT = np.array([0.0, -0.150, -0.012])


def joint_positions(geo: HeadGeometry) -> np.ndarray:
    return np.stack([GLOBAL_JOINT, NECK_JOINT, JAW_JOINT, geo.eye_centres[0], geo.eye_centres[1]])


def kintree_table() -> np.ndarray:
    """(2,5) uint32 like FLAME's file: parent row (root = 2**32-1), then joint ids."""
    parents = PARENTS.astype(np.int64) % (2 ** 32)
    return np.stack([parents, np.arange(5)]).astype(np.uint32)


def lbs_weights(geo: HeadGeometry) -> np.ndarray:
    """(V,5) skinning weights, rows summing to 1."""
    v = geo.vertices
    x, y, z = v[:, 0], v[:, 1], v[:, 2]
    w = np.zeros((len(v), 5))
    # Jaw: below a line from the lip line back to the jaw hinge, fading under the chin into the throat.
    y_lip = float(geo.vertices[geo.upper_slit, 1].mean())
    z_corner = float(geo.vertices[geo.upper_slit[0], 2])
    back = smoothstep(z_corner, JAW_JOINT[2] - 0.005, z)  # 0 at the mouth corners, 1 at the hinge
    line = y_lip + back * (JAW_JOINT[1] - 0.012 - y_lip)
    width = 0.004 + 0.024 * back
    below = smoothstep(0.0, 1.0, (line - y) / width + 0.5)
    front = smoothstep(JAW_JOINT[2] - 0.025, JAW_JOINT[2] + 0.005, z)
    # Below the mandible's lower border (jaw angle to chin) the skin fades from the jaw into the neck.
    border = -0.075 - 0.52 * (z - 0.005)
    under = smoothstep(border - 0.025, border - 0.003, y)
    jaw = below * front * under
    # Around the mouth the lip line decides: upper lip with the head, lower lip with the jaw.
    mouth = (np.abs(x) < np.abs(v[geo.upper_slit[0], 0]) - 1e-6) & (y > y_lip - 0.03) & (y < y_lip + 0.02) \
        & (z > z_corner - 0.01) & (geo.part == 0)
    jaw = np.where(mouth & (y >= y_lip - 1e-9) & ~geo.lower_lip, 0.0, jaw)
    jaw = np.where(mouth & (y < y_lip - 0.004), np.maximum(jaw, 1.0), jaw)
    jaw = np.where(geo.lower_lip, 1.0, jaw)
    jaw = np.where(geo.part == 3, 0.0, jaw)
    corners = [int(geo.upper_slit[0]), int(geo.upper_slit[-1])]
    jaw[corners] = 0.35
    glob = (1 - jaw) * smoothstep(-0.075, -0.16, y) * (geo.part == 0)
    w[:, 2] = jaw
    w[:, 0] = glob
    w[:, 1] = 1 - jaw - glob
    for k in (1, 2):
        eye = geo.part == k
        w[eye] = 0
        w[eye, 2 + k] = 1.0
    return w


def joint_regressor(geo: HeadGeometry, joints: np.ndarray) -> np.ndarray:
    """(5,V) rows summing to 1 that regress each joint from the surface around it.

    Eyes: the mean of their eyeball. Others: rays cast from the joint in 26 directions hit the skin;
    the hits' barycentric weights are then corrected (least change) so the template's joints come out exactly.
    """
    n_v = len(geo.vertices)
    reg = np.zeros((5, n_v))
    skin_faces = geo.faces[np.all(geo.part[geo.faces] == 0, axis=1)]
    dirs = np.array([(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)],
                    dtype=np.float64)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    for j in range(3):
        _, f, bary = ray_mesh(joints[j], dirs, geo.vertices, skin_faces, farthest=False)
        row = np.zeros(n_v)
        for fi, b in zip(f, bary):
            if fi >= 0:
                np.add.at(row, skin_faces[fi], b)
        idx = np.nonzero(row)[0]
        w0 = row[idx] / row[idx].sum()
        a = np.vstack([geo.vertices[idx].T, np.ones(len(idx))])  # (4,n)
        target = np.append(joints[j], 1.0)
        w1 = w0 + a.T @ np.linalg.solve(a @ a.T, target - a @ w0)
        reg[j, idx] = w1
    for k in (1, 2):
        eye = geo.part == k
        reg[2 + k, eye] = 1.0 / eye.sum()
    return reg
