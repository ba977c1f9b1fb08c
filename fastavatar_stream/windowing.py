"""Sliding windows over a session's tracked frames (pure logic, no I/O, no model).

Schedule: windows are due at 1, 4 and 8 usable tracked frames (a first avatar comes fast), then every
`stride` (12) new frames. Each window holds up to `window_size` (16) sparse frames: up to `overlap` (4)
frames carried over from the previous window's sparse frames (they re-anchor the new frames to the
registration the avatar already has, and are never dropped) plus the new frames. So the sparse sizes
run 1, 4, 8, 16, 16, ...

When more new frames are pending than there are free slots (a live stream whose engine is slower than
the camera), the window takes all of them: the stride grows to the number pending, `window_size -
overlap` of them become sparse frames chosen for head-pose coverage (greedy farthest-point sampling on
yaw, pitch, jaw opening and expression plus a time term, always keeping the newest frame so the avatar
is current), and the rest go to the window's FramePack pool (bounded, most informative first). The
strides used are kept in `Windower.strides` (the newest `STRIDES_KEPT`).

Pose coverage: every frame that went into a window marks its head-pose cell (yaw and pitch of the head as its
camera sees it, in cells of `coverage_cell`). `coverage_gain()` is the fraction of the pending frames whose
cell no window covered yet: what the next window would add that the avatar has not seen. The engine worker
uses it to weigh the next window against refinement.

Usage:
- replay (every window processed): `window = windower.push(frame)` returns a window whenever one is due.
- live: `windower.add(frame)` on every frame; when the engine is free, `windower.take()` returns the next
  window if one is due (its stride is whatever accumulated meanwhile).
- end of stream: `windower.flush()` returns a last window of the frames still pending, if any.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .frames import TrackedFrame, Window
from .tracking.rotations import rotation_matrix

#: strides a windower remembers (a live session may cut windows for days)
STRIDES_KEPT = 1000

log = logging.getLogger(__name__)

# Feature scales: one unit of distance ~ 0.1 rad of head turn.
_POSE_W = 1.0        # yaw, pitch (rad)
_JAW_W = 1.5         # jaw opening (rad; small numbers, so weighted up)
_EXPR_W = 0.05       # first expression coefficients (unitless, typically within +-2)
_EXPR_DIMS = 10


def pose_features(frame: TrackedFrame) -> np.ndarray:
    """(F,) coverage features of a usable frame: ~sin(yaw), ~sin(pitch) of the head seen by its camera, jaw
    opening, and the first expression coefficients, scaled so Euclidean distance is meaningful.

    The head's facing direction (FLAME +z, after global and neck rotation) is mapped into the camera by
    the viewmat, so monocular fits (motion in the head) and multi-view (motion in the camera) agree.
    """
    fit = frame.flame
    R = np.asarray(frame.viewmat, np.float64)[:3, :3] @ rotation_matrix(fit.rotation) @ rotation_matrix(fit.neck)
    f = R @ np.array([0.0, 0.0, 1.0])
    # sideways and vertical components of the facing direction: ~ sin(yaw), sin(pitch); unlike angles
    # they do not wrap, whichever way the tracker's world axes point along z
    yaw, pitch = f[0], f[1]
    jaw = float(np.asarray(fit.jaw, np.float64).reshape(-1)[0]) if np.size(fit.jaw) else 0.0
    expr = np.zeros(_EXPR_DIMS)
    e = np.asarray(fit.expression, np.float64).reshape(-1)[:_EXPR_DIMS]
    expr[: e.size] = e
    return np.concatenate([[_POSE_W * yaw, _POSE_W * pitch, _JAW_W * jaw], _EXPR_W * expr])


def farthest_point_order(features: np.ndarray, k: int, seeds: list[int] | None = None,
                         anchors: np.ndarray | None = None) -> list[int]:
    """Greedy farthest-point selection of k rows of `features` (N, F).

    seeds: rows chosen first (in order). anchors: (M, F) already-covered points (not selectable) the
    selection should stay away from. Without seeds or anchors the first pick is the row nearest the mean.
    Returns row indices in selection order (length min(k, N)).
    """
    n = len(features)
    k = min(k, n)
    chosen: list[int] = []
    dist = np.full(n, np.inf)

    def take(i: int) -> None:
        chosen.append(i)
        np.minimum(dist, np.linalg.norm(features - features[i], axis=1), out=dist)
        dist[i] = -1.0

    if anchors is not None and len(anchors):
        for a in anchors:
            np.minimum(dist, np.linalg.norm(features - a, axis=1), out=dist)
    for s in seeds or []:
        if len(chosen) < k and s not in chosen:
            take(s)
    if not chosen and (anchors is None or not len(anchors)) and k > 0:
        take(int(np.argmin(np.linalg.norm(features - features.mean(axis=0), axis=1))))
    while len(chosen) < k:
        take(int(np.argmax(dist)))
    return chosen


@dataclass
class WindowerStats:
    frames_in: int = 0
    rejected: int = 0          # unusable frames (never enter a window)
    thinned: int = 0           # pending frames dropped because too many piled up (live, engine stalled)
    pooled: int = 0            # frames placed in FramePack pools
    pool_dropped: int = 0      # frames that did not fit a window's pool
    windows: int = 0


@dataclass
class Windower:
    """Per-session window builder. See the module docstring for the schedule and policies.

    time_weight: weight of the time-spread term (normalised position in the candidate span) in the
    coverage features. max_pending: bound on frames waiting for the next window (live mode).
    coverage_cell: side of a head-pose coverage cell in ~sin(yaw), ~sin(pitch) units.
    """

    session: str
    window_size: int = 16
    overlap: int = 4
    stride: int = 12
    early: tuple[int, ...] = (1, 4, 8)
    pool_size: int = 64
    time_weight: float = 0.3
    max_pending: int = 256
    coverage_cell: float = 0.08
    stats: WindowerStats = field(default_factory=WindowerStats)
    strides: deque[int] = field(default_factory=lambda: deque(maxlen=STRIDES_KEPT))  # the newest windows' strides

    def __post_init__(self) -> None:
        if not (0 <= self.overlap < self.window_size):
            raise ValueError(f"overlap must be in [0, window_size), got {self.overlap} / {self.window_size}")
        if self.stride < 1 or self.stride > self.window_size - self.overlap:
            raise ValueError(f"stride must be in [1, window_size - overlap], got {self.stride}")
        if self.pool_size < 0 or self.max_pending < self.window_size:
            raise ValueError("pool_size must be >= 0 and max_pending >= window_size")
        self._pending: list[TrackedFrame] = []
        self._pending_feats: list[np.ndarray] = []  # pose_features of each pending frame, computed once
        self._thinned_since = 0
        self._previous: list[TrackedFrame] = []   # sparse frames of the last window
        self._consumed = 0                        # usable frames that went into windows
        self._next_index = 0
        self._covered: set[tuple[int, int]] = set()  # head-pose cells of frames that went into windows
        # the event loop adds frames while the engine worker takes windows
        self._lock = threading.RLock()

    # -- input -----------------------------------------------------------------------------------------
    def add(self, frame: TrackedFrame) -> bool:
        """Buffer a tracked frame; unusable frames are counted and refused (returns False)."""
        with self._lock:
            self.stats.frames_in += 1
            if not frame.usable:
                self.stats.rejected += 1
                return False
            self._pending.append(frame)
            self._pending_feats.append(pose_features(frame))
            if len(self._pending) > self.max_pending:
                self._thin()
            return True

    def push(self, frame: TrackedFrame) -> Window | None:
        """Replay mode: add a frame and return the window that became due, if any."""
        self.add(frame)
        return self.take()

    # -- schedule --------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return len(self._pending)

    def due_at(self) -> int:
        """Total usable frames (consumed + pending) at which the next window is due."""
        for threshold in self.early:
            if threshold > self._consumed:
                return threshold
        return self._consumed + self.stride

    def ready(self) -> bool:
        seen = self._consumed + len(self._pending) + self._thinned_since
        return bool(self._pending) and seen >= self.due_at()

    def take(self) -> Window | None:
        """The next window if one is due (consumes every pending frame), else None."""
        with self._lock:
            return self._build() if self.ready() else None

    def _cell(self, feats: np.ndarray) -> tuple[int, int]:
        return int(np.floor(feats[0] / (_POSE_W * self.coverage_cell))), \
            int(np.floor(feats[1] / (_POSE_W * self.coverage_cell)))

    def coverage_gain(self) -> float:
        """Fraction of the pending frames whose head-pose cell no window covered yet (0 when none pending)."""
        with self._lock:
            if not self._pending_feats:
                return 0.0
            return sum(self._cell(f) not in self._covered for f in self._pending_feats) / len(self._pending_feats)

    @property
    def covered_cells(self) -> int:
        return len(self._covered)

    def oldest_ready_capture(self) -> float | None:
        """t_capture of the oldest pending frame when a window is due, else None (for oldest-first picking)."""
        with self._lock:
            return min(f.t_capture for f in self._pending) if self.ready() else None

    def flush(self) -> Window | None:
        """A last window of whatever is pending (end of stream), or None."""
        with self._lock:
            return self._build() if self._pending else None

    # -- building --------------------------------------------------------------------------------------
    def _features(self, frames: list[TrackedFrame], feats: list[np.ndarray]) -> np.ndarray:
        """(N, F+1) pose features plus the time-spread column."""
        feats = np.stack(feats)
        idx = np.array([f.index for f in frames], np.float64)
        span = max(idx.max() - idx.min(), 1.0)
        return np.concatenate([feats, (self.time_weight * (idx - idx.min()) / span)[:, None]], axis=1)

    def _build(self) -> Window:
        candidates, cand_feats = self._pending, self._pending_feats
        self._pending, self._pending_feats = [], []
        stride = len(candidates) + self._thinned_since  # frames of the stream this window advanced over
        self._thinned_since = 0
        n_over = min(self.overlap, len(self._previous))
        slots = self.window_size - n_over

        overlap_frames: list[TrackedFrame] = []
        if n_over:
            prev_feats = np.stack([pose_features(f) for f in self._previous])
            new_centre = np.stack(cand_feats).mean(axis=0)
            seed = int(np.argmin(np.linalg.norm(prev_feats - new_centre, axis=1)))
            overlap_frames = [self._previous[i] for i in farthest_point_order(prev_feats, n_over, seeds=[seed])]

        if len(candidates) <= slots:
            new_frames, rest = candidates, []
        else:
            feats = self._features(candidates, cand_feats)
            pick = farthest_point_order(feats, slots, seeds=[len(candidates) - 1])
            chosen = set(pick)
            new_frames = [candidates[i] for i in sorted(pick)]
            rest_idx = [i for i in range(len(candidates)) if i not in chosen]
            # pool: continue the coverage order from the sparse set, keep the most informative
            rest_feats = feats[rest_idx]
            order = farthest_point_order(rest_feats, self.pool_size, anchors=feats[sorted(pick)])
            rest = [candidates[rest_idx[i]] for i in sorted(order)]
            self.stats.pool_dropped += len(rest_idx) - len(rest)

        frames = sorted(overlap_frames + new_frames, key=lambda f: (f.index, f.camera_id))
        over_ids = {id(f) for f in overlap_frames}
        window = Window(session=self.session, index=self._next_index, frames=frames,
                        overlap=[i for i, f in enumerate(frames) if id(f) in over_ids],
                        pool=rest, stride=stride,
                        coverage_gain=sum(self._cell(f) not in self._covered for f in cand_feats) / len(cand_feats))
        self._covered.update(self._cell(f) for f in cand_feats)
        self._next_index += 1
        self._consumed += stride
        self._previous = frames
        self.strides.append(stride)
        self.stats.windows += 1
        self.stats.pooled += len(rest)
        if stride > self.stride:
            log.debug("%s: window %d took %d new frames (engine behind)", self.session, window.index, stride)
        return window

    def _thin(self) -> None:
        """Drop the most redundant pending frame (nearest neighbour in pose/time), never the newest."""
        feats = self._features(self._pending, self._pending_feats)[:-1]
        d = np.linalg.norm(feats[:, None] - feats[None], axis=2)
        np.fill_diagonal(d, np.inf)
        victim = int(np.argmin(d.min(axis=1)))
        del self._pending[victim]
        del self._pending_feats[victim]
        self._thinned_since += 1
        self.stats.thinned += 1


def take_oldest(windowers: list[Windower]) -> Window | None:
    """The engine worker's pick across sessions: the due window whose oldest frame waited longest."""
    best, best_t = None, None
    for w in windowers:
        t = w.oldest_ready_capture()
        if t is not None and (best_t is None or t < best_t):
            best, best_t = w, t
    return best.take() if best is not None else None
