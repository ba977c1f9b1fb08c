"""Incremental fusion of per-window Gaussians into one session avatar.

Every window gives one GaussianSet per base frame (tagged with the stream's frame id) plus one for its FramePack
slot. The avatar keeps, for each source frame, the Gaussians of the newest window that saw it: an overlap frame is
re-predicted by the next window in the context of more frames, so its new Gaussians replace the old ones
(de-duplication). Only the newest FramePack slot is kept, since each window's pool summarises the frames before it.
After each fold, pruning (hard rule: keep logit > threshold) and a top-k budget bound the avatar's size.

Visibility-weighted fusion (our addition to the paper's plain concatenation, eq. 3): every Gaussian may carry
`seen`, how squarely its source frame saw its anchor (`view_weights`). The copies of one anchor from different
frames then share that anchor's coverage in proportion to `seen` (`GaussianSet.fusion_share`), and a copy is pruned
once another frame saw its anchor at least twice as well (`GaussianSet.keep_logit`), so a copy from a frame that saw
the anchor edge-on or not at all fades and goes. Because the weights are recomputed over the whole avatar at every
fold, a later frame that sees a region better takes it over from earlier ones: more frames, better coverage, and
the Gaussian count stays near the number of anchors that some frame saw well. Measured on held-out synthetic heads (benchmarks/RESULTS.md), plain
concatenation loses quality with every added frame while this fusion gains it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.gaussians import GaussianSet
from engine.model.point_guidance import FACING, INSIDE

POOL_FRAME = -1
#: how per-frame Gaussians combine: "visibility" (below) or "concat" (the paper's plain concatenation)
FUSIONS = ("visibility", "concat")
#: `seen` of a copy whose frame did not see its anchor (back-facing or outside the image), and of every FramePack
#: copy: where no frame saw an anchor all copies weigh the same, and the FramePack slot fills in
UNSEEN = 1e-3
VIEW_GAMMA = 2.0


def view_weights(point_features: torch.Tensor, gamma: float = VIEW_GAMMA) -> torch.Tensor:
    """How squarely each frame saw each point prompt: (..., P, F) projected point features -> (..., P) `seen`.

    (max(cos(normal, to camera), 0) * inside the image) ** gamma, floored at UNSEEN. In the fused avatar the copies
    of an anchor share its coverage in proportion to `seen` (GaussianSet.fusion_share), and pruning ranks copies by
    `seen` relative to the best copy (GaussianSet.relative_seen).
    """
    facing = point_features[..., FACING].clamp_min(0) * point_features[..., INSIDE]
    return (facing ** gamma).clamp_min(UNSEEN)


def slot_view_weights(point_features: torch.Tensor, n_slots: int) -> torch.Tensor:
    """(S,P) `seen` of every slot of a window: base slot i from frame i's (N,P,F) point features, the FramePack slot
    (and any slot past the features) UNSEEN."""
    seen = view_weights(point_features[:n_slots])
    rest = torch.full((n_slots - seen.shape[0], seen.shape[1]), UNSEEN, dtype=seen.dtype, device=seen.device)
    return torch.cat([seen, rest])


def check_fusion(fusion: str) -> str:
    """`fusion` if it is one of FUSIONS, else ValueError naming them."""
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; use one of {', '.join(FUSIONS)}")
    return fusion


@dataclass
class AvatarState:
    """One published state of a session avatar (engine side; the daemon adds the session id)."""

    version: int
    gaussians: GaussianSet
    shape: torch.Tensor | None
    frames: list[int]
    stats: dict = field(default_factory=dict)


@dataclass
class FuserState:
    """What an IncrementalFuser needs to go on somewhere else (another engine worker, another machine) exactly
    where it stopped: the avatar of the newest version (uids included), its number, the identity shape and the next
    free uid (ids of pruned Gaussians are never handed out again)."""

    version: int
    avatar: GaussianSet
    shape: torch.Tensor | None
    next_uid: int


class IncrementalFuser:
    """Folds window results into one avatar under a Gaussian budget; versions strictly increase."""

    def __init__(self, budget: int = 60_000, threshold: float = 0.0, keep_pool: bool = True) -> None:
        if budget <= 0:
            raise ValueError(f"Gaussian budget must be positive, got {budget}")
        self.budget = budget
        self.threshold = threshold
        self.keep_pool = keep_pool
        self._version = 0
        self._avatar = GaussianSet.empty()
        self._shape: torch.Tensor | None = None
        self._next_uid = 0

    @classmethod
    def resume(cls, state: FuserState, budget: int = 60_000, threshold: float = 0.0,
               keep_pool: bool = True) -> "IncrementalFuser":
        """A fuser that goes on from `state`: its next version is state.version + 1."""
        fuser = cls(budget, threshold, keep_pool)
        fuser._version, fuser._avatar, fuser._next_uid = state.version, state.avatar, state.next_uid
        fuser._shape = state.shape
        return fuser

    def state(self) -> FuserState:
        return FuserState(self._version, self._avatar, self._shape, self._next_uid)

    @property
    def version(self) -> int:
        return self._version

    @property
    def avatar(self) -> GaussianSet:
        return self._avatar

    def add_window(self, slots: list[GaussianSet], shape: torch.Tensor | None = None) -> AvatarState:
        """Fold one window: `slots` are the per-frame sets (frame ids inside each set) and optionally the pool set
        (frame id POOL_FRAME). Returns the new version."""
        slots = [self._with_uids(s.detach()) for s in slots if len(s)]
        new_frames = set()
        for s in slots:
            new_frames.update(torch.unique(s.frame).tolist())
        old = self._avatar
        if len(old):
            stale = torch.isin(old.frame, torch.tensor(sorted(new_frames), dtype=torch.long, device=old.frame.device))
            old = old.select(~stale)
        if not self.keep_pool:
            slots = [s.select(s.frame != POOL_FRAME) for s in slots]
        fused = GaussianSet.fuse([old.to(slots[0].device) if slots else old, *slots])
        before = len(fused)
        self._avatar = fused.prune(self.threshold, self.budget)
        if shape is not None:
            self._shape = shape.detach().clone()
        return self._publish({"fused": before, "kept": len(self._avatar), "new_frames": sorted(new_frames)})

    def replace(self, gaussians: GaussianSet, stats: dict | None = None,
                shape: torch.Tensor | None = None) -> AvatarState:
        """Install a new avatar made from this one (refined, or a painted surface layer; uids kept, new Gaussians
        get theirs), pruned to the budget like any other version; `shape` updates the identity shape."""
        self._avatar = self._with_uids(gaussians.detach()).prune(float("-inf"), self.budget)
        if shape is not None:
            self._shape = shape.detach().clone()
        return self._publish(dict(stats or {}, kept=len(self._avatar)))

    def _with_uids(self, gaussians: GaussianSet) -> GaussianSet:
        if gaussians.uid is not None:
            return gaussians
        n = len(gaussians)
        gaussians.uid = torch.arange(self._next_uid, self._next_uid + n, dtype=torch.long,
                                     device=gaussians.anchor.device)
        self._next_uid += n
        return gaussians

    def current(self) -> AvatarState:
        return AvatarState(self._version, self._avatar, self._shape, self._frames(), {})

    def _frames(self) -> list[int]:
        return sorted(f for f in torch.unique(self._avatar.frame).tolist() if f >= 0)  # not pool or surface ids

    def _publish(self, stats: dict) -> AvatarState:
        self._version += 1
        return AvatarState(self._version, self._avatar, self._shape, self._frames(), stats)
