"""The official query-point geometry (SPEC.md §5) rebuilt from a FLAME 2023 file and the LAM oral mesh.

FLAME 2023 cannot be shipped, so the fixture is a FLAME-2023-format pickle (chumpy-free numpy arrays, sparse
J_regressor, uint32 kintree as in the real file) with 5,023 random vertices on a triangle-strip-plus-random-triangle
topology: every lip-ring index of the teeth construction exists in it. The oral mesh is an OBJ of 321 vertices and
608 triangles written by the test.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch
from safetensors.torch import save_file

from engine.checkpoints import GEOMETRY_KEYS, load_official, ours_to_official
from engine.errors import InputError
from engine.gaussians import GaussianSet
from engine.model import MICRO as _MICRO
from engine.model import build_model
from engine.official_geometry import (GEOMETRY_NAMES, LIP_RING_LOWER, LIP_RING_UPPER, TEETH_BLOCKS, TEETH_FACES_LOWER,
                                      TEETH_FACES_UPPER, OfficialRig, build_official_geometry, read_flame, read_obj)
from engine.prompts import PointPrompts, subdivide_midpoint
from engine.types import FlameParams

N_FLAME, N_TEETH, N_ORAL = 5023, 120, 321
N_ALL = N_FLAME + N_TEETH + N_ORAL

#: the official network has no point guidance, so official-format files are written by this micro variant
MICRO = _MICRO.replace(point_guidance=False)


def _strip_plus_random(n_vertices: int, n_faces: int, rng: np.random.Generator) -> np.ndarray:
    strip = np.stack([np.arange(n_vertices - 2), np.arange(1, n_vertices - 1), np.arange(2, n_vertices)], 1)
    extra = np.stack([rng.choice(n_vertices, 3, replace=False) for _ in range(n_faces - len(strip))])
    return np.concatenate([strip, extra]).astype(np.int64)


def _flame_arrays(rng: np.random.Generator) -> dict:
    regressor = rng.random((5, N_FLAME)) * (rng.random((5, N_FLAME)) < 0.01)
    regressor /= regressor.sum(1, keepdims=True)
    return {
        "v_template": rng.normal(size=(N_FLAME, 3)) * 0.05,
        "f": _strip_plus_random(N_FLAME, 5200, rng).astype(np.uint32),
        "shapedirs": (rng.normal(size=(N_FLAME, 3, 400)) * 1e-3).astype(np.float32),
        "posedirs": np.zeros((N_FLAME, 3, 36), np.float32),
        "J_regressor": scipy.sparse.csc_matrix(regressor),
        "weights": rng.dirichlet(np.ones(5), size=N_FLAME),
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.uint32),
    }


def _write_oral_obj(path: Path, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    v = rng.normal(size=(N_ORAL, 3)) * 0.01
    f = _strip_plus_random(N_ORAL, 608, rng)
    lines = ["# oral cavity test mesh", "mtllib none.mtl", "o oral"]
    lines += [f"v {x:.9f} {y:.9f} {z:.9f}" for x, y, z in v]
    lines += [f"vt {u:.3f} 0.5" for u in np.linspace(0, 1, N_ORAL)] + ["vn 0 0 1"]
    lines += [f"f {a + 1}/{a + 1}/1 {b + 1}/{b + 1}/1 {c + 1}/{c + 1}/1" for a, b, c in f]
    path.write_text("\n".join(lines) + "\n")
    return v, f


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    torch.set_num_threads(1)
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("official-assets")
    flame = _flame_arrays(rng)
    with open(root / "flame2023.pkl", "wb") as fh:
        pickle.dump(flame, fh, protocol=2)
    oral_v, oral_f = _write_oral_obj(root / "oral_jawopen0p5.obj", rng)
    return {"flame": flame, "flame_path": root / "flame2023.pkl", "oral_v": oral_v, "oral_f": oral_f,
            "oral_path": root / "oral_jawopen0p5.obj", "root": root}


@pytest.fixture(scope="module")
def geometry(assets) -> dict[str, torch.Tensor]:
    return build_official_geometry(assets["flame_path"], assets["oral_path"])


def _unique_edges(faces: np.ndarray) -> np.ndarray:
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    return np.unique(e, axis=0)


# ------------------------------------------------------------------------------------------------ OBJ reader
def test_obj_reader_keeps_file_order_and_reads_every_face_form(tmp_path: Path) -> None:
    (tmp_path / "m.obj").write_text(
        "# comment line\nmtllib x.mtl\no thing\nv 0 0 0\nv 1 0 0  # trailing comment\nv 0 1 0 0.5 0.5 0.5\n"
        "vt 0 0\nvt 1 0\nvt 0 1\nvn 0 0 1\nv 0 0 1\ng part\ns off\nusemtl skin\n"
        "f 1 2 3\nf 1/1 2/2 4/3\nf 2//1 3//1 4//1\nf -4/1/1 -2/2/1 -1/3/1\n")
    v, f = read_obj(tmp_path / "m.obj")
    np.testing.assert_array_equal(v, [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(f, [[0, 1, 2], [0, 1, 3], [1, 2, 3], [0, 2, 3]])
    assert v.dtype == np.float64 and f.dtype == np.int64


def test_obj_reader_refuses_polygons_and_dangling_indices(tmp_path: Path) -> None:
    (tmp_path / "quad.obj").write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nf 1 2 3 4\n")
    with pytest.raises(InputError, match=r"quad\.obj:5: face with 4 vertices; only triangles"):
        read_obj(tmp_path / "quad.obj")
    (tmp_path / "bad.obj").write_text("v 0 0 0\nv 1 0 0\nf 1 2 3\nv 1 1 0\n")
    with pytest.raises(InputError, match=r"bad\.obj:3: face refers to vertex 3, but only 2"):
        read_obj(tmp_path / "bad.obj")


# ------------------------------------------------------------------------------------------------ buffers
def test_buffer_names_shapes_and_vertex_layout(assets, geometry) -> None:
    flame = assets["flame"]
    n_faces = len(flame["f"]) + 168 + 608
    n_up = N_ALL + len(_unique_edges(geometry["faces"].numpy()))
    expected = {"v_template": (N_ALL, 3), "shapedirs": (N_ALL, 3, 400), "J_regressor": (5, N_ALL), "parents": (5,),
                "lbs_weights": (N_ALL, 5), "faces": (n_faces, 3), "faces_up": (4 * n_faces, 3),
                "v_template_up": (n_up, 3), "lbs_weights_up": (n_up, 5), "shapedirs_up": (n_up, 3, 400)}
    assert {k: tuple(v.shape) for k, v in geometry.items()} == expected
    assert set(GEOMETRY_KEYS) <= set(geometry) and tuple(geometry) == GEOMETRY_NAMES
    for key in ("faces", "faces_up", "parents"):
        assert geometry[key].dtype == torch.int64, key
    for key in ("v_template", "shapedirs", "lbs_weights", "v_template_up", "shapedirs_up", "lbs_weights_up"):
        assert geometry[key].dtype == torch.float32, key
    assert geometry["parents"].tolist() == [-1, 0, 1, 1, 1]
    # FLAME first, untouched; oral mesh last, in file order; faces FLAME | upper teeth | lower teeth | oral.
    torch.testing.assert_close(geometry["v_template"][:N_FLAME], torch.tensor(flame["v_template"]).float())
    torch.testing.assert_close(geometry["v_template"][N_FLAME + N_TEETH:], torch.tensor(assets["oral_v"]).float())
    nf = len(flame["f"])
    assert torch.equal(geometry["faces"][:nf], torch.tensor(flame["f"].astype(np.int64)))
    teeth = torch.tensor(TEETH_FACES_UPPER + TEETH_FACES_LOWER) + N_FLAME
    assert torch.equal(geometry["faces"][nf:nf + 168], teeth)
    assert torch.equal(geometry["faces"][nf + 168:], torch.tensor(assets["oral_f"]) + N_FLAME + N_TEETH)
    torch.testing.assert_close(geometry["shapedirs"][:N_FLAME], torch.tensor(flame["shapedirs"]))


def test_embedded_teeth_constants_equal_the_reference(shared_dir: Path) -> None:
    c = json.loads((shared_dir / "reference" / "constants.json").read_text())
    teeth = c["teeth"]
    assert list(LIP_RING_UPPER) == teeth["lip_outside_ring_upper"]
    assert list(LIP_RING_LOWER) == teeth["lip_outside_ring_lower"]
    assert [list(f) for f in TEETH_FACES_UPPER] == teeth["faces_upper_local"]
    assert [list(f) for f in TEETH_FACES_LOWER] == teeth["faces_lower_local"]
    assert list(TEETH_BLOCKS) == teeth["vertex_blocks_in_order_each_15"]
    assert c["oral_mesh"]["vertex_offset"] == N_FLAME + N_TEETH


def test_teeth_vertices_follow_the_lip_rings(assets, geometry) -> None:
    """Recomputed in float64 from the construction text of constants.json."""
    v = assets["flame"]["v_template"]
    up, lo = v[list(LIP_RING_UPPER)], v[list(LIP_RING_LOWER)]
    d = np.linalg.norm(up - lo, axis=1).mean()
    mid = (up + lo) / 2
    mid[:, 1] = mid[:, 1].mean()
    mid[:, 2] -= 1.5 * d
    ue = mid + [0, 0.1 * d, 0]
    ur = ue + [0, 2 * d, 0]
    le = mid - [0, 0.1 * d, 0.4 * d]
    lr = le - [0, 2 * d, 0]
    back = np.array([0, 0, d])
    want = np.concatenate([ur, lr, ue, le, ur - back, ue - back, lr - back, le - back])
    got = geometry["v_template"][N_FLAME:N_FLAME + N_TEETH].double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_teeth_shape_directions_are_lip_ring_means_and_expression_free(assets, geometry) -> None:
    sd = assets["flame"]["shapedirs"].astype(np.float64)
    lip_mean = (sd[list(LIP_RING_UPPER), :, :300] + sd[list(LIP_RING_LOWER), :, :300]) / 2
    teeth = geometry["shapedirs"][N_FLAME:N_FLAME + N_TEETH].double().numpy().reshape(8, 15, 3, 400)
    for block in range(8):
        np.testing.assert_allclose(teeth[block, :, :, :300], lip_mean, atol=1e-9)
    assert not teeth[..., 300:].any()
    assert not geometry["shapedirs"][N_FLAME + N_TEETH:].any()


def test_skinning_weights_and_joint_regressor_rules(assets, geometry) -> None:
    w = geometry["lbs_weights"]
    torch.testing.assert_close(w[:N_FLAME], torch.tensor(assets["flame"]["weights"]).float())
    for k, name in enumerate(TEETH_BLOCKS):
        joint = 1 if name.startswith("upper") else 2
        rows = w[N_FLAME + 15 * k:N_FLAME + 15 * (k + 1)]
        assert torch.equal(rows, torch.nn.functional.one_hot(torch.full((15,), joint), 5).float()), name
    assert torch.equal(w[N_FLAME + N_TEETH:], torch.nn.functional.one_hot(torch.full((N_ORAL,), 1), 5).float())
    reg = geometry["J_regressor"]
    torch.testing.assert_close(reg[:, :N_FLAME], torch.tensor(assets["flame"]["J_regressor"].toarray()).float())
    assert not reg[:, N_FLAME:].any()


def test_subdivision_appends_one_endpoint_mean_per_unique_edge(geometry) -> None:
    edges = _unique_edges(geometry["faces"].numpy())
    rng = np.random.default_rng(0)
    for k in rng.choice(len(edges), 50, replace=False):
        a, b = edges[k]
        for key, base in (("v_template_up", "v_template"), ("shapedirs_up", "shapedirs"),
                          ("lbs_weights_up", "lbs_weights")):
            torch.testing.assert_close(geometry[key][N_ALL + k], (geometry[base][a] + geometry[base][b]) / 2,
                                       rtol=0, atol=0)
    assert torch.equal(geometry["v_template_up"][:N_ALL], geometry["v_template"])
    torch.testing.assert_close(geometry["lbs_weights_up"].sum(1), torch.ones(len(geometry["lbs_weights_up"])))


def test_subdivided_faces_are_laid_out_as_pytorch3d_does() -> None:
    # pytorch3d's documented example: face [0,1,2], edges (0,1)->3, (0,2)->4, (1,2)->5
    _, faces, _ = subdivide_midpoint(np.zeros((3, 3)), np.array([[0, 1, 2]]))
    np.testing.assert_array_equal(faces, [[0, 3, 4], [1, 5, 3], [2, 4, 5], [5, 4, 3]])


# ------------------------------------------------------------------------------------------------ inputs
def test_missing_or_wrong_files_say_which_and_where_to_get_them(assets, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"FLAME model file not found: .*nope\.pkl.*flame\.is\.tue\.mpg\.de"):
        build_official_geometry(tmp_path / "nope.pkl", assets["oral_path"])
    with pytest.raises(InputError, match=r"oral-cavity mesh not found: .*oral\.obj.*FastAvatar.*LAM"):
        build_official_geometry(assets["flame_path"], tmp_path / "oral.obj")
    (tmp_path / "small.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(InputError, match=r"has 3 vertices and 1 triangles; the official .* 321 and 608"):
        build_official_geometry(assets["flame_path"], tmp_path / "small.obj")
    flame = dict(assets["flame"], v_template=np.zeros((5055, 3)))
    np.savez(tmp_path / "other.npz", **{k: (v.toarray() if hasattr(v, "toarray") else v) for k, v in flame.items()})
    with pytest.raises(InputError, match=r"not a FLAME 2023 model: v_template \(5055, 3\)"):
        read_flame(tmp_path / "other.npz")


def test_npz_flame_reads_like_the_pickle(assets, tmp_path: Path) -> None:
    arrays = {k: (v.toarray() if hasattr(v, "toarray") else v) for k, v in assets["flame"].items()}
    np.savez(tmp_path / "flame.npz", **arrays)
    a, b = read_flame(tmp_path / "flame.npz"), read_flame(assets["flame_path"])
    for field in ("v_template", "shapedirs", "J_regressor", "lbs_weights", "parents", "faces"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


# ------------------------------------------------------------------------------------------------ wiring
def _official_micro_file(path: Path, geometry: dict[str, torch.Tensor] | None = None) -> None:
    torch.manual_seed(0)
    state = {ours_to_official(k): v.clone() for k, v in build_model(MICRO).state_dict().items()}
    for key, value in (geometry or {}).items():
        state["renderer.flame_model." + key] = value.contiguous()
    save_file(state, str(path))


def test_file_geometry_takes_precedence_over_a_rebuild(assets, geometry, tmp_path: Path) -> None:
    small = {"v_template": torch.ones(4, 3), "shapedirs": torch.zeros(4, 3, 400), "J_regressor": torch.ones(5, 4),
             "parents": torch.tensor([-1, 0, 1, 1, 1]), "lbs_weights": torch.ones(4, 5),
             "faces_up": torch.zeros(8, 3, dtype=torch.long), "v_template_up": torch.full((9, 3), 2.0),
             "lbs_weights_up": torch.ones(9, 5), "shapedirs_up": torch.zeros(9, 3, 400)}
    _official_micro_file(tmp_path / "with.safetensors", small)
    result = load_official(tmp_path / "with.safetensors", config=MICRO, flame_path=assets["flame_path"],
                           oral_mesh_path=assets["oral_path"])
    assert result.geometry_source == "file"
    assert torch.equal(result.geometry["v_template_up"], small["v_template_up"])

    _official_micro_file(tmp_path / "partial.safetensors", {"v_template_up": geometry["v_template_up"] + 1})
    result = load_official(tmp_path / "partial.safetensors", config=MICRO, flame_path=assets["flame_path"],
                           oral_mesh_path=assets["oral_path"])
    assert result.geometry_source == "rebuilt+file"
    assert torch.equal(result.geometry["v_template_up"], geometry["v_template_up"] + 1)
    assert torch.equal(result.geometry["shapedirs_up"], geometry["shapedirs_up"])


def test_without_file_geometry_the_loader_rebuilds_or_names_what_it_needs(assets, geometry, tmp_path: Path) -> None:
    _official_micro_file(tmp_path / "bare.safetensors")
    with pytest.raises(InputError, match=r"lacks the FLAME geometry .* pass flame_path and oral_mesh_path"):
        load_official(tmp_path / "bare.safetensors", config=MICRO)
    with pytest.raises(InputError, match=r"pass oral_mesh_path \(oral_jawopen0p5\.obj comes with"):
        load_official(tmp_path / "bare.safetensors", config=MICRO, flame_path=assets["flame_path"])
    result = load_official(tmp_path / "bare.safetensors", config=MICRO, flame_path=assets["flame_path"],
                           oral_mesh_path=assets["oral_path"])
    assert result.geometry_source == "rebuilt"
    for key, value in geometry.items():
        assert torch.equal(result.geometry[key], value), key


def test_avatar_model_from_official_uses_the_official_points_and_rig(assets, geometry, tmp_path: Path) -> None:
    from engine.avatar_model import AvatarModel

    _official_micro_file(tmp_path / "bare.safetensors")
    model = AvatarModel.from_official(tmp_path / "bare.safetensors", flame_path=assets["flame_path"],
                                      oral_mesh_path=assets["oral_path"], config=MICRO)
    n_up = geometry["v_template_up"].shape[0]
    assert len(model.prompts) == n_up and torch.equal(model.point_index, torch.arange(n_up))
    assert model.prompts.shapedirs.shape[-1] == 300 and model.prompts.exprdirs.shape[-1] == 100
    assert model.prompts.n_base_vertices == N_ALL
    assert isinstance(model.head, OfficialRig)
    shape = torch.randn(300) * 0.5
    expected = geometry["v_template_up"] + torch.einsum("l,pdl->pd", shape, geometry["shapedirs_up"][..., :300])
    torch.testing.assert_close(model.canonical_points(shape), expected)

    # Jaw opening moves the lower teeth (jaw joint) and leaves the upper teeth and oral cavity (neck joint) still.
    params = FlameParams.zeros(1, 300, 100)
    params.jaw = torch.tensor([[0.3, 0.0, 0.0]])
    probe = torch.tensor([N_FLAME + 0, N_FLAME + 15, N_FLAME + N_TEETH + 5])  # upper root, lower root, oral
    gs = GaussianSet.from_activated(anchor=probe, offset=torch.zeros(3, 3),
                                    rotation=torch.tensor([[1.0, 0, 0, 0]]).expand(3, 4),
                                    scale=torch.full((3, 3), 0.01), opacity=torch.full((3,), 0.5),
                                    color=torch.ones(3, 3), importance=torch.ones(3), frame=0)
    moved = gs.to_world(model.prompts, model.head, params)["means"][0]
    rest = gs.to_world(model.prompts, model.head, FlameParams.zeros(1, 300, 100))["means"][0]
    torch.testing.assert_close(rest, model.prompts.v_template[probe])
    assert (moved[1] - rest[1]).norm() > 1e-3
    torch.testing.assert_close(moved[[0, 2]], rest[[0, 2]])


def test_point_prompts_from_geometry_split_shape_and_expression(geometry) -> None:
    prompts = PointPrompts.from_official_geometry(geometry)
    assert torch.equal(prompts.exprdirs, geometry["shapedirs_up"][..., 300:])
    assert torch.equal(prompts.J_regressor[:, :N_ALL], geometry["J_regressor"])
    assert not prompts.J_regressor[:, N_ALL:].any()
    assert torch.equal(prompts.faces, geometry["faces_up"])
