"""Real-capture loader on a tiny fixture written in the official layout (SPEC §10)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import InputError
from engine.losses import project_points
from engine.train.real_data import RealCaptureDataset, find_sequences, load_views
from engine.train.samples import collate_samples

SIZE = 32
FOCAL = 40.0


def _c2w_gl(eye: np.ndarray) -> np.ndarray:
    """OpenGL camera-to-world for a camera at `eye` on the +z side looking at the origin (no rotation)."""
    m = np.eye(4)
    m[:3, 3] = eye
    return m


def _write_sequence(seq: Path, frames: list[int], eye: np.ndarray, rng: np.random.Generator) -> None:
    (seq / "flame_param").mkdir(parents=True)
    entries = []
    for f in frames:
        entries.append({"transform_matrix": _c2w_gl(eye).tolist(), "fl_x": FOCAL * 2, "fl_y": FOCAL * 2,
                        "cx": SIZE, "cy": SIZE, "w": SIZE * 2, "h": SIZE * 2,
                        "flame_param_path": f"flame_param/{f:05d}.npz"})
        np.savez(seq / "flame_param" / f"{f:05d}.npz", rotation=np.full((1, 3), 0.01 * f), translation=np.zeros((1, 3)),
                 neck_pose=np.zeros((1, 3)), jaw_pose=np.array([[0.1 * f, 0, 0]]), eyes_pose=np.zeros((1, 6)),
                 expr=np.full((1, 100), 0.5), shape=np.full(300, 9.0))
        fdir = seq / "processed_data" / f"{f:05d}"
        fdir.mkdir(parents=True)
        np.save(fdir / "rgb.npy", rng.random((3, SIZE, SIZE)).astype(np.float32))
        np.save(fdir / "mask.npy", np.ones((SIZE, SIZE), np.float32))
        np.save(fdir / "intrs.npy", np.array([[FOCAL, 0, SIZE / 2, 0], [0, FOCAL, SIZE / 2, 0], [0, 0, 1, 0],
                                              [0, 0, 0, 1]], np.float32))
        # landmark 0 is the projection of the world origin (image centre), stored normalised like the tracker does
        lmk = np.full((1, 68, 2), 0.25, np.float32)
        lmk[0, 0] = 0.5
        np.savez(fdir / "landmark2d.npz", face_landmark_2d=lmk)
        np.save(fdir / "bg_color.npy", np.array(0.5, np.float32))
    (seq / "transforms.json").write_text(json.dumps({"frames": entries}))
    np.savez(seq / "canonical_flame_param.npz", shape=np.arange(300, dtype=np.float32) / 300,
             jaw_pose=np.array([[0.3, 0, 0]]))


@pytest.fixture
def capture(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for person in ("p0", "p1"):
        for cam, eye in (("cam0", np.array([0.0, 0.0, 1.0])), ("cam1", np.array([0.0, 0.0, 1.5]))):
            _write_sequence(tmp_path / person / cam / "EXP-1", [0, 1, 2], eye, rng)
    return tmp_path


def test_finds_every_sequence(capture):
    seqs = find_sequences(capture)
    assert [(s.person, s.camera, s.sequence) for s in seqs] == [
        ("p0", "cam0", "EXP-1"), ("p0", "cam1", "EXP-1"), ("p1", "cam0", "EXP-1"), ("p1", "cam1", "EXP-1")]
    assert all(s.frames == (0, 1, 2) for s in seqs)


def test_views_load_images_cameras_flame_and_landmarks(capture):
    seq = find_sequences(capture)[0]
    sample = load_views([(seq, 1), (seq, 2)], n_shape=10, n_expression=20)
    assert sample.images.shape == (2, 3, SIZE, SIZE) and sample.masks.shape == (2, 1, SIZE, SIZE)
    stored = np.load(seq.path / "processed_data" / "00001" / "rgb.npy")
    assert np.allclose(sample.images[0].numpy(), stored)
    assert torch.allclose(sample.bg_colors, torch.full((2, 3), 0.5))
    # the canonical shape file wins over the per-frame shape; coefficient counts follow the head
    assert sample.flame.shape.shape == (2, 10) and torch.allclose(sample.flame.shape[0], torch.arange(10) / 300)
    assert sample.flame.expression.shape == (2, 20)
    assert sample.flame.jaw[:, 0].tolist() == pytest.approx([0.1, 0.2])
    # OpenGL camera-to-world -> OpenCV world-to-camera: the origin lies 1 m in front and projects to landmark 0
    assert torch.allclose(sample.cameras.viewmats[0, :3, 3], torch.tensor([0.0, 0.0, 1.0]))
    uv = project_points(torch.zeros(2, 1, 3), sample.cameras.viewmats, sample.cameras.Ks)
    assert torch.allclose(uv[:, 0], sample.landmarks[:, 0, :2], atol=1e-4)
    assert sample.landmarks.shape == (2, 68, 3) and (sample.landmarks[..., 2] == 1).all()


def test_resizing_rescales_intrinsics_and_landmarks(capture):
    seq = find_sequences(capture)[0]
    sample = load_views([(seq, 0)], resolution=16)
    assert sample.images.shape[-2:] == (16, 16)
    assert sample.cameras.width == 16 and sample.cameras.Ks[0, 0, 0].item() == pytest.approx(FOCAL / 2)
    assert sample.landmarks[0, 0, :2].tolist() == pytest.approx([8.0, 8.0])


def test_video_and_multiview_datasets(capture):
    video = RealCaptureDataset(capture, sampler="video", n_views=2, seed=3)
    assert len(video) == 4 and video.persons == ["p0", "p1"]
    a, b = video[1], video[1]
    assert a.n_views == 2 and torch.equal(a.images, b.images)  # deterministic by seed
    multi = RealCaptureDataset(capture, sampler="multiview", n_views=12, persons=["p1"])
    assert len(multi) == 3  # frames 0,1,2 of p1, each seen by two cameras
    sample = multi[0]
    assert sample.n_views == 2 and sample.identity == "p1"
    assert not torch.equal(sample.cameras.viewmats[0], sample.cameras.viewmats[1])
    loader = torch.utils.data.DataLoader(video, batch_size=2, collate_fn=collate_samples)
    assert [len(batch) for batch in loader] == [2, 2]


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(InputError):
        RealCaptureDataset(tmp_path / "nope")
    with pytest.raises(InputError):
        RealCaptureDataset(tmp_path)
