"""Small numpy mesh helpers for the head generator: ray casting, smooth steps, icospheres."""
from __future__ import annotations

import numpy as np


def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """Hermite step from 0 at edge0 to 1 at edge1 (edges may be in either order)."""
    t = np.clip((np.asarray(x, dtype=np.float64) - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def ray_mesh(origins: np.ndarray, dirs: np.ndarray, vertices: np.ndarray, faces: np.ndarray,
             *, farthest: bool, chunk: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersect N rays with a triangle mesh (Moller-Trumbore, both faces count).

    origins: (N,3) or (3,); dirs: (N,3) unit; vertices (V,3); faces (F,3).
    Returns t (N,) (nan where missed), face index (N,) (-1 where missed), barycentrics (N,3).
    `farthest` picks the last hit along each ray instead of the first.
    """
    dirs = np.asarray(dirs, dtype=np.float64)
    origins = np.broadcast_to(np.asarray(origins, dtype=np.float64), dirs.shape)
    a, b, c = (vertices[faces[:, k]] for k in range(3))
    e1, e2 = b - a, c - a
    n = len(dirs)
    t_out = np.full(n, np.nan)
    f_out = np.full(n, -1, dtype=np.int64)
    bary = np.zeros((n, 3))
    for s in range(0, n, chunk):
        d = dirs[s:s + chunk, None, :]
        o = origins[s:s + chunk, None, :]
        p = np.cross(d, e2[None])
        det = np.einsum("nfk,fk->nf", p, e1)
        ok = np.abs(det) > 1e-14
        inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
        tv = o - a[None]
        u = np.einsum("nfk,nfk->nf", tv, p) * inv
        q = np.cross(tv, e1[None])
        v = np.einsum("nfk,nfk->nf", np.broadcast_to(d, q.shape), q) * inv
        t = np.einsum("nfk,fk->nf", q, e2) * inv
        eps = 1e-9
        hit = ok & (u >= -eps) & (v >= -eps) & (u + v <= 1 + eps) & (t > 1e-9)
        score = np.where(hit, t if farthest else -t, -np.inf)
        best = np.argmax(score, axis=1)
        rows = np.arange(len(best))
        got = hit[rows, best]
        idx = s + rows[got]
        t_out[idx] = t[rows, best][got]
        f_out[idx] = best[got]
        uu, vv = u[rows, best][got], v[rows, best][got]
        bary[idx] = np.stack([1 - uu - vv, uu, vv], axis=1)
    return t_out, f_out, bary


def icosphere(level: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit icosphere: vertices (V,3), faces (F,3) wound outward. level 2 -> 162 vertices."""
    g = (1 + 5 ** 0.5) / 2
    v = [(-1, g, 0), (1, g, 0), (-1, -g, 0), (1, -g, 0), (0, -1, g), (0, 1, g), (0, -1, -g), (0, 1, -g),
         (g, 0, -1), (g, 0, 1), (-g, 0, -1), (-g, 0, 1)]
    f = [(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4), (11, 10, 2),
         (10, 7, 6), (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9), (4, 9, 5),
         (2, 4, 11), (6, 2, 10), (8, 6, 7), (9, 8, 1)]
    verts = [np.array(p, dtype=np.float64) / np.linalg.norm(p) for p in v]
    faces = [tuple(x) for x in f]
    for _ in range(level):
        cache: dict[tuple[int, int], int] = {}

        def mid(i: int, j: int) -> int:
            key = (min(i, j), max(i, j))
            if key not in cache:
                m = verts[i] + verts[j]
                verts.append(m / np.linalg.norm(m))
                cache[key] = len(verts) - 1
            return cache[key]

        new = []
        for a, b, c in faces:
            ab, bc, ca = mid(a, b), mid(b, c), mid(c, a)
            new += [(a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca)]
        faces = new
    return np.array(verts), np.array(faces, dtype=np.int64)


def face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Unit normals (F,3) of triangles wound counter-clockwise seen from outside."""
    n = np.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]])
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-15)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (V,3)."""
    n = np.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]])
    out = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(out, faces[:, k], n)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-15)


def point_in_polygon(px: np.ndarray, py: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd test of points (px,py) against a closed 2D polygon (K,2)."""
    inside = np.zeros(np.shape(px), dtype=bool)
    x0, y0 = poly[:, 0], poly[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for a, b, c, d in zip(x0, y0, x1, y1):
        cross = ((b > py) != (d > py))
        xint = (c - a) * (py - b) / np.where(d - b == 0, 1e-15, d - b) + a
        inside ^= cross & (px < xint)
    return inside
