"""Point prompts: midpoint subdivision of the head mesh carrying FLAME's per-vertex data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.head import load_head
from engine.prompts import PointPrompts, build_point_prompts, subdivide_midpoint
from engine.types import FlameParams


@pytest.fixture(scope="module")
def head():
    torch.set_num_threads(1)
    return load_head()


@pytest.fixture(scope="module")
def prompts(head) -> PointPrompts:
    return build_point_prompts(head, levels=1)


def _unique_edges(faces: np.ndarray) -> np.ndarray:
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    return np.unique(e, axis=0)


def test_tetrahedron_subdivision_order_and_values():
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    faces = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    attr = np.arange(4, dtype=np.float64)[:, None] * np.array([1.0, 10.0])
    v, f, a = subdivide_midpoint(verts, faces, {"x": attr})
    assert v.shape == (4 + 6, 3) and f.shape == (16, 3)
    # Original vertices first, then edges in (min,max) order: (0,1),(0,2),(0,3),(1,2),(1,3),(2,3).
    np.testing.assert_array_equal(v[:4], verts)
    for k, (i, j) in enumerate([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]):
        np.testing.assert_allclose(v[4 + k], 0.5 * (verts[i] + verts[j]))
        np.testing.assert_allclose(a["x"][4 + k], 0.5 * (attr[i] + attr[j]))
    # Every new triangle keeps the parent's orientation (tetrahedron volume stays positive).
    n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    centroid = v[f].mean(1) - verts.mean(0)
    assert np.all(np.einsum("fk,fk->f", n, centroid) > 0)


def test_counts_match_vertices_plus_unique_edges(head, prompts):
    n_edges = len(_unique_edges(head.faces))
    assert len(prompts) == head.n_vertices + n_edges
    assert prompts.n_base_vertices == head.n_vertices
    assert prompts.faces.shape == (4 * len(head.faces), 3)
    assert prompts.shapedirs.shape == (len(prompts), 3, head.n_shape)
    assert prompts.exprdirs.shape == (len(prompts), 3, head.n_expression)
    assert prompts.lbs_weights.shape == (len(prompts), 5)
    assert prompts.J_regressor.shape == (5, len(prompts))
    torch.testing.assert_close(prompts.J_regressor[:, head.n_vertices:], torch.zeros(5, n_edges))
    torch.testing.assert_close(prompts.lbs_weights.sum(1), torch.ones(len(prompts)))


def test_new_points_are_edge_midpoints_for_every_attribute(head, prompts):
    edges = _unique_edges(head.faces)
    f = head.flame
    for k in (0, 1, len(edges) // 2, len(edges) - 1):
        i, j = edges[k]
        p = head.n_vertices + k
        torch.testing.assert_close(prompts.v_template[p], 0.5 * (f.v_template[i] + f.v_template[j]))
        torch.testing.assert_close(prompts.shapedirs[p], 0.5 * (f.shapedirs[i] + f.shapedirs[j]))
        torch.testing.assert_close(prompts.exprdirs[p], 0.5 * (f.expr_dirs[i] + f.expr_dirs[j]))
        torch.testing.assert_close(prompts.lbs_weights[p], 0.5 * (f.lbs_weights[i] + f.lbs_weights[j]))
    torch.testing.assert_close(prompts.v_template[:head.n_vertices], f.v_template)


def test_lbs_of_prompts_reproduces_smplx_at_original_vertices(head, prompts):
    g = torch.Generator().manual_seed(3)
    params = FlameParams.zeros(2, head.n_shape, head.n_expression)
    params.shape = torch.randn(2, head.n_shape, generator=g)
    params.expression = 0.5 * torch.randn(2, head.n_expression, generator=g)
    params.rotation = 0.3 * torch.randn(2, 3, generator=g)
    params.neck = 0.2 * torch.randn(2, 3, generator=g)
    params.jaw = torch.tensor([[0.25, 0.0, 0.0], [0.1, 0.05, 0.0]])
    params.eyes = 0.2 * torch.randn(2, 6, generator=g)
    params.translation = 0.05 * torch.randn(2, 3, generator=g)
    with torch.no_grad():
        out = head.forward(params)
        A = head.joint_transforms(params)
        rest = prompts.canonical(params.shape) + prompts.expression_offsets(params.expression)
        T = torch.einsum("pj,bjxy->bpxy", prompts.lbs_weights, A)
        posed = (T[..., :3, :3] @ rest[..., None])[..., 0] + T[..., :3, 3] + params.translation[:, None]
    torch.testing.assert_close(posed[:, :head.n_vertices], out.vertices, atol=1e-6, rtol=0)
    # New points stay close to the midpoint of their posed edge (LBS is nearly linear along a short edge).
    edges = torch.as_tensor(_unique_edges(head.faces))
    mid = 0.5 * (out.vertices[:, edges[:, 0]] + out.vertices[:, edges[:, 1]])
    assert (posed[:, head.n_vertices:] - mid).norm(dim=-1).max() < 2e-3


def test_canonical_zero_shape_is_template_and_shape_moves_points(head, prompts):
    zero = prompts.canonical(torch.zeros(1, head.n_shape))
    torch.testing.assert_close(zero[0], prompts.v_template)
    one = prompts.canonical(torch.ones(1, head.n_shape))
    assert (one - zero).norm(dim=-1).max() > 1e-3
    assert prompts.expression_offsets(torch.zeros(3, head.n_expression)).abs().max() == 0


def test_subset_keeps_chosen_points(prompts):
    idx = torch.tensor([0, 5, len(prompts) - 1])
    sub = prompts.subset(idx)
    assert len(sub) == 3 and sub.n_base_vertices == 2 and sub.faces.shape == (0, 3)
    torch.testing.assert_close(sub.v_template, prompts.v_template[idx])
    torch.testing.assert_close(sub.exprdirs, prompts.exprdirs[idx])
    shape = torch.randn(2, prompts.shapedirs.shape[-1])
    torch.testing.assert_close(sub.canonical(shape), prompts.canonical(shape)[:, idx])


def test_levels_zero_and_two(head):
    p0 = build_point_prompts(head, levels=0)
    assert len(p0) == head.n_vertices
    p1 = build_point_prompts(head, levels=1)
    p2 = build_point_prompts(head, levels=2)
    assert len(p2) == len(p1) + len(_unique_edges(p1.faces.numpy()))


def test_numpy_and_torch_inputs_agree(head):
    v = head.template.detach()
    f = torch.as_tensor(head.faces)
    vt, ft, at = subdivide_midpoint(v, f, {"w": head.flame.lbs_weights})
    vn, fn, an = subdivide_midpoint(v.numpy(), head.faces, {"w": head.flame.lbs_weights.numpy()})
    np.testing.assert_array_equal(ft.numpy(), fn)
    np.testing.assert_allclose(vt.numpy(), vn, atol=1e-7)
    np.testing.assert_allclose(at["w"].numpy(), an["w"], atol=1e-7)
