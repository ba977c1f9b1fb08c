"""The default head's surface: a star-shaped skin over a latitude/longitude grid, plus eyeballs.

The skin's radius along each grid direction (seen from a centre inside the head) comes from a
smooth solid (cranium, lower face, neck) blended into MediaPipe's mean face in front, with ear
bumps on the sides and eye sockets behind separate eyeball spheres. The grid's slit row follows the
lip line: between the mouth corners it is split into an upper copy (follows the head) and a lower
copy (follows the jaw), and a small mouth pocket closes the opening behind the lips.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .face_reference import (FACE_OVAL, LEFT_EYE_LOOP, LOWER_INNER_LIP, RIGHT_EYE_LOOP, UPPER_INNER_LIP,
                             FaceReference)
from .meshops import icosphere, point_in_polygon, ray_mesh, smoothstep

STAR_CENTRE = np.array([0.0, -0.01, -0.015])
EYE_RADIUS = 0.0120
N_ROWS = 60
N_COLS = 78
MOUTH_INTERVALS = 8
POCKET_ROWS = 3
EYE_LEVEL = 2


@dataclass
class HeadGeometry:
    vertices: np.ndarray  # (V,3) metres
    faces: np.ndarray  # (F,3) int64, wound outward
    part: np.ndarray  # (V,) int: 0 skin, 1 left eyeball, 2 right eyeball, 3 upper pocket, 4 lower pocket
    lower_lip: np.ndarray  # (V,) bool: lower slit copies and lower pocket (move with the jaw)
    upper_slit: np.ndarray  # (K,) vertex ids along the lip line (upper copy, corner to corner)
    lower_slit: np.ndarray  # (K,) vertex ids along the lip line (lower copy; corners shared)
    eye_centres: np.ndarray  # (2,3) left (+x) then right (-x)
    eye_sheet: np.ndarray  # (V,) bool: skin vertices inside the eye openings (behind the eyeballs)
    grid_rc: np.ndarray  # (V,2) grid row/col of skin grid vertices, -1 elsewhere
    info: dict = field(default_factory=dict)


def _directions(theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    return np.stack([np.sin(theta) * np.sin(phi), np.cos(theta), np.sin(theta) * np.cos(phi)], axis=-1)


def _angles(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = points - STAR_CENTRE
    r = np.linalg.norm(d, axis=-1)
    return np.arccos(np.clip(d[..., 1] / r, -1, 1)), np.arctan2(d[..., 0], d[..., 2])


def _sdf_ellipsoid(p: np.ndarray, centre, radii) -> np.ndarray:
    q = (p - np.asarray(centre)) / np.asarray(radii)
    k0 = np.linalg.norm(q, axis=-1)
    k1 = np.linalg.norm(q / np.asarray(radii), axis=-1)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-12)


def _sdf_neck(p: np.ndarray) -> np.ndarray:
    # Elliptic cylinder leaning forward as it goes down, capped at the bottom.
    z_axis = -0.022 - 0.12 * (p[..., 1] + 0.05)
    q = np.stack([p[..., 0] / 0.054, (p[..., 2] - z_axis) / 0.058], axis=-1)
    side = (np.linalg.norm(q, axis=-1) - 1.0) * 0.056
    bottom = -0.205 - p[..., 1]
    top = p[..., 1] - 0.02
    return np.maximum(side, np.maximum(bottom, top))


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0, 1)
    return b * (1 - h) + a * h - k * h * (1 - h)


def base_sdf(p: np.ndarray) -> np.ndarray:
    """Signed distance (approximate) of the smooth base solid: cranium, lower face and neck."""
    cranium = _sdf_ellipsoid(p, (0.0, 0.032, -0.016), (0.077, 0.098, 0.099))
    lower = _sdf_ellipsoid(p, (0.0, -0.045, 0.012), (0.060, 0.068, 0.068))
    d = _smin(cranium, lower, 0.03)
    return _smin(d, _sdf_neck(p), 0.025)


def _base_radius(dirs: np.ndarray) -> np.ndarray:
    """Exit distance of rays from STAR_CENTRE through the base solid (N,)."""
    t = np.linspace(0.0, 0.4, 801)
    pts = STAR_CENTRE + dirs[:, None, :] * t[None, :, None]
    s = base_sdf(pts)
    outside = s > 0
    first = np.argmax(outside, axis=1)
    i0 = np.maximum(first - 1, 0)
    rows = np.arange(len(dirs))
    s0, s1 = s[rows, i0], s[rows, first]
    frac = np.clip(-s0 / np.where(s1 - s0 == 0, 1e-12, s1 - s0), 0, 1)
    return t[i0] + frac * (t[first] - t[i0])


def _column_angles(phi_corner: float) -> np.ndarray:
    """Azimuths of the N_COLS columns (radians, 0 = +z), uniform across the mouth, coarser behind."""
    step = 2 * phi_corner / MOUTH_INTERVALS
    half = [phi_corner]
    while half[-1] < np.pi:
        a = half[-1]
        # Fine over the face and at the ears, coarse at the back of the head.
        fine = smoothstep(1.45, 1.2, a) + 0.6 * np.exp(-((a - 1.5) / 0.22) ** 2)
        half.append(a + step * (1.0 + 2.4 * (1 - np.clip(fine, 0, 1))))
    n_side = (N_COLS - MOUTH_INTERVALS) // 2
    side = np.array(half)
    # Rescale the outer part so that exactly n_side steps reach pi.
    s = np.interp(np.linspace(0, len(side) - 1, n_side + 1), np.arange(len(side)), side)
    s = phi_corner + (s - phi_corner) * (np.pi - phi_corner) / (s[-1] - phi_corner)
    mouth = np.linspace(-phi_corner, phi_corner, MOUTH_INTERVALS + 1)
    right = s[1:]
    cols = np.concatenate([mouth, right[:-1], [np.pi], -right[:-1][::-1]])
    return cols  # periodic: the column after the last wraps to the first


def _row_angles(theta_lip: float) -> np.ndarray:
    fine = np.linspace(0, np.pi, 2001)
    dens = 0.45 + np.exp(-((fine - 1.62) / 0.75) ** 4) + 0.5 * np.exp(-((fine - 1.3) / 0.12) ** 2) \
        + 0.4 * np.exp(-((fine - theta_lip) / 0.12) ** 2)
    cdf = np.concatenate([[0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(fine))])
    rows = np.interp(np.linspace(0, cdf[-1], N_ROWS + 2)[1:-1], cdf, fine)
    i_m = int(np.argmin(np.abs(rows - theta_lip)))
    shift = theta_lip - rows[i_m]
    k = np.arange(N_ROWS)
    rows = rows + shift * np.clip(1 - np.abs(k - i_m) / 4.0, 0, 1)
    return rows, i_m


def _lip_line(face: FaceReference) -> np.ndarray:
    """(11,3) points midway between the inner upper and lower lip, corner to corner (-x to +x)."""
    return 0.5 * (face[UPPER_INNER_LIP] + face[LOWER_INNER_LIP])


def eye_centres_from(face: FaceReference) -> np.ndarray:
    """Eyeball centres (2,3), left (+x) then right (-x): lids sit on the eyeball's surface."""
    out = []
    for loop in (LEFT_EYE_LOOP, RIGHT_EYE_LOOP):
        pts = face[loop]
        cx, cy = pts[:, 0].mean(), pts[:, 1].mean() - 0.0005
        zs = np.linspace(pts[:, 2].mean() - 0.03, pts[:, 2].mean(), 3001)
        dist = np.linalg.norm(pts[None, :, :] - np.stack(
            [np.full_like(zs, cx), np.full_like(zs, cy), zs], axis=1)[:, None, :], axis=2).mean(1)
        z = zs[np.argmin(np.abs(dist - (EYE_RADIUS + 0.0008)))]
        out.append([cx, cy, z])
    return np.array(out)


def _ear_bump(p: np.ndarray) -> np.ndarray:
    """Outward radial offset (N,) that raises an ear on each side of the head."""
    tilt = np.radians(18.0)
    dy, dz = p[:, 1] - (-0.010), p[:, 2] - (-0.022)
    u = dy * np.cos(tilt) - dz * np.sin(tilt)  # along the ear, up
    v = dy * np.sin(tilt) + dz * np.cos(tilt)  # across, forward
    e = (u / 0.031) ** 2 + (v / 0.0175) ** 2
    side = smoothstep(0.035, 0.055, np.abs(p[:, 0]))
    rim = 0.55 + 0.45 * smoothstep(0.35, 0.8, e)  # raised helix rim around a shallower bowl
    flare = 0.45 + 0.55 * smoothstep(0.015, -0.015, v)  # the back edge stands out further
    lobe = 1.0 - 0.35 * smoothstep(-0.01, -0.03, u)
    return 0.017 * side * rim * flare * lobe * smoothstep(1.0, 0.82, e)


def build_geometry(face: FaceReference) -> HeadGeometry:
    lip = _lip_line(face)
    lip_theta, lip_phi = _angles(lip)
    phi_corner = float(lip_phi[-1])
    cols = _column_angles(phi_corner)
    theta_lip_mid = float(np.interp(0.0, lip_phi, lip_theta))
    rows, i_m = _row_angles(theta_lip_mid)
    n_c = len(cols)

    # Per-column bend of the slit row so it follows the lip line exactly.
    j_a = 0
    j_b = MOUTH_INTERVALS
    delta = np.zeros(n_c)
    delta[j_a:j_b + 1] = np.interp(cols[j_a:j_b + 1], lip_phi, lip_theta) - rows[i_m]
    # Ease the bend out over a few columns beyond the corners.
    for k in range(1, 4):
        w = 1 - k / 4
        delta[j_b + k] = delta[j_b] * w
        delta[(j_a - k) % n_c] = delta[j_a] * w
    tent = np.clip(1 - np.abs(np.arange(N_ROWS) - i_m) / 3.0, 0, 1)
    theta = rows[:, None] + tent[:, None] * delta[None, :]
    phi = np.broadcast_to(cols[None, :], theta.shape)
    dirs = _directions(theta, phi).reshape(-1, 3)

    r_base = _base_radius(dirs)
    face_v, face_f, oval = _face_with_skirt(face)
    t_face, f_face, _ = ray_mesh(STAR_CENTRE, dirs, face_v, face_f, farthest=True)
    hit = np.isfinite(t_face)
    p_face = STAR_CENTRE + dirs * np.where(hit, t_face, 0)[:, None]
    oval_seg = np.concatenate([oval, oval[:1]])
    dist = np.full(len(dirs), np.inf)
    for a, b in zip(oval_seg[:-1], oval_seg[1:]):
        ab = b - a
        t = np.clip(((p_face - a) @ ab) / (ab @ ab), 0, 1)
        dist = np.minimum(dist, np.linalg.norm(p_face - (a + t[:, None] * ab), axis=1))
    w_face = np.where(hit, smoothstep(0.0, 0.022, dist), 0.0)
    r = np.where(hit, w_face * np.nan_to_num(t_face) + (1 - w_face) * r_base, r_base)
    r = r + _ear_bump(STAR_CENTRE + dirs * r[:, None]) * np.abs(dirs[:, 0])

    # Eye sockets: inside each lid loop the skin sits just behind the eyeball's front.
    eyes = eye_centres_from(face)
    eye_sheet = np.zeros(len(dirs), dtype=bool)
    for centre, loop in zip(eyes, (LEFT_EYE_LOOP, RIGHT_EYE_LOOP)):
        poly = face[loop][:, :2]
        inside = hit & point_in_polygon(p_face[:, 0], p_face[:, 1], poly)
        oc = STAR_CENTRE - centre
        rad = EYE_RADIUS - 0.002
        b = dirs @ oc
        disc = b * b - (oc @ oc - rad * rad)
        t_far = -b + np.sqrt(np.maximum(disc, 0))
        ok = inside & (disc > 0)
        r = np.where(ok, np.minimum(r, t_far), r)
        eye_sheet |= ok

    skin = (STAR_CENTRE + dirs * r[:, None]).reshape(N_ROWS, n_c, 3)
    # Snap the slit row onto the lip line.
    skin[i_m, j_a:j_b + 1] = _resample_polyline(lip, cols[j_a:j_b + 1], lip_phi)

    verts = [STAR_CENTRE + np.array([0, 1, 0]) * _base_radius(np.array([[0.0, 1.0, 0.0]])),
             STAR_CENTRE + np.array([0, -1, 0]) * _base_radius(np.array([[0.0, -1.0, 0.0]]))]
    verts = [v.reshape(3) for v in verts]
    top, bottom = 0, 1
    grid_ids = 2 + np.arange(N_ROWS * n_c).reshape(N_ROWS, n_c)
    all_v = np.concatenate([np.array(verts), skin.reshape(-1, 3)])
    grid_rc = np.full((len(all_v), 2), -1, dtype=np.int64)
    grid_rc[2:] = np.stack(np.meshgrid(np.arange(N_ROWS), np.arange(n_c), indexing="ij"), -1).reshape(-1, 2)
    sheet = np.concatenate([[False, False], eye_sheet])

    # Lower copies of the interior slit vertices.
    interior = np.arange(j_a + 1, j_b)
    lower_ids = len(all_v) + np.arange(len(interior))
    all_v = np.concatenate([all_v, skin[i_m, interior]])
    grid_rc = np.concatenate([grid_rc, np.full((len(interior), 2), -1)])
    sheet = np.concatenate([sheet, np.zeros(len(interior), dtype=bool)])
    lower_of = {int(j): int(v) for j, v in zip(interior, lower_ids)}

    faces = []
    for i in range(N_ROWS - 1):
        for j in range(n_c):
            jn = (j + 1) % n_c
            a, b, c, d = grid_ids[i, j], grid_ids[i + 1, j], grid_ids[i, jn], grid_ids[i + 1, jn]
            if i == i_m:  # quads just below the lip line use the lower copies
                a = lower_of.get(j, a) if j_a <= j <= j_b else a
                c = lower_of.get(jn, c) if j_a <= jn <= j_b and j != n_c - 1 else c
            faces += [(a, b, c), (c, b, d)]
    for j in range(n_c):
        jn = (j + 1) % n_c
        faces.append((top, grid_ids[0, j], grid_ids[0, jn]))
        faces.append((grid_ids[N_ROWS - 1, j], bottom, grid_ids[N_ROWS - 1, jn]))

    upper_slit = np.array([grid_ids[i_m, j] for j in range(j_a, j_b + 1)])
    lower_slit = np.array([grid_ids[i_m, j_a]] + [lower_of[int(j)] for j in interior] + [grid_ids[i_m, j_b]])
    part = np.zeros(len(all_v), dtype=np.int64)
    lower_lip = np.zeros(len(all_v), dtype=bool)
    lower_lip[lower_ids] = True

    all_v, faces, part, lower_lip, sheet, grid_rc = _add_pocket(
        all_v, faces, part, lower_lip, sheet, grid_rc, upper_slit, lower_slit)

    # Eyeballs: separate closed spheres, left (+x) then right (-x).
    sphere_v, sphere_f = icosphere(EYE_LEVEL)
    faces = np.array(faces, dtype=np.int64)
    for k, centre in enumerate(eyes):
        base = len(all_v)
        all_v = np.concatenate([all_v, centre + EYE_RADIUS * sphere_v])
        faces = np.concatenate([faces, sphere_f + base])
        part = np.concatenate([part, np.full(len(sphere_v), 1 + k)])
        lower_lip = np.concatenate([lower_lip, np.zeros(len(sphere_v), dtype=bool)])
        sheet = np.concatenate([sheet, np.zeros(len(sphere_v), dtype=bool)])
        grid_rc = np.concatenate([grid_rc, np.full((len(sphere_v), 2), -1)])

    info = {"rows": N_ROWS, "cols": n_c, "slit_row": i_m, "mouth_cols": (j_a, j_b)}
    return HeadGeometry(vertices=all_v, faces=faces, part=part, lower_lip=lower_lip, upper_slit=upper_slit,
                        lower_slit=lower_slit, eye_centres=eyes, eye_sheet=sheet, grid_rc=grid_rc, info=info)


JAW_OVAL = slice(9, 28)  # FACE_OVAL from 323 (left) under the chin to 93 (right)


def _face_with_skirt(face: FaceReference) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference face extended under the jaw by two rings of a skirt reaching back to the neck,
    so the chin and jawline keep their shape and the blend into the base solid happens at the throat.
    Returns vertices, faces and the extended outline (closed polyline)."""
    jaw_ids = FACE_OVAL[JAW_OVAL]
    p = face[jaw_ids]
    to_neck = np.stack([-p[:, 0], np.zeros(len(p)), -0.02 - p[:, 2]], 1)
    to_neck /= np.linalg.norm(to_neck, axis=1, keepdims=True)
    # Skirt depth: longest under the chin, vanishing towards the ears.
    depth = 0.006 + 0.022 * smoothstep(0.075, 0.0, np.abs(p[:, 0])) ** 0.7
    rings, verts, faces = [np.array(jaw_ids)], [face.vertices], [face.faces]
    n0 = len(face.vertices)
    for k, (frac, drop) in enumerate(((0.5, 0.008), (1.0, 0.013))):
        ring = p + frac * depth[:, None] * to_neck + np.array([0.0, -drop, 0.0]) * (depth[:, None] / 0.028)
        verts.append(ring)
        rings.append(n0 + k * len(p) + np.arange(len(p)))
    for r0, r1 in zip(rings[:-1], rings[1:]):
        for j in range(len(p) - 1):
            faces.append(np.array([[r0[j], r1[j], r0[j + 1]], [r0[j + 1], r1[j], r1[j + 1]]]))
    all_v = np.concatenate(verts)
    oval_ids = list(rings[-1]) + FACE_OVAL[JAW_OVAL.stop:] + FACE_OVAL[:JAW_OVAL.start]
    return all_v, np.concatenate(faces), all_v[oval_ids]


def _resample_polyline(line: np.ndarray, phis: np.ndarray, line_phi: np.ndarray) -> np.ndarray:
    return np.stack([np.interp(phis, line_phi, line[:, k]) for k in range(3)], axis=1)


def _add_pocket(verts, faces, part, lower_lip, sheet, grid_rc, upper_slit, lower_slit):
    """Close the mouth opening with a pocket: an upper and a lower sheet meeting at a back wall."""
    inner = slice(1, len(upper_slit) - 1)
    corner_a, corner_b = int(upper_slit[0]), int(upper_slit[-1])
    p = verts[upper_slit[inner]]
    inward = STAR_CENTRE - p
    inward /= np.linalg.norm(inward, axis=1, keepdims=True)
    sheets = {}
    for name, sign, pid in (("upper", 1.0, 3), ("lower", -1.0, 4)):
        slit = upper_slit if name == "upper" else lower_slit
        ring_rows = [slit[inner]]
        for k in range(1, POCKET_ROWS + 1):
            depth = 0.009 * k
            pos = p + inward * depth + np.array([0, sign * 0.0035, 0]) * np.sqrt(k)
            ids = len(verts) + np.arange(len(p))
            verts = np.concatenate([verts, pos])
            part = np.concatenate([part, np.full(len(p), pid)])
            lower_lip = np.concatenate([lower_lip, np.full(len(p), name == "lower")])
            sheet = np.concatenate([sheet, np.zeros(len(p), dtype=bool)])
            grid_rc = np.concatenate([grid_rc, np.full((len(p), 2), -1)])
            ring_rows.append(ids)
        sheets[name] = ring_rows
    new_faces = []

    def strip(r0, r1, want):
        for j in range(len(r0) - 1):
            for tri in ((r0[j], r1[j], r0[j + 1]), (r0[j + 1], r1[j], r1[j + 1])):
                new_faces.append((tri, want))

    for name, want in (("upper", np.array([0, -1.0, 0])), ("lower", np.array([0, 1.0, 0]))):
        rr = sheets[name]
        for k in range(POCKET_ROWS):
            strip(rr[k], rr[k + 1], want)
            new_faces.append(((corner_a, rr[k][0], rr[k + 1][0]), want))
            new_faces.append(((corner_b, rr[k][-1], rr[k + 1][-1]), want))
    back_u, back_l = sheets["upper"][-1], sheets["lower"][-1]
    strip(back_u, back_l, np.array([0, 0, 1.0]))
    new_faces.append(((corner_a, back_u[0], back_l[0]), np.array([0, 0, 1.0])))
    new_faces.append(((corner_b, back_u[-1], back_l[-1]), np.array([0, 0, 1.0])))
    for tri, want in new_faces:
        a, b, c = (verts[i] for i in tri)
        n = np.cross(b - a, c - a)
        faces.append(tri if n @ want >= 0 else (tri[0], tri[2], tri[1]))
    return verts, faces, part, lower_lip, sheet, grid_rc
