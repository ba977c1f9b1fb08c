"""3DGS PLY files: standard layout (plyfile sees exactly our properties) and exact activation inverses."""
from __future__ import annotations

import numpy as np
import pytest
from plyfile import PlyData

from protocols.ply import PROPERTIES, SH_C0, PlyError, load_ply, save_ply


def sample(n: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    quats = rng.normal(size=(n, 4))
    return {
        "means": rng.normal(scale=0.1, size=(n, 3)).astype(np.float32),
        "quats": (quats / np.linalg.norm(quats, axis=1, keepdims=True)).astype(np.float32),
        "scales": rng.uniform(1e-4, 0.05, size=(n, 3)).astype(np.float32),
        "opacities": rng.uniform(0.01, 0.99, size=n).astype(np.float32),
        "colors": rng.uniform(0, 1, size=(n, 3)).astype(np.float32),
    }


def test_round_trip(tmp_path):
    arrays = sample()
    path = save_ply(tmp_path / "a.ply", arrays)
    back = load_ply(path)
    assert set(back) == {"means", "quats", "scales", "opacities", "colors"}
    assert np.array_equal(back["means"], arrays["means"]) and np.array_equal(back["quats"], arrays["quats"])
    for name in ("scales", "opacities", "colors"):
        assert back[name].dtype == np.float32 and back[name].shape == arrays[name].shape
        np.testing.assert_allclose(back[name], arrays[name], rtol=1e-5, atol=1e-6)


def test_plyfile_sees_exactly_the_standard_properties(tmp_path):
    save_ply(tmp_path / "a.ply", sample(7))
    ply = PlyData.read(str(tmp_path / "a.ply"))
    assert [e.name for e in ply.elements] == ["vertex"] and ply.elements[0].count == 7
    assert [p.name for p in ply["vertex"].properties] == list(PROPERTIES) == [
        "x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
        "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert all(p.val_dtype in ("f4", "float32") for p in ply["vertex"].properties)
    assert ply.byte_order == "<" and not ply.text


def test_stored_values_are_the_raw_3dgs_parameters(tmp_path):
    arrays = {"means": np.array([[0.1, -0.2, 0.3]], np.float32), "quats": np.array([[1, 0, 0, 0]], np.float32),
              "scales": np.array([[0.01, 0.02, np.e]], np.float32), "opacities": np.array([0.5], np.float32),
              "colors": np.array([[0.5, 1.0, 0.0]], np.float32)}
    save_ply(tmp_path / "one.ply", arrays)
    v = PlyData.read(str(tmp_path / "one.ply"))["vertex"]
    assert v["opacity"][0] == pytest.approx(0.0, abs=1e-7)  # logit(0.5)
    assert [v[f"scale_{i}"][0] for i in range(3)] == pytest.approx([np.log(0.01), np.log(0.02), 1.0], rel=1e-6)
    assert [v[f"f_dc_{i}"][0] for i in range(3)] == pytest.approx([0.0, 0.5 / SH_C0, -0.5 / SH_C0], rel=1e-6)
    assert v["rot_0"][0] == 1.0 and v["x"][0] == np.float32(0.1)
    assert v["nx"][0] == 0.0


def test_reads_plyfile_written_big_endian_files_with_extra_properties(tmp_path):
    names = list(PROPERTIES) + ["f_rest_0"]
    data = np.zeros(3, dtype=[(n, ">f4") for n in names])
    data["opacity"] = 2.0
    data["scale_0"] = -3.0
    from plyfile import PlyElement

    PlyData([PlyElement.describe(data, "vertex")], byte_order=">").write(str(tmp_path / "be.ply"))
    back = load_ply(tmp_path / "be.ply")
    assert back["opacities"][0] == pytest.approx(1 / (1 + np.exp(-2.0)))
    assert back["scales"][0, 0] == pytest.approx(np.exp(-3.0))


def test_degenerate_values_stay_finite(tmp_path):
    arrays = sample(3)
    arrays["opacities"] = np.array([0.0, 1.0, 0.5], np.float32)
    arrays["scales"][0] = 0.0
    save_ply(tmp_path / "d.ply", arrays)
    v = PlyData.read(str(tmp_path / "d.ply"))["vertex"]
    assert np.all(np.isfinite(v["opacity"])) and np.all(np.isfinite(v["scale_0"]))


def test_bad_files_and_inputs_are_rejected(tmp_path):
    (tmp_path / "junk.ply").write_bytes(b"not a ply")
    with pytest.raises(PlyError, match="not a PLY"):
        load_ply(tmp_path / "junk.ply")
    save_ply(tmp_path / "t.ply", sample(10))
    data = (tmp_path / "t.ply").read_bytes()
    (tmp_path / "trunc.ply").write_bytes(data[:-5])
    with pytest.raises(PlyError, match="truncated"):
        load_ply(tmp_path / "trunc.ply")
    (tmp_path / "ascii.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 0\nend_header\n")
    with pytest.raises(PlyError, match="binary"):
        load_ply(tmp_path / "ascii.ply")
    (tmp_path / "mesh.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 0\n"
                                        b"property float x\nend_header\n")
    with pytest.raises(PlyError, match="missing properties"):
        load_ply(tmp_path / "mesh.ply")
    bad = sample(4)
    bad["colors"] = bad["colors"][:3]
    with pytest.raises(ValueError, match="colors"):
        save_ply(tmp_path / "x.ply", bad)
