"""Shape and expression blendshapes of the default head: smooth, named displacement fields.

Each field is a function of the template's vertex positions (so the two copies of the lip line get
the same shape offsets). Eyeballs move rigidly with the field at their centre (they only change
size for global scale and eye size). A shape coefficient of 1 is about one standard deviation of
adult variation; an expression coefficient of 1 is the full expression (1 = eyes shut for a blink).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .face_reference import LEFT_EYE_LOOP, RIGHT_EYE_LOOP, FaceReference
from .geometry import EYE_RADIUS, HeadGeometry
from .meshops import smoothstep, vertex_normals

Field = Callable[[np.ndarray], np.ndarray]  # (N,3) positions -> (N,3) offsets


def _blob(p: np.ndarray, centre, sigma: float, *, mirror: bool = True) -> np.ndarray:
    c = np.asarray(centre, dtype=np.float64)
    g = np.exp(-np.sum((p - c) ** 2, axis=1) / (2 * sigma ** 2))
    if mirror and abs(c[0]) > 1e-9:
        g = g + np.exp(-np.sum((p - c * np.array([-1, 1, 1])) ** 2, axis=1) / (2 * sigma ** 2))
    return g


def _outward_x(p: np.ndarray) -> np.ndarray:
    return np.tanh(p[:, 0] / 0.01)


class _Anchors:
    """Named anatomical points (metres) taken from the reference face."""

    def __init__(self, face: FaceReference, geo: HeadGeometry):
        f = face.vertices
        self.nose_tip = f[4]
        self.bridge = f[6]
        self.alar = f[294]
        self.chin = f[152]
        self.chin_front = f[199]
        self.jaw_angle = f[288] + np.array([0.004, -0.01, -0.01])
        self.cheek = 0.5 * (f[425] + f[411])
        self.cheekbone = f[345]
        self.forehead = f[151]
        self.brow_mid = f[334]
        self.brow_inner = f[336]
        self.brow_outer = f[300]
        self.mouth_corner = f[291]
        self.upper_lip = f[0]
        self.lower_lip = f[17]
        self.philtrum = f[164]
        self.temple = f[251] + np.array([0.0, -0.01, 0.0])
        self.eye_left = geo.eye_centres[0]
        self.lip_y = float(geo.vertices[geo.upper_slit, 1].mean())
        self.corner_x = float(abs(geo.vertices[geo.upper_slit[0], 0]))
        self.ear = np.array([0.075, -0.01, -0.022])


def shape_fields(a: _Anchors, normals: Callable[[np.ndarray], np.ndarray]) -> list[tuple[str, Field, float]]:
    """(name, field, eyeball scale rate) for each shape component, ordered roughly by importance."""
    ex, ey, ez = np.eye(3)
    head_c = np.array([0.0, 0.0, -0.01])

    def lin(axis: int, rate: float, centre=head_c) -> Field:
        return lambda p: np.outer((p - centre)[:, axis] * rate, np.eye(3)[axis])

    def blob_dir(centre, sigma, vec, mirror_x=True) -> Field:
        vec = np.asarray(vec, dtype=np.float64)

        def f(p):
            g = _blob(p, centre, sigma)
            d = np.broadcast_to(vec, p.shape).copy()
            if mirror_x:
                d[:, 0] *= np.sign(p[:, 0])
            return g[:, None] * d
        return f

    def blob_normal(centre, sigma, amount) -> Field:
        return lambda p: (amount * _blob(p, centre, sigma))[:, None] * normals(p)

    face_front = lambda p: smoothstep(-0.01, 0.04, p[:, 2])  # noqa: E731
    lower_face = lambda p: smoothstep(-0.02, -0.06, p[:, 1]) * smoothstep(-0.125, -0.1, p[:, 1])  # noqa: E731
    return [
        ("scale", lambda p: (p - head_c) * 0.035, 0.035),
        ("head_width", lin(0, 0.05), 0.0),
        ("head_length", lin(2, 0.04), 0.0),
        ("head_height", lambda p: np.outer((p[:, 1] + 0.02) * 0.04 * smoothstep(-0.12, -0.08, p[:, 1]), ey), 0.0),
        ("face_length", lambda p: np.outer(-0.006 * lower_face(p) * face_front(p), ey), 0.0),
        ("jaw_width", lambda p: np.outer(0.005 * _outward_x(p) * _blob(p, a.jaw_angle, 0.022), ex), 0.0),
        ("chin_forward", blob_dir(a.chin_front, 0.014, 0.005 * ez), 0.0),
        ("chin_down", blob_dir(a.chin, 0.016, -0.004 * ey), 0.0),
        ("nose_forward", blob_dir(a.nose_tip, 0.012, 0.004 * ez), 0.0),
        ("nose_width", blob_dir(a.alar, 0.008, 0.0025 * ex), 0.0),
        ("nose_bridge", blob_dir(a.bridge, 0.01, 0.003 * ez), 0.0),
        ("nose_tip_up", blob_dir(a.nose_tip, 0.008, 0.0025 * ey), 0.0),
        ("cheek_fullness", blob_normal(a.cheek, 0.018, 0.004), 0.0),
        ("cheekbones", blob_normal(a.cheekbone, 0.013, 0.003), 0.0),
        ("forehead_slope", lambda p: np.outer(0.005 * smoothstep(0.03, 0.1, p[:, 1]) * face_front(p), ez), 0.0),
        ("brow_ridge", blob_dir(a.brow_mid, 0.013, 0.003 * ez), 0.0),
        ("eye_spacing", blob_dir(a.eye_left, 0.014, 0.0025 * ex), 0.0),
        ("eye_height", blob_dir(a.eye_left, 0.016, 0.003 * ey), 0.0),
        ("eye_size", lambda p: np.zeros_like(p), 0.08),  # eyeballs scale; lids are opened below
        ("mouth_width", blob_dir(a.mouth_corner, 0.011, 0.003 * ex), 0.0),
        ("upper_lip_full", blob_dir(a.upper_lip, 0.008, 0.0025 * ez), 0.0),
        ("lower_lip_full", blob_dir(a.lower_lip, 0.008, 0.0025 * ez), 0.0),
        ("ear_size", lambda p: (p - a.ear * np.stack([np.sign(p[:, 0]), np.ones(len(p)), np.ones(len(p))], 1))
         * 0.15 * _blob(p, a.ear, 0.02)[:, None], 0.0),
        ("ear_out", blob_dir(a.ear, 0.02, 0.004 * ex), 0.0),
        ("occiput", lambda p: np.outer(-0.006 * _blob(p, (0, 0.03, -0.11), 0.04), ez), 0.0),
        ("crown", lambda p: np.outer(0.006 * _blob(p, (0, 0.13, -0.02), 0.045), ey), 0.0),
        ("neck_thickness", lambda p: (0.005 * smoothstep(-0.1, -0.14, p[:, 1]))[:, None]
         * np.stack([p[:, 0], np.zeros(len(p)), p[:, 2] + 0.03], 1)
         / np.maximum(np.hypot(p[:, 0], p[:, 2] + 0.03), 1e-6)[:, None], 0.0),
        ("temples", blob_dir(a.temple, 0.02, 0.003 * ex), 0.0),
        ("midface_forward", lambda p: np.outer(0.004 * _blob(p, (0, -0.02, 0.07), 0.03), ez), 0.0),
        ("mouth_height", blob_dir((0, a.lip_y, 0.07), 0.014, 0.003 * ey), 0.0),
    ]


def _eye_frame(p: np.ndarray, centre: np.ndarray):
    rel = p - centre
    rho = np.linalg.norm(rel, axis=1)
    el = np.arcsin(np.clip(rel[:, 1] / np.maximum(rho, 1e-12), -1, 1))
    az = np.arctan2(rel[:, 0], rel[:, 2])
    return rho, el, az


def _lid_field(face: FaceReference, centre: np.ndarray, loop: list[int], lower_to: float, upper_to: float,
               cover: bool) -> Field:
    """Move the lids around the eyeball: the lower rim's elevation goes to el_lo + lower_to*gap and the
    upper rim's to el_lo + upper_to*gap (gap = open height at that azimuth); skin above and below follows
    piecewise linearly up to the brow and cheek. With `cover`, skin over the eyeball is lifted in front of it."""
    pts = face[loop]
    rho_l, el_l, az_l = _eye_frame(pts, centre)
    lower, upper = list(range(0, 9)), list(range(8, 16)) + [0]
    o_lo, o_up = np.argsort(az_l[lower]), np.argsort(az_l[upper])
    az_lo, el_lo_pts = az_l[lower][o_lo], el_l[lower][o_lo]
    az_up, el_up_pts = az_l[upper][o_up], el_l[upper][o_up]
    az_min, az_max = az_l.min(), az_l.max()

    def f(p):
        rho, el, az = _eye_frame(p, centre)
        el_lo = np.interp(az, az_lo, el_lo_pts)
        el_up = np.interp(az, az_up, el_up_pts)
        gap = el_up - el_lo
        bot, top = el_lo - 0.6, el_up + 0.85
        new_lo, new_up = el_lo + lower_to * gap, el_lo + upper_to * gap
        xs = np.stack([bot, el_lo, el_up, top], 1)
        ys = np.stack([bot, new_lo, new_up, top], 1)
        new_el = el.copy()
        for k in range(3):
            seg = (el >= xs[:, k]) & (el < xs[:, k + 1])
            t = (el - xs[:, k]) / np.maximum(xs[:, k + 1] - xs[:, k], 1e-9)
            new_el = np.where(seg, ys[:, k] + t * (ys[:, k + 1] - ys[:, k]), new_el)
        new_rho = rho
        if cover:
            over = (new_el > el_lo - 0.05) & (new_el < new_up + 0.3)
            new_rho = np.where(over, np.maximum(rho, EYE_RADIUS + 0.0015), rho)
        new = centre + new_rho[:, None] * np.stack(
            [np.cos(new_el) * np.sin(az), np.sin(new_el), np.cos(new_el) * np.cos(az)], 1)
        margin = 0.25
        w_az = smoothstep(az_min - margin, az_min, az) * smoothstep(az_max + margin, az_max, az)
        w_r = smoothstep(EYE_RADIUS + 0.02, EYE_RADIUS + 0.008, rho) * (p[:, 2] > centre[2] - 0.002)
        return (new - p) * (w_az * w_r)[:, None]
    return f


def expression_fields(a: _Anchors, face: FaceReference, geo: HeadGeometry,
                      normals: Callable[[np.ndarray], np.ndarray]) -> list[tuple[str, Field]]:
    ex, ey, ez = np.eye(3)
    corner = a.mouth_corner
    eyes = ((geo.eye_centres[0], LEFT_EYE_LOOP), (geo.eye_centres[1], RIGHT_EYE_LOOP))

    def lids(lower_to, upper_to, cover, which=(0, 1)) -> Field:
        fs = [_lid_field(face, *eyes[k], lower_to, upper_to, cover) for k in which]
        return lambda p: sum(f(p) for f in fs)

    def corners(vec, sigma=0.013, side=0) -> Field:
        vec = np.asarray(vec, dtype=np.float64)

        def f(p):
            out = np.zeros_like(p)
            for s in ((1, -1) if side == 0 else (side,)):
                c = corner * np.array([s, 1, 1])
                g = _blob(p, c, sigma, mirror=False)
                out += g[:, None] * (vec * np.array([s, 1, 1]))
            return out
        return f

    def lips(p, sigma=0.009):
        d_line = np.abs(p[:, 1] - a.lip_y)
        inside = smoothstep(a.corner_x + 0.008, a.corner_x - 0.004, np.abs(p[:, 0]))
        return np.exp(-0.5 * (d_line / sigma) ** 2) * inside * smoothstep(0.03, 0.05, p[:, 2])

    # Expression fields are evaluated on the whole template, so the lip copies can be told apart.
    is_lower = geo.lower_lip | (geo.vertices[:, 1] < a.lip_y - 1e-9)
    is_upper = ~is_lower

    def brows(p, inner_only=False):
        g = _blob(p, a.brow_mid, 0.014) + 0.8 * _blob(p, a.brow_inner, 0.01) + 0.7 * _blob(p, a.brow_outer, 0.011)
        if inner_only:
            g = _blob(p, a.brow_inner, 0.011)
        forehead = 0.35 * smoothstep(a.brow_mid[1], a.brow_mid[1] + 0.03, p[:, 1]) * smoothstep(
            a.brow_mid[1] + 0.07, a.brow_mid[1] + 0.03, p[:, 1]) * smoothstep(0.02, 0.06, p[:, 2])
        below_eye_guard = smoothstep(a.eye_left[1] + 0.004, a.eye_left[1] + 0.012, p[:, 1])
        return np.clip(g, 0, 1) * below_eye_guard + (0 if inner_only else forehead)

    def side(p, s):
        return smoothstep(-0.004 * s, 0.004 * s, p[:, 0]) if s else 1.0

    def smile(s=0) -> Field:
        base = corners((0.004, 0.006, -0.003), side=s)
        return lambda p: base(p) + np.outer(0.003 * _blob(p, a.cheek + np.array([0, 0.01, 0.005]), 0.014)
                                            * side(p, s), ey + 0.4 * ez)

    return [
        ("smile", smile()),
        ("frown", corners((0.0, -0.0055, -0.001))),
        ("pucker", lambda p: lips(p, 0.011)[:, None] * (0.007 * ez - 0.3 * p * ex)),
        ("mouth_stretch", corners((0.006, -0.001, -0.002))),
        ("upper_lip_raise", lambda p: (lips(p) * is_upper)[:, None] * (0.0035 * ey + 0.001 * ez)),
        ("lower_lip_depress", lambda p: (lips(p) * is_lower)[:, None] * (-0.004 * ey + 0.001 * ez)),
        ("lips_tighten", lambda p: lips(p)[:, None] * (-0.0025 * ez - 0.12 * p * ex)),
        ("brow_raise", lambda p: brows(p)[:, None] * (0.008 * ey)),
        ("brow_lower", lambda p: brows(p)[:, None] * (-0.005 * ey - 0.08 * p * ex)),
        ("inner_brow_raise", lambda p: brows(p, True)[:, None] * (0.007 * ey)),
        ("eyes_close", lids(0.05, 0.12, True)),
        ("blink_left", lids(0.05, 0.12, True, (0,))),
        ("blink_right", lids(0.05, 0.12, True, (1,))),
        ("eyes_wide", lids(-0.1, 1.35, False)),
        ("squint", lids(0.4, 0.8, False)),
        ("cheek_puff", lambda p: (0.008 * _blob(p, a.cheek, 0.016))[:, None] * normals(p)),
        ("cheek_suck", lambda p: (-0.005 * _blob(p, a.cheek, 0.013))[:, None] * normals(p)),
        ("nose_wrinkle", lambda p: np.outer(0.003 * (_blob(p, a.alar + np.array([0, 0.008, 0]), 0.009)
                                                     + 0.5 * _blob(p, a.bridge, 0.008)), ey)),
        ("smile_left", smile(1)),
        ("smile_right", smile(-1)),
        ("mouth_left", lambda p: np.outer(0.006 * lips(p, 0.012), ex)),
        ("mouth_right", lambda p: np.outer(-0.006 * lips(p, 0.012), ex)),
    ]


def build_blendshapes(face: FaceReference, geo: HeadGeometry):
    """Shape dirs (V,3,S), expression dirs (V,3,E) and their names."""
    anchors = _Anchors(face, geo)
    n_all = vertex_normals(geo.vertices, geo.faces)

    def normals(p):
        # Outward normals of the template where p is the template, the radial direction elsewhere.
        if len(p) == len(geo.vertices):
            return n_all
        r = p - np.array([0.0, -0.01, -0.015])
        return r / np.linalg.norm(r, axis=1, keepdims=True)

    eyeball = (geo.part == 1) | (geo.part == 2)
    v = geo.vertices
    shapes, shape_names = [], []
    for name, field, eye_rate in shape_fields(anchors, normals):
        d = field(v)
        for k in (1, 2):
            sel = geo.part == k
            centre = geo.eye_centres[k - 1]
            d[sel] = field(centre[None])[0] + eye_rate * (v[sel] - centre)
        if name == "eye_size":
            # Eye size also opens the lids around the larger eyeball.
            for k in (1, 2):
                centre = geo.eye_centres[k - 1]
                near = (geo.part == 0) & (np.linalg.norm(v - centre, axis=1) < EYE_RADIUS + 0.012)
                w = smoothstep(EYE_RADIUS + 0.012, EYE_RADIUS, np.linalg.norm(v[near] - centre, axis=1))
                d[near] = (v[near] - centre) * 0.08 * w[:, None]
        shapes.append(d)
        shape_names.append(name)
    exprs, expr_names = [], []
    for name, field in expression_fields(anchors, face, geo, normals):
        d = field(v)
        d[eyeball] = 0.0
        exprs.append(d)
        expr_names.append(name)
    return np.stack(shapes, -1), shape_names, np.stack(exprs, -1), expr_names
