"""From a window of frames to per-slot Gaussians: model call, slot decoding and pruning rules.

Pruning (SPEC.md §8). The official network samples Logistic(0,1) noise L per Gaussian and either scales
opacity by sigmoid(importance + L) (train mode, "soft"; what the released demo does because it never calls
`.eval()`) or keeps iff importance + L > 0 (eval mode, "stochastic"). A serving daemon must be
deterministic, so our default is **hard: keep iff importance > 0**, i.e. the noise replaced by its median.
"""
from __future__ import annotations

from typing import Literal

import torch

from engine.model.gs_head import GaussianHeadOutput
from engine.model.lgrt import LGRT

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


def decode_slots(output: GaussianHeadOutput, batch_index: int = 0) -> list[dict[str, torch.Tensor]]:
    """Split one batch item of the model output into S per-slot dicts (base frames first, FramePack slot last).

    Each dict: offset (P,3), rotation wxyz (P,4), scale (P,3) linear, opacity (P,), rgb (P,3), importance (P,)
    logit, xyz (P,3) canonical point + offset. Ready for `GaussianSet.from_activated(color=d["rgb"], ...)`.
    """
    slots = []
    for s in range(output.n_slots):
        pick = lambda t: t[batch_index, s]  # noqa: E731
        slots.append({
            "offset": pick(output.offset),
            "rotation": pick(output.rotation),
            "scale": pick(output.scale),
            "opacity": pick(output.opacity)[:, 0],
            "rgb": pick(output.rgb),
            "importance": pick(output.importance)[:, 0],
            "xyz": pick(output.xyz),
        })
    return slots


@torch.inference_mode()
def reconstruct(model: LGRT, frames: torch.Tensor, points: torch.Tensor, pool: torch.Tensor | None = None,
                guidance: dict[str, torch.Tensor] | None = None,
                point_features: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
    """Per-slot Gaussians for one window (batch of one).

    frames: (N,3,H,W) RGB in [0,1], N >= 1 (unordered; frames 16.. are pooled); points: (P,3) canonical
    prompts; pool: (F,3,H,W) extra frames for FramePack or None; guidance: per-frame tensors with a leading N;
    point_features: (N,P,F) projected point features (models with point guidance; engine.prompt_views).
    Returns min(N,16)+1 slot dicts (see `decode_slots`), on the model's device, float32.
    """
    device = next(model.parameters()).device
    frames = frames.to(device)[None]
    pool_b = None if pool is None or pool.shape[0] == 0 else pool.to(device)[None]
    guid = None if guidance is None else {k: v.to(device)[None] for k, v in guidance.items()}
    feats = None if point_features is None else point_features.to(device)[None]
    output = model(frames, points.to(device), pool_images=pool_b, guidance=guid, point_features=feats)
    return decode_slots(output)
