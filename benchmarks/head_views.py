"""Render the embedded default head (painted as in the synthetic training data) from 4 views with engine.render.

    python benchmarks/head_views.py --out benchmarks/results/default_head_4views.png
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from engine.render import render
    from engine.train.synthetic import HeadGenerator
    from engine.types import Cameras, look_at, intrinsics_from_fov

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/default_head_4views.png"))
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args(argv)

    gen = HeadGenerator()
    person = gen.identity(np.random.default_rng(args.seed))
    person.shape.zero_()  # the template identity, painted
    params = gen._zeros(1)
    verts, _ = gen._pose(params)
    faces = torch.from_numpy(gen.faces)
    look = person.look
    tri = verts[:, faces[torch.from_numpy(look.face_ids)]]
    means = torch.einsum("gk,vgkc->vgc", torch.from_numpy(look.bary), tri)[0]
    g = means.shape[0]
    quats = torch.tensor([[1.0, 0, 0, 0]]).expand(g, 4)
    scales = torch.from_numpy(look.scales)[:, None].expand(g, 3)
    centre = torch.tensor(person.centre)
    views = []
    for yaw in (0, 35, 90, 180):
        y = math.radians(yaw)
        eye = centre + 0.62 * torch.tensor([math.sin(y), 0.05, math.cos(y)])
        views.append(look_at(eye, centre))
    cams = Cameras(torch.stack(views), intrinsics_from_fov(30, args.size, args.size).expand(4, 3, 3).clone(),
                   args.size, args.size)
    out = render(means, quats, scales.contiguous(), torch.full((g,), 0.98), torch.from_numpy(look.colors),
                 cams.viewmats, cams.Ks, args.size, args.size, background=torch.ones(3))
    rgb = (out["rgb"].clamp(0, 1).numpy() * 255).astype(np.uint8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(list(rgb), axis=1)).save(args.out)
    print(f"{g} Gaussians on {verts.shape[1]} vertices -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
