"""The landmark solver: exact Jacobians, convergence, accuracy under pixel noise, identity, multi-view, speed.

Synthetic tests use a face-like linear landmark model built here (smooth random blendshapes, jaw joint);
tests marked `head` use the engine's embedded head and project its true landmarks.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

from fastavatar_stream.tracking.flame_fit import (FLAME_TO_OPENCV, FitConfig, HeadPose, LandmarkFitter, PinholeCamera,
                                                  View, _State, intrinsics_from_larger_side_fov)
from fastavatar_stream.tracking.landmark_model import LandmarkModel
from fastavatar_stream.tracking.rotations import angle_between, axis_angle, rotation_matrix
from fastavatar_stream.tracking.tracker import head_angles

N = 12


@pytest.fixture(scope="module")
def fitter() -> LandmarkFitter:
    return LandmarkFitter(LandmarkModel.synthetic(N, N, seed=3), FitConfig(n_shape=N, n_expression=N))


@pytest.fixture(scope="module")
def camera() -> PinholeCamera:
    return PinholeCamera(intrinsics_from_larger_side_fov(40.0, 512, 512))


def random_pose(rng, n_expression: int, max_yaw_deg: float = 45.0) -> HeadPose:
    return HeadPose(rotation=np.array([rng.uniform(-0.25, 0.25), math.radians(rng.uniform(-max_yaw_deg, max_yaw_deg)),
                                       rng.uniform(-0.15, 0.15)]),
                    translation=np.array([rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04), rng.uniform(-0.7, -0.5)]),
                    jaw=np.array([rng.uniform(0.0, 0.25), 0.0, 0.0]), expression=rng.normal(scale=0.7, size=n_expression))


def rot_err_deg(a: np.ndarray, b: np.ndarray) -> float:
    return math.degrees(angle_between(rotation_matrix(a), rotation_matrix(b)))


def test_rotation_helpers_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(50):
        aa = rng.normal(size=3)
        aa *= rng.uniform(0, 3.1) / np.linalg.norm(aa)
        np.testing.assert_allclose(axis_angle(rotation_matrix(aa)), aa, atol=1e-6)
    assert np.allclose(axis_angle(rotation_matrix(np.array([0, math.pi - 1e-6, 0]))), [0, math.pi - 1e-6, 0], atol=1e-4)


def test_jacobians_match_finite_differences(fitter, camera):
    rng = np.random.default_rng(1)
    pose, beta = random_pose(rng, N), rng.normal(size=N)
    state, prev = _State.from_pose(pose, N), _State.from_pose(random_pose(rng, N), N)
    base = fitter._shape_part(fitter._shape(beta))
    views = [View(camera, camera.project(fitter.landmarks_world(pose, beta)) + rng.normal(size=(68, 2)))]
    r, J, Jb = fitter._frame_terms(views, base, state, prev, True, True)
    eps = 1e-6
    for k in range(fitter.n_pose):
        d = np.zeros(fitter.n_pose)
        d[k] = eps
        num = (fitter._frame_terms(views, base, state.step(d), prev, False)[0]
               - fitter._frame_terms(views, base, state.step(-d), prev, False)[0]) / (2 * eps)
        np.testing.assert_allclose(num, J[:, k], atol=1e-5 * np.abs(J).max())
    for k in range(N):
        b1, b2 = beta.copy(), beta.copy()
        b1[k] += eps
        b2[k] -= eps
        num = (fitter._frame_terms(views, fitter._shape_part(fitter._shape(b1)), state, prev, False)[0]
               - fitter._frame_terms(views, fitter._shape_part(fitter._shape(b2)), state, prev, False)[0]) / (2 * eps)
        np.testing.assert_allclose(num, Jb[:, k], atol=1e-5 * np.abs(Jb).max())


def test_monocular_camera_sees_a_frontal_head_at_rest(fitter, camera):
    """Contract: viewmat = diag(1,-1,-1); rotation 0 faces the camera, output rotation is in OpenCV camera axes."""
    assert np.allclose(camera.viewmat[:3, :3], FLAME_TO_OPENCV)
    pose = HeadPose(np.zeros(3), np.array([0.0, 0.0, -0.6]), np.zeros(3), np.zeros(N))
    uv = camera.project(fitter.landmarks_world(pose))
    assert uv[36, 0] < uv[45, 0] and uv[19, 1] < uv[30, 1] < uv[8, 1]        # eyes left-right, brow above chin
    rot, trans = pose.in_camera(fitter.model, np.zeros(N), camera)
    assert np.allclose(rot, 0) and trans[2] == pytest.approx(0.6)
    turned = HeadPose(np.array([0.0, math.radians(30), 0.0]), pose.translation, np.zeros(3), np.zeros(N))
    yaw, pitch = head_angles(turned.in_camera(fitter.model, np.zeros(N), camera)[0])
    assert abs(abs(yaw) - 30) < 1e-6 and abs(pitch) < 1e-6


def test_noise_free_fit_recovers_the_parameters(fitter, camera):
    """With the true identity and no noise the only error left is the weak prior's pull."""
    rng = np.random.default_rng(2)
    for _ in range(5):
        pose, beta = random_pose(rng, N), rng.normal(size=N)
        obs = camera.project(fitter.landmarks_world(pose, beta))
        res = fitter.fit_frame([View(camera, obs)], beta)
        assert res.rms_px < 0.3
        assert rot_err_deg(res.pose.rotation, pose.rotation) < 1.0
        assert np.abs(res.pose.translation - pose.translation).max() < 0.01


def test_accuracy_under_pixel_noise_and_identity_estimation(fitter, camera):
    """1 px landmark noise on a ~180 px face (what a good detector gives): identity from 12 frames, then per-frame.

    Bounds: reprojection rms ~ the noise itself (sqrt(2) px for 1 px per axis; a fit no worse than the truth
    stays below 1.05 * sqrt(2)); rotation < 3 deg median
    (monocular depth/rotation ambiguity with 24 free shape+expression directions); expression error below
    the prior spread of the truth (0.7) by a clear margin."""
    rng = np.random.default_rng(3)
    beta = rng.normal(size=N)
    truths = [random_pose(rng, N) for _ in range(12)]
    frames = [[View(camera, camera.project(fitter.landmarks_world(p, beta)) + rng.normal(size=(68, 2)))] for p in truths]
    shape, results = fitter.fit_identity(frames)
    assert np.abs(shape[:N] - beta).mean() < 0.5 * np.abs(beta).mean()
    rms = [r.rms_px for r in results]
    rot = [rot_err_deg(r.pose.rotation, p.rotation) for r, p in zip(results, truths)]
    expr = [np.abs(r.pose.expression - p.expression).mean() for r, p in zip(results, truths)]
    assert np.median(rms) < 1.05 * math.sqrt(2) and np.median(rot) < 3.0 and np.median(expr) < 0.45


def test_warm_started_sequence_is_smooth_and_fast(fitter, camera):
    """A slowly turning head: temporal prior + warm start, a few iterations per frame, < 5 ms per frame."""
    rng = np.random.default_rng(4)
    beta, pose = rng.normal(size=N), random_pose(rng, N, 5)
    prev, times, errors = None, [], []
    for t in range(40):
        pose = HeadPose(pose.rotation + np.array([0, 0.02, 0]), pose.translation, pose.jaw,
                        pose.expression + rng.normal(scale=0.05, size=N))
        obs = camera.project(fitter.landmarks_world(pose, beta)) + rng.normal(scale=0.5, size=(68, 2))
        t0 = time.perf_counter()
        res = fitter.fit_frame([View(camera, obs)], beta, previous=prev)
        times.append(time.perf_counter() - t0)
        if prev is not None:
            assert rot_err_deg(res.pose.rotation, prev.rotation) < 5.0
        prev = res.pose
        errors.append(rot_err_deg(res.pose.rotation, pose.rotation))
    assert np.median(errors) < 2.0
    # the 5 ms target is measured by benchmarks/tracking.py; here only a regression guard that survives a
    # loaded shared CI core (an autograd loop would take hundreds of ms)
    assert np.median(times) < 0.025


def test_multiview_shared_pose_beats_single_view(fitter):
    """Three calibrated cameras, one head pose: the joint fit is more accurate than the frontal view alone."""
    rng = np.random.default_rng(5)
    K = intrinsics_from_larger_side_fov(30.0, 512, 512)
    cams = []
    for yaw in (-40.0, 0.0, 40.0):          # cameras on a circle around a head at the world origin
        R_head = rotation_matrix(np.array([0, math.radians(yaw), 0]))
        R = FLAME_TO_OPENCV @ R_head.T
        cams.append(PinholeCamera(K, R, np.array([0.0, 0.0, 0.6])))
    beta = rng.normal(size=N)
    rot_multi, rot_single = [], []
    for _ in range(6):
        pose = random_pose(rng, N, 30)
        pose.translation = rng.normal(scale=0.01, size=3)
        P = fitter.landmarks_world(pose, beta)
        views = [View(c, c.project(P) + rng.normal(scale=1.5, size=(68, 2))) for c in cams]
        multi = fitter.fit_frame(views, beta)
        single = fitter.fit_frame(views[1:2], beta)
        assert multi.errors_px.shape == (3, 68)
        rot_multi.append(rot_err_deg(multi.pose.rotation, pose.rotation))
        rot_single.append(rot_err_deg(single.pose.rotation, pose.rotation))
    assert np.median(rot_multi) < 1.5 and np.median(rot_multi) < np.median(rot_single)


@pytest.fixture(scope="module")
def head():
    import engine

    return engine.load_head(dtype=__import__("torch").float64)


def test_embedded_head_true_landmarks_are_recovered(head, camera):
    """The engine's embedded head, its true landmarks (smplx forward, barycentric on the posed mesh) projected
    with a known camera, random identity/expression/jaw and yaw within ±45°, 1 px noise per axis.

    Bounds: median reprojection < 1.05·sqrt(2) px (the noise floor); head rotation median < 1.5° (measured 0.5°;
    30 shape and 22 expression directions are free, so 1 px leaves some monocular ambiguity);
    mean expression error < 0.4 where the truth has spread 0.6 (well below guessing zero, ~0.48)."""
    import torch

    from engine.types import FlameParams

    model = LandmarkModel.from_head(head)
    fitter = LandmarkFitter(model)
    rng = np.random.default_rng(7)
    beta = rng.normal(scale=0.8, size=head.n_shape)
    truths, frames = [], []
    for _ in range(12):
        pose = random_pose(rng, head.n_expression)
        pose.expression = rng.normal(scale=0.6, size=head.n_expression)
        p = FlameParams.zeros(1, head.n_shape, head.n_expression, dtype=torch.float64)
        p = p.with_(shape=torch.tensor(beta)[None], expression=torch.tensor(pose.expression)[None],
                    rotation=torch.tensor(pose.rotation)[None], jaw=torch.tensor(pose.jaw)[None],
                    translation=torch.tensor(pose.translation)[None])
        with torch.no_grad():
            true_lm = head.landmark_vertices(head.forward(p))[0].numpy()
        truths.append(pose)
        frames.append([View(camera, camera.project(true_lm) + rng.normal(size=(68, 2)))])
    shape, results = fitter.fit_identity(frames)
    rms = [r.rms_px for r in results]
    rot = [rot_err_deg(r.pose.rotation, p.rotation) for r, p in zip(results, truths)]
    expr = [np.abs(r.pose.expression - p.expression).mean() for r, p in zip(results, truths)]
    assert np.median(rms) < 1.05 * math.sqrt(2)
    assert np.median(rot) < 1.5
    assert np.median(expr) < 0.4
