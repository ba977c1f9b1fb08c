"""Per-session refinement: optimise a session avatar against its own tracked frames.

The feed-forward model gives a fast first avatar; the refiner then fits its Gaussians to the session's frames
with the paper's photometric losses (L1 + SSIM, LPIPS when its backbone is available locally) while regularisers
keep every Gaussian near its anchor, so the avatar stays animatable by FLAME. Optimisation state survives
between calls, so the daemon can run short bursts between windows (`RefineSession.step(seconds=...)`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.gaussians import GaussianSet
from engine.losses import OFFSET_MARGIN, psnr, ssim_loss
from engine.render import render
from engine.types import Cameras, FlameParams


@dataclass
class RefineFrames:
    """N tracked frames at the working resolution.

    images: (N,H,W,3) float in [0,1]; masks: optional (N,H,W,1) weights (1 inside the head region);
    cameras: N cameras of size W x H; params: FLAME parameters of each frame (batch N);
    background: (3,) colour the renders are composited on.
    mattes: optional (N,H,W,1) head mattes in [0,1] from the tracker; with them the images are the heads
      composited on `background` like the renders, so whole images are compared (the silhouette included)
      and the render's alpha is fitted to the matte.
    """

    images: torch.Tensor
    cameras: Cameras
    params: FlameParams
    masks: torch.Tensor | None = None
    background: torch.Tensor = field(default_factory=lambda: torch.ones(3))
    mattes: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str) -> "RefineFrames":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return RefineFrames(self.images.to(device), self.cameras.to(device), self.params.to(device),
                            move(self.masks), self.background.to(device), move(self.mattes))


@dataclass
class RefineConfig:
    """Learning rates (Adam) and regulariser weights. Positions are in metres. The learning rates are twice
    those of the first release: a time budget buys few steps on a CPU, and larger steps made held-out frames
    more like the person (benchmarks/RESULTS.md, refiner ablation).

    weight_silhouette: |render alpha - matte| when the frames carry mattes. weight_symmetry: pulls the colour of
    an anchor no frame saw squarely towards the colour of its mirror anchor (across the head's left-right
    plane) when that one was seen better: a prior for the side of the head the camera never showed.
    max_gaussians: the refiner works on at most this many of the avatar's Gaussians, the best-ranked ones (the
    fuser's pruning order); fewer Gaussians make each step cheaper, so more steps fit a time budget (None: all).
    """

    batch_frames: int = 2
    lr_offset: float = 4e-4
    lr_rotation: float = 4e-3
    lr_log_scale: float = 1e-2
    lr_opacity: float = 1e-1
    lr_color: float = 4e-2
    weight_l1: float = 0.8
    weight_ssim: float = 0.2
    weight_offset: float = 10.0
    offset_margin: float = OFFSET_MARGIN / 4
    max_scale: float = 0.01
    weight_scale: float = 10.0
    weight_silhouette: float = 0.3
    weight_symmetry: float = 0.0
    max_gaussians: int | None = None
    backend: str = "auto"
    seed: int = 0


class RefineSession:
    """Holds one avatar's trainable parameters and optimiser between refinement bursts."""

    def __init__(self, gaussians: GaussianSet, prompts, head, config: RefineConfig | None = None) -> None:
        self.config = config or RefineConfig()
        self.prompts, self.head = prompts, head
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.steps = 0
        self.last_loss = float("nan")
        self._mirror = mirror_anchors(prompts.v_template) if self.config.weight_symmetry > 0 else None
        self._reset(gaussians)

    def _reset(self, gaussians: GaussianSet) -> None:
        g = gaussians.detach()
        if self.config.max_gaussians is not None and len(g) > self.config.max_gaussians:
            g = g.prune(float("-inf"), self.config.max_gaussians)
        eps = 1e-4
        self._fixed = {"anchor": g.anchor, "importance": g.importance, "frame": g.frame, "uid": g.uid,
                       "seen": g.seen}
        self.params = {
            "offset": g.offset.clone().requires_grad_(True),
            "rotation": g.rotation.clone().requires_grad_(True),
            "log_scale": g.log_scale.clone().requires_grad_(True),
            "opacity_logit": g.opacity_logit.clone().requires_grad_(True),
            "color_logit": torch.logit(g.color.clamp(eps, 1 - eps)).requires_grad_(True),
        }
        c = self.config
        self.optimizer = torch.optim.Adam([
            {"params": [self.params["offset"]], "lr": c.lr_offset},
            {"params": [self.params["rotation"]], "lr": c.lr_rotation},
            {"params": [self.params["log_scale"]], "lr": c.lr_log_scale},
            {"params": [self.params["opacity_logit"]], "lr": c.lr_opacity},
            {"params": [self.params["color_logit"]], "lr": c.lr_color},
        ], eps=1e-15)

    def gaussians(self, detach: bool = True) -> GaussianSet:
        p = self.params
        g = GaussianSet(anchor=self._fixed["anchor"], offset=p["offset"],
                        rotation=torch.nn.functional.normalize(p["rotation"], dim=-1), log_scale=p["log_scale"],
                        opacity_logit=p["opacity_logit"], color=torch.sigmoid(p["color_logit"]),
                        importance=self._fixed["importance"], frame=self._fixed["frame"], uid=self._fixed["uid"],
                        seen=self._fixed["seen"])
        return g.detach() if detach else g

    def render_frames(self, frames: RefineFrames, index: torch.Tensor, gaussians: GaussianSet | None = None,
                      background: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        g = self.gaussians(detach=False) if gaussians is None else gaussians
        world = g.to_world(self.prompts, self.head, frames.params.index(index))
        cams = frames.cameras.index(index)
        return render(world["means"], world["quats"], world["scales"], world["opacities"], world["colors"],
                      cams.viewmats, cams.Ks, cams.width, cams.height, backend=self.config.backend,
                      background=frames.background if background is None else background)

    def loss(self, frames: RefineFrames, index: torch.Tensor) -> torch.Tensor:
        c = self.config
        if frames.mattes is None:
            out = self.render_frames(frames, index)
            target = frames.images[index]
        else:
            # the matted head on a new random background each step, the render on the same one: only a
            # transparent avatar off the matte matches them all (on one fixed background, Gaussians painted in
            # its colour would match it too, and show as a white bib on any other)
            background = torch.rand(3, generator=self.generator)
            matte = frames.mattes[index]
            out = self.render_frames(frames, index, background=background)
            target = frames.images[index] + (1 - matte) * (background - frames.background)
        pred = out["rgb"]
        loss = torch.zeros(())
        if frames.mattes is not None:
            loss = c.weight_silhouette * (out["alpha"] - frames.mattes[index]).abs().mean()
        elif frames.masks is not None:
            m = frames.masks[index]
            bg = frames.background.view(1, 1, 1, 3)
            pred, target = pred * m + bg * (1 - m), target * m + bg * (1 - m)
        loss = loss + c.weight_l1 * (pred - target).abs().mean() + c.weight_ssim * ssim_loss(pred, target)
        if self._mirror is not None and self._fixed["seen"] is not None:
            loss = loss + c.weight_symmetry * self._symmetry_loss()
        offset_excess = (self.params["offset"].norm(dim=-1) - c.offset_margin).clamp_min(0)
        scale_excess = (self.params["log_scale"].exp() - c.max_scale).clamp_min(0)
        return loss + c.weight_offset * offset_excess.mean() + c.weight_scale * scale_excess.mean()

    def _symmetry_loss(self) -> torch.Tensor:
        """Colour of each Gaussian vs the (fixed) mean colour of its mirror anchor, weighted by how much better
        the mirror anchor was seen than its own."""
        anchor, seen = self._fixed["anchor"], self._fixed["seen"]
        color = torch.sigmoid(self.params["color_logit"])
        n = self._mirror.numel()
        best_seen = torch.zeros(n).scatter_reduce(0, anchor, seen, reduce="amax")
        totals = torch.zeros(n, 3).index_add(0, anchor, color.detach())
        counts = torch.zeros(n).index_add(0, anchor, torch.ones_like(seen)).clamp_min(1)
        mean = totals / counts[:, None]
        mirror = self._mirror[anchor]
        weight = (best_seen[mirror] - best_seen[anchor]).clamp_min(0)
        return (weight[:, None] * (color - mean[mirror]).abs()).mean()

    def step(self, frames: RefineFrames, *, iterations: int | None = None, seconds: float | None = None,
             stop: Callable[[], bool] | None = None) -> dict[str, float]:
        """Run optimisation steps until `iterations` are done, `seconds` have passed or `stop()` is true
        (checked after every step; at least one step runs)."""
        if iterations is None and seconds is None:
            raise ValueError("refine: give an iteration count or a time budget")
        if len(frames) == 0:
            raise ValueError("refine: no frames to refine against")
        start = time.perf_counter()
        done = 0
        while True:
            index = torch.randperm(len(frames), generator=self.generator)[: self.config.batch_frames]
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss(frames, index)
            loss.backward()
            self.optimizer.step()
            done += 1
            self.steps += 1
            self.last_loss = float(loss.detach())
            if iterations is not None and done >= iterations:
                break
            if seconds is not None and time.perf_counter() - start >= seconds:
                break
            if stop is not None and stop():
                break
        return {"iterations": done, "seconds": time.perf_counter() - start, "loss": self.last_loss,
                "total_steps": self.steps}

    @torch.no_grad()
    def evaluate(self, frames: RefineFrames) -> dict[str, float]:
        """Mean PSNR (inside the masks when given) over all frames."""
        values = []
        for i in range(len(frames)):
            index = torch.tensor([i])
            pred = self.render_frames(frames, index, self.gaussians())["rgb"]
            target = frames.images[index]
            if frames.masks is not None:
                m = frames.masks[index]
                bg = frames.background.view(1, 1, 1, 3)
                pred, target = pred * m + bg * (1 - m), target * m + bg * (1 - m)
            values.append(float(psnr(pred, target).mean()))
        return {"psnr": sum(values) / len(values)}


def mirror_anchors(points: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """(P,) index of the point nearest to each point's mirror image across x = 0 (FLAME's left-right plane)."""
    mirrored = points * torch.tensor([-1.0, 1.0, 1.0], dtype=points.dtype, device=points.device)
    return torch.cat([torch.cdist(mirrored[i:i + chunk], points).argmin(dim=1)
                      for i in range(0, len(points), chunk)])


def refine(gaussians: GaussianSet, frames: RefineFrames, prompts, head, *, iterations: int | None = None,
           seconds: float | None = None, config: RefineConfig | None = None) -> tuple[GaussianSet, dict]:
    """One-shot refinement: returns the refined set and stats (iterations, seconds, final loss)."""
    session = RefineSession(gaussians, prompts, head, config)
    stats = session.step(frames, iterations=iterations, seconds=seconds)
    return session.gaussians(), stats
