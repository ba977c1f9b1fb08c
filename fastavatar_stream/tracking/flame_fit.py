"""FLAME fit to landmarks (68 iBUG points or a dense face mesh): damped Gauss-Newton (Levenberg-Marquardt) with closed-form Jacobians.

Per frame the unknowns are head rotation (3), translation (3), jaw rotation (3) and the first E_fit
expression coefficients; identity β is solved jointly over a few frames (Schur complement over the
per-frame blocks) and then held. Residuals: landmark reprojection in every view (scaled by the face
size so the weights do not depend on resolution), Tikhonov priors on expression, jaw and shape, and a
temporal prior towards the previous frame. All numpy float64; no autograd.

Cameras (OpenCV axes: x right, y down, z forward). The monocular default is a fixed camera at the world
origin with world-to-camera rotation diag(1, -1, -1): FLAME's world (y up, face along +z) seen from a
camera looking down -z, so a head at rotation 0 faces the camera. Rotations are updated by left
multiplication R <- exp(δ) R, whose Jacobians are exact at δ = 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fastavatar_stream.tracking.landmark_model import LandmarkModel
from fastavatar_stream.tracking.rotations import axis_angle, left_jacobian_inverse, rotation_matrix, skew

FLAME_TO_OPENCV = np.diag([1.0, -1.0, -1.0])


def intrinsics_from_larger_side_fov(fov_degrees: float, width: int, height: int) -> np.ndarray:
    """(3, 3) pinhole intrinsics: `fov_degrees` across the larger image side, principal point at the centre."""
    if not 1.0 <= fov_degrees <= 170.0:
        raise ValueError(f"field of view {fov_degrees} degrees is outside 1..170")
    focal = 0.5 * max(width, height) / math.tan(math.radians(fov_degrees) / 2.0)
    return np.array([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]])


@dataclass
class PinholeCamera:
    """K (3, 3) pixels; R (3, 3), t (3,) world-to-camera (OpenCV axes)."""

    K: np.ndarray
    R: np.ndarray = field(default_factory=lambda: FLAME_TO_OPENCV.copy())
    t: np.ndarray = field(default_factory=lambda: np.zeros(3))

    @property
    def viewmat(self) -> np.ndarray:
        """(4, 4) world-to-camera."""
        v = np.eye(4)
        v[:3, :3], v[:3, 3] = self.R, self.t
        return v

    @property
    def centre(self) -> np.ndarray:
        return -self.R.T @ self.t

    def project(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) world -> (N, 2) pixels."""
        c = points @ self.R.T + self.t
        uv = c[:, :2] / c[:, 2:3]
        return uv @ self.K[:2, :2].T + self.K[:2, 2]


@dataclass
class View:
    """Observed landmarks in one camera: points (N, 2) pixels, weights (N,) >= 0 (0 drops a point)."""

    camera: PinholeCamera
    points: np.ndarray
    weights: np.ndarray | None = None


@dataclass
class HeadPose:
    """Per-frame FLAME parameters in world axes: rotation, jaw axis-angle (3,), translation (3,) m, expression (E,)."""

    rotation: np.ndarray
    translation: np.ndarray
    jaw: np.ndarray
    expression: np.ndarray

    def copy(self) -> "HeadPose":
        return HeadPose(self.rotation.copy(), self.translation.copy(), self.jaw.copy(), self.expression.copy())

    def in_camera(self, model: LandmarkModel, shape: np.ndarray, camera: PinholeCamera) -> tuple[np.ndarray, np.ndarray]:
        """Head rotation (3,) axis-angle and translation (3,) in camera axes.

        A point x of the canonical head (FLAME axes) lands in the camera at rotation·(camera.R x) + translation:
        rotation is the world rotation conjugated into camera axes (0 = facing a camera at rest), translation
        the camera-space position (metres) of the FLAME origin.
        """
        Rg = rotation_matrix(self.rotation)
        j0 = model.root_joint + model.root_shape_dirs @ shape[:model.n_shape] \
            + model.root_expr_dirs[:, :len(self.expression)] @ self.expression
        rot = camera.R @ Rg @ camera.R.T
        trans = camera.R @ (j0 - Rg @ j0 + self.translation) + camera.t
        return axis_angle(rot), trans


@dataclass
class FitConfig:
    """Solver settings. Sigmas are the expected spread of each quantity (a residual of one sigma costs 1).

    landmark_sigma:      landmark noise as a fraction of the face size (landmark box diagonal)
    contour_weight:      weight of the 17 jaw-line points, which slide along the silhouette on real faces
    expression_sigma:    prior on ψ (FLAME coefficients are about unit variance)
    jaw_sigma:           prior on the jaw axis-angle (x opens the mouth; y, z barely move)
    shape_sigma:         prior on β
    size_sigma:          prior on the relative change of overall face size that β makes: a single camera
                         cannot tell a small near face from a big far one, so adult size spread (~5%) decides
    temporal_*:          frame-to-frame change: rotation (rad), translation (m), expression, jaw (rad)
    """

    n_expression: int = 30
    n_shape: int = 50
    landmark_sigma: float = 0.01
    contour_weight: float = 0.3
    expression_sigma: float = 1.5
    jaw_sigma: tuple[float, float, float] = (0.3, 0.05, 0.05)
    shape_sigma: float = 1.5
    size_sigma: float = 0.05
    temporal_rotation: float = 0.06
    temporal_translation: float = 0.01
    temporal_expression: float = 0.6
    temporal_jaw: float = 0.08
    iterations_warm: int = 8
    iterations_cold: int = 40
    identity_iterations: int = 25


@dataclass
class FitResult:
    """pose: fitted parameters; errors_px: (V, N) reprojection error per view; rms_px over weighted points;
    rms_rel: rms error as a fraction of the face size; iterations run; cost: final objective."""

    pose: HeadPose
    errors_px: np.ndarray
    rms_px: float
    rms_rel: float
    iterations: int
    cost: float


@dataclass
class _State:
    Rg: np.ndarray
    t: np.ndarray
    Rj: np.ndarray
    psi: np.ndarray

    @classmethod
    def from_pose(cls, pose: HeadPose, n_expression: int) -> "_State":
        psi = np.zeros(n_expression)
        k = min(n_expression, len(pose.expression))
        psi[:k] = pose.expression[:k]
        return cls(rotation_matrix(pose.rotation), np.asarray(pose.translation, float).copy(),
                   rotation_matrix(pose.jaw), psi)

    def to_pose(self) -> HeadPose:
        return HeadPose(axis_angle(self.Rg), self.t.copy(), axis_angle(self.Rj), self.psi.copy())

    def step(self, delta: np.ndarray) -> "_State":
        return _State(rotation_matrix(delta[0:3]) @ self.Rg, self.t + delta[3:6],
                      rotation_matrix(delta[6:9]) @ self.Rj, self.psi + delta[9:])


class LandmarkFitter:
    """Fits FLAME to the model's N landmarks in one or more calibrated views.

    `fit_frame` solves one time step (warm-started, with the temporal prior when `previous` is given);
    `fit_identity` solves β jointly with the poses of several time steps.
    """

    def __init__(self, model: LandmarkModel, config: FitConfig | None = None):
        self.config = config or FitConfig()
        self.full_model = model
        self.model = model.truncated(self.config.n_shape, self.config.n_expression)
        self.n_expression = self.model.n_expression
        self.n_shape = self.model.n_shape
        self.n_pose = 9 + self.n_expression
        m = self.model
        self._jaw_w = m.jaw_weight[:, None, None]
        self.n_points = m.n_points
        self._point_weights = np.ones(self.n_points)
        self._point_weights[m.contour] = self.config.contour_weight
        E, n = self.n_expression, self.n_pose
        self._prior_expression = np.zeros((E, n))
        self._prior_expression[:, 9:] = np.eye(E) / self.config.expression_sigma
        self._prior_temporal_expression = np.zeros((E, n))
        self._prior_temporal_expression[:, 9:] = np.eye(E) / self.config.temporal_expression
        self._prior_translation = np.zeros((3, n))
        self._prior_translation[:, 3:6] = np.eye(3) / self.config.temporal_translation
        centred = m.template - m.template.mean(0)
        shape_centred = m.shape_dirs - m.shape_dirs.mean(0, keepdims=True)
        # relative uniform scaling of the landmark set made by one unit of each shape coefficient, (S,)
        self._size_dir = np.einsum("ic,ics->s", centred, shape_centred) / float((centred ** 2).sum())
        # a robust size of the model face, for the depth of a cold start
        self._template_spread = float(np.sqrt(((m.template[:, :2] - m.template[:, :2].mean(0)) ** 2).sum(1).mean()))

    # ----------------------------------------------------------------------------------------- public API
    def fit_frame(self, views: list[View], shape: np.ndarray | None = None, init: HeadPose | None = None,
                  previous: HeadPose | None = None, iterations: int | None = None) -> FitResult:
        """One time step. init: warm start (defaults to `previous`); without either, a cold start from a
        head facing the first camera, placed along the ray through the landmarks' centroid."""
        shape = self._shape(shape)
        init = init or previous
        prev = _State.from_pose(previous, self.n_expression) if previous is not None else None
        if init is not None:
            state = _State.from_pose(init, self.n_expression)
            state, cost, its = self._solve_frame(views, shape, state, prev, iterations or self.config.iterations_warm)
        else:
            best = None
            for yaw in (0.0, -35.0, 35.0):
                state = self._cold_start(views, shape, yaw)
                state, cost, its = self._solve_frame(views, shape, state, prev, iterations or self.config.iterations_cold)
                if best is None or cost < best[1]:
                    best = (state, cost, its)
                if self._rms_rel(views, shape, state) < 2.0 * self.config.landmark_sigma:
                    break
            state, cost, its = best
        return self._result(views, shape, state, cost, its)

    def fit_identity(self, frames: list[list[View]], shape: np.ndarray | None = None,
                     inits: list[HeadPose | None] | None = None) -> tuple[np.ndarray, list[FitResult]]:
        """β (n_shape of the full model, zeros past the fitted ones) and per-frame fits, solved jointly."""
        beta = self._shape(shape)[:self.n_shape].copy()
        inits = inits or [None] * len(frames)
        states = []
        for views, init in zip(frames, inits):
            if init is None:
                init = self.fit_frame(views, self._full_shape(beta)).pose
            states.append(_State.from_pose(init, self.n_expression))
        beta, states, cost = self._solve_identity(frames, beta, states, self.config.identity_iterations)
        full = self._full_shape(beta)
        results = [self._result(views, full, s, float("nan"), self.config.identity_iterations)
                   for views, s in zip(frames, states)]
        return full, results

    def landmarks_world(self, pose: HeadPose, shape: np.ndarray | None = None) -> np.ndarray:
        """(N, 3) world positions of the model landmarks for `pose`."""
        return self._points(_State.from_pose(pose, self.n_expression), self._shape_part(self._shape(shape)))[0]

    # ------------------------------------------------------------------------------------------ internals
    def _shape(self, shape: np.ndarray | None) -> np.ndarray:
        full = np.zeros(self.full_model.n_shape)
        if shape is not None:
            k = min(len(shape), len(full))
            full[:k] = shape[:k]
        return full

    def _full_shape(self, beta: np.ndarray) -> np.ndarray:
        full = np.zeros(self.full_model.n_shape)
        full[:len(beta)] = beta
        return full

    def _shape_part(self, shape: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        m, b = self.model, shape[:self.n_shape]
        return m.template + m.shape_dirs @ b, m.root_joint + m.root_shape_dirs @ b, m.jaw_joint + m.jaw_shape_dirs @ b

    def _points(self, s: _State, base, jacobian: bool = False, shape_jacobian: bool = False):
        """World landmarks P (N, 3) and, on request, dP/d[δr, t, δjaw, ψ] (N, 3, 9+E) and dP/dβ (N, 3, S)."""
        m = self.model
        u = base[0] + m.expr_dirs @ s.psi
        j0 = base[1] + m.root_expr_dirs @ s.psi
        j2 = base[2] + m.jaw_expr_dirs @ s.psi
        d = u - j2
        Rd = d @ s.Rj.T
        q = u + m.jaw_weight[:, None] * (Rd - d)
        Ra = (q - j0) @ s.Rg.T
        P = Ra + j0 + s.t
        if not jacobian:
            return P, None, None
        J = np.empty((self.n_points, 3, self.n_pose))
        J[:, :, 0:3] = -skew(Ra)
        J[:, :, 3:6] = np.eye(3)
        J[:, :, 6:9] = -(s.Rg @ (self._jaw_w * skew(Rd)))
        J[:, :, 9:] = self._blend_jacobian(s, m.expr_dirs, m.root_expr_dirs, m.jaw_expr_dirs)
        Js = self._blend_jacobian(s, m.shape_dirs, m.root_shape_dirs, m.jaw_shape_dirs) if shape_jacobian else None
        return P, J, Js

    def _blend_jacobian(self, s: _State, dirs, root_dirs, jaw_dirs) -> np.ndarray:
        """dP/dcoef (N, 3, K) for blendshapes `dirs` (N, 3, K) that also move the root and jaw joints."""
        M = s.Rj - np.eye(3)
        dq = dirs + self._jaw_w * (M @ (dirs - jaw_dirs[None]))
        return s.Rg @ (dq - root_dirs[None]) + root_dirs[None]

    def _view_terms(self, views: list[View], P, J, Js):
        """Stacked scaled reprojection residuals (and Jacobian rows) of all views."""
        rs, Js_out, Jb_out = [], [], []
        for v in views:
            cam = v.camera
            c = P @ cam.R.T + cam.t
            z = c[:, 2]
            if np.any(z < 1e-3):
                return None, None, None
            scale = self._scales(v)
            uv = c[:, :2] / z[:, None]
            proj = uv @ cam.K[:2, :2].T + cam.K[:2, 2]
            rs.append(((proj - v.points) * scale[:, None]).ravel())
            if J is not None:
                for jac, out in ((J, Js_out), (Js, Jb_out)):
                    if jac is None:
                        continue
                    Jc = cam.R @ jac
                    Juv = (Jc[:, :2] - uv[:, :, None] * Jc[:, 2:3]) / z[:, None, None]
                    Jp = (cam.K[:2, :2] @ Juv) * scale[:, None, None]
                    out.append(Jp.reshape(2 * self.n_points, -1))
        r = np.concatenate(rs)
        return r, (np.concatenate(Js_out) if Js_out else None), (np.concatenate(Jb_out) if Jb_out else None)

    def _scales(self, v: View) -> np.ndarray:
        """Per-point residual scale sqrt(w)/sigma_px, sigma_px from the observed face size."""
        pts = v.points
        size = float(np.hypot(*(pts.max(0) - pts.min(0))))
        w = self._point_weights if v.weights is None else self._point_weights * np.clip(v.weights, 0.0, None)
        return np.sqrt(w) / max(self.config.landmark_sigma * size, 1e-6)

    def _prior_terms(self, s: _State, prev: _State | None, jacobian: bool):
        """Prior residuals (K,) and their Jacobian (K, 9+E)."""
        cfg, n = self.config, self.n_pose
        aj = axis_angle(s.Rj)
        jaw_sig = np.asarray(cfg.jaw_sigma)
        rows = [s.psi / cfg.expression_sigma, aj / jaw_sig]
        jac = []
        if jacobian:
            jj = np.zeros((3, n)); jj[:, 6:9] = left_jacobian_inverse(aj) / jaw_sig[:, None]
            jac += [self._prior_expression, jj]
        if prev is not None:
            ar = axis_angle(s.Rg @ prev.Rg.T)
            rows += [ar / cfg.temporal_rotation, (s.t - prev.t) / cfg.temporal_translation,
                     (s.psi - prev.psi) / cfg.temporal_expression, (aj - axis_angle(prev.Rj)) / cfg.temporal_jaw]
            if jacobian:
                jr = np.zeros((3, n)); jr[:, 0:3] = left_jacobian_inverse(ar) / cfg.temporal_rotation
                jjaw = np.zeros((3, n)); jjaw[:, 6:9] = left_jacobian_inverse(aj) / cfg.temporal_jaw
                jac += [jr, self._prior_translation, self._prior_temporal_expression, jjaw]
        return np.concatenate(rows), (np.concatenate(jac) if jacobian else None)

    def _frame_terms(self, views, base, s: _State, prev, jacobian: bool, shape_jacobian: bool = False):
        P, J, Js = self._points(s, base, jacobian, shape_jacobian)
        r_obs, J_obs, Jb_obs = self._view_terms(views, P, J, Js)
        if r_obs is None:
            return None, None, None
        r_pri, J_pri = self._prior_terms(s, prev, jacobian)
        r = np.concatenate([r_obs, r_pri])
        if not jacobian:
            return r, None, None
        Jt = np.concatenate([J_obs, J_pri])
        Jb = None
        if shape_jacobian:
            Jb = np.concatenate([Jb_obs, np.zeros((len(r_pri), self.n_shape))])
        return r, Jt, Jb

    def _solve_frame(self, views, shape, state: _State, prev, iterations: int):
        base = self._shape_part(shape)
        r, J, _ = self._frame_terms(views, base, state, prev, True)
        if r is None:
            return state, math.inf, 0
        cost, lam, it = float(r @ r), 1e-3, 0
        for it in range(1, iterations + 1):
            H, g = J.T @ J, J.T @ r
            improved = False
            while lam < 1e10:
                delta = np.linalg.solve(H + lam * np.diag(np.diag(H) + 1e-9), -g)
                cand = state.step(delta)
                r_new, _, _ = self._frame_terms(views, base, cand, prev, False)
                new_cost = math.inf if r_new is None else float(r_new @ r_new)
                if new_cost < cost:
                    improved = True
                    break
                lam *= 5.0
            if not improved:
                break
            gain = cost - new_cost
            state, cost, lam = cand, new_cost, max(lam / 4.0, 1e-7)
            if gain < 1e-4 * cost + 1e-10 or float(np.abs(delta).max()) < 1e-6:
                break
            r, J, _ = self._frame_terms(views, base, state, prev, True)
        return state, cost, it

    def _solve_identity(self, frames, beta: np.ndarray, states: list[_State], iterations: int):
        """Joint LM over β and all frames' poses; the normal equations are reduced to β by a Schur complement."""
        cfg, S = self.config, self.n_shape

        def terms(b, sts, jac):
            base = self._shape_part(self._full_shape(b))
            out = [self._frame_terms(v, base, s, None, jac, jac) for v, s in zip(frames, sts)]
            if any(o[0] is None for o in out):
                return None
            return out

        c = self._size_dir

        def total(out, b):
            return (sum(float(o[0] @ o[0]) for o in out) + float(b @ b) / cfg.shape_sigma ** 2
                    + float(c @ b) ** 2 / cfg.size_sigma ** 2)

        out = terms(beta, states, True)
        if out is None:
            return beta, states, math.inf
        cost, lam = total(out, beta), 1e-3
        for _ in range(iterations):
            blocks = []
            Hbb = np.eye(S) / cfg.shape_sigma ** 2 + np.outer(c, c) / cfg.size_sigma ** 2
            gb = beta / cfg.shape_sigma ** 2 + c * float(c @ beta) / cfg.size_sigma ** 2
            for r, Jt, Jb in out:
                blocks.append((Jt.T @ Jt, Jt.T @ Jb, Jt.T @ r))
                Hbb = Hbb + Jb.T @ Jb
                gb = gb + Jb.T @ r
            improved = False
            while lam < 1e10:
                S_mat, rhs, solved = Hbb + lam * np.diag(np.diag(Hbb) + 1e-9), gb.copy(), []
                for Htt, Htb, gt in blocks:
                    Hd = Htt + lam * np.diag(np.diag(Htt) + 1e-9)
                    X = np.linalg.solve(Hd, np.column_stack([Htb, gt]))
                    S_mat -= Htb.T @ X[:, :S]
                    rhs -= Htb.T @ X[:, S]
                    solved.append(X)
                db = np.linalg.solve(S_mat, -rhs)
                cand_states = [s.step(-(X[:, S] + X[:, :S] @ db)) for s, X in zip(states, solved)]
                cand_beta = beta + db
                cand_out = terms(cand_beta, cand_states, False)
                new_cost = math.inf if cand_out is None else total(cand_out, cand_beta)
                if new_cost < cost:
                    improved = True
                    break
                lam *= 5.0
            if not improved:
                break
            gain = cost - new_cost
            beta, states, cost, lam = cand_beta, cand_states, new_cost, max(lam / 4.0, 1e-7)
            if gain < 1e-6 * cost:
                break
            out = terms(beta, states, True)
        return beta, states, cost

    def _cold_start(self, views: list[View], shape: np.ndarray, yaw_degrees: float) -> _State:
        """A head facing the first camera (turned by `yaw_degrees`), on the ray through the landmark centroid,
        at the depth where the model's face spread matches the observed one."""
        cam, pts = views[0].camera, views[0].points
        centroid = pts.mean(0)
        spread = float(np.sqrt(((pts - centroid) ** 2).sum(1).mean()))
        depth = cam.K[0, 0] * self._template_spread / max(spread, 1e-6)
        ray = np.linalg.solve(cam.K, np.array([centroid[0], centroid[1], 1.0]))
        target = cam.R.T @ (ray * depth - cam.t)              # world point at that depth on the ray
        Rg = cam.R.T @ FLAME_TO_OPENCV @ rotation_matrix(np.array([0.0, math.radians(yaw_degrees), 0.0]))
        state = _State(Rg, np.zeros(3), np.eye(3), np.zeros(self.n_expression))
        P = self._points(state, self._shape_part(shape))[0]
        state.t = target - P.mean(0)
        return state

    def _rms_rel(self, views, shape, state) -> float:
        return self._result(views, shape, state, 0.0, 0).rms_rel

    def _result(self, views, shape, state: _State, cost: float, iterations: int) -> FitResult:
        P = self._points(state, self._shape_part(shape))[0]
        errors, sq, wsum, rel = [], 0.0, 0.0, []
        for v in views:
            c = P @ v.camera.R.T + v.camera.t
            if np.any(c[:, 2] < 1e-3):
                errors.append(np.full(self.n_points, np.inf))
                rel.append(np.inf)
                continue
            e = np.linalg.norm(v.camera.project(P) - v.points, axis=1)
            w = self._point_weights if v.weights is None else self._point_weights * np.clip(v.weights, 0, None)
            errors.append(e)
            sq += float((w * e ** 2).sum())
            wsum += float(w.sum())
            size = float(np.hypot(*(v.points.max(0) - v.points.min(0))))
            rel.append(math.sqrt(float((w * e ** 2).sum()) / max(float(w.sum()), 1e-9)) / max(size, 1e-6))
        rms = math.sqrt(sq / wsum) if wsum > 0 else math.inf
        return FitResult(state.to_pose(), np.stack(errors), rms, float(max(rel)), iterations, cost)


def zero_pose(n_expression: int) -> HeadPose:
    return HeadPose(np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(n_expression))


__all__ = ["FLAME_TO_OPENCV", "FitConfig", "FitResult", "HeadPose", "LandmarkFitter", "PinholeCamera", "View",
           "intrinsics_from_larger_side_fov", "zero_pose"]
