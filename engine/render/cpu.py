"""Compiled CPU Gaussian splatting (numba): projection, global depth sort, tile binning, compositing, and
hand-written backward passes for all of them, wrapped as two autograd stages.

Same conventions as `engine.render.reference` (which these kernels are tested against). The 2D stage keeps
per-pixel transmittance and the index of the last contributing Gaussian, so the backward pass walks each
pixel's list back to front and recovers earlier transmittances by division (as gsplat does). Per-Gaussian
gradients are first written per tile-intersection (each owned by one tile, so tiles run in parallel without
atomics), then summed per Gaussian.

Kernels are cached on disk (`cache=True`; NUMBA_CACHE_DIR is honoured), so only the very first call after
install pays the JIT compile.
"""
from __future__ import annotations

import math
import os
import threading

import numba
import numpy as np
import torch
from numba import njit, prange

from engine.render.reference import ALPHA_MAX, ALPHA_MIN, T_MIN, TILE

# numba's OpenMP layer and torch's bundled libgomp would be two spinning pools on the same cores; the
# workqueue layer is numba's own and quiet. It must be chosen before the first parallel launch, and a
# user's explicit NUMBA_THREADING_LAYER wins.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

# The workqueue layer aborts the process when two Python threads launch kernels at once; serialize launches.
_LAUNCH_LOCK = threading.Lock()

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_HALF = np.float32(0.5)
_AMIN = np.float32(ALPHA_MIN)
_AMAX = np.float32(ALPHA_MAX)
_TMIN = np.float32(T_MIN)
_SPAN_MARGIN = np.float32(0.01)
N_FEAT = 4  # composited features: r, g, b, camera z
_N_GRAD = 6 + N_FEAT  # per intersection: d mean2d (2), d conic (3), d opacity, d features


def _threads() -> int:
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


# ----------------------------------------------------------------------------------------------- projection
@njit(cache=True, fastmath=True, parallel=True)
def _project_fwd(means, quats, scales, opac, view, K, width, height, near, far, eps2d,
                 mean2d, conic, depth, valid):  # pragma: no cover - compiled
    fx, fy, cx, cy = float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])
    lxp = (width - cx) / fx + 0.15 * width / fx
    lxn = cx / fx + 0.15 * width / fx
    lyp = (height - cy) / fy + 0.15 * height / fy
    lyn = cy / fy + 0.15 * height / fy
    for i in prange(means.shape[0]):
        mx, my, mz = float(means[i, 0]), float(means[i, 1]), float(means[i, 2])
        x = view[0, 0] * mx + view[0, 1] * my + view[0, 2] * mz + view[0, 3]
        y = view[1, 0] * mx + view[1, 1] * my + view[1, 2] * mz + view[1, 3]
        z = view[2, 0] * mx + view[2, 1] * my + view[2, 2] * mz + view[2, 3]
        depth[i] = z
        valid[i] = 0
        mean2d[i, 0] = 0.0
        mean2d[i, 1] = 0.0
        conic[i, 0] = 0.0
        conic[i, 1] = 0.0
        conic[i, 2] = 0.0
        if not (z >= near and z <= far) or opac[i] < ALPHA_MIN:
            continue
        qw, qx, qy, qz = float(quats[i, 0]), float(quats[i, 1]), float(quats[i, 2]), float(quats[i, 3])
        qn = max(math.sqrt(qw * qw + qx * qx + qy * qy + qz * qz), 1e-12)
        qw, qx, qy, qz = qw / qn, qx / qn, qy / qn, qz / qn
        s0, s1, s2 = float(scales[i, 0]), float(scales[i, 1]), float(scales[i, 2])
        # M = R(q) diag(s)
        m00 = (1 - 2 * (qy * qy + qz * qz)) * s0
        m01 = 2 * (qx * qy - qw * qz) * s1
        m02 = 2 * (qx * qz + qw * qy) * s2
        m10 = 2 * (qx * qy + qw * qz) * s0
        m11 = (1 - 2 * (qx * qx + qz * qz)) * s1
        m12 = 2 * (qy * qz - qw * qx) * s2
        m20 = 2 * (qx * qz - qw * qy) * s0
        m21 = 2 * (qy * qz + qw * qx) * s1
        m22 = (1 - 2 * (qx * qx + qy * qy)) * s2
        rz = 1.0 / z
        u = min(max(x * rz, -lxn), lxp)
        v = min(max(y * rz, -lyn), lyp)
        j00, j02, j11, j12 = fx * rz, -fx * u * rz, fy * rz, -fy * v * rz
        # T = J V (2x3), A = T M (2x3), cov2d = A A^T
        t00 = j00 * view[0, 0] + j02 * view[2, 0]
        t01 = j00 * view[0, 1] + j02 * view[2, 1]
        t02 = j00 * view[0, 2] + j02 * view[2, 2]
        t10 = j11 * view[1, 0] + j12 * view[2, 0]
        t11 = j11 * view[1, 1] + j12 * view[2, 1]
        t12 = j11 * view[1, 2] + j12 * view[2, 2]
        a00 = t00 * m00 + t01 * m10 + t02 * m20
        a01 = t00 * m01 + t01 * m11 + t02 * m21
        a02 = t00 * m02 + t01 * m12 + t02 * m22
        a10 = t10 * m00 + t11 * m10 + t12 * m20
        a11 = t10 * m01 + t11 * m11 + t12 * m21
        a12 = t10 * m02 + t11 * m12 + t12 * m22
        ca = a00 * a00 + a01 * a01 + a02 * a02 + eps2d
        cb = a00 * a10 + a01 * a11 + a02 * a12
        cc = a10 * a10 + a11 * a11 + a12 * a12 + eps2d
        det = ca * cc - cb * cb
        if not det > 0.0:
            continue
        conic[i, 0] = cc / det
        conic[i, 1] = -cb / det
        conic[i, 2] = ca / det
        mean2d[i, 0] = fx * x * rz + cx
        mean2d[i, 1] = fy * y * rz + cy
        valid[i] = 1


@njit(cache=True, fastmath=True, parallel=True)
def _project_bwd(means, quats, scales, view, K, width, height, eps2d, valid,
                 g_mean2d, g_conic, g_depth, g_means, g_quats, g_scales):  # pragma: no cover - compiled
    fx, fy, cx, cy = float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])
    lxp = (width - cx) / fx + 0.15 * width / fx
    lxn = cx / fx + 0.15 * width / fx
    lyp = (height - cy) / fy + 0.15 * height / fy
    lyn = cy / fy + 0.15 * height / fy
    for i in prange(means.shape[0]):
        for k in range(3):
            g_means[i, k] = 0.0
            g_scales[i, k] = 0.0
        for k in range(4):
            g_quats[i, k] = 0.0
        if valid[i] == 0:
            continue
        mx, my, mz = float(means[i, 0]), float(means[i, 1]), float(means[i, 2])
        x = view[0, 0] * mx + view[0, 1] * my + view[0, 2] * mz + view[0, 3]
        y = view[1, 0] * mx + view[1, 1] * my + view[1, 2] * mz + view[1, 3]
        z = view[2, 0] * mx + view[2, 1] * my + view[2, 2] * mz + view[2, 3]
        qw0, qx0, qy0, qz0 = float(quats[i, 0]), float(quats[i, 1]), float(quats[i, 2]), float(quats[i, 3])
        qn = max(math.sqrt(qw0 * qw0 + qx0 * qx0 + qy0 * qy0 + qz0 * qz0), 1e-12)
        qw, qx, qy, qz = qw0 / qn, qx0 / qn, qy0 / qn, qz0 / qn
        s0, s1, s2 = float(scales[i, 0]), float(scales[i, 1]), float(scales[i, 2])
        r00 = 1 - 2 * (qy * qy + qz * qz)
        r01 = 2 * (qx * qy - qw * qz)
        r02 = 2 * (qx * qz + qw * qy)
        r10 = 2 * (qx * qy + qw * qz)
        r11 = 1 - 2 * (qx * qx + qz * qz)
        r12 = 2 * (qy * qz - qw * qx)
        r20 = 2 * (qx * qz - qw * qy)
        r21 = 2 * (qy * qz + qw * qx)
        r22 = 1 - 2 * (qx * qx + qy * qy)
        m00, m01, m02 = r00 * s0, r01 * s1, r02 * s2
        m10, m11, m12 = r10 * s0, r11 * s1, r12 * s2
        m20, m21, m22 = r20 * s0, r21 * s1, r22 * s2
        rz = 1.0 / z
        xr, yr = x * rz, y * rz
        u = min(max(xr, -lxn), lxp)
        v = min(max(yr, -lyn), lyp)
        j00, j02, j11, j12 = fx * rz, -fx * u * rz, fy * rz, -fy * v * rz
        t00 = j00 * view[0, 0] + j02 * view[2, 0]
        t01 = j00 * view[0, 1] + j02 * view[2, 1]
        t02 = j00 * view[0, 2] + j02 * view[2, 2]
        t10 = j11 * view[1, 0] + j12 * view[2, 0]
        t11 = j11 * view[1, 1] + j12 * view[2, 1]
        t12 = j11 * view[1, 2] + j12 * view[2, 2]
        a00 = t00 * m00 + t01 * m10 + t02 * m20
        a01 = t00 * m01 + t01 * m11 + t02 * m21
        a02 = t00 * m02 + t01 * m12 + t02 * m22
        a10 = t10 * m00 + t11 * m10 + t12 * m20
        a11 = t10 * m01 + t11 * m11 + t12 * m21
        a12 = t10 * m02 + t11 * m12 + t12 * m22
        ca = a00 * a00 + a01 * a01 + a02 * a02 + eps2d
        cb = a00 * a10 + a01 * a11 + a02 * a12
        cc = a10 * a10 + a11 * a11 + a12 * a12 + eps2d
        det = ca * cc - cb * cb
        ia, ib, ic = cc / det, -cb / det, ca / det
        # conic = inverse(cov2d): dL/dcov = -conic G conic with G = [[gA, gB/2], [gB/2, gC]]
        ga, gb, gc = float(g_conic[i, 0]), 0.5 * float(g_conic[i, 1]), float(g_conic[i, 2])
        p00 = ia * ga + ib * gb
        p01 = ia * gb + ib * gc
        p10 = ib * ga + ic * gb
        p11 = ib * gb + ic * gc
        g00 = -(p00 * ia + p01 * ib)
        g01 = -(p00 * ib + p01 * ic)
        g11 = -(p10 * ib + p11 * ic)
        # cov2d = A A^T  ->  dA = 2 G A
        da00 = 2 * (g00 * a00 + g01 * a10)
        da01 = 2 * (g00 * a01 + g01 * a11)
        da02 = 2 * (g00 * a02 + g01 * a12)
        da10 = 2 * (g01 * a00 + g11 * a10)
        da11 = 2 * (g01 * a01 + g11 * a11)
        da12 = 2 * (g01 * a02 + g11 * a12)
        # A = T M
        dt00 = da00 * m00 + da01 * m01 + da02 * m02
        dt01 = da00 * m10 + da01 * m11 + da02 * m12
        dt02 = da00 * m20 + da01 * m21 + da02 * m22
        dt10 = da10 * m00 + da11 * m01 + da12 * m02
        dt11 = da10 * m10 + da11 * m11 + da12 * m12
        dt12 = da10 * m20 + da11 * m21 + da12 * m22
        dm00 = t00 * da00 + t10 * da10
        dm01 = t00 * da01 + t10 * da11
        dm02 = t00 * da02 + t10 * da12
        dm10 = t01 * da00 + t11 * da10
        dm11 = t01 * da01 + t11 * da11
        dm12 = t01 * da02 + t11 * da12
        dm20 = t02 * da00 + t12 * da10
        dm21 = t02 * da01 + t12 * da11
        dm22 = t02 * da02 + t12 * da12
        # T = J V
        dj00 = dt00 * view[0, 0] + dt01 * view[0, 1] + dt02 * view[0, 2]
        dj02 = dt00 * view[2, 0] + dt01 * view[2, 1] + dt02 * view[2, 2]
        dj11 = dt10 * view[1, 0] + dt11 * view[1, 1] + dt12 * view[1, 2]
        dj12 = dt10 * view[2, 0] + dt11 * view[2, 1] + dt12 * view[2, 2]
        # camera point: mean2d, the Jacobian (through the clamped x/z, y/z), and z itself
        gmx, gmy = float(g_mean2d[i, 0]), float(g_mean2d[i, 1])
        gx = gmx * fx * rz
        gy = gmy * fy * rz
        gz = -(gmx * fx * xr + gmy * fy * yr) * rz + float(g_depth[i])
        gz += -(dj00 * fx + dj11 * fy) * rz * rz
        gz += (dj02 * fx * u + dj12 * fy * v) * rz * rz
        if -lxn <= xr <= lxp:
            gx += -dj02 * fx * rz * rz
            gz += dj02 * fx * xr * rz * rz
        if -lyn <= yr <= lyp:
            gy += -dj12 * fy * rz * rz
            gz += dj12 * fy * yr * rz * rz
        for k in range(3):
            g_means[i, k] = view[0, k] * gx + view[1, k] * gy + view[2, k] * gz
        # M = R diag(s)
        g_scales[i, 0] = dm00 * r00 + dm10 * r10 + dm20 * r20
        g_scales[i, 1] = dm01 * r01 + dm11 * r11 + dm21 * r21
        g_scales[i, 2] = dm02 * r02 + dm12 * r12 + dm22 * r22
        d00, d01, d02 = dm00 * s0, dm01 * s1, dm02 * s2
        d10, d11, d12 = dm10 * s0, dm11 * s1, dm12 * s2
        d20, d21, d22 = dm20 * s0, dm21 * s1, dm22 * s2
        gqw = 2 * (-qz * d01 + qy * d02 + qz * d10 - qx * d12 - qy * d20 + qx * d21)
        gqx = 2 * (qy * d01 + qz * d02 + qy * d10 - 2 * qx * d11 - qw * d12 + qz * d20 + qw * d21 - 2 * qx * d22)
        gqy = 2 * (-2 * qy * d00 + qx * d01 + qw * d02 + qx * d10 + qz * d12 - qw * d20 + qz * d21 - 2 * qy * d22)
        gqz = 2 * (-2 * qz * d00 - qw * d01 + qx * d02 + qw * d10 - 2 * qz * d11 + qy * d12 + qx * d20 + qy * d21)
        dot = qw * gqw + qx * gqx + qy * gqy + qz * gqz
        g_quats[i, 0] = (gqw - qw * dot) / qn
        g_quats[i, 1] = (gqx - qx * dot) / qn
        g_quats[i, 2] = (gqy - qy * dot) / qn
        g_quats[i, 3] = (gqz - qz * dot) / qn


# --------------------------------------------------------------------------------------- sort and binning
@njit(cache=True)
def _radix_argsort(keys):  # pragma: no cover - compiled
    """Stable argsort of non-negative int64 keys < 2**32 (LSD, 8-bit digits): ties keep input order."""
    n = keys.shape[0]
    idx = np.arange(n).astype(np.int32)
    tmp = np.empty(n, np.int32)
    counts = np.empty(257, np.int64)
    for shift in range(0, 32, 8):
        counts[:] = 0
        for j in range(n):
            counts[((keys[idx[j]] >> shift) & 255) + 1] += 1
        for d in range(256):
            counts[d + 1] += counts[d]
        for j in range(n):
            d = (keys[idx[j]] >> shift) & 255
            tmp[counts[d]] = idx[j]
            counts[d] += 1
        idx, tmp = tmp, idx
    return idx


@njit(cache=True, fastmath=False)
def _bin(mean2d, conic, opac, depth, valid, width, height, tile):  # pragma: no cover - compiled
    """Footprint rectangles (N,4) [x0,x1,y0,y1], tile offsets (T+1,) and the tile-major list of Gaussian ids,
    each tile's list in global (depth, index) order."""
    n = mean2d.shape[0]
    rect = np.zeros((n, 4), np.int32)
    hit = np.zeros(n, np.bool_)
    n_hit = 0
    for i in range(n):
        if valid[i] == 0:
            continue
        a, b, c = float(conic[i, 0]), float(conic[i, 1]), float(conic[i, 2])
        det = a * c - b * b
        if not det > 0.0:
            continue
        level = 2.0 * math.log(max(float(opac[i]), ALPHA_MIN) / ALPHA_MIN)
        rx = math.sqrt(level * max(c / det, 0.0))
        ry = math.sqrt(level * max(a / det, 0.0))
        mx, my = float(mean2d[i, 0]), float(mean2d[i, 1])
        if not (math.isfinite(rx) and math.isfinite(ry) and math.isfinite(mx) and math.isfinite(my)):
            continue
        fx0 = math.ceil(mx - rx - 0.5)
        fx1 = math.floor(mx + rx - 0.5)
        fy0 = math.ceil(my - ry - 0.5)
        fy1 = math.floor(my + ry - 0.5)
        if fx1 < 0 or fy1 < 0 or fx0 > width - 1 or fy0 > height - 1:
            continue
        rect[i, 0] = max(int(fx0), 0)
        rect[i, 1] = min(int(fx1), width - 1)
        rect[i, 2] = max(int(fy0), 0)
        rect[i, 3] = min(int(fy1), height - 1)
        if rect[i, 0] > rect[i, 1] or rect[i, 2] > rect[i, 3]:
            continue
        hit[i] = True
        n_hit += 1
    order = np.empty(n_hit, np.int32)
    keys = np.empty(n_hit, np.int64)
    bits = depth.view(np.uint32)
    j = 0
    for i in range(n):
        if hit[i]:
            order[j] = i
            b32 = np.int64(bits[i])
            # float32 bit patterns in sortable order (negatives reversed)
            keys[j] = (4294967295 - b32) if b32 >= 2147483648 else (b32 + 2147483648)
            j += 1
    order = order[_radix_argsort(keys)]
    ntx = (width + tile - 1) // tile
    nty = (height + tile - 1) // tile
    offsets = np.zeros(ntx * nty + 1, np.int64)
    for j in range(n_hit):
        g = order[j]
        for ty in range(rect[g, 2] // tile, rect[g, 3] // tile + 1):
            for tx in range(rect[g, 0] // tile, rect[g, 1] // tile + 1):
                offsets[ty * ntx + tx + 1] += 1
    for t in range(ntx * nty):
        offsets[t + 1] += offsets[t]
    ids = np.empty(offsets[ntx * nty], np.int32)
    cursor = offsets[:-1].copy()
    for j in range(n_hit):
        g = order[j]
        for ty in range(rect[g, 2] // tile, rect[g, 3] // tile + 1):
            for tx in range(rect[g, 0] // tile, rect[g, 1] // tile + 1):
                t = ty * ntx + tx
                ids[cursor[t]] = g
                cursor[t] += 1
    return rect, offsets, ids


@njit(cache=True, fastmath=True, inline="always")
def _row_span(mx, dy, ca, cb, cc, level, lo, hi):  # pragma: no cover - compiled
    """Pixel columns of one row where sigma <= level (the alpha >= 1/255 chord of the ellipse), within
    [lo, hi]; widened by a hundredth of a pixel so float rounding never drops a pixel the test would keep."""
    disc = dy * dy * (cb * cb - ca * cc) + np.float32(2.0) * ca * level
    if disc < _F0:
        return 1, 0
    root = np.sqrt(disc)
    dx_lo = (-cb * dy - root) / ca
    dx_hi = (-cb * dy + root) / ca
    x_lo = int(np.ceil(mx - dx_hi - _HALF - _SPAN_MARGIN))
    x_hi = int(np.floor(mx - dx_lo - _HALF + _SPAN_MARGIN))
    return max(x_lo, lo), min(x_hi, hi)


# ------------------------------------------------------------------------------------------- compositing
@njit(cache=True, fastmath=True, parallel=True)
def _raster_fwd(offsets, ids, rect, mean2d, conic, opac, feats, width, height, tile,
                out_feat, out_trans, out_last):  # pragma: no cover - compiled
    ntx = (width + tile - 1) // tile
    n_tiles = offsets.shape[0] - 1
    for t in prange(n_tiles):
        ty = t // ntx
        tx = t - ty * ntx
        x0, y0 = tx * tile, ty * tile
        x1, y1 = min(x0 + tile, width), min(y0 + tile, height)
        tw = x1 - x0
        npix = tw * (y1 - y0)
        trans = np.ones(npix, np.float32)
        t_final = np.ones(npix, np.float32)
        acc = np.zeros((npix, 4), np.float32)
        last = np.full(npix, -1, np.int32)
        n_done = 0
        for k in range(offsets[t], offsets[t + 1]):
            g = ids[k]
            gx0, gx1 = max(rect[g, 0], x0), min(rect[g, 1], x1 - 1)
            gy0, gy1 = max(rect[g, 2], y0), min(rect[g, 3], y1 - 1)
            mx, my = mean2d[g, 0], mean2d[g, 1]
            ca, cb, cc = conic[g, 0], conic[g, 1], conic[g, 2]
            o = opac[g]
            f0, f1, f2, f3 = feats[g, 0], feats[g, 1], feats[g, 2], feats[g, 3]
            level = np.log(o / _AMIN)
            step2 = np.exp(-ca)
            for py in range(gy0, gy1 + 1):
                dy = my - (np.float32(py) + _HALF)
                sx0, sx1 = _row_span(mx, dy, ca, cb, cc, level, gx0, gx1)
                if sx0 > sx1:
                    continue
                # exp(-sigma) is Gaussian along the row: two multiplications per pixel instead of an exp
                dx = mx - (np.float32(sx0) + _HALF)
                vis_next = np.exp(-(_HALF * (ca * dx * dx + cc * dy * dy) + cb * dx * dy))
                step = np.exp(ca * dx - _HALF * ca + cb * dy)
                row = (py - y0) * tw - x0
                for px in range(sx0, sx1 + 1):
                    vis = vis_next
                    vis_next *= step
                    step *= step2
                    p = row + px
                    tr = trans[p]
                    if tr == _F0:
                        continue
                    alpha = min(_AMAX, o * vis)
                    if alpha < _AMIN:
                        continue
                    nt = tr * (_F1 - alpha)
                    if nt <= _TMIN:
                        t_final[p] = tr
                        trans[p] = _F0
                        n_done += 1
                        continue
                    w = alpha * tr
                    acc[p, 0] += w * f0
                    acc[p, 1] += w * f1
                    acc[p, 2] += w * f2
                    acc[p, 3] += w * f3
                    trans[p] = nt
                    last[p] = k
            if n_done == npix:
                break
        for p in range(npix):
            py = y0 + p // tw
            px = x0 + p - (p // tw) * tw
            for f in range(4):
                out_feat[py, px, f] = acc[p, f]
            out_trans[py, px] = trans[p] if trans[p] != _F0 else t_final[p]
            out_last[py, px] = last[p]


@njit(cache=True, fastmath=True, parallel=True)
def _raster_bwd(offsets, ids, rect, mean2d, conic, opac, feats, width, height, tile,
                t_final, last, g_feat, g_alpha, g_int):  # pragma: no cover - compiled
    ntx = (width + tile - 1) // tile
    n_tiles = offsets.shape[0] - 1
    for t in prange(n_tiles):
        start = offsets[t]
        if offsets[t + 1] == start:
            continue
        ty = t // ntx
        tx = t - ty * ntx
        x0, y0 = tx * tile, ty * tile
        x1, y1 = min(x0 + tile, width), min(y0 + tile, height)
        tw = x1 - x0
        npix = tw * (y1 - y0)
        trans = np.empty(npix, np.float32)
        t_end = np.empty(npix, np.float32)
        lst = np.empty(npix, np.int64)
        gf = np.empty((npix, 4), np.float32)
        ga = np.empty(npix, np.float32)
        back = np.zeros((npix, 4), np.float32)
        k_max = np.int64(-1)
        for p in range(npix):
            py = y0 + p // tw
            px = x0 + p - (p // tw) * tw
            trans[p] = t_final[py, px]
            t_end[p] = t_final[py, px]
            lst[p] = last[py, px]
            k_max = max(k_max, lst[p])
            for f in range(4):
                gf[p, f] = g_feat[py, px, f]
            ga[p] = g_alpha[py, px]
        for k in range(start, offsets[t + 1]):
            for f in range(_N_GRAD):
                g_int[k, f] = _F0
        for k in range(k_max, start - 1, -1):
            g = ids[k]
            gx0, gx1 = max(rect[g, 0], x0), min(rect[g, 1], x1 - 1)
            gy0, gy1 = max(rect[g, 2], y0), min(rect[g, 3], y1 - 1)
            mx, my = mean2d[g, 0], mean2d[g, 1]
            ca, cb, cc = conic[g, 0], conic[g, 1], conic[g, 2]
            o = opac[g]
            f0, f1, f2, f3 = feats[g, 0], feats[g, 1], feats[g, 2], feats[g, 3]
            s_mx = _F0
            s_my = _F0
            s_a = _F0
            s_b = _F0
            s_c = _F0
            s_o = _F0
            s_f0 = _F0
            s_f1 = _F0
            s_f2 = _F0
            s_f3 = _F0
            level = np.log(o / _AMIN)
            step2 = np.exp(-ca)
            for py in range(gy0, gy1 + 1):
                dy = my - (np.float32(py) + _HALF)
                sx0, sx1 = _row_span(mx, dy, ca, cb, cc, level, gx0, gx1)
                if sx0 > sx1:
                    continue
                dx_next = mx - (np.float32(sx0) + _HALF)
                vis_next = np.exp(-(_HALF * (ca * dx_next * dx_next + cc * dy * dy) + cb * dx_next * dy))
                step = np.exp(ca * dx_next - _HALF * ca + cb * dy)
                row = (py - y0) * tw - x0
                for px in range(sx0, sx1 + 1):
                    vis = vis_next
                    dx = dx_next
                    vis_next *= step
                    step *= step2
                    dx_next -= _F1
                    p = row + px
                    if k > lst[p]:
                        continue
                    raw = o * vis
                    alpha = min(_AMAX, raw)
                    if alpha < _AMIN:
                        continue
                    one_m = _F1 - alpha
                    tr = trans[p] / one_m
                    w = alpha * tr
                    gf0, gf1, gf2, gf3 = gf[p, 0], gf[p, 1], gf[p, 2], gf[p, 3]
                    s_f0 += w * gf0
                    s_f1 += w * gf1
                    s_f2 += w * gf2
                    s_f3 += w * gf3
                    d_alpha = tr * ((f0 - back[p, 0]) * gf0 + (f1 - back[p, 1]) * gf1
                                    + (f2 - back[p, 2]) * gf2 + (f3 - back[p, 3]) * gf3)
                    d_alpha += ga[p] * t_end[p] / one_m
                    back[p, 0] = f0 * alpha + back[p, 0] * one_m
                    back[p, 1] = f1 * alpha + back[p, 1] * one_m
                    back[p, 2] = f2 * alpha + back[p, 2] * one_m
                    back[p, 3] = f3 * alpha + back[p, 3] * one_m
                    trans[p] = tr
                    if raw <= _AMAX:
                        s_o += vis * d_alpha
                        d_sigma = -raw * d_alpha
                        s_mx += d_sigma * (ca * dx + cb * dy)
                        s_my += d_sigma * (cb * dx + cc * dy)
                        s_a += _HALF * d_sigma * dx * dx
                        s_b += d_sigma * dx * dy
                        s_c += _HALF * d_sigma * dy * dy
            g_int[k, 0] = s_mx
            g_int[k, 1] = s_my
            g_int[k, 2] = s_a
            g_int[k, 3] = s_b
            g_int[k, 4] = s_c
            g_int[k, 5] = s_o
            g_int[k, 6] = s_f0
            g_int[k, 7] = s_f1
            g_int[k, 8] = s_f2
            g_int[k, 9] = s_f3


@njit(cache=True)
def _sum_by_gaussian(ids, g_int, out):  # pragma: no cover - compiled
    out[:] = 0.0
    for k in range(ids.shape[0]):
        g = ids[k]
        for f in range(g_int.shape[1]):
            out[g, f] += g_int[k, f]


# --------------------------------------------------------------------------------------- autograd stages
def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy())


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, quats, scales, opacities, viewmat, K, width, height, near, far, eps2d):
        n = means.shape[0]
        m, q, s = _np(means), _np(quats), _np(scales)
        view = np.ascontiguousarray(viewmat.detach().cpu().numpy().astype(np.float64))
        Kn = np.ascontiguousarray(K.detach().cpu().numpy().astype(np.float64))
        mean2d = np.empty((n, 2), np.float32)
        conic = np.empty((n, 3), np.float32)
        depth = np.empty(n, np.float32)
        valid = np.empty(n, np.uint8)
        if n:
            with _LAUNCH_LOCK:
                numba.set_num_threads(_threads())
                _project_fwd(m, q, s, _np(opacities), view, Kn, float(width), float(height), float(near),
                             float(far), float(eps2d), mean2d, conic, depth, valid)
        ctx.state = (m, q, s, view, Kn, float(width), float(height), float(eps2d), valid)
        valid_t = torch.from_numpy(valid.astype(np.bool_))
        ctx.mark_non_differentiable(valid_t)
        return torch.from_numpy(mean2d), torch.from_numpy(conic), torch.from_numpy(depth), valid_t

    @staticmethod
    def backward(ctx, g_mean2d, g_conic, g_depth, _g_valid):
        m, q, s, view, Kn, width, height, eps2d, valid = ctx.state
        n = m.shape[0]
        g_means = np.empty((n, 3), np.float32)
        g_quats = np.empty((n, 4), np.float32)
        g_scales = np.empty((n, 3), np.float32)
        if n:
            with _LAUNCH_LOCK:
                numba.set_num_threads(_threads())
                _project_bwd(m, q, s, view, Kn, width, height, eps2d, valid, _np(g_mean2d), _np(g_conic),
                             _np(g_depth), g_means, g_quats, g_scales)
        return (torch.from_numpy(g_means), torch.from_numpy(g_quats), torch.from_numpy(g_scales),
                None, None, None, None, None, None, None, None)


class _Rasterize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mean2d, conic, opacities, feats, depth, valid, width, height):
        m2, co, op, fe = _np(mean2d), _np(conic), _np(opacities), _np(feats)
        de = _np(depth)
        va = np.ascontiguousarray(valid.detach().cpu().numpy().astype(np.uint8))
        out_feat = np.empty((height, width, N_FEAT), np.float32)
        out_trans = np.empty((height, width), np.float32)
        out_last = np.empty((height, width), np.int32)
        with _LAUNCH_LOCK:
            numba.set_num_threads(_threads())
            rect, offsets, ids = _bin(m2, co, op, de, va, width, height, TILE)
            _raster_fwd(offsets, ids, rect, m2, co, op, fe, width, height, TILE, out_feat, out_trans, out_last)
        ctx.state = (m2, co, op, fe, rect, offsets, ids, out_trans, out_last, width, height)
        alpha = torch.from_numpy(1.0 - out_trans[..., None])
        return torch.from_numpy(out_feat), alpha

    @staticmethod
    def backward(ctx, g_feat, g_alpha):
        m2, co, op, fe, rect, offsets, ids, out_trans, out_last, width, height = ctx.state
        g_int = np.empty((ids.shape[0], _N_GRAD), np.float32)
        summed = np.empty((m2.shape[0], _N_GRAD), np.float32)
        with _LAUNCH_LOCK:
            numba.set_num_threads(_threads())
            _raster_bwd(offsets, ids, rect, m2, co, op, fe, width, height, TILE, out_trans, out_last,
                        _np(g_feat), np.ascontiguousarray(_np(g_alpha)[..., 0]), g_int)
            _sum_by_gaussian(ids, g_int, summed)
        g = torch.from_numpy(summed)
        return g[:, 0:2], g[:, 2:5], g[:, 5], g[:, 6:10], None, None, None, None


def project_cpu(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, opacities: torch.Tensor,
                viewmat: torch.Tensor, K: torch.Tensor, width: int, height: int, *, near_plane: float = 0.01,
                far_plane: float = 100.0, eps2d: float = 0.3) -> tuple[torch.Tensor, ...]:
    """Compiled twin of `reference.project` for one camera: returns (mean2d (N,2), conic (N,3), depth (N,),
    valid (N,) bool); differentiable to means, quats and scales."""
    return _Project.apply(means, quats, scales, opacities, viewmat, K, int(width), int(height),
                          float(near_plane), float(far_plane), float(eps2d))


def rasterize_cpu(mean2d: torch.Tensor, conic: torch.Tensor, opacities: torch.Tensor, features: torch.Tensor,
                  depth: torch.Tensor, valid: torch.Tensor, width: int, height: int) -> tuple[torch.Tensor, ...]:
    """Compiled twin of `reference.rasterize` (features must be (N,4)): returns (features (H,W,4),
    alpha (H,W,1)); differentiable to mean2d, conic, opacities and features."""
    if features.shape[-1] != N_FEAT:
        raise ValueError(f"the compiled rasterizer composites exactly {N_FEAT} features, got {features.shape[-1]}")
    return _Rasterize.apply(mean2d, conic, opacities, features, depth, valid, int(width), int(height))


def render_cpu(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, opacities: torch.Tensor,
               colors: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int, *,
               near_plane: float = 0.01, far_plane: float = 100.0,
               eps2d: float = 0.3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as `reference.render_torch` (per-camera Gaussians, leading C axis), float32 out."""
    rgbs, alphas, depths = [], [], []
    for i in range(viewmats.shape[0]):
        mean2d, conic, depth, valid = project_cpu(means[i], quats[i], scales[i], opacities[i], viewmats[i],
                                                  Ks[i], width, height, near_plane=near_plane,
                                                  far_plane=far_plane, eps2d=eps2d)
        feats = torch.cat([colors[i].to(torch.float32), depth[:, None]], -1)
        img, alpha = rasterize_cpu(mean2d, conic, opacities[i].to(torch.float32), feats, depth, valid, width, height)
        rgbs.append(img[..., :3])
        depths.append(img[..., 3:])
        alphas.append(alpha)
    return torch.stack(rgbs), torch.stack(alphas), torch.stack(depths)
