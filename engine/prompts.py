"""Point prompts: the head mesh subdivided by edge midpoints, with FLAME's per-vertex data carried along.

The official release subdivides FLAME once (`flame_subdivide_num: 1`) so each prompt point has a
canonical position, shape and expression directions and skinning weights. Subdivision order:
original vertices first, then one new vertex per unique undirected edge, edges sorted by
(min index, max index). New vertices take the mean of their edge's endpoints for every attribute.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def subdivide_midpoint(vertices: np.ndarray | torch.Tensor, faces: np.ndarray | torch.Tensor,
                       attributes: dict[str, np.ndarray | torch.Tensor] | None = None):
    """One level of midpoint subdivision.

    vertices (V,3), faces (F,3), attributes: name -> (V, ...) per-vertex arrays.
    Returns vertices (V+E,3), faces (4F,3) and attributes (V+E, ...), E = number of unique edges.
    Works on numpy arrays or torch tensors (same type out as in).
    Faces exactly as pytorch3d's SubdivideMeshes lays them out (so the official `faces_up` buffer is reproduced):
    for each parent (a,b,c) with edge midpoints ab, bc, ca: first all [a,ab,ca], then all [b,bc,ab], then all
    [c,ca,bc], then all [bc,ca,ab]; every child keeps the parent's orientation.
    """
    is_torch = isinstance(vertices, torch.Tensor)
    f = faces.cpu().numpy() if isinstance(faces, torch.Tensor) else np.asarray(faces)
    f = f.astype(np.int64)
    n_v = int(vertices.shape[0])
    edges = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    edges = np.sort(edges, axis=1)
    unique, inverse = np.unique(edges, axis=0, return_inverse=True)  # sorted by (min, max)
    inverse = inverse.reshape(-1)
    n_f = len(f)
    mid = n_v + inverse.reshape(3, n_f).T  # (F,3): midpoints of edges 01, 12, 20
    a, b, c = f[:, 0], f[:, 1], f[:, 2]
    ab, bc, ca = mid[:, 0], mid[:, 1], mid[:, 2]
    new_faces = np.concatenate([np.stack([a, ab, ca], 1), np.stack([b, bc, ab], 1),
                                np.stack([c, ca, bc], 1), np.stack([bc, ca, ab], 1)])

    def extend(x):
        if isinstance(x, torch.Tensor):
            e = torch.as_tensor(unique, device=x.device)
            return torch.cat([x, 0.5 * (x[e[:, 0]] + x[e[:, 1]])])
        x = np.asarray(x)
        return np.concatenate([x, 0.5 * (x[unique[:, 0]] + x[unique[:, 1]])])

    out_attrs = {k: extend(v) for k, v in (attributes or {}).items()}
    out_faces = torch.as_tensor(new_faces, device=vertices.device) if is_torch else new_faces
    return extend(vertices), out_faces, out_attrs


@dataclass
class PointPrompts:
    """P canonical prompt points on the (subdivided) head.

    v_template:       (P,3)   rest positions (metres, FLAME axes)
    shapedirs:        (P,3,S) offsets per shape coefficient
    exprdirs:         (P,3,E) offsets per expression coefficient
    lbs_weights:      (P,5)   skinning weights (rows sum to 1)
    faces:            (F,3)   long, triangles over the points (empty after `subset`)
    n_base_vertices:  how many leading points are the head model's own vertices
    J_regressor:      (5,P)   joint regressor (the head's, zero on new points); None after `subset`
    normals:          (P,3)   unit vertex normals of the rest mesh (area-weighted), or None when unknown
    """

    v_template: torch.Tensor
    shapedirs: torch.Tensor
    exprdirs: torch.Tensor
    lbs_weights: torch.Tensor
    faces: torch.Tensor
    n_base_vertices: int
    J_regressor: torch.Tensor | None = None
    normals: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.v_template.shape[0])

    @classmethod
    def from_official_geometry(cls, geometry: dict[str, torch.Tensor], n_shape: int = 300) -> "PointPrompts":
        """The official network's 21,675 query points from its FLAME geometry buffers (SPEC.md §5; from the
        checkpoint or `engine.official_geometry.build_official_geometry`): `shapedirs_up` split into `n_shape`
        shape and the remaining expression directions; J_regressor widened with zero columns for the new points."""
        v = geometry["v_template_up"].float()
        dirs = geometry["shapedirs_up"].float()
        n_base = int(geometry["v_template"].shape[0])
        base_reg = geometry["J_regressor"].float()
        reg = torch.zeros((base_reg.shape[0], v.shape[0]), dtype=v.dtype)
        reg[:, :n_base] = base_reg
        faces = geometry["faces_up"].long()
        return cls(v_template=v, shapedirs=dirs[..., :n_shape], exprdirs=dirs[..., n_shape:],
                   lbs_weights=geometry["lbs_weights_up"].float(), faces=faces,
                   n_base_vertices=n_base, J_regressor=reg, normals=vertex_normals(v, faces))

    def canonical(self, shape: torch.Tensor) -> torch.Tensor:
        """(B,P,3) template plus shape offsets for shape (B,S); zero expression and pose."""
        s = shape.shape[-1]
        return self.v_template + torch.einsum("bl,pdl->bpd", shape, self.shapedirs[..., :s])

    def expression_offsets(self, expression: torch.Tensor) -> torch.Tensor:
        """(B,P,3) offsets for expression (B,E)."""
        e = expression.shape[-1]
        return torch.einsum("bl,pdl->bpd", expression, self.exprdirs[..., :e])

    def subset(self, indices) -> "PointPrompts":
        """The chosen points only (faces dropped; n_base_vertices counts chosen original vertices)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return PointPrompts(v_template=self.v_template[idx], shapedirs=self.shapedirs[idx],
                            exprdirs=self.exprdirs[idx], lbs_weights=self.lbs_weights[idx],
                            faces=torch.zeros((0, 3), dtype=torch.long),
                            n_base_vertices=int((idx < self.n_base_vertices).sum()),
                            J_regressor=None, normals=None if self.normals is None else self.normals[idx])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "PointPrompts":
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return PointPrompts(move(self.v_template), move(self.shapedirs), move(self.exprdirs), move(self.lbs_weights),
                            self.faces.to(device=device), self.n_base_vertices, move(self.J_regressor),
                            move(self.normals))


def build_point_prompts(head, levels: int = 1) -> PointPrompts:
    """Prompts from a HeadModel: its mesh subdivided `levels` times (0 = the vertices themselves)."""
    f = head.flame
    with torch.no_grad():
        verts = f.v_template.detach().clone()
        faces = torch.as_tensor(head.faces, dtype=torch.long)
        attrs = {"shapedirs": f.shapedirs.detach().clone(), "exprdirs": f.expr_dirs.detach().clone(),
                 "lbs_weights": f.lbs_weights.detach().clone()}
        for _ in range(levels):
            verts, faces, attrs = subdivide_midpoint(verts, faces, attrs)
        n_base = int(f.v_template.shape[0])
        reg = torch.zeros((f.J_regressor.shape[0], verts.shape[0]), dtype=verts.dtype)
        reg[:, :n_base] = f.J_regressor
    return PointPrompts(v_template=verts, shapedirs=attrs["shapedirs"], exprdirs=attrs["exprdirs"],
                        lbs_weights=attrs["lbs_weights"], faces=faces.long(), n_base_vertices=n_base,
                        J_regressor=reg, normals=vertex_normals(verts, faces.long()))


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(V,3) unit area-weighted vertex normals of a triangle mesh (V,3), (F,3); zero-area vertices get +z."""
    v = vertices.float()
    f = faces.long()
    face_n = torch.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]], dim=-1)
    normals = torch.zeros_like(v)
    for k in range(3):
        normals.index_add_(0, f[:, k], face_n)
    lengths = normals.norm(dim=-1, keepdim=True)
    fallback = torch.tensor([0.0, 0.0, 1.0], dtype=v.dtype, device=v.device).expand_as(v)
    return torch.where(lengths > 1e-12, normals / lengths.clamp_min(1e-12), fallback)
