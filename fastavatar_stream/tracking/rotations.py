"""Small SO(3) helpers in numpy float64 for the landmark solver (axis-angle <-> matrix, left Jacobians)."""
from __future__ import annotations

import math

import numpy as np


def skew(v: np.ndarray) -> np.ndarray:
    """(..., 3) -> (..., 3, 3) cross-product matrices: skew(a) @ b == cross(a, b)."""
    v = np.asarray(v, dtype=np.float64)
    out = np.zeros(v.shape[:-1] + (3, 3))
    out[..., 0, 1], out[..., 0, 2] = -v[..., 2], v[..., 1]
    out[..., 1, 0], out[..., 1, 2] = v[..., 2], -v[..., 0]
    out[..., 2, 0], out[..., 2, 1] = -v[..., 1], v[..., 0]
    return out


def rotation_matrix(aa: np.ndarray) -> np.ndarray:
    """Axis-angle (3,) -> rotation matrix (3, 3) (Rodrigues)."""
    aa = np.asarray(aa, dtype=np.float64)
    theta = math.sqrt(float(aa @ aa))
    k = skew(aa)
    if theta < 1e-8:
        return np.eye(3) + k + 0.5 * (k @ k)
    return np.eye(3) + (math.sin(theta) / theta) * k + ((1.0 - math.cos(theta)) / theta ** 2) * (k @ k)


def axis_angle(R: np.ndarray) -> np.ndarray:
    """Rotation matrix (3, 3) -> axis-angle (3,), angle in [0, pi]."""
    R = np.asarray(R, dtype=np.float64)
    cos = min(1.0, max(-1.0, (np.trace(R) - 1.0) / 2.0))
    theta = math.acos(cos)
    w = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    if theta < 1e-6:
        return 0.5 * w
    if theta > math.pi - 1e-4:
        # near pi the antisymmetric part vanishes: the axis is R's eigenvector of eigenvalue 1
        vals, vecs = np.linalg.eig(R)
        axis = np.real(vecs[:, int(np.argmin(np.abs(vals - 1.0)))])
        axis /= np.linalg.norm(axis)
        if axis @ w < 0:
            axis = -axis
        return theta * axis
    return (theta / (2.0 * math.sin(theta))) * w


def left_jacobian_inverse(aa: np.ndarray) -> np.ndarray:
    """(3, 3) d log(exp(d) R) / d d at d = 0, where log(R) = aa: maps left perturbations to axis-angle changes."""
    aa = np.asarray(aa, dtype=np.float64)
    theta = math.sqrt(float(aa @ aa))
    k = skew(aa)
    if theta < 1e-5:
        return np.eye(3) - 0.5 * k + (k @ k) / 12.0
    coef = 1.0 / theta ** 2 - (1.0 + math.cos(theta)) / (2.0 * theta * math.sin(theta))
    return np.eye(3) - 0.5 * k + coef * (k @ k)


def angle_between(R1: np.ndarray, R2: np.ndarray) -> float:
    """Geodesic angle (radians) between two rotation matrices."""
    cos = (np.trace(R1.T @ R2) - 1.0) / 2.0
    return math.acos(min(1.0, max(-1.0, cos)))
