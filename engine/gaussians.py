"""Canonical, FLAME-anchored Gaussian sets: fusion, pruning, animation to world space.

A Gaussian is attached to one point prompt (an anchor vertex of the subdivided head). Its canonical position is
the anchor's canonical position (identity shape applied) plus an offset; animation moves it with the anchor's
expression displacement and linear blend skinning, and (by default) turns its rotation with the anchor's
blended joint rotation. The official release moves positions only (`rotate=False` reproduces that).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from engine.types import FlameParams

if TYPE_CHECKING:  # imported for annotations only: engine.head/prompts import torch-heavy smplx
    from engine.head import HeadModel
    from engine.prompts import PointPrompts

MIN_SCALE = 1e-9
#: a copy of an anchor is pruned once another frame saw that anchor at least twice as well (relative `seen` < 0.5):
#: such a copy adds little and its removal bounds the avatar near one well-seen copy per anchor
#: (the kept fraction and its effect on quality: benchmarks/RESULTS.md)
PRUNE_RELATIVE_SEEN = 0.5


@dataclass
class GaussianSet:
    """M canonical Gaussians.

    anchor:        (M,)   long, index of the point prompt each Gaussian hangs on
    offset:        (M, 3) canonical offset from the anchor, metres
    rotation:      (M, 4) unit quaternion wxyz in the anchor's local frame
    log_scale:     (M, 3) log of the per-axis standard deviation, metres
    opacity_logit: (M,)   logit of opacity
    color:         (M, 3) RGB in [0, 1]
    importance:    (M,)   pruning logit (keep when > 0 under the hard rule)
    frame:         (M,)   long, id of the source frame that produced the Gaussian (-1: FramePack slot)
    uid:           (M,)   long stable identity handed out by the session's fuser (None until fused); it keeps a
                   Gaussian's slot in published avatars across versions
    seen:          (M,)   how squarely the source frame saw the anchor, in (0, 1] (`engine.fusion.view_weights`), or
                   None. With it the set is a visibility-weighted fusion: the copies of one anchor share that
                   anchor's coverage in proportion to `seen` (`fusion_share`): a copy of opacity o shows
                   1 - (1 - o) ** share, so k copies of opacity o together cover what one copy covers, and the
                   frames that saw a region best decide how it looks (a set of one frame is unchanged)
    """

    anchor: torch.Tensor
    offset: torch.Tensor
    rotation: torch.Tensor
    log_scale: torch.Tensor
    opacity_logit: torch.Tensor
    color: torch.Tensor
    importance: torch.Tensor
    frame: torch.Tensor
    uid: torch.Tensor | None = None
    seen: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.anchor.shape[0])

    @property
    def device(self) -> torch.device:
        return self.offset.device

    @classmethod
    def empty(cls, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "GaussianSet":
        f = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        i = lambda: torch.zeros(0, dtype=torch.long, device=device)  # noqa: E731
        return cls(i(), f(0, 3), f(0, 4), f(0, 3), f(0), f(0, 3), f(0), i(), i(), f(0))

    @classmethod
    def from_activated(cls, *, anchor: torch.Tensor, offset: torch.Tensor, rotation: torch.Tensor,
                       scale: torch.Tensor, opacity: torch.Tensor, color: torch.Tensor,
                       importance: torch.Tensor, frame: int | torch.Tensor,
                       seen: torch.Tensor | None = None) -> "GaussianSet":
        """Wrap a Gaussian head's activated outputs (linear scales, opacities in [0,1]); `seen` (M,) optional."""
        m = anchor.shape[0]
        frame_t = frame if torch.is_tensor(frame) else torch.full((m,), int(frame), dtype=torch.long,
                                                                 device=anchor.device)
        eps = torch.finfo(opacity.dtype).eps
        opacity = opacity.reshape(m).clamp(eps, 1 - eps)
        return cls(anchor=anchor.long(), offset=offset, rotation=torch.nn.functional.normalize(rotation, dim=-1),
                   log_scale=scale.clamp_min(MIN_SCALE).log(), opacity_logit=torch.logit(opacity),
                   color=color.reshape(m, 3), importance=importance.reshape(m), frame=frame_t.long(),
                   seen=None if seen is None else seen.reshape(m).to(opacity.dtype))

    # -- set operations -------------------------------------------------------------------------------------
    def _map(self, fn) -> "GaussianSet":
        return GaussianSet(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                              for f in fields(self)})

    def select(self, index: torch.Tensor) -> "GaussianSet":
        """Subset by boolean mask or integer index (M',)."""
        return self._map(lambda t: t[index])

    @staticmethod
    def fuse(sets: Sequence["GaussianSet"]) -> "GaussianSet":
        """Concatenate (paper eq. 3). Order is preserved: set 0's Gaussians first."""
        if not sets:
            return GaussianSet.empty()
        out = {}
        for f in fields(GaussianSet):
            parts = [getattr(s, f.name) for s in sets]
            out[f.name] = None if any(p is None for p in parts) else torch.cat(parts)
        return GaussianSet(**out)

    def keep_logit(self) -> torch.Tensor:
        """(M,) the logit pruning ranks by: the importance, capped by log(relative_seen / PRUNE_RELATIVE_SEEN) when
        the set carries `seen` (a copy of an anchor that another frame saw at least twice as well adds little and
        goes; among the rest, the worst-seen copies go first when a budget bites)."""
        if self.seen is None:
            return self.importance
        by_view = torch.log(self.relative_seen().clamp_min(1e-12) / PRUNE_RELATIVE_SEEN)
        return torch.minimum(self.importance, by_view)

    def prune(self, threshold: float = 0.0, budget: int | None = None) -> "GaussianSet":
        """Keep Gaussians with `keep_logit` > threshold, then at most `budget` of them by that logit.

        Deterministic: ties are broken by position in the set (earlier wins), and the kept Gaussians keep their
        relative order. Without `seen` the logit is the importance itself.
        """
        logit = self.keep_logit()
        keep = torch.nonzero(logit > threshold).squeeze(1)
        if budget is not None and keep.numel() > budget:
            order = torch.argsort(logit[keep], descending=True, stable=True)[:budget]
            keep = torch.sort(keep[order]).values
        return self.select(keep)

    def detach(self) -> "GaussianSet":
        return self._map(torch.Tensor.detach)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "GaussianSet":
        """Move to a device; `dtype` applies to the floating-point fields only."""
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def clone(self) -> "GaussianSet":
        return self._map(torch.Tensor.clone)

    # -- activated views --------------------------------------------------------------------------------------
    @property
    def scales(self) -> torch.Tensor:
        return self.log_scale.exp()

    def _per_anchor(self, reduce: str) -> torch.Tensor:
        """`seen` reduced ("sum" or "amax") over the Gaussians of each one's anchor, (M,)."""
        n_anchors = int(self.anchor.max()) + 1
        out = torch.zeros(n_anchors, dtype=self.seen.dtype, device=self.seen.device)
        out = out.scatter_reduce(0, self.anchor, self.seen, reduce=reduce, include_self=True)
        return out[self.anchor].clamp_min(torch.finfo(self.seen.dtype).tiny)

    def fusion_share(self) -> torch.Tensor:
        """(M,) in (0, 1]: `seen` over the sum of `seen` of the Gaussians of the same anchor (ones without seen)."""
        if self.seen is None or len(self) == 0:
            return torch.ones_like(self.opacity_logit)
        return self.seen / self._per_anchor("sum")

    def relative_seen(self) -> torch.Tensor:
        """(M,) in (0, 1]: `seen` over the largest `seen` among the Gaussians of the same anchor (ones without seen)."""
        if self.seen is None or len(self) == 0:
            return torch.ones_like(self.opacity_logit)
        return self.seen / self._per_anchor("amax")

    @property
    def opacities(self) -> torch.Tensor:
        """Activated opacities; with `seen`, 1 - (1 - opacity) ** fusion_share (see the class docstring)."""
        if self.seen is None:
            return torch.sigmoid(self.opacity_logit)
        # log(1 - sigmoid(x)) = -softplus(x), stable for opacities near 1
        return -torch.expm1(-self.fusion_share() * torch.nn.functional.softplus(self.opacity_logit))

    # -- animation ------------------------------------------------------------------------------------------
    def to_world(self, prompts: "PointPrompts", head: "HeadModel", params: FlameParams,
                 rotate: bool = True) -> dict[str, torch.Tensor]:
        """Pose the Gaussians for B sets of FLAME parameters.

        Returns means (B,M,3), quats (B,M,4) wxyz, scales (B,M,3), opacities (B,M), colors (B,M,3): the
        arguments `engine.render` takes with a leading camera axis.
        """
        b = params.batch_size
        canonical = prompts.canonical(params.shape)                      # (B,P,3)
        displaced = canonical + prompts.expression_offsets(params.expression)
        local = displaced[:, self.anchor] + self.offset.unsqueeze(0)     # (B,M,3)
        transforms = head.joint_transforms(params).to(local.dtype)       # (B,J,4,4)
        weights = prompts.lbs_weights[self.anchor].to(local.dtype)       # (M,J)
        rot, trans = transforms[..., :3, :3], transforms[..., :3, 3]
        per_joint = torch.einsum("bjik,bmk->bjmi", rot, local) + trans.unsqueeze(2)  # (B,J,M,3)
        means = torch.einsum("mj,bjmi->bmi", weights, per_joint) + params.translation.unsqueeze(1).to(local.dtype)
        quats = self.rotation.unsqueeze(0).expand(b, -1, -1)
        if rotate:
            joint_q = matrix_to_quaternion(rot)                            # (B,J,4)
            sign = torch.where((joint_q * joint_q[:, :1]).sum(-1, keepdim=True) < 0, -1.0, 1.0)
            blended = torch.einsum("mj,bjq->bmq", weights, joint_q * sign)
            quats = quaternion_multiply(torch.nn.functional.normalize(blended, dim=-1), quats)
        m = len(self)
        return {
            "means": means,
            "quats": quats,
            "scales": self.scales.unsqueeze(0).expand(b, m, 3),
            "opacities": self.opacities.unsqueeze(0).expand(b, m),
            "colors": self.color.unsqueeze(0).expand(b, m, 3),
        }

    def to_arrays(self, prompts: "PointPrompts", head: "HeadModel", params: FlameParams | None = None,
                  shape: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """World-space arrays for publishing/PLY at one pose (neutral pose with `shape` when params is None).

        Keys: means (M,3), quats (M,4), scales (M,3), opacities (M,), colors (M,3), all float32.
        """
        if params is None:
            n_shape = prompts.shapedirs.shape[-1]
            params = FlameParams.zeros(1, n_shape, prompts.exprdirs.shape[-1], device=self.device)
            if shape is not None:
                params.shape = shape.reshape(1, -1)[:, :n_shape].to(params.shape)
        with torch.no_grad():
            world = self.to_world(prompts, head, params.index(0))
        return {k: v[0].detach().cpu().float().numpy().copy() for k, v in world.items()}


def quaternion_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product of wxyz quaternions, broadcasting over leading axes."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], dim=-1)


def matrix_to_quaternion(matrix: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (...,3,3) to unit quaternions wxyz (...,4), w >= 0; stable for all rotations."""
    m = matrix
    trace_terms = torch.stack([
        1 + m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2],
        1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2],
        1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2],
        1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2],
    ], dim=-1)
    best = trace_terms.argmax(dim=-1, keepdim=True)
    r = 0.5 * trace_terms.clamp_min(1e-12).sqrt()  # the magnitude of each component
    w = r[..., 0]
    cand_w = torch.stack([w, (m[..., 2, 1] - m[..., 1, 2]) / (4 * w), (m[..., 0, 2] - m[..., 2, 0]) / (4 * w),
                          (m[..., 1, 0] - m[..., 0, 1]) / (4 * w)], -1)
    x = r[..., 1]
    cand_x = torch.stack([(m[..., 2, 1] - m[..., 1, 2]) / (4 * x), x, (m[..., 0, 1] + m[..., 1, 0]) / (4 * x),
                          (m[..., 0, 2] + m[..., 2, 0]) / (4 * x)], -1)
    y = r[..., 2]
    cand_y = torch.stack([(m[..., 0, 2] - m[..., 2, 0]) / (4 * y), (m[..., 0, 1] + m[..., 1, 0]) / (4 * y), y,
                          (m[..., 1, 2] + m[..., 2, 1]) / (4 * y)], -1)
    z = r[..., 3]
    cand_z = torch.stack([(m[..., 1, 0] - m[..., 0, 1]) / (4 * z), (m[..., 0, 2] + m[..., 2, 0]) / (4 * z),
                          (m[..., 1, 2] + m[..., 2, 1]) / (4 * z), z], -1)
    cands = torch.stack([cand_w, cand_x, cand_y, cand_z], dim=-2)   # (...,4,4)
    q = torch.gather(cands, -2, best.unsqueeze(-1).expand(*best.shape[:-1], 1, 4)).squeeze(-2)
    q = torch.nn.functional.normalize(q, dim=-1)
    return torch.where(q[..., :1] < 0, -q, q)


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternions wxyz (...,4) to rotation matrices (...,3,3)."""
    q = torch.nn.functional.normalize(q, dim=-1)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(*q.shape[:-1], 3, 3)
