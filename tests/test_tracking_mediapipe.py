"""The MediaPipe landmark backend: dense face mesh, the 68 points read off it, the matte, the dense FLAME fit,
the MediaPipe embeddings (ours and FLAME's file layout) and what happens when mediapipe cannot load."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

import engine
from engine.errors import InputError
from engine.head import read_mediapipe_embedding
from fastavatar_stream.cli import main
from fastavatar_stream.tracking import FaceTracker, HeadPose, LandmarkFitter, LandmarkModel, TrackerConfig, View
from fastavatar_stream.tracking.backends import make_detector
from fastavatar_stream.tracking.detectors import DlibDetector
from fastavatar_stream.tracking.mediapipe_backend import MediaPipeDetector
from fastavatar_stream.tracking.mesh_landmarks import IBUG_FROM_MESH, ibug_from_mesh
from fastavatar_stream.tracking.tracker import head_angles


def read_clip(path, n: int) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for _, f in zip(range(n), c.decode(video=0))]


@pytest.fixture(scope="module")
def head():
    return engine.load_head()


@pytest.fixture(scope="module")
def address_frames(real_clip) -> list[np.ndarray]:
    return read_clip(real_clip, 40)


@pytest.fixture(scope="module")
def mesh_mirror(shared_dir) -> np.ndarray:
    """(468,) the mirror partner of each face-mesh vertex: MediaPipe's canonical face is left-right symmetric."""
    obj = shared_dir / "data" / "face" / "canonical_face_model.obj"
    v = np.array([[float(x) for x in line.split()[1:4]] for line in obj.read_text().splitlines()
                  if line.startswith("v ")])
    flipped = v * np.array([-1.0, 1.0, 1.0])
    return np.argmin(np.linalg.norm(v[:, None] - flipped[None], axis=2), axis=1)


def tracker(head, **config) -> FaceTracker:
    return FaceTracker(LandmarkModel.from_head(head), TrackerConfig(detector="mediapipe", **config),
                       mesh_model=LandmarkModel.mesh_from_head(head))


def camera_yaw(tracker: FaceTracker, frame) -> float:
    f = frame.flame
    pose = HeadPose(f.rotation.astype(float), f.translation.astype(float), f.jaw.astype(float),
                    f.expression.astype(float))
    camera = tracker.camera_for(frame.image.shape[1], frame.image.shape[0])
    return head_angles(pose.in_camera(tracker.model, tracker.shape, camera)[0])[0]


# ------------------------------------------------------------------------------------------- the contract
def test_track_cli_with_mediapipe_writes_mesh_backend_and_valid_frames(real_clip, tmp_path):
    out = tmp_path / "tracks.npz"
    assert main(["track", str(real_clip), "--out", str(out), "--max-frames", "40", "--landmarks", "mediapipe",
                 "--matte-out", str(tmp_path / "mattes")]) == 0
    z = np.load(out)
    T = 40
    assert str(z["backend"]) == "mediapipe"
    assert z["valid"].mean() >= 0.95
    assert z["landmarks"].shape == (T, 68, 2) and z["mesh"].shape == (T, 478, 3)
    for key in ("rotation", "translation", "jaw_pose"):
        assert z[key].shape == (T, 3)
    assert z["expression"].shape[0] == T and z["shape"].ndim == 1 and z["K"].shape == (3, 3) and z["fps"].ndim == 0
    # the 68 points are the index map applied to the mesh, and the mesh lies on the 512 x 512 frame
    np.testing.assert_allclose(z["landmarks"][5], ibug_from_mesh(z["mesh"][5, :, :2].astype(float)), atol=1e-3)
    assert 0 < z["mesh"][:, :, :2].min() and z["mesh"][:, :, :2].max() < 512
    # the dense fit reprojects the embedded mesh vertices within 2% of the face size (rms)
    assert np.nanmedian(z["fit_error_rel"]) < 0.02
    assert len(list((tmp_path / "mattes").glob("*.png"))) == T


def test_preview_dims_what_the_matte_leaves_out_and_draws_over_the_face(shared_dir, tmp_path):
    clip = shared_dir / "data" / "real" / "obama_talk_834x884.mp4"
    preview = tmp_path / "preview.mp4"
    assert main(["track", str(clip), "--out", str(tmp_path / "t.npz"), "--max-frames", "4", "--preview",
                 str(preview), "--landmarks", "mediapipe"]) == 0
    original = read_clip(clip, 4)[-1].astype(float)
    shown = read_clip(preview, 4)[-1].astype(float)
    h, w = shown.shape[:2]
    k = h // 10
    room, room_shown = original[:k, :k].mean(), shown[:k, :k].mean()
    assert abs(room_shown - room / 3.0) < 0.1 * room                             # the room at a third
    z = np.load(tmp_path / "t.npz")
    x0, y0 = z["mesh"][-1, :, :2].min(0).astype(int)
    x1, y1 = z["mesh"][-1, :, :2].max(0).astype(int)
    assert np.abs(shown[y0:y1, x0:x1] - original[y0:y1, x0:x1]).mean() > 10    # the face carries the drawings


def test_replay_and_serve_take_the_landmarks_choice():
    from fastavatar_stream.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["replay", "clip.mp4", "--out", "d"]).landmarks == "auto"
    assert parser.parse_args(["replay", "clip.mp4", "--out", "d", "--landmarks", "dlib"]).landmarks == "dlib"
    assert parser.parse_args(["serve", "--landmarks", "mediapipe"]).landmarks == "mediapipe"
    assert parser.parse_args(["track", "v.mp4", "--out", "t.npz"]).landmarks == "auto"


def test_auto_is_mediapipe_and_missing_mediapipe_is_one_clear_line(real_clip, tmp_path, monkeypatch, capsys):
    assert make_detector("auto").name == "mediapipe"
    monkeypatch.setitem(sys.modules, "mediapipe", None)                          # `import mediapipe` fails
    with pytest.raises(InputError, match="--landmarks dlib"):
        MediaPipeDetector()
    assert main(["track", str(real_clip), "--out", str(tmp_path / "t.npz"), "--landmarks", "mediapipe"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mediapipe" in err[0] and "--landmarks dlib" in err[0]


def test_unloadable_mediapipe_exits_2_naming_the_dlib_fallback(real_clip, tmp_path):
    broken = tmp_path / "site" / "mediapipe"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('libmediapipe.so: cannot open shared object file')\n")
    env = {"PYTHONPATH": f"{broken.parent}:{':'.join(sys.path)}", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "fastavatar_stream", "track", str(real_clip), "--out",
                           str(tmp_path / "t.npz"), "--landmarks", "mediapipe"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "libmediapipe.so" in lines[0] and "--landmarks dlib" in lines[0]


# --------------------------------------------------------------------------------- landmarks from the mesh
def test_the_68_points_from_the_mesh_agree_with_dlib_on_the_inner_face(address_frames):
    """Eyes, nose, lips and brows within 8% of the inter-ocular distance of dlib's (median); the jaw line is
    defined a little differently by the two (dlib: silhouette; ours: the head builder's embedding)."""
    mp_detector, dlib_detector = MediaPipeDetector(), DlibDetector()
    errors = []
    for image in address_frames[:10]:
        ours = mp_detector.detect(image)[0].landmarks
        theirs = dlib_detector.detect(image)[0].landmarks
        iod = np.linalg.norm(theirs[36:42].mean(0) - theirs[42:48].mean(0))
        errors.append(np.linalg.norm(ours - theirs, axis=1) / iod)
    errors = np.array(errors)
    assert np.median(errors[:, 17:]) < 0.08 and np.median(errors[:, :17]) < 0.2
    assert len(IBUG_FROM_MESH) == 68


def test_mirrored_clip_gives_the_mirrored_mesh_and_negated_yaw(head, address_frames, mesh_mirror):
    """Metamorphic: the mirror image of a clip gives the mirrored mesh (vertices swap with their partners) within
    2 px median, and the head's yaw relative to the clip's mean yaw is negated within 1.5 degrees (median over
    frames). MediaPipe's mesh from a fresh detection on every frame (mesh_tracking=False) is tested: in tracking
    mode each frame's crop comes from the previous mesh, which lets the network's small left/right asymmetry
    accumulate (benchmarks/RESULTS.md has both)."""
    width = address_frames[0].shape[1]
    runs = []
    for frames in (address_frames, [np.ascontiguousarray(im[:, ::-1]) for im in address_frames]):
        t = tracker(head, mesh_tracking=False)
        tracked = [t.track(im, i / 25.0, i) for i, im in enumerate(frames)]
        assert all(f.usable for f in tracked)
        runs.append((np.stack([f.mesh for f in tracked]), np.array([camera_yaw(t, f) for f in tracked])))
    (mesh, yaw), (mirrored_mesh, mirrored_yaw) = runs
    back = mirrored_mesh[:, :468][:, mesh_mirror]
    back[..., 0] = width - back[..., 0]
    assert np.median(np.linalg.norm(mesh[:, :468, :2] - back[..., :2], axis=2)) < 2.0
    relative, mirrored_relative = yaw - yaw.mean(), mirrored_yaw - mirrored_yaw.mean()
    assert np.ptp(yaw) > 3.0                                                    # the head does turn
    assert np.median(np.abs(relative + mirrored_relative)) < 1.5


def test_the_dense_fit_is_exactly_mirror_symmetric(head, address_frames, mesh_mirror):
    """Given the mirrored mesh itself, the fit gives the negated yaw: the embedding and solver add no bias."""
    t = tracker(head)
    frame = [t.track(im, i / 25.0, i) for i, im in enumerate(address_frames[:3])][-1]
    width = frame.image.shape[1]
    mirrored = frame.mesh[:468][mesh_mirror].astype(float)
    mirrored[:, 0] = width - mirrored[:, 0]
    fitter, camera = t.fitter, t.camera_for(width, frame.image.shape[0])
    idx = t.model.mesh_indices
    yaws = []
    for points in (frame.mesh[idx, :2].astype(float), mirrored[idx, :2]):
        pose = fitter.fit_frame([View(camera, points)], t.shape).pose
        yaws.append(head_angles(pose.in_camera(t.model, t.shape, camera)[0])[0])
    assert abs(yaws[0]) > 1.0 and yaws[0] + yaws[1] == pytest.approx(0.0, abs=0.05)


# ----------------------------------------------------------------------------------------------- the matte
def test_matte_covers_the_face_and_leaves_the_room_out(shared_dir, head):
    """obama_talk_834x884: a real room behind him; his shoulders fill the bottom corners of the frame."""
    frames = read_clip(shared_dir / "data" / "real" / "obama_talk_834x884.mp4", 12)
    t = tracker(head)
    for i, image in enumerate(frames):
        frame = t.track(image, i / 25.0, i)
    h, w = image.shape[:2]
    matte = frame.matte
    assert matte.shape == (h, w) and matte.dtype == np.float32 and 0.0 <= matte.min() and matte.max() <= 1.0
    x0, y0 = np.floor(frame.landmarks[:, :2].min(0)).astype(int)                # the face: its 68 points' box
    x1, y1 = np.ceil(frame.landmarks[:, :2].max(0)).astype(int)
    assert matte[y0:y1, x0:x1].mean() > 0.9                                     # (the box's lower corners are neck)
    cols, rows = np.round(frame.mesh[:, :2]).astype(int).T
    assert (matte[rows, cols] > 0.5).mean() > 0.97                              # (the oval's vertices are its edge)
    cols, rows = np.round(frame.landmarks[17:, :2]).astype(int).T
    assert (matte[rows, cols] > 0.9).all()                                      # brows, eyes, nose, mouth
    k = max(h, w) // 10
    for corner in (matte[:k, :k], matte[:k, -k:]):                              # the room above his shoulders
        assert corner.mean() < 0.05
    assert matte[-k:, w // 2 - k:w // 2 + k].mean() > 0.9                       # his shirt and tie stay


def test_closing_a_tracker_releases_mediapipe_once(head, address_frames):
    t = tracker(head)
    assert t.track(address_frames[0], 0.0, 0).usable
    t.close()
    t.close()                                                                   # a second close is harmless
    with pytest.raises(ValueError, match="_graph is None"):
        t.detector.mesh(address_frames[1])                                      # its graphs are gone


def test_backends_without_a_matte_leave_it_none(head, address_frames):
    frame = FaceTracker(LandmarkModel.from_head(head), TrackerConfig(detector="dlib")).track(address_frames[0], 0, 0)
    assert frame.usable and frame.matte is None and frame.mesh is None


# ---------------------------------------------------------------------------------------------- embeddings
def test_default_head_ships_a_mediapipe_embedding_on_the_canonical_face(head, shared_dir):
    """Every embedded vertex sits where MediaPipe's canonical face has it, up to our head's own shape: within
    2 mm (median) after the head builder's placement of the canonical face, and within 1 cm everywhere."""
    from engine.train.head_builder.face_reference import load_face_reference

    emb = head.mediapipe
    assert emb is not None and len(emb.mesh_indices) == len(set(emb.mesh_indices.tolist())) >= 100
    model = LandmarkModel.mesh_from_head(head)
    reference = load_face_reference().vertices[emb.mesh_indices]
    distance = np.linalg.norm(model.template - reference, axis=1)
    assert np.median(distance) < 0.002 and distance.max() < 0.01
    assert model.n_points == len(emb.mesh_indices) and 20 <= len(model.contour) <= 40


def test_a_flame_users_mediapipe_embedding_file_is_read_and_checked(tmp_path, head):
    """The layout of FLAME's mediapipe_landmark_embedding.npz: lmk_face_idx, lmk_b_coords, landmark_indices."""
    rng = np.random.default_rng(0)
    n = 105
    good = tmp_path / "mediapipe_landmark_embedding.npz"
    bary = rng.dirichlet(np.ones(3), n)
    np.savez(good, lmk_face_idx=rng.integers(0, len(head.faces), n), lmk_b_coords=bary,
             landmark_indices=rng.choice(468, n, replace=False))
    emb = read_mediapipe_embedding(good, len(head.faces))
    assert emb.face_idx.shape == (n,) and emb.bary.shape == (n, 3) and emb.mesh_indices.shape == (n,)
    loaded = engine.load_head(mediapipe_path=good)
    assert np.array_equal(loaded.mediapipe.mesh_indices, emb.mesh_indices)
    assert LandmarkModel.mesh_from_head(loaded).n_points == n
    np.savez(tmp_path / "no_indices.npz", lmk_face_idx=np.zeros(n, int), lmk_b_coords=bary)
    with pytest.raises(InputError, match="landmark_indices"):
        read_mediapipe_embedding(tmp_path / "no_indices.npz", len(head.faces))
    np.savez(tmp_path / "outside.npz", lmk_face_idx=np.full(n, 10 ** 6), lmk_b_coords=bary,
             landmark_indices=np.arange(n))
    with pytest.raises(InputError, match="outside"):
        read_mediapipe_embedding(tmp_path / "outside.npz", len(head.faces))


def test_dense_fit_recovers_a_known_pose_from_the_embedded_vertices(head):
    model = LandmarkModel.mesh_from_head(head)
    fitter = LandmarkFitter(model)
    from fastavatar_stream.tracking.flame_fit import PinholeCamera, intrinsics_from_larger_side_fov

    camera = PinholeCamera(intrinsics_from_larger_side_fov(40.0, 512, 512))
    truth = HeadPose(np.array([0.1, 0.35, -0.05]), np.array([0.01, -0.02, -0.7]), np.array([0.15, 0.0, 0.0]),
                     np.zeros(fitter.n_expression))
    points = camera.project(fitter.landmarks_world(truth))
    result = fitter.fit_frame([View(camera, points)])
    assert result.rms_px < 0.5
    angle = np.linalg.norm(result.pose.rotation - truth.rotation)
    assert math.degrees(angle) < 1.0


def test_eye_poses_follow_the_irises(address_frames, mesh_mirror):
    """Iris at the eye's centre: no rotation; moved towards image right: both eyes turn about +y (FLAME's gaze
    to the subject's left); the mirrored mesh gives the mirrored poses (x kept, y negated, eyes swapped)."""
    from fastavatar_stream.tracking.mesh_landmarks import eye_poses_from_mesh

    mesh = MediaPipeDetector().detect(address_frames[0])[0].mesh[:, :2].astype(float)
    real = eye_poses_from_mesh(mesh)
    assert np.all(np.abs(real) < np.radians(25))                             # a speaker looking at the camera
    centred = mesh.copy()
    for iris, ring, (outer, inner) in ((468, range(468, 473), (33, 133)), (473, range(473, 478), (263, 362))):
        shift = 0.5 * (mesh[outer] + mesh[inner]) - mesh[iris]
        centred[list(ring)] += shift
    looking_right = centred.copy()
    looking_right[468:] += [8.0, 0.0]
    straight, turned = eye_poses_from_mesh(centred), eye_poses_from_mesh(looking_right)
    assert np.allclose(straight[[1, 4]], 0.0, atol=1e-9)
    assert turned[1] > np.radians(5) and turned[4] > np.radians(5)
    width = address_frames[0].shape[1]
    mirrored = np.concatenate([mesh[:468][mesh_mirror], mesh[473:478], mesh[468:473]])
    mirrored[:, 0] = width - mirrored[:, 0]
    back = eye_poses_from_mesh(mirrored)
    np.testing.assert_allclose(back[[3, 4, 0, 1]], real[[0, 1, 3, 4]] * [1, -1, 1, -1], atol=1e-6)
