"""The authors' release through the product: `--weights official:DIR`, `check-weights`, the user's FLAME as the
tracker's head, official framing and mattes.

The release is `engine.testing.make_official_release`'s micro fixture: random weights under the official key names
at micro widths, a FLAME-2023-format pickle made from our default head, an oral-cavity OBJ, DINOv2-format weights
and FLAME's 70-point landmark layout. The replay runs on a real clip.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.checkpoints import default_checkpoint_dir
from engine.official_release import check_release, expected_network_tensors, find_release, is_official_release
from engine.testing import make_official_release
from fastavatar_stream.cli import main

CLI = [sys.executable, "-m", "fastavatar_stream"]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return make_official_release(tmp_path_factory.mktemp("release"))


def copy_of(release: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(release, tmp_path / "copy"))


def test_the_fixture_is_a_complete_release_in_the_tree_and_in_a_flat_folder(release, tmp_path) -> None:
    tree = find_release(release)
    assert tree.network.relative_to(release) == Path("model_zoo/fastavatar/model.safetensors")
    assert tree.flame.name == "flame2023.pkl" and tree.oral_mesh.name == "oral_jawopen0p5.obj"
    assert tree.dinov2.name == "dinov2_vitl14_reg4_pretrain.pth" and tree.config().name == "micro"
    assert not any(k.startswith("encoder.model.") for k in load_file(str(tree.network)))  # DINOv2 comes separately
    flat = make_official_release(tmp_path / "flat", layout="flat")
    assert sorted(p.name for p in flat.iterdir()) == sorted(
        ["model.safetensors", "fastavatar_config.json", "dinov2_vitl14_reg4_pretrain.pth", "flame2023.pkl",
         "oral_jawopen0p5.obj", "landmark_embedding_with_eyes.npy"])
    for root in (release, flat):
        check = check_release(root)
        assert check.complete, check.problems()
        assert [r.status for r in check.rows] == ["found"] * 5 + ["optional"]
        assert is_official_release(root)


def test_the_optional_mediapipe_embedding_is_found_and_checked(release, tmp_path) -> None:
    copy = copy_of(release, tmp_path)
    folder = next(copy.rglob("flame2023.pkl")).parent
    np.savez(folder / "mediapipe_landmark_embedding.npz", lmk_face_idx=np.arange(105),
             lmk_b_coords=np.full((105, 3), 1 / 3), landmark_indices=np.arange(105))
    check = check_release(copy)
    assert check.complete and check.rows[-1].status == "found"
    assert check.release.mediapipe_landmarks == folder / "mediapipe_landmark_embedding.npz"
    np.savez(folder / "mediapipe_landmark_embedding.npz", lmk_face_idx=np.arange(105))
    check = check_release(copy)
    assert not check.complete and "mediapipe_landmark_embedding.npz" in check.problems()[0]


def test_expected_network_shapes_are_the_manifests(shared_dir) -> None:
    manifest = json.loads((shared_dir / "reference" / "manifest.json").read_text())
    listed = {e["name"]: tuple(e["shape"]) for name, group in manifest["groups"].items()
              if name != "renderer.flame_model" for e in group["entries"]}
    listed.pop("encoder.model.mask_token", None)
    assert expected_network_tensors(__import__("engine.model", fromlist=["OFFICIAL"]).OFFICIAL) == listed


def test_check_weights_exits_0_on_a_complete_release_and_lists_every_file(release, capsys) -> None:
    assert main(["check-weights", str(release)]) == 0
    out = capsys.readouterr().out
    for name in ("model.safetensors", "dinov2_vitl14_reg4_pretrain.pth", "flame2023.pkl", "oral_jawopen0p5.obj",
                 "landmark_embedding_with_eyes.npy"):
        assert name in out
    assert main(["check-weights", str(release), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["complete"] is True


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_missing_file_exits_2_naming_it(release, tmp_path, capsys, real_clip) -> None:
    broken = copy_of(release, tmp_path)
    next(broken.rglob("flame2023.pkl")).unlink()
    assert main(["check-weights", str(broken)]) == 2
    assert "missing flame2023.pkl" in _one_error_line(capsys)
    assert main(["--log-level", "error", "replay", str(real_clip), "--weights", f"official:{broken}",
                 "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"]) == 2
    assert "missing flame2023.pkl" in _one_error_line(capsys)


@pytest.mark.parametrize("name", ["flame2023.pkl", "oral_jawopen0p5.obj", "landmark_embedding_with_eyes.npy",
                                  "dinov2_vitl14_reg4_pretrain.pth"])
def test_check_weights_names_any_truncated_file(release, tmp_path, capsys, name) -> None:
    broken = copy_of(release, tmp_path)
    path = next(broken.rglob(name))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert main(["check-weights", str(broken)]) == 2
    assert name in _one_error_line(capsys)


def test_a_truncated_file_exits_2_naming_it(release, tmp_path, capsys, real_clip) -> None:
    broken = copy_of(release, tmp_path)
    network = next(broken.rglob("model.safetensors"))
    data = network.read_bytes()
    network.write_bytes(data[: len(data) // 2])
    assert main(["check-weights", str(broken)]) == 2
    assert "model.safetensors" in _one_error_line(capsys)
    assert main(["--log-level", "error", "replay", str(real_clip), "--weights", f"official:{broken}",
                 "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert "model.safetensors" in line and "incomplete" in line


def test_a_tensor_of_the_wrong_shape_exits_2_naming_it(release, tmp_path, capsys, real_clip) -> None:
    broken = copy_of(release, tmp_path)
    network = next(broken.rglob("model.safetensors"))
    state = load_file(str(network))
    name = "transformer.frame_attn.layers.0.attn.to_q.weight"
    state[name] = torch.zeros(3, 5)
    save_file(state, str(network))
    assert main(["check-weights", str(broken)]) == 2
    assert name in _one_error_line(capsys)
    assert main(["--log-level", "error", "replay", str(real_clip), "--weights", f"official:{broken}",
                 "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"]) == 2
    assert name in _one_error_line(capsys)


def test_devices_are_checked(capsys, tmp_path, real_clip) -> None:
    from fastavatar_stream.commands._common import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert main(["replay", str(real_clip), "--out", str(tmp_path / "o"), "--device", "tpu:0"]) == 2
    assert "--device must be auto, cpu, cuda or cuda:N" in _one_error_line(capsys)
    if not torch.cuda.is_available():
        assert main(["replay", str(real_clip), "--out", str(tmp_path / "o"), "--device", "cuda:0"]) == 2
        assert "no CUDA device" in _one_error_line(capsys)


def test_the_official_model_tracks_the_users_flame_and_frames_the_head(release) -> None:
    from engine.avatar_model import AvatarModel
    from engine.official_geometry import OfficialRig

    model = AvatarModel.from_spec(str(release))  # a release folder is recognised without the prefix
    assert isinstance(model.head, OfficialRig)  # Gaussians are posed with the official rig
    head = model.landmark_head
    assert head.n_vertices == 5023 and head.n_shape == 300 and head.n_expression == 100
    assert head.source.endswith("flame2023.pkl")
    assert (model.framing, model.crop_scale, model.expects_matted, model.default_fusion) == ("head", 1.65, True,
                                                                                            "concat")
    assert not model.default_surface  # the released behaviour: no surface layer unless asked for
    assert len(model.prompts) == model.network.cfg.n_points == 64
    assert not is_official_release(default_checkpoint_dir())  # our own checkpoint is not mistaken for a release


def test_official_windows_fuse_by_concat_or_by_visibility(release) -> None:
    from engine.avatar_model import AvatarModel
    from engine.reconstruct import Views
    from engine.types import FlameParams, orbit_cameras

    model = AvatarModel.from_spec(f"official:{release}")
    size, n = model.input_size, 3
    params = FlameParams.zeros(n, 300, 100)
    views = Views(torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)),
                  orbit_cameras(n, radius=0.6, fov_x_degrees=30, width=size, height_px=size), params)
    concat = model.window_gaussians(views, [0, 1, 2], fusion=model.default_fusion)
    weighted = model.window_gaussians(views, [0, 1, 2], fusion="visibility")
    assert [len(s) for s in concat] == [64] * (n + 1) and all(s.seen is None for s in concat)
    assert all(s.seen is not None for s in weighted)   # posed with the official rig, seen by the crop cameras
    torch.testing.assert_close(concat[0].color, weighted[0].color)  # the network itself is the same


def _frame_facing_the_camera(head):
    from fastavatar_stream.frames import FlameFit, TrackedFrame
    from fastavatar_stream.tracking import PinholeCamera, intrinsics_from_larger_side_fov

    camera = PinholeCamera(intrinsics_from_larger_side_fov(40.0, 512, 512))
    fit = FlameFit(shape=np.zeros(300, np.float32), expression=np.zeros(100, np.float32),
                   rotation=np.zeros(3, np.float32), neck=np.zeros(3, np.float32), jaw=np.zeros(3, np.float32),
                   eyes=np.zeros(6, np.float32), translation=np.array([0.0, 0.0, -0.6], np.float32))
    return TrackedFrame(image=np.zeros((512, 512, 3), np.uint8), pts=0.0, index=0, K=camera.K.astype(np.float32),
                        viewmat=camera.viewmat.astype(np.float32), flame=fit, landmarks=np.zeros((68, 3), np.float32),
                        box=np.zeros(4, np.float32))


def test_head_box_holds_the_face_and_forehead_but_not_the_neck(release) -> None:
    from engine.head import load_head
    from engine.types import FlameParams
    from fastavatar_stream.views import HeadBox

    rel = find_release(release)
    head = load_head(rel.flame, rel.landmarks)
    frame = _frame_facing_the_camera(head)
    box = HeadBox(head)(frame)
    params = FlameParams.zeros(1, 300, 100)
    params.translation = torch.tensor([[0.0, 0.0, -0.6]])
    with torch.no_grad():
        out = head(params)
        lmk = head.landmark_vertices(out)[0].double().numpy()
    cam = lmk @ frame.viewmat[:3, :3].T.astype(np.float64) + frame.viewmat[:3, 3]
    uv = cam[:, :2] / cam[:, 2:] * frame.K[0, 0] + frame.K[:2, 2]
    x0, y0 = uv.min(0)
    x1, y1 = uv.max(0)
    assert box[0] <= x0 + 1 and box[2] >= x1 - 1                 # as wide as the face at least
    assert box[1] < y0 - 0.3 * (y1 - y0)                          # reaches well above the brows
    assert abs(box[3] - uv[8, 1]) < 0.05 * (y1 - y0)              # ends at the chin: no neck


def test_a_trackers_matte_puts_the_official_crop_on_white() -> None:
    from fastavatar_stream.frames import TrackedFrame
    from fastavatar_stream.prepare import FramePreparer

    image = np.zeros((64, 64, 3), np.uint8)
    image[..., 0] = 200
    frame = TrackedFrame(image=image, pts=0.0, index=0, K=np.eye(3, dtype=np.float32),
                         viewmat=np.eye(4, dtype=np.float32), flame=None, landmarks=np.zeros((68, 3), np.float32),
                         box=np.array([16, 16, 48, 48], np.float32))
    matte = np.zeros((64, 64), np.float32)
    matte[:, :32] = 1.0                                           # the left half is the head
    frame.matte = matte
    prep = FramePreparer(size=32, scale=1.0, expects_matted=True)
    out = prep.prepare(frame)
    assert prep.notes == [] and prep.mattes_used == 1
    np.testing.assert_allclose(out.image[:, :, :12], np.broadcast_to([[[200 / 255]], [[0.0]], [[0.0]]], (3, 32, 12)),
                               atol=1e-6)
    np.testing.assert_allclose(out.image[:, :, 20:], 1.0, atol=1e-6)  # white where the matte is 0
    unmatted = FramePreparer(size=32, scale=1.0).prepare(frame)      # our models take the crop as it is
    assert np.allclose(unmatted.image[0], 200 / 255, atol=1e-6)


@pytest.fixture(scope="module")
def replayed(release, real_clip, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("official-replay")
    env = dict(os.environ, OMP_NUM_THREADS="2")
    done = subprocess.run(CLI + ["replay", str(real_clip), "--weights", f"official:{release}", "--out", str(out),
                                 "--device", "cpu", "--max-frames", "16", "--refine", "1", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_replay_with_official_weights_writes_avatar_report_and_preview(replayed) -> None:
    from PIL import Image

    from protocols.ply import load_ply

    report = json.loads((replayed / "report.json").read_text())
    assert report["frames_tracked"] == 16 and report["windows"] >= 2 and report["n_gaussians_final"] > 0
    assert report["extra"]["model"] == "micro" and report["extra"]["weights"].startswith("official:")
    prep = report["extra"]["input"]
    assert prep["framing"] == "head" and prep["crop_scale"] == 1.65 and prep["fusion"] == "concat"
    assert prep["tracking_head"].endswith("flame2023.pkl")  # the tracker fitted the release's FLAME
    assert prep["matte"].startswith(("tracker matte on", "none available"))
    arrays = load_ply(replayed / "avatar.ply")
    assert len(arrays["means"]) == report["n_gaussians_final"]
    assert np.isfinite(arrays["means"]).all()
    assert Image.open(replayed / "preview.png").size == (8 * 256, 2 * 256)


@pytest.mark.gpu
def test_replay_with_official_weights_on_cuda(release, real_clip, tmp_path) -> None:
    out = tmp_path / "cuda"
    done = subprocess.run(CLI + ["replay", str(real_clip), "--weights", f"official:{release}", "--out", str(out),
                                 "--device", "cuda", "--max-frames", "16", "--refine", "2", "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["n_gaussians_final"] > 0 and report["stages"].get("refine", {}).get("n", 0) > 0
