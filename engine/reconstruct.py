"""One path between views of a head and the LGRT: the network's inputs from images, cameras and FLAME fits, the
network call, per-slot GaussianSets from its outputs, and the pruning rules.

The daemon (`AvatarModel.window_gaussians`), the trainer, validation and the benchmarks all go through
`network_inputs` -> `forward` -> `slot_sets`, so a change to what the network takes is made once.

Pruning (SPEC.md §8). The official network samples Logistic(0,1) noise L per Gaussian and either scales
opacity by sigmoid(importance + L) (train mode, "soft"; what the released demo does because it never calls
`.eval()`) or keeps iff importance + L > 0 (eval mode, "stochastic"). A serving daemon must be
deterministic, so our default is **hard: keep iff importance > 0**, i.e. the noise replaced by its median.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from engine.fusion import check_fusion, slot_view_weights
from engine.gaussians import GaussianSet
from engine.model.config import ModelConfig
from engine.model.gs_head import GaussianHeadOutput
from engine.model.lgrt import LGRT
from engine.prompt_views import point_features
from engine.types import Cameras, FlameParams

PruneMode = Literal["hard", "soft", "stochastic"]


def logistic_noise(shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Logistic(0,1) samples exactly as the official code draws them: -log(log(u1+1e-10)/log(u2+1e-10)+1e-10)."""
    u1 = torch.rand(shape, generator=generator, device=device)
    u2 = torch.rand(shape, generator=generator, device=device)
    return -torch.log(torch.log(u1 + 1e-10) / torch.log(u2 + 1e-10) + 1e-10)


def prune_mask(importance_logit: torch.Tensor, mode: PruneMode = "hard",
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Which Gaussians to keep, from their importance logits (any shape).

    hard:       bool, importance > 0 (deterministic; our serving rule)
    stochastic: bool, importance + L > 0 (official eval mode)
    soft:       float weights sigmoid(importance + L) in (0,1) to multiply opacities by (official train mode)
    The noise is drawn on the CPU from `generator` (as the official code uses the CPU RNG), then moved.
    """
    if mode == "hard":
        return importance_logit > 0
    if mode not in ("soft", "stochastic"):
        raise ValueError(f"unknown pruning mode {mode!r}; use 'hard', 'soft' or 'stochastic'")
    noise = logistic_noise(importance_logit.shape, generator).to(importance_logit.device)
    noisy = importance_logit.float() + noise
    return torch.sigmoid(noisy) if mode == "soft" else noisy > 0


@dataclass
class Views:
    """N views of one head, the network's base frames.

    images:  (N,3,S,S) RGB in [0,1]
    cameras: N cameras, intrinsics in pixels of S
    params:  FlameParams with N rows (shape/expression as wide as the point prompts' directions)
    """

    images: torch.Tensor
    cameras: Cameras
    params: FlameParams

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def first(self, n: int) -> "Views":
        return Views(self.images[:n], self.cameras.index(slice(0, n)), self.params.index(slice(0, n)))


@dataclass
class NetworkInputs:
    """What the LGRT takes for N base views besides images, points and the FramePack pool, and how the slots it
    returns are weighed in fusion.

    guidance:       camera (N,4,4), expression (N,E), pose (N,15), or None (network without the guidance token)
    point_features: (N,P,F) projected point features, or None (network without point guidance)
    seen:           (N+1,P) view weights of every slot (FramePack slot last) for visibility fusion, or None
    """

    guidance: dict[str, torch.Tensor] | None
    point_features: torch.Tensor | None
    seen: torch.Tensor | None


def guidance_inputs(views: Views, expression_dim: int) -> dict[str, torch.Tensor]:
    """The guidance token's inputs (paper eq. 2) per view: camera (N,4,4) world-to-camera, expression (N,E) zero-padded
    or truncated to `expression_dim`, pose (N,15) = global, neck, jaw, eyes axis-angles."""
    params = views.params
    expression = params.expression[:, :expression_dim]
    if expression.shape[1] < expression_dim:
        expression = torch.nn.functional.pad(expression, (0, expression_dim - expression.shape[1]))
    pose = torch.cat([params.rotation, params.neck, params.jaw, params.eyes], dim=-1)
    return {"camera": views.cameras.viewmats, "expression": expression, "pose": pose}


def network_inputs(cfg: ModelConfig, prompts, head, views: Views, fusion: str = "visibility") -> NetworkInputs:
    """The inputs `cfg`'s network takes for `views` (only the first cfg.max_base_frames are base frames), and the
    slots' view weights when `fusion` is "visibility" (engine.fusion)."""
    base = views.first(cfg.max_base_frames)
    weighted = check_fusion(fusion) == "visibility"
    features = (point_features(prompts, head, base.params, base.cameras, base.images)
                if cfg.point_guidance or weighted else None)
    return NetworkInputs(
        guidance=guidance_inputs(base, cfg.guidance_expr_dim) if cfg.guidance else None,
        point_features=features if cfg.point_guidance else None,
        seen=slot_view_weights(features, len(base) + 1) if weighted else None)


def forward(network: LGRT, images: torch.Tensor, points: torch.Tensor, inputs: NetworkInputs,
            pool: torch.Tensor | None = None) -> GaussianHeadOutput:
    """The network on one window (batch of one): images (N,3,S,S) in [0,1] (frames 16.. are pooled), points (P,3)
    canonical prompts, pool (F,3,S,S) extra FramePack frames or None. Returns (1,S,P,k) fields, S = min(N,16)+1,
    on the network's device; gradients flow unless the caller disables them."""
    return forward_batch(network, images[None], points[None], [inputs], None if pool is None else pool[None])


def forward_batch(network: LGRT, images: torch.Tensor, points: torch.Tensor, inputs: list[NetworkInputs],
                  pool: torch.Tensor | None = None) -> GaussianHeadOutput:
    """`forward` for B windows of the same shape in one call: images (B,N,3,S,S), points (B,P,3), one
    NetworkInputs per window, pool (B,F,3,S,S) or None. Attention never mixes batch items, so item b equals its own
    `forward` up to floating-point summation order. Returns (B,S,P,k) fields."""
    device = next(network.parameters()).device
    stacked = lambda ts: None if ts[0] is None else torch.stack([t.to(device) for t in ts])  # noqa: E731
    first = inputs[0]
    guidance = (None if first.guidance is None
                else {k: stacked([i.guidance[k] for i in inputs]) for k in first.guidance})
    pool = None if pool is None or pool.shape[1] == 0 else pool.to(device)
    return network(images.to(device), points.to(device), pool_images=pool, guidance=guidance,
                   point_features=stacked([i.point_features for i in inputs]))


def slot_sets(output: GaussianHeadOutput, slots: list[int], frame_ids: list[int],
              seen: torch.Tensor | None = None, batch_index: int = 0) -> list[GaussianSet]:
    """One canonical GaussianSet per chosen slot of batch item `batch_index`, tagged with `frame_ids` (one per slot).

    seen: (S,P) view weights of every slot of `output` (NetworkInputs.seen) for visibility fusion, or None.
    Each set has P Gaussians, anchor i on point prompt i; they stay on the output's device with its gradients.
    """
    if len(slots) != len(frame_ids):
        raise ValueError(f"{len(slots)} slots but {len(frame_ids)} frame ids")
    anchors = torch.arange(output.xyz.shape[2], device=output.xyz.device)
    sets = []
    for slot, frame in zip(slots, frame_ids):
        pick = lambda t: t[batch_index, slot]  # noqa: E731
        sets.append(GaussianSet.from_activated(
            anchor=anchors, offset=pick(output.offset), rotation=pick(output.rotation), scale=pick(output.scale),
            opacity=pick(output.opacity), color=pick(output.rgb), importance=pick(output.importance), frame=frame,
            seen=None if seen is None else seen[slot].to(output.xyz.device)))
    return sets
