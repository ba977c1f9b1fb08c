"""Render a head mesh from 4 views to a PNG with a small numpy z-buffer and Lambert shading.

    python -m engine.train.head_builder.preview [--head DIR] [--out /tmp/head_preview.png]
        [--jaw 0.3] [--expression NAME=VALUE ...] [--weights]

For eyeballing the generated default head; not used by the engine.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def rasterize(vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray, view: np.ndarray, *,
              size: int = 320, half_extent: float = 0.16) -> np.ndarray:
    """Orthographic render. vertices (V,3) world, colors (V,3) in [0,1], view (3,3) rows = camera
    right, up, towards-viewer axes. Returns an (size,size,3) uint8 image."""
    cam = vertices @ view.T
    px = (cam[:, 0] / half_extent * 0.5 + 0.5) * size
    py = (0.5 - cam[:, 1] / half_extent * 0.5) * size
    depth = cam[:, 2]
    img = np.full((size, size, 3), 255, dtype=np.float64)
    zbuf = np.full((size, size), -np.inf)
    light = np.array([0.35, 0.45, 1.0])
    light /= np.linalg.norm(light)
    for tri in faces:
        x, y, z = px[tri], py[tri], depth[tri]
        n = np.cross(cam[tri[1]] - cam[tri[0]], cam[tri[2]] - cam[tri[0]])
        nn = np.linalg.norm(n)
        if nn == 0:
            continue
        shade = 0.25 + 0.75 * abs(n @ light) / nn
        x0, x1 = int(max(np.floor(x.min()), 0)), int(min(np.ceil(x.max()), size - 1))
        y0, y1 = int(max(np.floor(y.min()), 0)), int(min(np.ceil(y.max()), size - 1))
        if x1 < x0 or y1 < y0:
            continue
        gx, gy = np.meshgrid(np.arange(x0, x1 + 1) + 0.5, np.arange(y0, y1 + 1) + 0.5)
        d = (y[1] - y[2]) * (x[0] - x[2]) + (x[2] - x[1]) * (y[0] - y[2])
        if abs(d) < 1e-12:
            continue
        l0 = ((y[1] - y[2]) * (gx - x[2]) + (x[2] - x[1]) * (gy - y[2])) / d
        l1 = ((y[2] - y[0]) * (gx - x[2]) + (x[0] - x[2]) * (gy - y[2])) / d
        l2 = 1 - l0 - l1
        inside = (l0 >= 0) & (l1 >= 0) & (l2 >= 0)
        if not inside.any():
            continue
        zz = l0 * z[0] + l1 * z[1] + l2 * z[2]
        sub = zbuf[y0:y1 + 1, x0:x1 + 1]
        win = inside & (zz > sub)
        sub[win] = zz[win]
        col = (l0[..., None] * colors[tri[0]] + l1[..., None] * colors[tri[1]] + l2[..., None] * colors[tri[2]])
        img[y0:y1 + 1, x0:x1 + 1][win] = 255 * shade * col[win]
    return img.clip(0, 255).astype(np.uint8)


def views() -> list[np.ndarray]:
    """Front, three-quarter, side (subject's left, +x) and back views as (3,3) camera bases."""
    out = []
    for yaw in (0.0, 40.0, 90.0, 180.0):
        a = np.radians(yaw)
        toward = np.array([np.sin(a), 0.0, np.cos(a)])
        right = np.cross(np.array([0.0, 1.0, 0.0]), toward)
        out.append(np.stack([right, [0.0, 1.0, 0.0], toward]))
    return out


def render_views(vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None,
                 marks: np.ndarray | None = None, size: int = 320) -> np.ndarray:
    """(size, 4*size, 3) image of the 4 views side by side; `marks` (K,3) are drawn as red dots."""
    colors = np.full((len(vertices), 3), (0.93, 0.8, 0.72)) if colors is None else colors
    centre = np.array([0.0, -0.02, 0.0])
    tiles = []
    for view in views():
        tile = rasterize(vertices - centre, faces, colors, view, size=size)
        if marks is not None:
            cam = (marks - centre) @ view.T
            for x, y, z in cam if view[2, 2] > -0.5 else []:  # no marks on the back view
                u = int((x / 0.16 * 0.5 + 0.5) * size)
                v = int((0.5 - y / 0.16 * 0.5) * size)
                tile[max(v - 1, 0):v + 2, max(u - 1, 0):u + 2] = (220, 0, 0)
        tiles.append(tile)
    return np.concatenate(tiles, axis=1)


def main(argv: list[str] | None = None) -> None:
    import torch
    from PIL import Image

    from engine.head import load_head
    from engine.types import FlameParams

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", default=None, help="head model folder or FLAME file (default: embedded)")
    parser.add_argument("--out", default="/tmp/head_preview.png")
    parser.add_argument("--jaw", type=float, default=0.0, help="jaw opening, radians")
    parser.add_argument("--expression", nargs="*", default=[], help="NAME=VALUE pairs")
    parser.add_argument("--shape", nargs="*", default=[], help="NAME=VALUE pairs")
    parser.add_argument("--weights", action="store_true", help="colour by LBS weights (jaw red, global blue)")
    parser.add_argument("--no-landmarks", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    head = load_head(args.head)
    params = FlameParams.zeros(1, head.n_shape, head.n_expression)
    params.jaw[0, 0] = args.jaw
    for pairs, names, target in ((args.expression, head.expression_names, params.expression),
                                 (args.shape, head.shape_names, params.shape)):
        for item in pairs:
            name, value = item.split("=")
            target[0, list(names).index(name)] = float(value)
    with torch.no_grad():
        out = head.forward(params)
        lmk = head.landmark_vertices(out)[0].numpy()
    verts = out.vertices[0].numpy()
    colors = None
    if args.weights:
        w = head.flame.lbs_weights.numpy()
        colors = np.stack([0.3 + 0.7 * w[:, 2], 0.3 + 0.7 * (w[:, 1] + w[:, 3] + w[:, 4]), 0.3 + 0.7 * w[:, 0]], 1)
    image = render_views(verts, head.faces, colors, None if args.no_landmarks else lmk)
    Image.fromarray(image).save(args.out)
    print(Path(args.out).resolve())


if __name__ == "__main__":
    main()
