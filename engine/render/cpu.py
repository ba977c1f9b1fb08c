"""Compiled CPU Gaussian splatting (numba): projection, global depth sort, tile binning, compositing, and
hand-written backward passes for all of them, wrapped as two autograd stages.

Same conventions as `engine.render.reference` (which these kernels are tested against). The 2D stage keeps
per-pixel transmittance and the index of the last contributing Gaussian, so the backward pass walks each
pixel's list back to front and recovers earlier transmittances by division (as gsplat does). Per-Gaussian
gradients are first written per tile-intersection (each owned by one tile, so tiles run in parallel without
atomics), then summed per Gaussian in a fixed order (results do not depend on the thread count).

Compositing is vectorized: each Gaussian is evaluated on 8-pixel vectors of the tile rows its footprint covers
(AVX), with a polynomial exp and branch-free updates, in float32 throughout; tiles are dealt to threads in
groups of equal work.

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
from llvmlite import ir as llvm_ir
from numba import njit, prange, types
from numba.extending import intrinsic

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
_TILE = TILE
N_FEAT = 4  # composited features: r, g, b, camera z
_N_GRAD = 6 + N_FEAT  # per intersection: d mean2d (2), d conic (3), d opacity, d features


def _threads() -> int:
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


# ----------------------------------------------------------------------------------------------- projection
@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
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


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
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
    """Stable argsort of non-negative int64 keys < 2**32 (LSD, 8-bit digits): ties keep input order. Keys
    travel with their indices so every pass reads sequentially; all four digit histograms come from one pass."""
    n = keys.shape[0]
    idx = np.arange(n).astype(np.int32)
    tmp = np.empty(n, np.int32)
    key = keys.astype(np.uint32)
    ktmp = np.empty(n, np.uint32)
    counts = np.zeros((4, 257), np.int64)
    for j in range(n):
        v = key[j]
        for d in range(4):
            counts[d, ((v >> np.uint32(8 * d)) & np.uint32(255)) + 1] += 1
    for d in range(4):
        if counts[d, 1:].max() == n:  # one bucket holds everything: this digit never reorders
            continue
        for b in range(256):
            counts[d, b + 1] += counts[d, b]
        shift = np.uint32(8 * d)
        for j in range(n):
            b = (key[j] >> shift) & np.uint32(255)
            c = counts[d, b]
            tmp[c] = idx[j]
            ktmp[c] = key[j]
            counts[d, b] = c + 1
        idx, tmp = tmp, idx
        key, ktmp = ktmp, key
    return idx


@njit(cache=True, parallel=True, error_model="numpy")
def _footprints(mean2d, conic, opac, depth, valid, width, height, tile,
                rect, n_tiles, keys):  # pragma: no cover - compiled
    """Per Gaussian: its alpha >= 1/255 pixel rectangle (as `reference.footprint_rects`, in float64), the
    number of tiles it touches (0 when culled) and its depth as a sortable integer key."""
    bits = depth.view(np.uint32)
    for i in prange(mean2d.shape[0]):
        n_tiles[i] = 0
        b32 = np.int64(bits[i])
        # float32 bit patterns in sortable order (negatives reversed)
        keys[i] = (4294967295 - b32) if b32 >= 2147483648 else (b32 + 2147483648)
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
        x0, x1 = max(int(fx0), 0), min(int(fx1), width - 1)
        y0, y1 = max(int(fy0), 0), min(int(fy1), height - 1)
        rect[i, 0], rect[i, 1], rect[i, 2], rect[i, 3] = x0, x1, y0, y1
        if x0 > x1 or y0 > y1:
            continue
        n_tiles[i] = (x1 // tile - x0 // tile + 1) * (y1 // tile - y0 // tile + 1)


@njit(cache=True, parallel=True)
def _count_row_tiles(rect, row_off, row_ids, ntx, tile, offsets):  # pragma: no cover - compiled
    for ty in prange(row_off.shape[0] - 1):
        for e in range(row_off[ty], row_off[ty + 1]):
            g = row_ids[e]
            for tx in range(rect[g, 0] // tile, rect[g, 1] // tile + 1):
                offsets[ty * ntx + tx + 1] += 1


@njit(cache=True, parallel=True)
def _fill_row_tiles(rect, row_off, row_ids, ntx, tile, offsets, ids):  # pragma: no cover - compiled
    for ty in prange(row_off.shape[0] - 1):
        cursor = offsets[ty * ntx:(ty + 1) * ntx].copy()
        for e in range(row_off[ty], row_off[ty + 1]):
            g = row_ids[e]
            for tx in range(rect[g, 0] // tile, rect[g, 1] // tile + 1):
                ids[cursor[tx]] = g
                cursor[tx] += 1


@njit(cache=True, error_model="numpy")
def _bin(mean2d, conic, opac, depth, valid, width, height, tile):  # pragma: no cover - compiled
    """Footprint rectangles (N,4) [x0,x1,y0,y1], tile offsets (T+1,) and the tile-major list of Gaussian ids,
    each tile's list in global (depth, index) order."""
    n = mean2d.shape[0]
    rect = np.zeros((n, 4), np.int32)
    n_tiles = np.empty(n, np.int64)
    keys = np.empty(n, np.int64)
    _footprints(mean2d, conic, opac, depth, valid, width, height, tile, rect, n_tiles, keys)
    n_hit = 0
    for i in range(n):
        n_hit += n_tiles[i] > 0
    order = np.empty(n_hit, np.int32)
    hit_keys = np.empty(n_hit, np.int64)
    j = 0
    for i in range(n):
        if n_tiles[i] > 0:
            order[j] = i
            hit_keys[j] = keys[i]
            j += 1
    order = order[_radix_argsort(hit_keys)]
    # two-level scatter (into tile rows, then, one row per thread, into that row's tiles) keeps every pass
    # writing to a few dozen streams instead of to every tile at once, which thrashed the cache
    ntx = (width + tile - 1) // tile
    nty = (height + tile - 1) // tile
    row_off = np.zeros(nty + 1, np.int64)
    for j in range(n_hit):
        g = order[j]
        for ty in range(rect[g, 2] // tile, rect[g, 3] // tile + 1):
            row_off[ty + 1] += 1
    for ty in range(nty):
        row_off[ty + 1] += row_off[ty]
    row_ids = np.empty(row_off[nty], np.int32)
    cursor = row_off[:-1].copy()
    for j in range(n_hit):
        g = order[j]
        for ty in range(rect[g, 2] // tile, rect[g, 3] // tile + 1):
            row_ids[cursor[ty]] = g
            cursor[ty] += 1
    offsets = np.zeros(ntx * nty + 1, np.int64)
    _count_row_tiles(rect, row_off, row_ids, ntx, tile, offsets)
    for t in range(ntx * nty):
        offsets[t + 1] += offsets[t]
    ids = np.empty(offsets[ntx * nty], np.int32)
    _fill_row_tiles(rect, row_off, row_ids, ntx, tile, offsets, ids)
    return rect, offsets, ids


# ------------------------------------------------------------------------------------ vectorizable exp
@intrinsic
def _pow2_neg(typingctx, kf):  # pragma: no cover - compiled
    """2**-kf for an integer-valued float32 kf in [0, 126], written straight into the exponent bits: unlike
    numba's exp (a libm call per element) this stays inside an LLVM vector loop."""
    if kf != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = llvm_ir.IntType(32)
        k = builder.fptosi(args[0], i32)
        bits = builder.shl(builder.sub(llvm_ir.Constant(i32, 127), k), llvm_ir.Constant(i32, 23))
        return builder.bitcast(bits, llvm_ir.FloatType())

    return types.float32(types.float32), codegen


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 split in two (Cody-Waite) so k * ln2 is exact for small k
_LN2_LO = np.float32(-2.12194440e-4)
_S_MAX = np.float32(80.0)
_C2, _C3, _C4 = np.float32(1 / 2), np.float32(1 / 6), np.float32(1 / 24)
_C5, _C6, _C7 = np.float32(1 / 120), np.float32(1 / 720), np.float32(1 / 5040)


@njit(fastmath=True, inline="always")
def _exp_neg(s):  # pragma: no cover - compiled
    """exp(-s) in float32 for s >= 0 (negative s read as 0, s above 80 as 80) within 1.5 ulp: 2**-k times a
    degree-7 polynomial on the reduced argument, branch-free so LLVM vectorizes the pixel loops."""
    s = min(max(s, _F0), _S_MAX)
    kf = np.floor(s * _LOG2E + _HALF)
    r = kf * _LN2_HI - s
    r = r + kf * _LN2_LO
    p = _F1 + r * (_F1 + r * (_C2 + r * (_C3 + r * (_C4 + r * (_C5 + r * (_C6 + r * _C7))))))
    return p * _pow2_neg(kf)


# ------------------------------------------------------------------------------------- load balancing
@njit(cache=True)
def _balance(cost, n_bins):  # pragma: no cover - compiled
    """Split tiles into n_bins groups of about equal cost (largest first, each to the lightest group): numba's
    workqueue layer hands each thread one fixed contiguous share of a prange, so the kernels prange over these
    groups instead of over tiles. Returns (bin offsets (n_bins+1,), tile ids grouped by bin)."""
    n = cost.shape[0]
    order = np.argsort(-cost)
    load = np.zeros(n_bins, np.int64)
    owner = np.empty(n, np.int64)
    bin_off = np.zeros(n_bins + 1, np.int64)
    for i in range(n):
        t = order[i]
        b = 0
        for c in range(1, n_bins):
            if load[c] < load[b]:
                b = c
        load[b] += cost[t]
        owner[t] = b
        bin_off[b + 1] += 1
    for b in range(n_bins):
        bin_off[b + 1] += bin_off[b]
    tiles = np.empty(n, np.int64)
    cursor = bin_off[:-1].copy()
    for i in range(n):
        t = order[i]
        tiles[cursor[owner[t]]] = t
        cursor[owner[t]] += 1
    return bin_off, tiles


# ------------------------------------------------------------------------------------------- compositing
# Tile state lives in one (planes, 256) float32 array per thread, its pixels ordered by 8-pixel column block,
# then row, then lane: the rows a Gaussian covers inside one block are then one contiguous run, walked as a
# single flat loop that LLVM turns into AVX vectors (8 lanes), with branch-free selects, the polynomial exp
# above, and no runtime alias checks (one allocation). This beats clipping each row to the ellipse chord
# (a sqrt, two divisions and two libm exps per row) by about 2x.
_LANES = 8
_TT = _TILE * _TILE
_PX, _PY = 0, 1  # planes holding each pixel's x and y offset inside the tile


@njit(cache=True, fastmath=True, inline="always")
def _tile_coords(S):  # pragma: no cover - compiled
    for p in range(_TT):
        blk = p // (_TILE * _LANES)
        S[_PX, p] = np.float32(blk * _LANES + p % _LANES)
        S[_PY, p] = np.float32((p // _LANES) % _TILE)


@njit(cache=True, inline="always")
def _live_rows(flags, blk, r0, r1, floor):  # pragma: no cover - compiled
    """Rows [r0, r1] of column block blk trimmed at both ends to rows whose 8-pixel group has flag > floor
    (rows of finished pixels, or of pixels a Gaussian cannot reach, cost nothing). Empty: ra > rb."""
    base = blk * _TILE
    while r0 <= r1 and flags[base + r0] <= floor:
        r0 += 1
    while r1 >= r0 and flags[base + r1] <= floor:
        r1 -= 1
    return r0, r1


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def _raster_fwd(offsets, ids, rect, mean2d, conic, opac, feats, width, height, bin_off, bin_tiles,
                out_feat, out_trans, out_last):  # pragma: no cover - compiled
    ntx = (width + _TILE - 1) // _TILE
    for b in prange(bin_off.shape[0] - 1):
        # planes: x, y, transmittance (negated once the pixel is finished), 4 features, last index
        S = np.empty((8, _TT), np.float32)
        _tile_coords(S)
        live = np.empty(_TT // _LANES, np.float32)  # per 8-pixel group: > 0 while one of its pixels is unfinished
        for i in range(bin_off[b], bin_off[b + 1]):
            t = bin_tiles[i]
            ty = t // ntx
            tx = t - ty * ntx
            x0, y0 = tx * _TILE, ty * _TILE
            tw, th = min(_TILE, width - x0), min(_TILE, height - y0)
            for p in range(_TT):
                # pixels past the image edge start finished, so they never composite
                S[2, p] = _F1 if (S[_PX, p] < np.float32(tw)) & (S[_PY, p] < np.float32(th)) else -_F1
                S[3, p] = _F0
                S[4, p] = _F0
                S[5, p] = _F0
                S[6, p] = _F0
                S[7, p] = np.float32(-1.0)
            live[:] = _F1
            start = offsets[t]
            for k in range(start, offsets[t + 1]):
                g = ids[k]
                kr = np.float32(k - start)  # exact: a tile holds far fewer than 2**24 Gaussians
                r0, r1 = max(rect[g, 2] - y0, 0), min(rect[g, 3] - y0, th - 1)
                b0, b1 = max(rect[g, 0] - x0, 0) // _LANES, min(rect[g, 1] - x0, tw - 1) // _LANES
                dx0 = mean2d[g, 0] - (np.float32(x0) + _HALF)
                dy0 = mean2d[g, 1] - (np.float32(y0) + _HALF)
                ha, cb, hc = _HALF * conic[g, 0], conic[g, 1], _HALF * conic[g, 2]
                o = opac[g]
                f0, f1, f2, f3 = feats[g, 0], feats[g, 1], feats[g, 2], feats[g, 3]
                for blk in range(b0, b1 + 1):
                    ra, rb = _live_rows(live, blk, r0, r1, _F0)
                    lo = (blk * _TILE + ra) * _LANES
                    for q in range((rb - ra + 1) * _LANES):
                        p = np.uint64(lo + q)  # unsigned: no negative-index wraparound in the vector loop
                        dx = dx0 - S[_PX, p]
                        dy = dy0 - S[_PY, p]
                        alpha = min(_AMAX, o * _exp_neg(ha * dx * dx + cb * dx * dy + hc * dy * dy))
                        tr = S[2, p]
                        nt = tr * (_F1 - alpha)
                        hit = (alpha >= _AMIN) & (tr > _F0)
                        fin = hit & (nt <= _TMIN)
                        use = hit & (nt > _TMIN)
                        w = alpha * tr if use else _F0
                        S[3, p] += w * f0
                        S[4, p] += w * f1
                        S[5, p] += w * f2
                        S[6, p] += w * f3
                        # plain selects and max (k only grows), never a store that keeps the old value
                        # under a mask: those become masked loads and stores
                        S[2, p] = nt if use else (-tr if fin else tr)
                        S[7, p] = max(S[7, p], kr if use else np.float32(-1.0))
                if (k - start) % 4 == 3:  # refresh which rows still have unfinished pixels; stop when none
                    any_live = _F0
                    for grp in range(_TT // _LANES):
                        m = -_F1
                        for j in range(_LANES):
                            m = max(m, S[2, grp * _LANES + j])
                        live[grp] = m
                        any_live = max(any_live, m)
                    if any_live <= _F0:
                        break
            for p in range(_TT):
                r, c = np.int64(S[_PY, p]), np.int64(S[_PX, p])
                if r < th and c < tw:
                    out_feat[y0 + r, x0 + c, 0] = S[3, p]
                    out_feat[y0 + r, x0 + c, 1] = S[4, p]
                    out_feat[y0 + r, x0 + c, 2] = S[5, p]
                    out_feat[y0 + r, x0 + c, 3] = S[6, p]
                    out_trans[y0 + r, x0 + c] = abs(S[2, p])
                    out_last[y0 + r, x0 + c] = np.int32(start + np.int64(S[7, p])) if S[7, p] >= _F0 else -1


@njit(cache=True, fastmath=True, parallel=True, error_model="numpy")
def _raster_bwd(offsets, ids, rect, mean2d, conic, opac, feats, width, height, bin_off, bin_tiles,
                t_final, last, g_feat, g_alpha, g_int):  # pragma: no cover - compiled
    """Back to front per pixel: each Gaussian's transmittance is recovered by dividing out its own
    (1 - alpha), starting from the final transmittance the forward pass kept."""
    ntx = (width + _TILE - 1) // _TILE
    for b in prange(bin_off.shape[0] - 1):
        # planes: x, y, transmittance, dL/dalpha_final * T_final, last index (relative), dL/dfeatures (4),
        # features composited behind the current Gaussian (4)
        S = np.empty((13, _TT), np.float32)
        _tile_coords(S)
        reach = np.empty(_TT // _LANES, np.float32)  # per 8-pixel group: the largest last index in it
        for i in range(bin_off[b], bin_off[b + 1]):
            t = bin_tiles[i]
            start, stop = offsets[t], offsets[t + 1]
            for k in range(start, stop):
                for f in range(_N_GRAD):
                    g_int[k, f] = _F0
            if stop == start:
                continue
            ty = t // ntx
            tx = t - ty * ntx
            x0, y0 = tx * _TILE, ty * _TILE
            tw, th = min(_TILE, width - x0), min(_TILE, height - y0)
            k_max = np.int64(-1)
            for p in range(_TT):
                r, c = np.int64(S[_PY, p]), np.int64(S[_PX, p])
                for f in range(9, 13):
                    S[f, p] = _F0
                if r < th and c < tw:
                    py, px = y0 + r, x0 + c
                    S[2, p] = t_final[py, px]
                    S[3, p] = g_alpha[py, px] * t_final[py, px]
                    lp = np.int64(last[py, px])
                    S[4, p] = np.float32(lp - start) if lp >= 0 else np.float32(-1.0)
                    k_max = max(k_max, lp)
                    for f in range(4):
                        S[5 + f, p] = g_feat[py, px, f]
                else:
                    S[2, p] = _F1
                    S[3, p] = _F0
                    S[4, p] = np.float32(-1.0)
                    for f in range(4):
                        S[5 + f, p] = _F0
            for grp in range(_TT // _LANES):
                m = np.float32(-1.0)
                for j in range(_LANES):
                    m = max(m, S[4, grp * _LANES + j])
                reach[grp] = m
            for k in range(k_max, start - 1, -1):
                g = ids[k]
                kr = np.float32(k - start)
                r0, r1 = max(rect[g, 2] - y0, 0), min(rect[g, 3] - y0, th - 1)
                b0, b1 = max(rect[g, 0] - x0, 0) // _LANES, min(rect[g, 1] - x0, tw - 1) // _LANES
                dx0 = mean2d[g, 0] - (np.float32(x0) + _HALF)
                dy0 = mean2d[g, 1] - (np.float32(y0) + _HALF)
                ca, cb, cc = conic[g, 0], conic[g, 1], conic[g, 2]
                ha, hc = _HALF * ca, _HALF * cc
                o = opac[g]
                f0, f1, f2, f3 = feats[g, 0], feats[g, 1], feats[g, 2], feats[g, 3]
                # sums over pixels of dL/dsigma times dx, dy, dx^2, dx dy, dy^2
                s_x = _F0
                s_y = _F0
                s_xx = _F0
                s_xy = _F0
                s_yy = _F0
                s_o = _F0
                s_f0 = _F0
                s_f1 = _F0
                s_f2 = _F0
                s_f3 = _F0
                for blk in range(b0, b1 + 1):
                    ra, rb = _live_rows(reach, blk, r0, r1, kr - _HALF)
                    lo = (blk * _TILE + ra) * _LANES
                    for q in range((rb - ra + 1) * _LANES):
                        p = np.uint64(lo + q)
                        dx = dx0 - S[_PX, p]
                        dy = dy0 - S[_PY, p]
                        vis = _exp_neg(ha * dx * dx + cb * dx * dy + hc * dy * dy)
                        raw = o * vis
                        alpha = min(_AMAX, raw)
                        use = (kr <= S[4, p]) & (alpha >= _AMIN)
                        inv = _F1 / (_F1 - alpha)
                        a_u = alpha if use else _F0
                        tr = S[2, p] * inv
                        w = a_u * tr
                        g0, g1, g2, g3 = S[5, p], S[6, p], S[7, p], S[8, p]
                        b0_, b1_, b2_, b3_ = S[9, p], S[10, p], S[11, p], S[12, p]
                        s_f0 += w * g0
                        s_f1 += w * g1
                        s_f2 += w * g2
                        s_f3 += w * g3
                        d_alpha = tr * ((f0 - b0_) * g0 + (f1 - b1_) * g1 + (f2 - b2_) * g2 + (f3 - b3_) * g3) + S[3, p] * inv
                        # a clamped alpha passes no gradient to opacity or the footprint
                        d_raw = d_alpha if (use & (raw <= _AMAX)) else _F0
                        # updates written as arithmetic on selected values, never as a store of a select
                        # against the old memory value: LLVM would make that a conditional store, which
                        # together with the reductions stops it from vectorizing the loop
                        S[9, p] = b0_ + a_u * (f0 - b0_)
                        S[10, p] = b1_ + a_u * (f1 - b1_)
                        S[11, p] = b2_ + a_u * (f2 - b2_)
                        S[12, p] = b3_ + a_u * (f3 - b3_)
                        S[2, p] = S[2, p] * (inv if use else _F1)
                        s_o += vis * d_raw
                        d_sigma = -raw * d_raw
                        d_sx = d_sigma * dx
                        d_sy = d_sigma * dy
                        s_x += d_sx
                        s_y += d_sy
                        s_xx += d_sx * dx
                        s_xy += d_sx * dy
                        s_yy += d_sy * dy
                g_int[k, 0] = ca * s_x + cb * s_y
                g_int[k, 1] = cb * s_x + cc * s_y
                g_int[k, 2] = _HALF * s_xx
                g_int[k, 3] = s_xy
                g_int[k, 4] = _HALF * s_yy
                g_int[k, 5] = s_o
                g_int[k, 6] = s_f0
                g_int[k, 7] = s_f1
                g_int[k, 8] = s_f2
                g_int[k, 9] = s_f3


@njit(cache=True, fastmath=True)
def _sum_by_gaussian(ids, g_int, out):  # pragma: no cover - compiled
    out[:] = 0.0
    for k in range(ids.shape[0]):
        g = ids[k]
        for f in range(_N_GRAD):
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
            bins = _balance(np.diff(offsets) + 1, _threads())
            _raster_fwd(offsets, ids, rect, m2, co, op, fe, width, height, *bins, out_feat, out_trans, out_last)
        ctx.state = (m2, co, op, fe, rect, offsets, ids, bins, out_trans, out_last, width, height)
        alpha = torch.from_numpy(1.0 - out_trans[..., None])
        return torch.from_numpy(out_feat), alpha

    @staticmethod
    def backward(ctx, g_feat, g_alpha):
        m2, co, op, fe, rect, offsets, ids, bins, out_trans, out_last, width, height = ctx.state
        g_int = np.empty((ids.shape[0], _N_GRAD), np.float32)
        summed = np.empty((m2.shape[0], _N_GRAD), np.float32)
        with _LAUNCH_LOCK:
            numba.set_num_threads(_threads())
            _raster_bwd(offsets, ids, rect, m2, co, op, fe, width, height, *bins, out_trans, out_last,
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
