"""What a session needs to turn windows of frames into Gaussians: network, head model and point prompts.

The network's point prompts are the subdivided head's points, or a fixed subset of them for the small configs.
The subset is part of a trained model (it decides which anchor each output row belongs to), so checkpoints
store it in their metadata as `point_index`; a fresh model picks it by farthest-point sampling.
"""
from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.errors import InputError
from engine.fusion import POOL_FRAME
from engine.gaussians import GaussianSet
from engine.model.lgrt import LGRT
from engine.reconstruct import Views, forward_batch, network_inputs, slot_sets
from engine.refine import mirror_anchors

log = logging.getLogger(__name__)

DEFAULT_CROP_SCALE = 2.8
#: the official framing (SPEC.md §2): the head box, square, side sqrt(w*h) * 1.65
OFFICIAL_CROP_SCALE = 1.65
#: `--weights official:DIR` names a copy of the authors' release
OFFICIAL_PREFIX = "official:"


def farthest_point_indices(points: torch.Tensor, n: int, start: int = 0) -> torch.Tensor:
    """(n,) indices of a farthest-point sample of (P,3) points, deterministic from `start`; all if n >= P."""
    p = points.shape[0]
    if n >= p:
        return torch.arange(p)
    pts = points.double()
    chosen = torch.empty(n, dtype=torch.long)
    dist = torch.full((p,), float("inf"), dtype=torch.float64)
    current = start
    for i in range(n):
        chosen[i] = current
        dist = torch.minimum(dist, ((pts - pts[current]) ** 2).sum(-1))
        current = int(torch.argmax(dist))
    return torch.sort(chosen).values


@dataclass
class AvatarModel:
    """The LGRT network with its head model and the point prompts it was trained on.

    prompts: the subset of point prompts the network sees (anchor ids of its Gaussians index into it).
    """

    network: LGRT
    head: object
    prompts: object
    point_index: torch.Tensor
    metadata: dict = field(default_factory=dict)
    tracking_head: object = None

    @property
    def landmark_head(self):
        """The HeadModel the tracker fits: the user's FLAME 2023 for official weights, else `head`."""
        return self.head if self.tracking_head is None else self.tracking_head

    @property
    def framing(self) -> str:
        """What the crop box is measured on: "landmarks" (the 68-landmark box, our models) or "head" (the tracked
        head's whole box above the chin, as the official pipeline's head detector gives it)."""
        return str(self.metadata.get("framing", "landmarks"))

    @property
    def expects_matted(self) -> bool:
        """The network was trained on heads matted on white (the official one was)."""
        return bool(self.metadata.get("expects_matted", False))

    @property
    def default_fusion(self) -> str:
        """How this model's per-frame Gaussians combine unless told otherwise: the official network's own rule
        (plain concatenation + importance pruning) for official weights, visibility weighting for ours."""
        return str(self.metadata.get("fusion", "visibility"))

    @property
    def default_surface(self) -> bool:
        """Whether sessions paint a surface layer (`engine.surface`) unless told otherwise: on for our models (a
        small network trained on synthetic heads is blurry on real faces), off for the official weights, which
        keep the released behaviour."""
        return bool(self.metadata.get("surface", self.default_fusion == "visibility"))

    @functools.cached_property
    def mirror_points(self) -> torch.Tensor:
        """(P,) each point prompt's mirror point across FLAME's left-right plane (computed once: for the official
        network's 21,675 points it takes seconds on a CPU)."""
        return mirror_anchors(self.prompts.v_template)

    @property
    def input_size(self) -> int:
        return self.network.cfg.image_size

    @property
    def crop_scale(self) -> float:
        """Side of the square input crop as a multiple of the 68-landmark box (sqrt of its area).

        The framing a model was trained with is part of its input convention: our synthetic training views have
        a median of 2.8 (10th-90th percentile 2.6-3.1, measured on engine.train.synthetic samples), which is the default;
        a checkpoint may record its own as `crop_scale`.
        """
        return float(self.metadata.get("crop_scale", DEFAULT_CROP_SCALE))

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @classmethod
    def create(cls, network: LGRT, head=None, point_index: torch.Tensor | list[int] | None = None,
               metadata: dict | None = None) -> "AvatarModel":
        from engine.head import load_head
        from engine.prompts import build_point_prompts

        head = load_head() if head is None else head
        full = build_point_prompts(head)
        if point_index is None:
            point_index = farthest_point_indices(full.v_template, network.cfg.n_points)
        point_index = torch.as_tensor(point_index, dtype=torch.long)
        if point_index.numel() and int(point_index.max()) >= full.v_template.shape[0]:
            raise InputError(f"the checkpoint's point prompts index {int(point_index.max())} but the head model has "
                             f"{full.v_template.shape[0]} points: it was trained with another head model")
        return cls(network.eval(), head, full.subset(point_index), point_index, dict(metadata or {}))

    @classmethod
    def load(cls, weights: str | Path | None = None, *, device: str | torch.device = "cpu",
             head=None) -> "AvatarModel":
        """Our checkpoint directory (the shipped default when None)."""
        from engine.checkpoints import default_checkpoint_dir, load_checkpoint

        directory = Path(weights) if weights is not None else default_checkpoint_dir()
        if weights is None and not any(directory.glob("*.safetensors")):
            raise InputError(f"the default checkpoint is missing from {directory}; reinstall the package or "
                             "pass --weights DIR")
        network, metadata = load_checkpoint(directory, device=device)
        log.info("loaded %s model from %s", network.cfg.name, directory)
        return cls.create(network, head, metadata.get("point_index"), metadata)

    @classmethod
    def from_official(cls, weights_path: str | Path, dinov2_path: str | Path | None = None,
                      flame_path: str | Path | None = None, oral_mesh_path: str | Path | None = None, *,
                      head=None, config="official", device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, n_points: int | None = None) -> "AvatarModel":
        """The official FastAvatar v2 network with its own 21,675 query points (SPEC.md §5).

        Geometry from the weights file, else rebuilt from `flame_path` + `oral_mesh_path` (see `load_official`).
        `n_points` keeps a farthest-point subset of the points (small test networks; None: all of them).
        Animation uses the non-subdivided official buffers (`OfficialRig`, SPEC.md §8) unless `head` is given;
        pass `engine.load_head(flame2023.pkl, landmarks)` as `head` where landmark tracking is needed too.
        """
        from engine.checkpoints import load_official
        from engine.official_geometry import OfficialRig
        from engine.prompts import PointPrompts

        loaded = load_official(weights_path, dinov2_path=dinov2_path, config=config, dtype=dtype, device=device,
                               flame_path=flame_path, oral_mesh_path=oral_mesh_path)
        prompts = PointPrompts.from_official_geometry(loaded.geometry)
        rig = OfficialRig.from_geometry(loaded.geometry) if head is None else head
        # all 21,675 points, or a fixed farthest-point subset of `n_points` for a small test network
        point_index = farthest_point_indices(prompts.v_template, len(prompts) if n_points is None else n_points)
        if len(point_index) < len(prompts):
            prompts = prompts.subset(point_index)
        log.info("loaded official weights from %s (geometry: %s, %d points)", weights_path, loaded.geometry_source,
                 len(prompts))
        return cls(loaded.model, rig, prompts, point_index,
                   {"source": "official", "geometry_source": loaded.geometry_source, "crop_scale": OFFICIAL_CROP_SCALE,
                    "framing": "head", "expects_matted": True, "fusion": "concat"})

    @classmethod
    def from_release(cls, root: str | Path, *, device: str | torch.device = "cpu") -> "AvatarModel":
        """The official network from a user's copy of the release (`engine.official_release`), with the user's
        FLAME 2023 as the tracker's head (its 68-landmark embedding from the release). InputError naming every
        missing/unreadable file or mis-shaped tensor when the release is incomplete."""
        from engine.head import load_head
        from engine.official_release import require_complete

        release = require_complete(root)
        config = release.config()
        model = cls.from_official(release.network, release.dinov2, release.flame, release.oral_mesh,
                                  config=config, device=device, n_points=config.n_points)
        # FLAME's MediaPipe embedding, when the release has one, lets the dense-mesh tracker fit the user's FLAME
        model.tracking_head = load_head(release.flame, release.landmarks, mediapipe_path=release.mediapipe_landmarks)
        model.metadata["release"] = str(root)
        log.info("tracking fits %s with the landmarks of %s", release.flame, release.landmarks)
        return model

    @classmethod
    def from_spec(cls, weights: str | Path | None, *, device: str | torch.device = "cpu") -> "AvatarModel":
        """What `--weights` names: None (the embedded default), `official:DIR` (the authors' release), or a folder:
        the release when it holds official-format weights, else our checkpoint."""
        from engine.official_release import is_official_release

        if weights is None:
            return cls.load(None, device=device)
        text = str(weights)
        if text.startswith(OFFICIAL_PREFIX):  # the shell does not expand ~ after the prefix
            return cls.from_release(Path(text[len(OFFICIAL_PREFIX):]).expanduser(), device=device)
        if is_official_release(Path(text)):
            log.info("%s holds the official release's files: loading them as official weights", text)
            return cls.from_release(text, device=device)
        return cls.load(text, device=device)

    def posing_on(self, device: torch.device | str) -> tuple[object, object]:
        """(prompts, head) whose tensors live on `device`, for work there (refinement on the GPU renders with
        gsplat); the model's own stay where they are (publishing poses avatars on the CPU)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.prompts, self.head
        head = copy.copy(self.head)
        if hasattr(head, "flame"):  # a HeadModel: its smplx module's buffers
            head.flame = copy.deepcopy(self.head.flame).to(device)
        else:                       # the official rig: plain tensors
            for name, value in vars(self.head).items():
                if isinstance(value, torch.Tensor):
                    setattr(head, name, value.to(device))
        return self.prompts.to(device), head

    def canonical_points(self, shape: torch.Tensor | None) -> torch.Tensor:
        """(P,3) canonical prompt positions for identity `shape` (S',) (zero-padded/truncated to the head's)."""
        n_shape = self.prompts.shapedirs.shape[-1]
        beta = torch.zeros(1, n_shape)
        if shape is not None:
            shape = torch.as_tensor(shape, dtype=torch.float32).reshape(-1)[:n_shape]
            beta[0, : shape.numel()] = shape
        return self.prompts.canonical(beta)[0]

    @torch.inference_mode()
    def window_gaussians(self, views: Views, frame_ids: list[int], shape: torch.Tensor | None = None,
                         pool: torch.Tensor | None = None, fusion: str = "visibility") -> list[GaussianSet]:
        """One window -> one GaussianSet per base frame (tagged with its frame id) + the FramePack slot (POOL_FRAME).

        views: N <= 16 base views (engine.reconstruct.Views: crops in [0,1], crop cameras, FLAME rows); pool
        (F,3,S,S) or None. fusion "visibility": every set carries `seen` (engine.fusion.view_weights; the FramePack
        slot UNSEEN), so the fused avatar weighs each anchor's copies by how squarely their frames saw it;
        "concat": no weights.
        """
        return self.windows_gaussians([WindowRequest(views, list(frame_ids), shape, pool, fusion)])[0]

    @torch.inference_mode()
    def windows_gaussians(self, windows: list["WindowRequest"]) -> list[list[GaussianSet]]:
        """Several windows (of different sessions) -> each one's `window_gaussians` result. Windows with the same
        `WindowRequest.batch_key` go through the network in one batched forward, in the order given (oldest
        first); each result equals its window's own run up to floating-point summation order."""
        for w in windows:
            if len(w.views) != len(w.frame_ids):
                raise ValueError(f"{len(w.views)} views but {len(w.frame_ids)} frame ids")
        groups: dict[tuple, list[int]] = {}
        for i, w in enumerate(windows):
            groups.setdefault(w.batch_key(), []).append(i)
        results: list[list[GaussianSet]] = [[] for _ in windows]
        for members in groups.values():
            batch = [windows[i] for i in members]
            inputs = [network_inputs(self.network.cfg, self.prompts, self.head, w.views, w.fusion) for w in batch]
            images = torch.stack([w.views.images for w in batch])
            points = torch.stack([self.canonical_points(w.shape) for w in batch])
            pool = torch.stack([w.pool for w in batch]) if batch[0].pool is not None else None
            output = forward_batch(self.network, images, points, inputs, pool)
            slots = list(range(output.n_slots))
            for b, (i, w, net_inputs) in enumerate(zip(members, batch, inputs)):
                frames = list(w.frame_ids[: len(slots) - 1]) + [POOL_FRAME]
                sets = slot_sets(output, slots, frames, net_inputs.seen, batch_index=b)
                results[i] = [s.to("cpu") for s in sets]
        return results


@dataclass
class WindowRequest:
    """One window for `AvatarModel.windows_gaussians` (see `window_gaussians` for the fields)."""

    views: Views
    frame_ids: list[int]
    shape: torch.Tensor | None = None
    pool: torch.Tensor | None = None
    fusion: str = "visibility"

    def __post_init__(self) -> None:
        if self.pool is not None and self.pool.shape[0] == 0:
            self.pool = None

    def batch_key(self) -> tuple:
        """Windows with equal keys share one forward: the same number and size of views and of pool frames."""
        return (tuple(self.views.images.shape), 0 if self.pool is None else int(self.pool.shape[0]))
