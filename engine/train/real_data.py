"""Loader for tracked captures in the official FastAvatar training layout (SPEC §10).

    <root>/<person>/<camera>/<sequence>/
        transforms.json                 frames[]: transform_matrix (4x4 camera-to-world, OpenGL axes),
                                        fl_x, fl_y, cx, cy, w, h, flame_param_path ("flame_param/00012.npz")
        canonical_flame_param.npz       shape (S,) used as the identity of every frame (as the official code does)
        flame_param/{frame:05d}.npz     rotation (1,3), translation (1,3), neck_pose (1,3), jaw_pose (1,3),
                                        eyes_pose (1,6), expr (1,E), shape (S,)
        processed_data/{frame:05d}/
            rgb.npy        (3,H,W) float in [0,1] (also accepted: (H,W,3) uint8/float)
            mask.npy       (H,W), (1,H,W) or (H,W,1) foreground alpha
            intrs.npy      4x4 (or 3x3) intrinsics in pixels of this H,W
            landmark2d.npz or landmark2d.npy   68 landmarks, (68,2|3) or (1,68,2|3); pixels, or normalised to [0,1]
            bg_color.npy   scalar or (3,): the plain colour the matted image sits on

Two samplers, as in the paper's appendix C.1: "video" takes frames of one camera's sequence; "multiview" takes the
same frame of one sequence from every camera of that person that has it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import InputError
from engine.train.samples import HeadSample
from engine.types import Cameras, FlameParams

_GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


@dataclass(frozen=True)
class SequenceDir:
    """One `<person>/<camera>/<sequence>` folder and its frame ids (sorted)."""

    person: str
    camera: str
    sequence: str
    path: Path
    frames: tuple[int, ...]


def find_sequences(root: str | Path) -> list[SequenceDir]:
    """Every sequence folder under `root` that has transforms.json and processed frames, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"capture folder {root} does not exist; pass the root of the <person>/<camera>/<sequence> tree")
    out = []
    for transforms in sorted(root.glob("*/*/*/transforms.json")):
        seq = transforms.parent
        frames = tuple(sorted(int(p.name) for p in (seq / "processed_data").glob("*") if p.name.isdigit()))
        if frames:
            person, camera, sequence = seq.relative_to(root).parts
            out.append(SequenceDir(person, camera, sequence, seq, frames))
    return out


def _frame_id(entry: dict, position: int) -> int:
    for key in ("flame_param_path", "file_path"):
        if key in entry:
            digits = re.findall(r"(\d+)", Path(str(entry[key])).stem)
            if digits:
                return int(digits[-1])
    return int(entry.get("timestep_index", position))


def _read_transforms(seq: Path) -> dict[int, dict]:
    with open(seq / "transforms.json") as fh:
        data = json.load(fh)
    frames = data.get("frames")
    if not isinstance(frames, list):
        raise InputError(f"{seq / 'transforms.json'} has no 'frames' list")
    return {_frame_id(f, i): f for i, f in enumerate(frames)}


def _image_chw(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] not in (3, 4):
        arr = arr[..., :3].transpose(2, 0, 1)
    arr = arr.astype(np.float32)
    return arr / 255.0 if arr.max() > 1.5 else arr


def _mask_1hw(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float32).squeeze()
    if arr.ndim == 3:  # (3,H,W) or (H,W,3) masks: take one channel
        arr = arr[0] if arr.shape[0] in (3, 4) else arr[..., 0]
    arr = arr / 255.0 if arr.max() > 1.5 else arr
    if arr.shape != (h, w):
        raise InputError(f"mask of shape {arr.shape} does not match the {h}x{w} image")
    return arr[None]


def _landmarks(frame_dir: Path, h: int, w: int) -> np.ndarray:
    path = frame_dir / "landmark2d.npz"
    if path.is_file():
        with np.load(path) as data:
            arr = data[data.files[0]]
    elif (frame_dir / "landmark2d.npy").is_file():
        arr = np.load(frame_dir / "landmark2d.npy")
    else:
        return np.zeros((68, 3), np.float32)  # unknown landmarks: zero confidence
    arr = np.asarray(arr, dtype=np.float32).reshape(-1, np.asarray(arr).shape[-1])[:68]
    if arr.shape[0] != 68:
        raise InputError(f"{frame_dir}: expected 68 landmarks, found {arr.shape[0]}")
    xy = arr[:, :2].copy()
    if np.abs(xy).max() <= 1.5:  # normalised coordinates
        xy *= np.array([w, h], np.float32)
    conf = arr[:, 2:3] if arr.shape[1] > 2 else np.ones((68, 1), np.float32)
    return np.concatenate([xy, conf], axis=1)


def _fit(vec: np.ndarray, n: int | None) -> np.ndarray:
    vec = np.asarray(vec, dtype=np.float32).reshape(-1)
    if n is None:
        return vec
    return vec[:n] if vec.size >= n else np.pad(vec, (0, n - vec.size))


def _flame(seq: Path, frame: int, n_shape: int | None, n_expression: int | None) -> dict[str, np.ndarray]:
    path = seq / "flame_param" / f"{frame:05d}.npz"
    if not path.is_file():
        raise InputError(f"missing FLAME parameters {path}")
    with np.load(path) as d:
        shape_src = d["shape"]
        canonical = seq / "canonical_flame_param.npz"
        if canonical.is_file():
            with np.load(canonical) as c:
                shape_src = c["shape"]
        return {"shape": _fit(shape_src, n_shape), "expression": _fit(d["expr"], n_expression),
                "rotation": _fit(d["rotation"], 3), "neck": _fit(d["neck_pose"], 3), "jaw": _fit(d["jaw_pose"], 3),
                "eyes": _fit(d["eyes_pose"], 6), "translation": _fit(d["translation"], 3)}


def load_views(views: list[tuple[SequenceDir, int]], *, resolution: int | None = None,
               n_shape: int | None = None, n_expression: int | None = None, sampler: str = "video") -> HeadSample:
    """Read the given (sequence, frame id) views of one person into a HeadSample.

    resolution: square output size (images, masks, intrinsics and landmarks are rescaled); None keeps the stored size.
    n_shape / n_expression: truncate or zero-pad FLAME coefficients to the head model's counts.
    """
    images, masks, bgs, viewmats, Ks, lmks, flames = [], [], [], [], [], [], []
    transforms: dict[Path, dict[int, dict]] = {}
    for seq, frame in views:
        table = transforms.setdefault(seq.path, _read_transforms(seq.path))
        if frame not in table:
            raise InputError(f"{seq.path / 'transforms.json'} has no entry for frame {frame}")
        entry = table[frame]
        fdir = seq.path / "processed_data" / f"{frame:05d}"
        rgb = _image_chw(np.load(fdir / "rgb.npy"))
        h, w = rgb.shape[1:]
        mask = _mask_1hw(np.load(fdir / "mask.npy"), h, w) if (fdir / "mask.npy").is_file() else np.ones((1, h, w),
                                                                                                        np.float32)
        bg = np.broadcast_to(np.asarray(np.load(fdir / "bg_color.npy"), np.float32).reshape(-1), (3,)) \
            if (fdir / "bg_color.npy").is_file() else np.ones(3, np.float32)
        if (fdir / "intrs.npy").is_file():
            K = np.asarray(np.load(fdir / "intrs.npy"), np.float64)[:3, :3]
        else:  # fall back to transforms.json, stated for its own w,h
            sx, sy = w / float(entry.get("w", w)), h / float(entry.get("h", h))
            K = np.array([[entry["fl_x"] * sx, 0, entry["cx"] * sx], [0, entry["fl_y"] * sy, entry["cy"] * sy],
                          [0, 0, 1]])
        c2w = np.asarray(entry["transform_matrix"], np.float64) @ _GL_TO_CV
        lmk = _landmarks(fdir, h, w)
        if resolution is not None and (h, w) != (resolution, resolution):
            sx, sy = resolution / w, resolution / h
            rgb = F.interpolate(torch.from_numpy(rgb)[None], size=(resolution, resolution), mode="bilinear",
                                antialias=True, align_corners=False)[0].numpy()
            mask = F.interpolate(torch.from_numpy(mask)[None], size=(resolution, resolution), mode="bilinear",
                                 antialias=True, align_corners=False)[0].numpy()
            K = np.diag([sx, sy, 1.0]) @ K
            lmk = lmk * np.array([sx, sy, 1.0], np.float32)
        images.append(rgb)
        masks.append(mask)
        bgs.append(bg)
        viewmats.append(np.linalg.inv(c2w))
        Ks.append(K)
        lmks.append(lmk)
        flames.append(_flame(seq.path, frame, n_shape, n_expression))
    t = lambda xs: torch.from_numpy(np.stack(xs).astype(np.float32))  # noqa: E731
    imgs = t(images).clamp(0, 1)
    size = imgs.shape[-1], imgs.shape[-2]
    flame = FlameParams(**{k: t([f[k] for f in flames]) for k in flames[0]})
    return HeadSample(images=imgs, targets=imgs.clone(), masks=t(masks), bg_colors=t(bgs),
                      cameras=Cameras(t(viewmats), t(Ks), int(size[0]), int(size[1])), flame=flame,
                      landmarks=t(lmks), identity=views[0][0].person, sampler=sampler)


class RealCaptureDataset(torch.utils.data.Dataset):
    """Groups of up to `n_views` views of one person from an official-layout capture tree.

    sampler "video": one group per sequence folder (frames of one camera); "multiview": one group per
    (person, sequence name, frame id) seen by at least two cameras. Views inside a group are drawn with
    `numpy.random.default_rng([seed, index])`, so a dataset is deterministic. `persons` restricts to some
    people (an identity split); None takes all.
    """

    def __init__(self, root: str | Path, *, sampler: str = "video", n_views: int = 16, seed: int = 0,
                 resolution: int | None = None, persons: list[str] | None = None,
                 n_shape: int | None = None, n_expression: int | None = None):
        if sampler not in ("video", "multiview"):
            raise InputError(f"unknown sampler {sampler!r}; use 'video' or 'multiview'")
        seqs = [s for s in find_sequences(root) if persons is None or s.person in persons]
        if not seqs:
            raise InputError(f"no sequences with transforms.json and processed_data under {root}")
        self.sampler, self.n_views, self.seed, self.resolution = sampler, n_views, seed, resolution
        self.n_shape, self.n_expression = n_shape, n_expression
        if sampler == "video":
            self.groups: list[list[tuple[SequenceDir, int]]] = [[(s, f) for f in s.frames] for s in seqs]
        else:
            by_time: dict[tuple[str, str, int], list[tuple[SequenceDir, int]]] = {}
            for s in seqs:
                for f in s.frames:
                    by_time.setdefault((s.person, s.sequence, f), []).append((s, f))
            self.groups = [v for _, v in sorted(by_time.items(), key=lambda kv: kv[0]) if len(v) >= 2]
            if not self.groups:
                raise InputError(f"no frame under {root} is seen by two or more cameras; use sampler 'video'")

    @property
    def persons(self) -> list[str]:
        return sorted({g[0][0].person for g in self.groups})

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> HeadSample:
        group = self.groups[index]
        rng = np.random.default_rng([self.seed, index])
        take = np.sort(rng.choice(len(group), size=min(self.n_views, len(group)), replace=False))
        return load_views([group[i] for i in take], resolution=self.resolution, n_shape=self.n_shape,
                          n_expression=self.n_expression, sampler=self.sampler)
