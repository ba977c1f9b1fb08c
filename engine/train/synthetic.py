"""Synthetic multi-view heads for training: random people on the head model, rendered with `engine.render`.

Identity: shape coefficients of the head's shape space plus an appearance (skin tone, lips, brows, eyes,
hair cap of random colour and coverage, optional beard, baked soft shading) painted on the neutral head as
per-vertex colours. The surface is drawn as dense small isotropic Gaussians: one per vertex and a few per face
at fixed random barycentric positions, so they follow the mesh exactly when it is posed.

Samplers (paper appendix C.1):
- "video":     one fixed camera, a moving and expressive head (smooth random trajectories of expression,
               jaw, eyes and head/neck rotation), `n_views` frames;
- "multiview": one instant (one expression and pose) seen by up to 12 cameras over the front hemisphere.

Backgrounds: every frame gets a plain colour drawn from {black, grey, white} (paper C.1); with
`background="textured"` (or "mixed", half the frames) the *input* image sits on smooth coloured noise instead,
while `targets` keep the plain colour (a model cannot predict a background, and webcam inputs are unmatted).

Determinism and splits: identity k of split s uses `numpy.random.default_rng([seed, SPLIT_BASE[s] + k])`;
its view group g uses `[seed, SPLIT_BASE[s] + k, g, 1]`. The id ranges of train/validation/test are disjoint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import InputError
from engine.train.samples import HeadSample, collate_samples
from engine.types import Cameras, FlameParams, intrinsics_from_fov, look_at

SPLIT_BASE = {"train": 0, "validation": 1_000_000, "test": 2_000_000}
SAMPLERS = ("video", "multiview")
BACKGROUNDS = ("plain", "textured", "mixed")
PLAIN_COLORS = (0.0, 0.5, 1.0)

SKIN_TONES = np.array([[0.96, 0.80, 0.69], [0.90, 0.72, 0.60], [0.80, 0.60, 0.46], [0.68, 0.48, 0.34],
                       [0.55, 0.38, 0.26], [0.40, 0.27, 0.18], [0.30, 0.20, 0.14]], np.float32)
HAIR_COLORS = np.array([[0.05, 0.04, 0.04], [0.20, 0.12, 0.07], [0.38, 0.24, 0.12], [0.70, 0.55, 0.30],
                        [0.55, 0.22, 0.08], [0.62, 0.62, 0.62], [0.90, 0.88, 0.80]], np.float32)
IRIS_COLORS = np.array([[0.30, 0.18, 0.08], [0.15, 0.10, 0.05], [0.25, 0.45, 0.65], [0.30, 0.50, 0.30]],
                       np.float32)


@dataclass
class SyntheticConfig:
    """Knobs of the generator (defaults suit 64-256 px training)."""

    n_views: int = 16                 # views per sample (video frames, or cameras for multiview, at most 12)
    background: str = "plain"         # "plain", "textured" or "mixed"
    samples_per_face: int = 2         # extra Gaussians per mesh face (beyond one per vertex)
    shape_std: float = 0.8            # std of shape coefficients (clipped at 2.5 std)
    expression_std: float = 0.7       # std of expression coefficients in a frame
    max_jaw: float = 0.25             # radians of mouth opening
    fov_range: tuple[float, float] = (14.0, 26.0)
    fill_range: tuple[float, float] = (0.85, 1.05)   # head radius / half view size
    max_cameras: int = 12


@dataclass
class Person:
    """A synthetic identity: shape (S,), appearance, framing centre (3,) and radius (metres, neutral head)."""

    shape: torch.Tensor
    look: "Appearance"
    centre: np.ndarray
    radius: float


@dataclass
class Appearance:
    """A person's painted surface: (V,3) vertex colours in [0,1], and Gaussian layout on the mesh.

    face_ids (G,) / bary (G,3): each Gaussian's face and barycentric weights; colors (G,3); scales (G,).
    """

    vertex_colors: np.ndarray
    face_ids: np.ndarray
    bary: np.ndarray
    colors: np.ndarray
    scales: np.ndarray


# -- geometry helpers ----------------------------------------------------------------------------------------------
def _vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    tri = verts[faces]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    vn = np.zeros_like(verts)
    for k in range(3):
        np.add.at(vn, faces[:, k], fn)
    return vn / np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-12)


def _inside_polygon(xy: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule, (N,2) points against a closed (K,2) polygon -> (N,) bool."""
    inside = np.zeros(len(xy), bool)
    x, y = xy[:, 0:1], xy[:, 1:2]
    a, b = poly, np.roll(poly, -1, axis=0)
    cond = (a[None, :, 1] > y) != (b[None, :, 1] > y)
    t = (y - a[None, :, 1]) / np.where(np.abs(b[:, 1] - a[:, 1]) < 1e-12, 1e-12, b[:, 1] - a[:, 1])[None]
    xcross = a[None, :, 0] + t * (b[None, :, 0] - a[None, :, 0])
    inside ^= (np.sum(cond & (x < xcross), axis=1) % 2).astype(bool)
    return inside


def _distance_to_polyline(xy: np.ndarray, line: np.ndarray) -> np.ndarray:
    """Distance from (N,2) points to the open polyline (K,2) -> (N,)."""
    best = np.full(len(xy), np.inf)
    for a, b in zip(line[:-1], line[1:]):
        ab = b - a
        t = np.clip(((xy - a) @ ab) / max(float(ab @ ab), 1e-12), 0, 1)
        best = np.minimum(best, np.linalg.norm(xy - (a + t[:, None] * ab), axis=1))
    return best


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def paint_head(verts: np.ndarray, faces: np.ndarray, lmk: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-vertex colours (V,3) of a random person on the neutral head `verts` (V,3) with landmarks `lmk` (68,3).

    Regions are found from the 68 landmarks (FLAME axes: y up, face towards +z), so any head with a sensible
    landmark embedding can be painted.
    """
    normals = _vertex_normals(verts, faces)
    front = normals[:, 2] > 0.2
    xy, z = verts[:, :2], verts[:, 2]
    skin = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.92, 1.08, 3)
    colors = np.tile(skin, (len(verts), 1)).astype(np.float32)
    face_width = float(np.linalg.norm(lmk[16, :2] - lmk[0, :2]))
    # cheeks: a faint blush
    for c in (lmk[2] * 0.4 + lmk[31] * 0.6, lmk[14] * 0.4 + lmk[35] * 0.6):
        d = np.linalg.norm(verts - c, axis=1) / (0.15 * face_width)
        colors += (np.exp(-d ** 2) * front)[:, None] * np.array([0.06, -0.03, -0.03]) * rng.uniform(0, 1.5)
    # hair cap: above a plane through the hairline, tilting down towards the back of the head
    brow_y = float(lmk[17:27, 1].max())
    hairline = brow_y + rng.uniform(0.01, 0.05)
    tilt = rng.uniform(0.4, 1.4)  # how far the hair comes down at the back (coverage)
    z_front = float(lmk[27, 2])
    hair_height = hairline + tilt * (z - z_front) * 0.8
    hair_amount = _smoothstep(-0.004, 0.006, verts[:, 1] - hair_height)
    if rng.random() < 0.1:  # bald
        hair_amount *= 0.0
    hair = HAIR_COLORS[rng.integers(len(HAIR_COLORS))] * rng.uniform(0.85, 1.15, 3)
    # brows
    brow_w = rng.uniform(0.003, 0.006) * face_width / 0.14
    brow = np.zeros(len(verts))
    for seg in (lmk[17:22], lmk[22:27]):
        brow = np.maximum(brow, 1 - _smoothstep(brow_w * 0.5, brow_w, _distance_to_polyline(xy, seg[:, :2])))
    brow *= front & (z > lmk[17:27, 2].min() - 0.02)
    brow_col = hair * 0.7 if rng.random() < 0.7 else np.array([0.1, 0.07, 0.05])
    # beard (optional)
    beard = np.zeros(len(verts))
    if rng.random() < 0.3:
        mouth_y = float(lmk[48:60, 1].mean())
        below = _smoothstep(0.0, 0.01, (float(lmk[33, 1]) - 0.005) - verts[:, 1])
        jaw_band = _smoothstep(-0.01, 0.01, verts[:, 1] - (float(lmk[8, 1]) - 0.04))
        beard = below * jaw_band * (z > z_front - 0.09) * (verts[:, 1] < mouth_y + rng.uniform(0.0, 0.02))
        beard *= rng.uniform(0.5, 1.0)
    # lips (inside the outer lip contour, on the front)
    lips = _inside_polygon(xy, lmk[48:60, :2]) & front & (z > lmk[48:60, 2].min() - 0.015)
    lip_col = skin * np.array([0.95, 0.62, 0.62]) * rng.uniform(0.8, 1.05)
    # eyes: sclera inside the eye contour, iris and pupil disks at the contour centre
    eye_mask = np.zeros(len(verts), bool)
    iris_mask = np.zeros(len(verts), bool)
    pupil_mask = np.zeros(len(verts), bool)
    for sl in (slice(36, 42), slice(42, 48)):
        contour = lmk[sl]
        centre = contour.mean(axis=0)
        width = float(np.linalg.norm(contour[3, :2] - contour[0, :2]))
        grown = centre[:2] + (contour[:, :2] - centre[:2]) * 1.15
        inside = _inside_polygon(xy, grown) & front & (z > centre[2] - 0.02)
        r = np.linalg.norm(xy - centre[:2], axis=1)
        eye_mask |= inside
        iris_mask |= inside & (r < 0.22 * width)
        pupil_mask |= inside & (r < 0.09 * width)
    iris_col = IRIS_COLORS[rng.integers(len(IRIS_COLORS))]

    colors = colors * (1 - beard[:, None] * 0.85) + beard[:, None] * 0.85 * hair * 0.8
    colors = colors * (1 - brow[:, None]) + brow[:, None] * brow_col
    colors[lips] = lip_col
    colors[eye_mask] = np.array([0.92, 0.9, 0.88])
    colors[iris_mask] = iris_col
    colors[pupil_mask] = 0.03
    colors = colors * (1 - hair_amount[:, None]) + hair_amount[:, None] * hair
    # baked soft light from the front-top, fixed per person
    light = np.array([rng.uniform(-0.4, 0.4), rng.uniform(0.2, 0.6), 1.0])
    light /= np.linalg.norm(light)
    shade = 0.55 + 0.45 * np.clip(normals @ light, 0, 1)
    return np.clip(colors * shade[:, None], 0, 1).astype(np.float32)


def layout_gaussians(verts: np.ndarray, faces: np.ndarray, vertex_colors: np.ndarray, samples_per_face: int,
                     rng: np.random.Generator) -> Appearance:
    """Dense small Gaussians on the surface: one per vertex plus `samples_per_face` per face."""
    n_v, n_f = len(verts), len(faces)
    # vertex Gaussians are encoded as a degenerate barycentric on any face that holds the vertex
    owner = np.zeros(n_v, np.int64)
    slot = np.zeros(n_v, np.int64)
    for k in range(3):
        owner[faces[:, k]] = np.arange(n_f)
        slot[faces[:, k]] = k
    used = np.zeros(n_v, bool)
    used[faces.reshape(-1)] = True
    vid = np.nonzero(used)[0]
    v_bary = np.zeros((len(vid), 3))
    v_bary[np.arange(len(vid)), slot[vid]] = 1.0
    f_ids = np.repeat(np.arange(n_f), samples_per_face)
    r = rng.random((len(f_ids), 2))
    flip = r.sum(axis=1) > 1
    r[flip] = 1 - r[flip]
    f_bary = np.stack([1 - r[:, 0] - r[:, 1], r[:, 0], r[:, 1]], axis=1)
    face_ids = np.concatenate([owner[vid], f_ids])
    bary = np.concatenate([v_bary, f_bary]).astype(np.float32)
    tri = verts[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    per_face_scale = 0.7 * np.sqrt(area / (samples_per_face + 0.5))
    scales = np.maximum(per_face_scale[face_ids], 2e-4).astype(np.float32)
    colors = np.einsum("gk,gkc->gc", bary, vertex_colors[faces[face_ids]])
    colors = np.clip(colors * rng.uniform(0.93, 1.07, (len(colors), 1)), 0, 1).astype(np.float32)  # skin grain
    return Appearance(vertex_colors, face_ids, bary, colors, scales)


def textured_background(rng: np.random.Generator, height: int, width: int) -> torch.Tensor:
    """(3,H,W) smooth coloured noise with a gradient: a stand-in for an unmatted room behind the person."""
    coarse = torch.from_numpy(rng.random((1, 3, 5, 5)).astype(np.float32))
    fine = torch.from_numpy(rng.random((1, 3, 17, 17)).astype(np.float32))
    img = 0.7 * F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    img = img + 0.3 * F.interpolate(fine, size=(height, width), mode="bilinear", align_corners=False)
    ramp = torch.linspace(rng.uniform(-0.2, 0.0), rng.uniform(0.0, 0.2), height).view(1, 1, height, 1)
    grey = img.mean(dim=1, keepdim=True)
    img = grey + rng.uniform(0.2, 0.6) * (img - grey)  # rooms are not rainbow-coloured
    return (img + ramp)[0].clamp(0, 1)


# -- the generator -------------------------------------------------------------------------------------------------
class HeadGenerator:
    """Random people and views on a head model. All randomness comes from the numpy generators passed in."""

    def __init__(self, head=None, config: SyntheticConfig | None = None, render_backend: str = "auto"):
        if head is None:
            from engine.head import load_head

            head = load_head()
        self.head = head
        self.config = config or SyntheticConfig()
        self.render_backend = render_backend
        self.faces = np.asarray(head.faces.cpu().numpy() if torch.is_tensor(head.faces) else head.faces, np.int64)
        self.n_shape = int(head.n_shape)
        self.n_expression = int(head.n_expression)

    # -- FLAME parameters --
    def _zeros(self, batch: int) -> FlameParams:
        return FlameParams.zeros(batch, self.n_shape, self.n_expression)

    def _pose(self, params: FlameParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Posed vertices (B,V,3) and landmarks (B,68,3)."""
        with torch.no_grad():
            out = self.head.forward(params)
            verts = out.vertices if hasattr(out, "vertices") else out["vertices"]
            return verts.float(), self.head.landmark_vertices(out).float()

    def identity(self, rng: np.random.Generator) -> "Person":
        """A random person: shape coefficients, painted appearance and how to frame the head."""
        cfg = self.config
        shape = np.clip(rng.normal(0, cfg.shape_std, self.n_shape), -2.5, 2.5).astype(np.float32)
        params = self._zeros(1)
        params.shape = torch.from_numpy(shape)[None]
        verts, lmk = self._pose(params)
        v, l = verts[0].numpy().astype(np.float64), lmk[0].numpy().astype(np.float64)
        colors = paint_head(v, self.faces, l, rng)
        look = layout_gaussians(v, self.faces, colors, cfg.samples_per_face, rng)
        # frame the face and skull: the centre sits between the landmarks and the middle of the head
        used = v[np.unique(self.faces)]
        centre = 0.5 * (l.mean(axis=0) + 0.5 * (used.min(axis=0) + used.max(axis=0)))
        radius = float(np.linalg.norm(used - centre, axis=1).max())
        return Person(torch.from_numpy(shape), look, centre.astype(np.float32), radius)

    def _motion(self, rng: np.random.Generator, n: int, smooth: bool) -> FlameParams:
        """n expressions/poses: smooth random trajectories (a video) or one draw repeated (an instant)."""
        cfg = self.config
        t = np.linspace(0, 1, n)[:, None] if smooth else np.zeros((n, 1))

        def wave(dim: int, amp: float) -> np.ndarray:
            freq = rng.uniform(0.3, 2.0, (1, dim)) if smooth else np.zeros((1, dim))
            phase = rng.uniform(0, 2 * np.pi, (1, dim))
            jitter = rng.normal(0, 0.3 * amp, (n, dim)) if smooth else 0.0
            return (amp * np.sin(2 * np.pi * freq * t + phase) + jitter).astype(np.float32)

        p = self._zeros(n)
        p.expression = torch.from_numpy(wave(self.n_expression, cfg.expression_std))
        jaw = np.clip(np.abs(wave(1, cfg.max_jaw * 0.6)), 0, cfg.max_jaw)
        p.jaw = torch.from_numpy(np.concatenate([jaw, np.zeros((n, 2), np.float32)], axis=1))
        rot = wave(3, 1.0) * np.array([0.25, 0.45, 0.12], np.float32)  # pitch, yaw, roll amplitudes (rad)
        p.rotation = torch.from_numpy(rot * (0.7 if smooth else 0.5))
        p.neck = torch.from_numpy(wave(3, 1.0) * np.array([0.08, 0.12, 0.04], np.float32))
        gaze = wave(2, 0.15)
        p.eyes = torch.from_numpy(np.concatenate([gaze, np.zeros((n, 1), np.float32)] * 2, axis=1))
        return p

    def _cameras(self, rng: np.random.Generator, n: int, centre: np.ndarray, radius: float, resolution: int,
                 multiview: bool) -> Cameras:
        cfg = self.config
        fov = rng.uniform(*cfg.fov_range)
        fill = rng.uniform(*cfg.fill_range)
        dist = radius / (fill * math.tan(math.radians(fov) / 2))
        if multiview:
            yaw = np.sort(rng.uniform(-75, 75, n))
            pitch = rng.uniform(-20, 30, n)
        else:
            yaw = np.full(n, rng.uniform(-25, 25))
            pitch = np.full(n, rng.uniform(-10, 15))
        views = []
        target = torch.tensor(centre, dtype=torch.float32)
        for y, p in zip(np.radians(yaw), np.radians(pitch)):
            d = dist * rng.uniform(0.93, 1.07) if multiview else dist
            eye = target + torch.tensor([d * math.cos(p) * math.sin(y), d * math.sin(p), d * math.cos(p) * math.cos(y)],
                                        dtype=torch.float32)
            views.append(look_at(eye, target))
        K = intrinsics_from_fov(fov, resolution, resolution).float()
        return Cameras(torch.stack(views), K.expand(n, 3, 3).clone(), resolution, resolution)

    def render_group(self, shape: torch.Tensor, look: Appearance, params: FlameParams, cameras: Cameras,
                     rng: np.random.Generator, identity: str, sampler: str) -> HeadSample:
        """Pose the person for every view (params has V rows, cameras V cameras) and render."""
        from engine.render import render

        n = len(cameras)
        params = params.with_(shape=shape[None].expand(n, -1).clone())
        verts, lmk = self._pose(params)
        faces = torch.from_numpy(self.faces)
        tri = verts[:, faces[torch.from_numpy(look.face_ids)]]                      # (V,G,3,3)
        means = torch.einsum("gk,vgkc->vgc", torch.from_numpy(look.bary), tri)
        g = means.shape[1]
        quats = torch.zeros(n, g, 4)
        quats[..., 0] = 1
        scales = torch.from_numpy(look.scales)[None, :, None].expand(n, g, 3).contiguous()
        opac = torch.full((n, g), 0.98)
        colors = torch.from_numpy(look.colors)[None].expand(n, g, 3).contiguous()
        h = w = cameras.width
        with torch.no_grad():
            out = render(means, quats, scales, opac, colors, cameras.viewmats, cameras.Ks, w, h,
                         backend=self.render_backend)
        rgb = out["rgb"].reshape(n, h, w, 3).permute(0, 3, 1, 2).clamp(0, 1)       # premultiplied over black
        alpha = out["alpha"].reshape(n, 1, h, w).clamp(0, 1)
        bg_choice = rng.integers(len(PLAIN_COLORS), size=n)
        bg = torch.tensor([PLAIN_COLORS[i] for i in bg_choice], dtype=torch.float32)[:, None].expand(n, 3).clone()
        targets = (rgb + (1 - alpha) * bg[:, :, None, None]).clamp(0, 1)
        mode = self.config.background
        textured = np.zeros(n, bool) if mode == "plain" else (np.ones(n, bool) if mode == "textured"
                                                              else rng.random(n) < 0.5)
        images = targets.clone()
        for i in np.nonzero(textured)[0]:
            images[i] = (rgb[i] + (1 - alpha[i]) * textured_background(rng, h, w)).clamp(0, 1)
        from engine.losses import project_points

        lmk2d = project_points(lmk, cameras.viewmats, cameras.Ks)
        landmarks = torch.cat([lmk2d, torch.ones(n, 68, 1)], dim=-1)
        return HeadSample(images=images.contiguous(), targets=targets.contiguous(), masks=alpha.contiguous(),
                          bg_colors=bg, cameras=cameras, flame=params, landmarks=landmarks, identity=identity,
                          sampler=sampler)

    def sample(self, person: "Person", rng: np.random.Generator, sampler: str, resolution: int,
               identity: str = "") -> HeadSample:
        """One HeadSample of `person`: a view group drawn from `rng` with `sampler` at `resolution` px."""
        if sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {sampler!r}; use one of {SAMPLERS}")
        multiview = sampler == "multiview"
        n = min(self.config.n_views, self.config.max_cameras) if multiview else self.config.n_views
        params = self._motion(rng, n, smooth=not multiview)
        if multiview:  # one instant: every camera sees the same expression and pose
            params = params.index([0] * n)
        cams = self._cameras(rng, n, person.centre, person.radius, resolution, multiview)
        return self.render_group(person.shape, person.look, params, cams, rng, identity, sampler)


class SyntheticHeads(torch.utils.data.Dataset):
    """`n_identities` people of one split, `groups_per_identity` view groups each; item i is person
    i % n_identities, group i // n_identities. Rendered on access (deterministic); people are cached.
    Use `collate_fn=collate_samples` with a DataLoader (a batch is a list of HeadSample).
    """

    collate = staticmethod(collate_samples)

    def __init__(self, seed: int, split: str, n_identities: int, sampler: str, resolution: int, *,
                 groups_per_identity: int = 1, config: SyntheticConfig | None = None, head=None,
                 render_backend: str = "auto"):
        if split not in SPLIT_BASE:
            raise InputError(f"unknown split {split!r}; use one of {sorted(SPLIT_BASE)}")
        if sampler not in SAMPLERS + ("mixed",):
            raise InputError(f"unknown sampler {sampler!r}; use 'video', 'multiview' or 'mixed'")
        if n_identities < 1 or n_identities > 1_000_000:
            raise InputError(f"n_identities must be in 1..1000000, got {n_identities}")
        if (config or SyntheticConfig()).background not in BACKGROUNDS:
            raise InputError(f"unknown background {(config or SyntheticConfig()).background!r}; use {BACKGROUNDS}")
        self.seed, self.split, self.n_identities = seed, split, n_identities
        self.sampler, self.resolution, self.groups_per_identity = sampler, resolution, groups_per_identity
        self.generator = HeadGenerator(head, config, render_backend)
        self._people: dict[int, Person] = {}

    def identity_id(self, index: int) -> int:
        return SPLIT_BASE[self.split] + index % self.n_identities

    def person(self, index: int) -> Person:
        pid = self.identity_id(index)
        if pid not in self._people:
            self._people[pid] = self.generator.identity(np.random.default_rng([self.seed, pid]))
        return self._people[pid]

    def __len__(self) -> int:
        return self.n_identities * self.groups_per_identity

    def __getitem__(self, index: int) -> HeadSample:
        if not 0 <= index < len(self):
            raise IndexError(index)
        pid = self.identity_id(index)
        group = index // self.n_identities
        rng = np.random.default_rng([self.seed, pid, group, 1])
        sampler = self.sampler
        if sampler == "mixed":
            sampler = SAMPLERS[int(rng.integers(2))]
        return self.generator.sample(self.person(index), rng, sampler, self.resolution,
                                     identity=f"synthetic-{self.seed}-{pid}")


def make_dataset(seed: int, split: str, n_identities: int, sampler: str, resolution: int,
                 **kwargs) -> SyntheticHeads:
    """The synthetic dataset contract: `n_identities` people of `split` ("train", "validation", "test"),
    views from `sampler` ("video", "multiview" or "mixed") at `resolution` px square. Extra keyword arguments go
    to `SyntheticHeads` (groups_per_identity, config, head, render_backend).
    """
    return SyntheticHeads(seed, split, n_identities, sampler, resolution, **kwargs)
