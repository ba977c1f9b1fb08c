"""The head model: the embedded default FLAME-format head through smplx, and users' FLAME files."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.sparse
import smplx
import torch

from engine.errors import InputError
from engine.head import DEFAULT_HEAD_DIR, HeadModel, load_head
from engine.types import FlameParams

# Where the named expression directions must move the face most (anchor landmarks per region).
REGIONS = {
    "mouth": list(range(48, 68)),
    "brows": list(range(17, 27)),
    "eyes": list(range(36, 48)),
    "nose": list(range(27, 36)),
}
EXPRESSION_REGION = {
    "smile": "mouth", "frown": "mouth", "pucker": "mouth", "mouth_stretch": "mouth", "upper_lip_raise": "mouth",
    "lower_lip_depress": "mouth", "lips_tighten": "mouth", "smile_left": "mouth", "smile_right": "mouth",
    "mouth_left": "mouth", "mouth_right": "mouth", "brow_raise": "brows", "brow_lower": "brows",
    "inner_brow_raise": "brows", "eyes_close": "eyes", "blink_left": "eyes", "blink_right": "eyes",
    "eyes_wide": "eyes", "squint": "eyes", "nose_wrinkle": "nose", "cheek_puff": "cheeks", "cheek_suck": "cheeks",
}


@pytest.fixture(scope="module")
def head() -> HeadModel:
    torch.set_num_threads(1)
    return load_head()


def _params(head: HeadModel, batch: int = 1, **values) -> FlameParams:
    p = FlameParams.zeros(batch, head.n_shape, head.n_expression)
    return p.with_(**values)


def _random_params(head: HeadModel, seed: int, batch: int = 2) -> FlameParams:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: scale * torch.randn(*s, generator=g)  # noqa: E731
    return FlameParams(shape=r(batch, head.n_shape), expression=r(batch, head.n_expression, scale=0.5),
                       rotation=r(batch, 3, scale=0.3), neck=r(batch, 3, scale=0.2),
                       jaw=torch.tensor([[0.3, 0.02, 0.0]]).repeat(batch, 1), eyes=r(batch, 6, scale=0.2),
                       translation=r(batch, 3, scale=0.05))


def test_default_head_loads_through_smplx_unchanged():
    flame = smplx.FLAME(model_path=str(DEFAULT_HEAD_DIR), ext="npz", num_betas=20, num_expression_coeffs=10)
    out = flame()
    assert 4500 <= out.vertices.shape[1] <= 5600
    assert flame.J_regressor.shape == (5, out.vertices.shape[1])
    assert flame.parents.tolist() == [-1, 0, 1, 1, 1]
    torch.testing.assert_close(out.vertices[0], flame.v_template)


def test_head_model_exposes_the_contract(head):
    assert isinstance(head.flame, smplx.FLAME)
    assert head.faces.dtype == np.int64 and head.faces.shape[1] == 3
    assert head.template.shape == (head.n_vertices, 3)
    assert head.n_shape >= 20 and head.n_expression >= 15
    assert len(head.shape_names) == head.n_shape and len(head.expression_names) == head.n_expression
    assert head.landmark_face_idx.shape == (68,) and head.landmark_face_idx.dtype == torch.long
    assert head.landmark_bary.shape == (68, 3)
    torch.testing.assert_close(head.landmark_bary.sum(1), torch.ones(68))
    torch.testing.assert_close(head.flame.lbs_weights.sum(1), torch.ones(head.n_vertices))
    # smplx's file has 300 + 100 columns; the unused ones are zero.
    data = np.load(DEFAULT_HEAD_DIR / "FLAME_NEUTRAL.npz")
    assert data["shapedirs"].shape[2] == 400
    assert np.abs(data["shapedirs"][:, :, head.n_shape:300]).max() == 0
    assert np.abs(data["shapedirs"][:, :, 300 + head.n_expression:]).max() == 0
    assert np.abs(data["posedirs"]).max() == 0


def test_zero_params_give_the_template(head):
    out = head.forward(_params(head, batch=2))
    assert out.vertices.shape == (2, head.n_vertices, 3)
    torch.testing.assert_close(out.vertices[1], head.template, atol=1e-7, rtol=0)


def test_gradients_reach_shape_expression_and_jaw(head):
    p = _params(head)
    for name in ("shape", "expression", "jaw"):
        getattr(p, name).requires_grad_(True)
    lmk = head.landmark_vertices(head.forward(p))
    lmk.square().sum().backward()
    for name in ("shape", "expression", "jaw"):
        g = getattr(p, name).grad
        assert g is not None and g.abs().max() > 0, name


def test_jaw_opening_separates_the_lips_and_lowers_the_chin(head):
    closed = head.landmark_vertices(head.forward(_params(head)))[0]
    opened = head.landmark_vertices(head.forward(_params(head, jaw=torch.tensor([[0.3, 0.0, 0.0]]))))[0]
    gap = lambda l, a, b: float((l[a] - l[b]).norm())  # noqa: E731
    assert gap(closed, 62, 66) < 1e-6
    assert gap(opened, 62, 66) > 0.008
    assert gap(opened, 51, 57) > gap(closed, 51, 57) + 0.008
    assert opened[8, 1] < closed[8, 1] - 0.01  # chin goes down
    torch.testing.assert_close(opened[17:48], closed[17:48])  # brows, nose and eyes stay


def test_each_expression_moves_its_region_most(head):
    lmk = head.landmark_vertices(head.forward(_params(head)))[0]
    anchors = {name: lmk[idx] for name, idx in REGIONS.items()}
    cheek_r = 0.5 * (lmk[2] + lmk[31]) * 0.5 + 0.5 * (0.5 * (lmk[3] + lmk[48]))
    anchors["cheeks"] = torch.stack([cheek_r, cheek_r * torch.tensor([-1.0, 1.0, 1.0])])
    template = head.template
    assert set(head.expression_names) == set(EXPRESSION_REGION)
    for k, name in enumerate(head.expression_names):
        expr = torch.zeros(1, head.n_expression)
        expr[0, k] = 1.0
        moved = head.forward(_params(head, expression=expr)).vertices[0]
        disp = (moved - template).norm(dim=1)
        assert disp.max() > 0.002, name
        peak = template[disp.argmax()]
        nearest = min(anchors, key=lambda r: float((anchors[r] - peak).norm(dim=1).min()))
        assert nearest == EXPRESSION_REGION[name], (name, nearest)
    # One-sided expressions stay on their side (left = +x).
    for name, sign in (("blink_left", 1), ("blink_right", -1), ("smile_left", 1), ("smile_right", -1)):
        expr = torch.zeros(1, head.n_expression)
        expr[0, head.expression_names.index(name)] = 1.0
        disp = (head.forward(_params(head, expression=expr)).vertices[0] - template).norm(dim=1)
        other = template[:, 0] * sign < -0.01
        assert disp[other].max() < 0.1 * disp.max(), name


def test_eyes_close_brings_the_lids_together(head):
    expr = torch.zeros(1, head.n_expression)
    expr[0, head.expression_names.index("eyes_close")] = 1.0
    open_ = head.landmark_vertices(head.forward(_params(head)))[0]
    shut = head.landmark_vertices(head.forward(_params(head, expression=expr)))[0]
    for upper, lower in ((37, 41), (38, 40), (43, 47), (44, 46)):
        assert (shut[upper] - shut[lower]).norm() < 0.5 * (open_[upper] - open_[lower]).norm()


def test_landmark_vertices_are_barycentric_on_faces(head):
    p = _random_params(head, seed=1)
    out = head.forward(p)
    lmk = head.landmark_vertices(out)
    faces = torch.as_tensor(head.faces)[head.landmark_face_idx]
    for b in range(2):
        manual = sum(head.landmark_bary[:, k, None] * out.vertices[b, faces[:, k]] for k in range(3))
        torch.testing.assert_close(lmk[b], manual)


def test_joint_transforms_reproduce_smplx_vertices(head):
    p = _random_params(head, seed=2)
    out = head.forward(p)
    A = head.joint_transforms(p)
    assert A.shape == (2, 5, 4, 4)
    f = head.flame
    v_shaped = f.v_template + torch.einsum("bl,vdl->bvd", torch.cat([p.shape, p.expression], -1),
                                           torch.cat([f.shapedirs, f.expr_dirs], -1))
    T = torch.einsum("vj,bjxy->bvxy", f.lbs_weights, A)
    posed = (T[..., :3, :3] @ v_shaped[..., None])[..., 0] + T[..., :3, 3] + p.translation[:, None]
    torch.testing.assert_close(posed, out.vertices, atol=1e-6, rtol=0)
    # Zero pose: identity transforms.
    torch.testing.assert_close(head.joint_transforms(_params(head))[0], torch.eye(4).expand(5, 4, 4))


def test_landmark_basis_places_landmarks_without_autograd(head):
    from smplx.lbs import batch_rigid_transform, batch_rodrigues

    p = _random_params(head, seed=4)
    basis = head.landmark_basis()
    rest = basis.template + torch.einsum("bl,kdl->bkd", p.shape, basis.shapedirs) \
        + torch.einsum("bl,kdl->bkd", p.expression, basis.exprdirs)
    joints = basis.joint_template + torch.einsum("bl,jdl->bjd", p.shape, basis.joint_shapedirs) \
        + torch.einsum("bl,jdl->bjd", p.expression, basis.joint_exprdirs)
    pose = torch.cat([p.rotation, p.neck, p.jaw, p.eyes], -1)
    _, A = batch_rigid_transform(batch_rodrigues(pose.reshape(-1, 3)).view(2, 5, 3, 3), joints, basis.parents)
    T = torch.einsum("kj,bjxy->bkxy", basis.lbs_weights, A)
    lmk = (T[..., :3, :3] @ rest[..., None])[..., 0] + T[..., :3, 3] + p.translation[:, None]
    expected = head.landmark_vertices(head.forward(p))
    # Skinning with weights interpolated at the landmark is LBS of the point itself: exact at rest,
    # within a fraction of a millimetre when posed (the mesh skins each corner separately).
    assert float((lmk - expected).norm(dim=-1).max()) < 3e-4
    rest_only = head.landmark_vertices(head.forward(p.with_(rotation=0 * p.rotation, neck=0 * p.neck, jaw=0 * p.jaw,
                                                            eyes=0 * p.eyes, translation=0 * p.translation)))
    torch.testing.assert_close(rest, rest_only, atol=1e-6, rtol=0)


def test_adult_proportions(head):
    v = head.template
    skin = torch.as_tensor(head.part == 0)
    lmk = head.landmark_vertices(head.forward(_params(head)))[0]
    chin_to_crown = float(v[skin, 1].max() - lmk[8, 1])
    assert 0.22 <= chin_to_crown <= 0.26
    cranium = skin & (v[:, 1] > lmk[19, 1])  # above the brows: no ears
    width = float(v[cranium, 0].max() - v[cranium, 0].min())
    assert 0.14 <= width <= 0.17
    length = float(v[cranium, 2].max() - v[cranium, 2].min())
    assert 0.17 <= length <= 0.21
    eye_l, eye_r = head.flame.J_regressor[3] @ v, head.flame.J_regressor[4] @ v
    assert 0.055 <= float((eye_l - eye_r).norm()) <= 0.07
    assert eye_l[0] > 0 > eye_r[0]  # left eye joint at +x
    centres = [lmk[36:42].mean(0), lmk[42:48].mean(0)]
    assert 0.055 <= float((centres[0] - centres[1]).norm()) <= 0.07


def test_landmarks_follow_the_ibug_layout(head):
    lmk = head.landmark_vertices(head.forward(_params(head)))[0]
    x, y, z = lmk.unbind(1)
    # Subject's right (image-left) is -x: jaw start, right brow, right eye, right mouth corner.
    assert x[0] < -0.05 and x[16] > 0.05 and abs(float(x[8])) < 1e-6
    assert x[17] < x[21] < 0 < x[22] < x[26]
    assert x[36] < x[39] < 0 < x[42] < x[45]
    assert x[48] < 0 < x[54]
    torch.testing.assert_close(x[0:8], -x[9:17].flip(0), atol=2e-4, rtol=0)  # mirror-symmetric jawline
    torch.testing.assert_close(x[36:42][[3, 2, 1, 0, 5, 4]], -x[42:48], atol=5e-4, rtol=0)  # eyes mirror
    # Vertical order: brows above eyes above nose tip above mouth above chin.
    assert y[17:27].min() > y[36:48].max() > y[30] > y[48:68].max() > y[8]
    assert z[30] == z.max()  # nose tip is the most forward point
    assert torch.all(z > 0.0)  # on the face side
    # Every landmark sits on a skin face (not inside the eyeballs or the mouth pocket).
    face_parts = head.part[head.faces[head.landmark_face_idx.numpy()]]
    assert np.all(face_parts == 0)


def test_lbs_weights_put_the_chin_on_the_jaw_and_eyeballs_on_the_eyes(head):
    w = head.flame.lbs_weights
    lmk_idx = head.landmark_face_idx
    faces = torch.as_tensor(head.faces)
    chin_vertices = faces[lmk_idx[8]]
    assert torch.all(w[chin_vertices, 2] > 0.9)
    brow_vertices = faces[lmk_idx[19]]
    assert torch.all(w[brow_vertices, 1] > 0.99)
    assert torch.all(w[torch.as_tensor(head.part == 1), 3] == 1)
    assert torch.all(w[torch.as_tensor(head.part == 2), 4] == 1)
    # Eye rotation spins the eyeball about its centre and moves nothing else.
    eyes = torch.zeros(1, 6)
    eyes[0, 1] = 0.4
    out = head.forward(_params(head, eyes=eyes)).vertices[0]
    moved = (out - head.template).norm(dim=1) > 1e-7
    left = torch.as_tensor(head.part == 1)
    assert not moved[~left].any() and moved[left].float().mean() > 0.95  # only points on the axis stay
    torch.testing.assert_close(out[left].mean(0), head.template[left].mean(0), atol=1e-6, rtol=0)


def _write_user_flame(tmp_path, head: HeadModel, layout: str):
    """A FLAME-2020-style pickle (plain numpy + sparse J_regressor) and a landmark file."""
    data = dict(np.load(DEFAULT_HEAD_DIR / "FLAME_NEUTRAL.npz"))
    model = {k: data[k] for k in ("v_template", "f", "shapedirs", "posedirs", "weights", "kintree_table")}
    model["J_regressor"] = scipy.sparse.csc_matrix(data["J_regressor"])
    (tmp_path / "generic_model.pkl").write_bytes(pickle.dumps(model, protocol=2))
    lm = np.load(DEFAULT_HEAD_DIR / "landmarks_68.npz")
    f68, b68 = lm["lmk_face_idx"], lm["lmk_b_coords"]
    if layout == "full":
        emb = {"full_lmk_faces_idx": f68[None], "full_lmk_bary_coords": b68[None]}
    else:
        emb = {"static_lmk_faces_idx": f68[17:], "static_lmk_bary_coords": b68[17:],
               "dynamic_lmk_faces_idx": np.repeat(f68[None, :17], 79, 0),
               "dynamic_lmk_bary_coords": np.repeat(b68[None, :17], 79, 0)}
    np.save(tmp_path / "landmark_embedding.npy", emb, allow_pickle=True)
    return tmp_path / "generic_model.pkl"


@pytest.mark.parametrize("layout", ["full", "static_dynamic"])
def test_user_flame_file_loads_like_the_same_model(tmp_path, head, layout):
    path = _write_user_flame(tmp_path, head, layout)
    user = load_head(path, n_shape=head.n_shape, n_expression=head.n_expression)
    assert user.part is None and user.n_shape == head.n_shape
    np.testing.assert_array_equal(user.faces, head.faces)
    p = _random_params(head, seed=5)
    torch.testing.assert_close(user.forward(p).vertices, head.forward(p).vertices)
    torch.testing.assert_close(user.landmark_vertices(user.forward(p)), head.landmark_vertices(head.forward(p)))
    # Without caps a FLAME file gives FLAME's 300 shape and 100 expression coefficients.
    assert load_head(tmp_path).n_shape == 300


def test_missing_user_files_raise_one_clear_line(tmp_path, head):
    missing = tmp_path / "nowhere" / "generic_model.pkl"
    with pytest.raises(InputError) as err:
        load_head(missing)
    msg = str(err.value)
    assert str(missing) in msg and "flame.is.tue.mpg.de" in msg and "\n" not in msg
    path = _write_user_flame(tmp_path, head, "full")
    (tmp_path / "landmark_embedding.npy").unlink()
    with pytest.raises(InputError, match="landmark_embedding.npy"):
        load_head(path)
    with pytest.raises(InputError, match="not found"):
        load_head(path, tmp_path / "absent.npy")
    bad = tmp_path / "broken.pkl"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(InputError, match="cannot read FLAME model"):
        load_head(bad, DEFAULT_HEAD_DIR / "landmarks_68.npz")


@pytest.mark.slow
def test_shipped_head_matches_its_generator(tmp_path):
    from engine.train.head_builder import build_head, write_head

    write_head(build_head(), tmp_path)
    for name in ("FLAME_NEUTRAL.npz", "landmarks_68.npz"):
        new, shipped = np.load(tmp_path / name), np.load(DEFAULT_HEAD_DIR / name)
        assert set(new.files) == set(shipped.files)
        for key in new.files:
            if new[key].dtype.kind in "fc":
                np.testing.assert_allclose(new[key], shipped[key], atol=1e-9, err_msg=key)
            else:
                np.testing.assert_array_equal(new[key], shipped[key], err_msg=key)
