"""Pure-PyTorch Gaussian splatting: the differentiable reference every fast backend is tested against.

Conventions (gsplat's "classic" mode unless noted):
- projection: EWA splatting with the 2D covariance J W Σ Wᵀ Jᵀ + eps2d·I (the low-pass filter), the
  Jacobian's x/z and y/z clamped to 1.3x the field of view as gsplat does;
- a Gaussian is dropped when its centre is outside [near, far] in camera z, its 2D covariance is not
  positive definite, its opacity is below 1/255, or its alpha >= 1/255 ellipse misses every pixel;
- pixel centres sit at (x + 0.5, y + 0.5);
- one global depth sort (stable, so equal depths keep index order), then per-tile front-to-back
  compositing: alpha = min(0.99, o·exp(-σ)); alphas below 1/255 are skipped; a pixel stops before the
  Gaussian that would bring its transmittance to <= 1e-4 (3DGS). gsplat's CUDA kernel clamps at 0.999.
Everything is differentiable by autograd and runs in float32 or float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.99
T_MIN = 1e-4
TILE = 16


@dataclass
class Projection:
    """One camera's view of N Gaussians.

    mean2d: (N, 2) pixel coordinates of the centres
    conic:  (N, 3) inverse 2D covariance (a, b, c) = [[a, b], [b, c]]
    depth:  (N,)   camera-space z (sort key and the depth that is composited)
    valid:  (N,)   bool, False for culled Gaussians (their other values are finite but meaningless)
    """

    mean2d: torch.Tensor
    conic: torch.Tensor
    depth: torch.Tensor
    valid: torch.Tensor


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """(..., 4) wxyz quaternions, not necessarily unit -> (..., 3, 3) rotation matrices."""
    q = quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).reshape(*q.shape[:-1], 3, 3)


def project(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, opacities: torch.Tensor,
            viewmat: torch.Tensor, K: torch.Tensor, width: int, height: int, *, near_plane: float = 0.01,
            far_plane: float = 100.0, eps2d: float = 0.3) -> Projection:
    """Project N Gaussians (means (N,3), quats (N,4) wxyz, scales (N,3), opacities (N,)) into one camera
    (viewmat (4,4) world-to-camera, K (3,3)). Differentiable; culled entries stay finite (no NaN gradients)."""
    R_w, t_w = viewmat[:3, :3], viewmat[:3, 3]
    p = means @ R_w.T + t_w
    x, y, z = p.unbind(-1)
    in_range = (z >= near_plane) & (z <= far_plane)
    z_safe = torch.where(in_range, z, torch.ones_like(z))
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]

    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    u = torch.minimum(torch.maximum(x / z_safe, -(cx / fx + 0.3 * tan_fovx)), (width - cx) / fx + 0.3 * tan_fovx)
    v = torch.minimum(torch.maximum(y / z_safe, -(cy / fy + 0.3 * tan_fovy)), (height - cy) / fy + 0.3 * tan_fovy)
    zeros = torch.zeros_like(z)
    J = torch.stack([fx / z_safe, zeros, -fx * u / z_safe, zeros, fy / z_safe, -fy * v / z_safe], -1).reshape(-1, 2, 3)

    M = quat_to_rotmat(quats) * scales[:, None, :]
    cov_world = M @ M.transpose(-1, -2)
    cov_cam = R_w @ cov_world @ R_w.T
    cov2d = J @ cov_cam @ J.transpose(-1, -2)
    a = cov2d[:, 0, 0] + eps2d
    b = cov2d[:, 0, 1]
    c = cov2d[:, 1, 1] + eps2d
    det = a * c - b * b
    ok_det = det > 0
    det_safe = torch.where(ok_det, det, torch.ones_like(det))
    conic = torch.stack([c / det_safe, -b / det_safe, a / det_safe], -1)
    mean2d = torch.stack([fx * x / z_safe + cx, fy * y / z_safe + cy], -1)
    valid = in_range & ok_det & (opacities >= ALPHA_MIN)
    return Projection(mean2d=mean2d, conic=conic, depth=z, valid=valid)


def footprint_rects(mean2d: torch.Tensor, conic: torch.Tensor, opacities: torch.Tensor, valid: torch.Tensor,
                    width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel rectangles (N,4) int64 [x0, x1, y0, y1] (inclusive, clipped) holding each alpha >= 1/255
    ellipse, and the (N,) mask of Gaussians that are valid and touch at least one pixel."""
    with torch.no_grad():
        a, b, c = conic.double().unbind(-1)
        det = a * c - b * b
        o = opacities.double().clamp_min(ALPHA_MIN)
        level = 2.0 * torch.log(o / ALPHA_MIN)
        good = valid & (det > 0)
        det = torch.where(det > 0, det, torch.ones_like(det))
        rx = torch.sqrt(level * (c / det).clamp_min(0))
        ry = torch.sqrt(level * (a / det).clamp_min(0))
        mx, my = mean2d.double().unbind(-1)
        big = 1e9  # keeps the int conversion of far-off centres in range
        x0 = torch.ceil((mx - rx - 0.5).clamp(-big, big)).clamp_min(0).long()
        x1 = torch.floor((mx + rx - 0.5).clamp(-big, big)).clamp_max(width - 1).long()
        y0 = torch.ceil((my - ry - 0.5).clamp(-big, big)).clamp_min(0).long()
        y1 = torch.floor((my + ry - 0.5).clamp(-big, big)).clamp_max(height - 1).long()
        hit = good & (x0 <= x1) & (y0 <= y1) & torch.isfinite(rx) & torch.isfinite(ry)
        return torch.stack([x0, x1, y0, y1], -1), hit


def rasterize(mean2d: torch.Tensor, conic: torch.Tensor, opacities: torch.Tensor, features: torch.Tensor,
              depth: torch.Tensor, valid: torch.Tensor, width: int, height: int,
              tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """Composite N projected Gaussians front to back into one image.

    mean2d (N,2), conic (N,3), opacities (N,), features (N,K) (what is composited, e.g. RGB and z),
    depth (N,) the sort key, valid (N,) bool. Returns (features (H,W,K), alpha (H,W,1)).
    """
    n_feat = features.shape[-1]
    rects, hit = footprint_rects(mean2d, conic, opacities, valid, width, height)
    ntx, nty = math.ceil(width / tile), math.ceil(height / tile)
    tile_imgs: list[torch.Tensor | None] = [None] * (ntx * nty)

    idx = hit.nonzero().squeeze(-1)
    order = idx[torch.argsort(depth.detach()[idx], stable=True)]
    if order.numel():
        r = rects[order]
        tx0, tx1, ty0, ty1 = r[:, 0] // tile, r[:, 1] // tile, r[:, 2] // tile, r[:, 3] // tile
        nx = tx1 - tx0 + 1
        counts = nx * (ty1 - ty0 + 1)
        rank = torch.repeat_interleave(torch.arange(order.numel()), counts)
        start = torch.cumsum(counts, 0) - counts
        k = torch.arange(int(counts.sum())) - start[rank]
        tile_id = (ty0[rank] + k // nx[rank]) * ntx + tx0[rank] + k % nx[rank]
        tile_sorted, perm = torch.sort(tile_id, stable=True)
        gauss_sorted = order[rank[perm]]
        tiles, tile_counts = torch.unique_consecutive(tile_sorted, return_counts=True)
        offsets = torch.cumsum(tile_counts, 0) - tile_counts
        local = torch.arange(tile, dtype=mean2d.dtype) + 0.5
        for t, off, cnt in zip(tiles.tolist(), offsets.tolist(), tile_counts.tolist()):
            g = gauss_sorted[off:off + cnt]
            ty, tx = divmod(t, ntx)
            py = (local + ty * tile)[:, None].expand(tile, tile).reshape(-1, 1)
            px = (local + tx * tile)[None, :].expand(tile, tile).reshape(-1, 1)
            dx = mean2d[g, 0][None, :] - px
            dy = mean2d[g, 1][None, :] - py
            ca, cb, cc = conic[g].unbind(-1)
            sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
            alpha = (opacities[g] * torch.exp(-sigma)).clamp_max(ALPHA_MAX)
            alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_MIN), alpha, torch.zeros_like(alpha))
            trans_incl = torch.cumprod(1 - alpha, dim=1)
            trans_excl = torch.cat([torch.ones_like(trans_incl[:, :1]), trans_incl[:, :-1]], 1)
            weights = alpha * trans_excl * (trans_incl > T_MIN)
            feat = weights @ features[g]
            acc = weights.sum(1, keepdim=True)
            tile_imgs[t] = torch.cat([feat, acc], 1).reshape(tile, tile, n_feat + 1)

    # keeps every input in the graph (zero gradients, never None) even when nothing is drawn
    empty = features.new_zeros(tile, tile, n_feat + 1) + 0 * (mean2d.sum() + conic.sum() + opacities.sum()
                                                              + features.sum())
    grid = torch.stack([img if img is not None else empty for img in tile_imgs])
    grid = grid.reshape(nty, ntx, tile, tile, n_feat + 1).permute(0, 2, 1, 3, 4)
    image = grid.reshape(nty * tile, ntx * tile, n_feat + 1)[:height, :width]
    return image[..., :n_feat], image[..., n_feat:]


def render_torch(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, opacities: torch.Tensor,
                 colors: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int, *,
                 near_plane: float = 0.01, far_plane: float = 100.0,
                 eps2d: float = 0.3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-camera Gaussians means (C,N,3), quats (C,N,4), scales (C,N,3), opacities (C,N), colors (C,N,3);
    viewmats (C,4,4), Ks (C,3,3). Returns rgb (C,H,W,3), alpha (C,H,W,1), accumulated depth Σ w·z (C,H,W,1),
    all before any background."""
    rgbs, alphas, depths = [], [], []
    for i in range(viewmats.shape[0]):
        proj = project(means[i], quats[i], scales[i], opacities[i], viewmats[i], Ks[i], width, height,
                       near_plane=near_plane, far_plane=far_plane, eps2d=eps2d)
        feats = torch.cat([colors[i], proj.depth[:, None]], -1)
        img, alpha = rasterize(proj.mean2d, proj.conic, opacities[i], feats, proj.depth, proj.valid, width, height)
        rgbs.append(img[..., :3])
        depths.append(img[..., 3:])
        alphas.append(alpha)
    return torch.stack(rgbs), torch.stack(alphas), torch.stack(depths)
