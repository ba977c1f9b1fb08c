"""The head model restricted to its landmarks, as linear blendshapes plus a jaw joint (numpy float64).

Landmarks are the 68 iBUG points, or the MediaPipe face-mesh vertices of the head's MediaPipe embedding
(`mesh_indices` says which). The tracker never runs the full mesh: at the N landmarks FLAME is

    u(β, ψ)  = template + shape_dirs·β + expr_dirs·ψ                    (N, 3) rest positions
    j(β, ψ)  = joint + joint_shape_dirs·β + joint_expr_dirs·ψ           root and jaw joint centres
    q        = u + w_jaw ⊙ (R_jaw − I)(u − j_jaw)                       jaw opening (LBS, neck/eyes at rest)
    p        = R_head (q − j_root) + j_root + translation                FLAME world (y up, face along +z)

which is exactly smplx's LBS at the landmarks when neck and eye poses are zero, minus FLAME's
pose-corrective blendshapes (millimetre-level at the landmarks; the solver treats them as noise).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IBUG_CONTOUR = np.arange(17)        # the jaw line of the 68 iBUG points
# MediaPipe's face-oval vertices: like iBUG's jaw line they sit on the silhouette and slide with the view
MESH_FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152,
                  148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)


@dataclass
class LandmarkModel:
    """Linear landmark model (float64).

    template:          (N, 3) rest landmark positions, metres, FLAME axes
    shape_dirs:        (N, 3, S) identity blendshapes at the landmarks
    expr_dirs:         (N, 3, E) expression blendshapes at the landmarks
    jaw_weight:        (N,) LBS weight of the jaw joint at each landmark
    root_joint:        (3,) rest position of the root joint (head rotation centre)
    root_shape_dirs:   (3, S), root_expr_dirs: (3, E) how the root joint moves with β and ψ
    jaw_joint:         (3,) rest position of the jaw joint
    jaw_shape_dirs:    (3, S), jaw_expr_dirs: (3, E)
    contour:           indices of the landmarks on the face's silhouette (weighted down by the fit)
    mesh_indices:      (N,) the MediaPipe mesh vertex of each landmark, or None for the 68 iBUG points
    """

    template: np.ndarray
    shape_dirs: np.ndarray
    expr_dirs: np.ndarray
    jaw_weight: np.ndarray
    root_joint: np.ndarray
    root_shape_dirs: np.ndarray
    root_expr_dirs: np.ndarray
    jaw_joint: np.ndarray
    jaw_shape_dirs: np.ndarray
    jaw_expr_dirs: np.ndarray
    contour: np.ndarray = field(default_factory=lambda: IBUG_CONTOUR.copy())
    mesh_indices: np.ndarray | None = None

    @property
    def n_points(self) -> int:
        return int(self.template.shape[0])

    @property
    def n_shape(self) -> int:
        return int(self.shape_dirs.shape[2])

    @property
    def n_expression(self) -> int:
        return int(self.expr_dirs.shape[2])

    def truncated(self, n_shape: int, n_expression: int) -> "LandmarkModel":
        """The same model keeping only the first n_shape identity and n_expression expression directions."""
        s, e = min(n_shape, self.n_shape), min(n_expression, self.n_expression)
        return LandmarkModel(
            template=self.template, shape_dirs=self.shape_dirs[:, :, :s], expr_dirs=self.expr_dirs[:, :, :e],
            jaw_weight=self.jaw_weight, root_joint=self.root_joint, root_shape_dirs=self.root_shape_dirs[:, :s],
            root_expr_dirs=self.root_expr_dirs[:, :e], jaw_joint=self.jaw_joint,
            jaw_shape_dirs=self.jaw_shape_dirs[:, :s], jaw_expr_dirs=self.jaw_expr_dirs[:, :e], contour=self.contour,
            mesh_indices=self.mesh_indices)

    @classmethod
    def from_head(cls, head) -> "LandmarkModel":
        """The 68 iBUG landmarks of an `engine.HeadModel` (through its `landmark_basis()`)."""
        return _from_landmark_basis(head.landmark_basis())

    @classmethod
    def mesh_from_head(cls, head) -> "LandmarkModel | None":
        """The MediaPipe face-mesh vertices of `head`'s MediaPipe embedding; None when the head has none."""
        if getattr(head, "mediapipe", None) is None:
            return None
        mesh_indices = np.asarray(head.mediapipe.mesh_indices, dtype=np.int64)
        model = _from_landmark_basis(head.landmark_basis(head.mediapipe))
        model.contour = np.nonzero(np.isin(mesh_indices, MESH_FACE_OVAL))[0]
        model.mesh_indices = mesh_indices
        return model

    @classmethod
    def synthetic(cls, n_shape: int = 20, n_expression: int = 20, seed: int = 0) -> "LandmarkModel":
        """A face-like 68-point model with smooth random blendshapes, for solver tests and benchmarks.

        Directions are smooth random fields over the template, so neighbouring landmarks
        move together as they do on a real head; one unit moves points by a few millimetres.
        """
        rng = np.random.default_rng(seed)
        template = _ibug_template()
        basis = _smooth_features(template)                              # (68, F)

        def dirs(n: int, scale: float) -> np.ndarray:
            coef = rng.normal(size=(basis.shape[1], 3, n))
            d = np.einsum("if,fcn->icn", basis, coef)
            d /= np.sqrt((d ** 2).sum(axis=(0, 1)) / 68.0)[None, None, :]  # rms displacement 1 per unit
            return d * scale * np.linspace(1.0, 0.4, n)[None, None, :]

        jaw_weight = np.clip((0.005 - template[:, 1]) / 0.03, 0.0, 1.0)    # below the mouth corners opens
        jaw_weight[list(range(0, 4)) + list(range(13, 17))] *= 0.3
        return cls(template=template, shape_dirs=dirs(n_shape, 0.004), expr_dirs=dirs(n_expression, 0.003),
                   jaw_weight=jaw_weight, root_joint=np.array([0.0, -0.04, -0.02]),
                   root_shape_dirs=rng.normal(scale=0.001, size=(3, n_shape)),
                   root_expr_dirs=np.zeros((3, n_expression)), jaw_joint=np.array([0.0, -0.01, -0.01]),
                   jaw_shape_dirs=rng.normal(scale=0.001, size=(3, n_shape)),
                   jaw_expr_dirs=rng.normal(scale=0.0002, size=(3, n_expression)))


def _from_landmark_basis(basis) -> LandmarkModel:
    """From `engine.head.LandmarkBasis` (FLAME joints: 0 root, 1 neck, 2 jaw, 3/4 eyes)."""
    f64 = lambda x: np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)  # noqa: E731
    parents = [int(p) for p in f64(basis.parents)]
    if len(parents) < 3 or parents[1] != 0 or parents[2] != 1:
        raise ValueError(f"expected FLAME's kinematic tree (root, neck, jaw, ...), got parents {parents}")
    joints, jshape, jexpr = f64(basis.joint_template), f64(basis.joint_shapedirs), f64(basis.joint_exprdirs)
    return LandmarkModel(
        template=f64(basis.template), shape_dirs=f64(basis.shapedirs), expr_dirs=f64(basis.exprdirs),
        jaw_weight=f64(basis.lbs_weights)[:, 2], root_joint=joints[0], root_shape_dirs=jshape[0],
        root_expr_dirs=jexpr[0], jaw_joint=joints[2], jaw_shape_dirs=jshape[2], jaw_expr_dirs=jexpr[2])


def _smooth_features(points: np.ndarray) -> np.ndarray:
    """(68, 25): a constant and 24 Gaussian bumps (4 cm wide) spread over the face, for smooth random fields."""
    centres = np.stack(np.meshgrid(np.linspace(-0.07, 0.07, 4), np.linspace(-0.08, 0.05, 3),
                                   np.array([0.03, 0.09]), indexing="ij"), -1).reshape(-1, 3)
    d2 = ((points[:, None, :] - centres[None]) ** 2).sum(-1)
    return np.concatenate([np.ones((len(points), 1)), np.exp(-d2 / (2 * 0.04 ** 2))], axis=1)


def _ibug_template() -> np.ndarray:
    """(68, 3) metres: an average-looking face in the iBUG 68-point order, FLAME axes, face along +z."""
    pts = np.zeros((68, 3))
    t = np.linspace(-1.0, 1.0, 17)                                          # contour, ear to ear via chin
    ang = t * np.radians(95)
    pts[0:17, 0] = 0.072 * np.sin(ang)
    pts[0:17, 1] = 0.025 - 0.105 * (1 - np.abs(t) ** 1.6)                      # chin lowest
    pts[0:17, 2] = 0.02 + 0.05 * np.cos(ang)
    xs = np.linspace(-0.058, -0.012, 5)                                      # brows, image left to right
    for start, x in ((17, xs), (22, -xs[::-1])):
        pts[start:start + 5] = np.stack([x, 0.045 + 0.006 * np.sin(np.pi * (np.abs(x) - 0.012) / 0.046),
                                         0.085 - 3.5 * (np.abs(x) - 0.02) ** 2], axis=1)
    pts[27:31] = np.stack([np.zeros(4), np.linspace(0.03, -0.005, 4), np.linspace(0.095, 0.115, 4)], axis=1)
    pts[31:36] = np.stack([np.linspace(-0.016, 0.016, 5), np.full(5, -0.013),
                           0.095 + 0.008 * (1 - np.abs(np.linspace(-1, 1, 5)))], axis=1)
    eye = np.array([[-1.0, 0.0], [-0.5, 0.4], [0.5, 0.4], [1.0, 0.0], [0.5, -0.35], [-0.5, -0.35]])
    for cx, start in ((-0.033, 36), (0.033, 42)):
        pts[start:start + 6] = np.stack([cx + 0.013 * eye[:, 0], 0.028 + 0.006 * eye[:, 1],
                                         np.full(6, 0.080)], axis=1)
    outer = np.linspace(0, 2 * np.pi, 13)[:-1]                              # 48..59 outer lip, from left corner
    pts[48:60] = np.stack([-0.026 * np.cos(outer), -0.038 + 0.011 * np.sin(outer) * np.where(np.sin(outer) > 0, 0.8, 1.0),
                           0.088 - 0.012 * np.cos(outer) ** 2], axis=1)
    inner = np.linspace(0, 2 * np.pi, 9)[:-1]                               # 60..67 inner lip
    pts[60:68] = np.stack([-0.018 * np.cos(inner), -0.038 + 0.004 * np.sin(inner), 0.090 - 0.008 * np.cos(inner) ** 2],
                          axis=1)
    return pts
