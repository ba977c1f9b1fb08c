"""The seam between the daemon and whatever runs the model for it.

The daemon (ingest, tracking, publishing, control) hands an engine the jobs of its sessions; an engine turns them
into avatar versions. Two engines implement `EngineBackend`: the in-process `worker.EngineWorker` (one thread per
device) and `ray_engine.RayEngineWorker` (Ray actors, on this machine or a cluster). Both run the same
`SessionEngine`, so a window gives the same avatar wherever it runs:

- `WindowJob` / `RefineJob`: what the engine needs of one window or refinement burst (numpy data that travels: the
  model-size crops, light tracked frames without their full-resolution image).
- `SessionEngine`: the engine-side state of one session (its fuser, refiner and refinement targets) and the code
  that folds a window or a refinement burst into the next avatar version.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np
import torch

from engine.avatar_model import AvatarModel, WindowRequest
from engine.fusion import AvatarState, FuserState, IncrementalFuser
from engine.gaussians import GaussianSet
from engine.refine import RefineConfig, RefineFrames, RefineSession
from engine.surface import SurfaceConfig, paint, surface_gaussians
from fastavatar_stream.frames import TrackedFrame, Window
from fastavatar_stream.prepare import PreparedFrame
from fastavatar_stream.session import RefineSample, Session, crop_matte, light_frame
from fastavatar_stream.views import refine_frames, tracked_views


class EngineBackend(Protocol):
    """What the daemon asks of an engine worker. It takes windows from the sessions it was given (each session's
    `take_window`/`window_finished`), refines their avatars between windows, and calls the daemon's on_version
    callback with every new version, in order, from its own thread."""

    windows_done: int
    busy_s: float

    def start(self) -> None: ...
    def add_session(self, session: Session) -> None: ...
    def remove_session(self, session_id: str) -> None: ...
    def notify(self) -> None: ...
    def stop(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...


@dataclass
class WindowJob:
    """One window as the engine needs it.

    frames: the window's sparse tracked frames, without their full-resolution image; prepared: their model-size
    crops (same order); pool: crops of the FramePack pool frames; fusion: the session's fusion mode;
    surface: paint the avatar's surface layer with the window's frames (`engine.surface`); mattes: the tracker's
    head mattes cut like the crops (None where it gave none), for the painting.
    """

    session: str
    index: int
    frames: list[TrackedFrame]
    prepared: list[PreparedFrame]
    pool: list[PreparedFrame]
    fusion: str
    surface: bool = False
    mattes: list[np.ndarray | None] = field(default_factory=list)

    @classmethod
    def from_window(cls, session: Session, window: Window) -> "WindowJob":
        prepared = [session.prepared(f) for f in window.frames]
        surface = bool(session.options.surface)
        mattes = [crop_matte(f, p) for f, p in zip(window.frames, prepared)] if surface else []
        return cls(session.id, window.index, [light_frame(f) for f in window.frames], prepared,
                   [session.prepared(f) for f in window.pool], session.options.fusion, surface, mattes)


@dataclass
class RefineJob:
    """One refinement burst: `seconds` of optimisation against the session's kept frames. `key` names the kept
    frames (their indices); `samples` carries them when the engine may not hold that key yet (None: it does).
    restart: a window changed the avatar since the refiner last started from it."""

    session: str
    key: tuple[int, ...]
    samples: list[RefineSample] | None
    seconds: float
    restart: bool


@dataclass
class StageLog:
    """Stage durations recorded where the engine runs, added to the session's StageTimer where it is published."""

    stages: list[tuple[str, float]] = field(default_factory=list)

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages.append((stage, time.perf_counter() - t0))


class SessionEngine:
    """The engine side of one session: see the module docstring."""

    def __init__(self, fuser: IncrementalFuser, refine: RefineConfig | None = None,
                 surface: SurfaceConfig | None = None) -> None:
        self.fuser = fuser
        self.refine_config = refine or RefineConfig()
        self.surface_config = surface or SurfaceConfig()
        self._refiner: RefineSession | None = None
        self._targets: tuple[tuple[int, ...], RefineFrames] | None = None
        self._paint: tuple[list[int], RefineFrames] | None = None  # the window being run, when it paints

    @classmethod
    def resume(cls, state: FuserState | None, budget: int, refine: RefineConfig | None = None) -> "SessionEngine":
        """A fresh engine (state None) or one that goes on from another engine's last version."""
        fuser = IncrementalFuser(budget=budget) if state is None else IncrementalFuser.resume(state, budget)
        return cls(fuser, refine)

    @property
    def targets_key(self) -> tuple[int, ...] | None:
        return self._targets[0] if self._targets is not None else None

    def run_window(self, model: AvatarModel, job: WindowJob, timer) -> AvatarState:
        """Reconstruct one window with the LGRT and fold it into the avatar; `timer.time(stage)` times the stages."""
        request = self.window_request(model, job, timer)
        with timer.time("engine"):
            sets = model.windows_gaussians([request])[0]
        return self.fold(model, sets, request.shape, timer)

    def window_request(self, model: AvatarModel, job: WindowJob, timer) -> WindowRequest:
        """The network's view of one window (`AvatarModel.windows_gaussians` may batch it with other sessions');
        a painting window also leaves its painting frames for `fold`."""
        with timer.time("prepare_window"):
            views = tracked_views(job.frames, job.prepared, model)
            pool = torch.stack([torch.from_numpy(p.image) for p in job.pool]) if job.pool else None
            shape = torch.from_numpy(np.asarray(job.frames[-1].flame.shape, np.float32))
            self._paint = self._paint_frames(model, job) if job.surface else None
        return WindowRequest(views, [f.index for f in job.frames], shape, pool, job.fusion)

    def _paint_frames(self, model: AvatarModel, job: WindowJob) -> tuple[list[int], RefineFrames]:
        """At most `fit_frames` of the window's frames, evenly spaced, as painting targets (the refiner's kind)."""
        n = len(job.frames)
        picked = sorted(set(np.linspace(0, n - 1, min(n, self.surface_config.fit_frames)).round().astype(int)))
        mattes = job.mattes or [None] * n
        samples = [RefineSample(job.frames[i].index, job.frames[i], job.prepared[i], mattes[i]) for i in picked]
        return [s.index for s in samples], refine_frames(samples, model)

    def fold(self, model: AvatarModel, sets, shape: torch.Tensor, timer) -> AvatarState:
        """Fold one window's per-slot GaussianSets into the avatar: the next version. With a surface layer the
        window's frames paint the layer (made on the first window) and the network's Gaussians only seed the
        colours of what no frame has shown yet."""
        if self._paint is None:
            with timer.time("fuse"):
                return self.fuser.add_window(sets, shape)
        frame_ids, frames = self._paint
        self._paint = None
        device = model.device
        prompts, head = model.posing_on(device)
        with timer.time("paint"):
            layer = self.fuser.avatar if len(self.fuser.avatar) else surface_gaussians(prompts, self.surface_config,
                                                                                       self.fuser.budget)
            painted, stats = paint(layer.to(device), GaussianSet.fuse(sets).to(device), frames.to(device), frame_ids,
                                   prompts, head, model.mirror_points.to(device), self.surface_config)
        return self.fuser.replace(painted.to("cpu"), {"surface": stats}, shape=shape)

    def refine(self, model: AvatarModel, job: RefineJob, timer,
               stop: Callable[[], bool] | None = None) -> AvatarState:
        """Optimise the avatar against the session's kept frames for about `job.seconds` (ending early when `stop()`
        turns true) and install the result as the next version (the refiner's stats in its `stats`)."""
        device = model.device  # refinement runs where the model runs (gsplat on CUDA); the avatar stays on the CPU
        if job.samples is not None and job.key != self.targets_key:
            with timer.time("refine_setup"):
                self._targets = (job.key, refine_frames(job.samples, model).to(device))
        if self._targets is None or self._targets[0] != job.key:
            raise RuntimeError(f"session {job.session}: the refinement frames {job.key} were never sent here")
        with torch.enable_grad():
            if job.restart or self._refiner is None:
                prompts, head = model.posing_on(device)
                self._refiner = RefineSession(self.fuser.avatar.to(device), prompts, head, self.refine_config)
            with timer.time("refine"):
                stats = self._refiner.step(self._targets[1], seconds=job.seconds, stop=stop)
        return self.fuser.replace(self._refiner.gaussians().to("cpu"), {"refine": stats})


def refine_job(session: Session, seconds: float, known_key: tuple[int, ...] | None) -> RefineJob:
    """The next refinement burst of `session`; its kept frames travel only when the engine holds another key."""
    with session.lock:
        samples = list(session.refine_pool)
    key = tuple(s.index for s in samples)
    return RefineJob(session.id, key, None if key == known_key else samples, seconds, session.take_refine_restart())
