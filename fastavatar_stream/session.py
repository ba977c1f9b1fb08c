"""One stream = one session = one avatar: tracking state, windows, fusion, refinement frames, counters.

A session is fed from the event loop (frames in) and from a tracking thread (tracked frames, windows); the
engine worker takes its windows and installs new avatar versions. Everything shared between those threads is
guarded by the session's lock or by the thread-safe windower.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from engine.fusion import AvatarState, IncrementalFuser
from fastavatar_stream.frames import TrackedFrame, Window
from fastavatar_stream.prepare import FramePreparer, PreparedFrame, crop_resize
from fastavatar_stream.timing import StageTimer
from fastavatar_stream.report import SessionReport
from fastavatar_stream.windowing import Windower

log = logging.getLogger(__name__)


@dataclass
class SessionOptions:
    """Per-session settings.

    live: a live stream (camera/WebRTC, or --realtime replay): windows are cut when the engine is free, so the
      stride grows instead of falling behind; otherwise every scheduled window is processed.
    budget: most Gaussians the avatar keeps. holdout: every K-th frame is kept out of reconstruction and
    refinement for evaluation (0: none). holdout_from: every frame from this index on is kept out (a tail
    hold-out: the avatar is scored on a stretch of the stream it never saw; None: none).
    refine_seconds: total refinement time for this session (0: off).
    linger_s: after the stream ends and its windows are done, the session stays open this long (refinement goes
      on while its budget lasts; subscribers can still ask for snapshots).
    max_frames: stop after this many source frames (None: the whole stream).
    fusion: "visibility" (each copy of an anchor weighs by how squarely its frame saw it) or "concat" (the paper's
      plain concatenation, every copy at its predicted opacity, pruned by importance); None: the model's default
      (`AvatarModel.default_fusion`, set when the daemon opens the session).
    surface: tile the avatar's surface with small Gaussians painted by the frames of every window
      (`engine.surface`); None: the model's default (`AvatarModel.default_surface`, set when the daemon opens
      the session).
    refine_share_max: live mode: the largest share of this session's engine time refinement may take from
      windows. The next window waits while refinement since the last window is short of
      share / (1 - share) x the last window's engine time, share = min(refine_share_max, 1 - coverage gain):
      a window that would show the avatar new head poses goes at once, one that adds little waits for
      refinement (see `window_deferred`).
    refine_burst_seconds: length of one refinement burst on the engine worker (a ready window waits at most
      about this long, usually one optimiser step). refine_pool_size: most tracked frames the refiner fits
      against (spread over the session). max_timings: window/burst timing records kept.
    """

    live: bool = False
    budget: int = 60_000
    holdout: int = 0
    holdout_from: int | None = None
    refine_seconds: float = 0.0
    refine_burst_seconds: float = 0.25
    refine_share_max: float = 0.8
    refine_pool_size: int = 24
    max_frames: int | None = None
    fusion: str | None = None
    surface: bool | None = None
    detector: str = "auto"
    fov_degrees: float = 40.0
    max_ready_windows: int = 2
    max_prepared: int = 512
    max_timings: int = 2_000
    linger_s: float = 0.0


@dataclass
class WindowTiming:
    """When one window became ready for the engine, when the engine took it and when it was done
    (time.perf_counter() seconds). wait = t_started - t_ready is what refinement bursts may add."""

    index: int
    t_ready: float
    t_started: float
    frames: tuple[int, ...] = ()  # indices of the window's sparse frames
    pool: tuple[int, ...] = ()    # indices of its FramePack pool frames
    coverage_gain: float = 1.0    # fraction of its new frames in head poses no earlier window covered
    t_done: float | None = None

    @property
    def wait(self) -> float:
        return self.t_started - self.t_ready


@dataclass
class RefineSample:
    """A tracked frame kept for refinement/evaluation: the model-size crop and its camera, and the tracker's
    head matte cut to the same crop ((S,S) float32 in [0,1]) when the tracker gave one."""

    index: int
    frame: TrackedFrame
    prepared: PreparedFrame
    matte: np.ndarray | None = None


class Session:
    """State of one stream; see the module docstring for who touches what."""

    def __init__(self, session_id: str, name: str, options: SessionOptions, input_size: int,
                 tracker, expects_matted: bool = False, crop_scale: float = 2.8, head_box=None) -> None:
        self.id = session_id
        self.name = name
        self.options = options
        self.tracker = tracker
        self.report = SessionReport(source=name, realtime=options.live)
        self.preparer = FramePreparer(size=input_size, scale=crop_scale, expects_matted=expects_matted,
                                      head_box=head_box, notes=self.report.notes)
        self.windower = Windower(session_id)
        self.fuser = IncrementalFuser(budget=options.budget)
        self.timer = StageTimer()
        self.state = "running"
        self.error: str | None = None
        self.latest: AvatarState | None = None
        self.windows_done = 0
        self.in_flight = 0  # windows taken by the engine worker and not finished yet
        self.frames_tracked = 0
        self.frames_unusable = 0
        self.refine_spent = 0.0
        self.pose_latency_s: float | None = None  # capture -> tracked, newest frame: how late its pose is
        self.window_spent = 0.0
        self.last_window_s = 0.0          # engine time of the last window
        self.refine_since_window = 0.0    # refinement engine time since the last window
        self.refine_dirty = False  # a window changed the avatar since the refiner last started from it
        self.refine_stopped = False  # refinement failed once: off for the rest of the session
        self.lock = threading.RLock()
        self._ready: deque[Window] = deque()
        self._prepared: OrderedDict[int, PreparedFrame] = OrderedDict()
        self.refine_pool: list[RefineSample] = []
        self.holdout: list[RefineSample] = []
        self.tracking_done = threading.Event()
        self.t_created = time.time()
        # bounded: a daemon session may run for hours
        self.window_timings: deque[WindowTiming] = deque(maxlen=options.max_timings)
        self.refine_bursts: deque[tuple[float, float]] = deque(maxlen=options.max_timings)  # perf_counter spans
        self.version_log: deque[dict] = deque(maxlen=options.max_timings)  # what made each version
        self._ready_times: deque[float] = deque()  # when each window of _ready was queued (replay mode)
        self._t_live_ready: float | None = None  # when the live windower last became due
        # the avatar when the stream ended and its windows were done (before any lingering refinement)
        self.stream_end: tuple[float, AvatarState | None] | None = None  # (time.time(), version)
        self.t_work_done: float | None = None  # time.time() when windows and the replay's refinement were done

    # -- tracking side (tracking thread) ---------------------------------------------------------------------
    def is_holdout(self, index: int) -> bool:
        k, tail = self.options.holdout, self.options.holdout_from
        return (k > 0 and index % k == k - 1) or (tail is not None and index >= tail)

    def add_tracked(self, frame: TrackedFrame) -> None:
        """Account for a tracked frame and feed it to the windower (holdout frames are set aside)."""
        with self.lock:
            self.frames_tracked += 1
            self.pose_latency_s = time.time() - frame.t_capture if frame.t_capture else None
            if not frame.usable:
                self.frames_unusable += 1
                self.windower.stats.frames_in += 1
                self.windower.stats.rejected += 1
                return
            with self.timer.time("prepare"):
                prepared = self.preparer.prepare(frame)
            if self.is_holdout(frame.index):
                self.holdout.append(_sample(frame, prepared))
                return
            self._prepared[frame.index] = prepared
            while len(self._prepared) > self.options.max_prepared:
                self._prepared.popitem(last=False)
        if self.options.live:
            self.windower.add(frame)
            with self.lock:
                if self._t_live_ready is None and self.windower.oldest_ready_capture() is not None:
                    self._t_live_ready = time.perf_counter()
        else:
            window = self.windower.push(frame)
            if window is not None:
                self._queue(window)

    def _queue(self, window: Window) -> None:
        with self.lock:
            self._ready_times.append(time.perf_counter())
            self._ready.append(window)

    def backlog_full(self) -> bool:
        """Replay back-pressure: the tracking side waits while this many windows wait for the engine."""
        with self.lock:
            return len(self._ready) >= self.options.max_ready_windows

    def finish_tracking(self) -> None:
        """End of stream: the last partial window (if any) becomes ready."""
        window = self.windower.flush()
        if window is not None:
            self._queue(window)
        self.tracking_done.set()

    # -- engine side (engine worker) ----------------------------------------------------------------------------
    def oldest_ready(self) -> float | None:
        """Capture time of the oldest frame of the next window, or None when none is ready."""
        with self.lock:
            if self._ready:
                return min(f.t_capture for f in self._ready[0].frames)
        if self.options.live and not self.window_deferred():
            return self.windower.oldest_ready_capture()
        return None

    def window_deferred(self) -> bool:
        """Live: the next window waits so that refinement gets the engine share its coverage gain leaves (see
        SessionOptions.refine_share_max). The first windows (a fast first avatar) never wait."""
        if self.windows_done < len(self.windower.early) or not self.wants_refinement():
            return False
        share = min(self.options.refine_share_max, 1.0 - self.windower.coverage_gain())
        return self.refine_since_window < self.last_window_s * share / (1.0 - share) - 1e-9

    def take_window(self) -> Window | None:
        """The next window for the engine; the caller must call `window_finished()` when done with it."""
        with self.lock:
            window = self._ready.popleft() if self._ready else None
            now = time.perf_counter()
            t_ready = self._ready_times.popleft() if window is not None else now
            if window is None and self.options.live:
                window = self.windower.take()
                if window is not None:
                    self.report.stride(window.stride)
                    t_ready = self._t_live_ready if self._t_live_ready is not None else now
                    self._t_live_ready = None
            if window is not None:
                self.in_flight += 1
                self.window_timings.append(WindowTiming(window.index, t_ready, now,
                                                        tuple(f.index for f in window.frames),
                                                        tuple(f.index for f in window.pool), window.coverage_gain))
            return window

    def window_finished(self, engine_s: float = 0.0, version: int | None = None) -> None:
        """The engine is done with the window it took after `engine_s` seconds (version: what it made, None when
        it failed or was given up)."""
        with self.lock:
            self.in_flight -= 1
            timing = self.window_timings[-1] if self.window_timings else None
            if timing is not None and timing.t_done is None:
                timing.t_done = time.perf_counter()
            self.window_spent += engine_s
            self.last_window_s = engine_s
            self.refine_since_window = 0.0
            if version is not None:
                self.version_log.append({"version": version, "made_by": "window", "engine_s": round(engine_s, 4),
                                         "coverage_gain": round(timing.coverage_gain, 3) if timing else None})

    def engine_split(self) -> dict:
        """Engine seconds this session spent on windows and on refinement, and their shares."""
        total = self.window_spent + self.refine_spent
        return {"window_s": round(self.window_spent, 3), "refine_s": round(self.refine_spent, 3),
                "refine_share": round(self.refine_spent / total, 3) if total else None,
                "covered_pose_cells": self.windower.covered_cells}

    def engine_idle(self) -> bool:
        """No window waiting for or inside the engine."""
        with self.lock:
            return self.in_flight == 0 and self.oldest_ready() is None

    def prepared(self, frame: TrackedFrame) -> PreparedFrame:
        with self.lock:
            p = self._prepared.get(frame.index)
        return p if p is not None else self.preparer.prepare(frame, update=False)

    def keep_for_refinement(self, window: Window) -> None:
        """Keep the window's sparse frames (model-size crops) as refinement targets, bounded, newest first out
        only when they add no pose coverage (uniform thinning by index)."""
        with self.lock:
            have = {s.index for s in self.refine_pool}
            for frame in window.frames:
                if frame.index not in have:
                    self.refine_pool.append(_sample(frame, self.prepared(frame)))
            limit = self.options.refine_pool_size
            if len(self.refine_pool) > limit:
                keep = np.linspace(0, len(self.refine_pool) - 1, limit).round().astype(int)
                self.refine_pool = [self.refine_pool[i] for i in sorted(set(keep.tolist()))]

    def mark_stream_end(self) -> None:
        with self.lock:
            self.stream_end = (time.time(), self.latest)
    def release(self) -> None:
        """The session ended: drop what only a running session needs (the prepared-frame cache, queued
        windows). What its results need (latest version, kept frames, counters) stays."""
        with self.lock:
            self._prepared.clear()
            self._ready.clear()
            self._ready_times.clear()

    def wants_refinement(self) -> bool:
        return (self.options.refine_seconds > 0 and not self.refine_stopped and self.latest is not None
                and bool(self.refine_pool) and self.refine_spent < self.options.refine_seconds
                and self.state != "failed")

    # -- engine side (engine worker) -------------------------------------------------------------------------
    def window_folded(self, window: Window) -> None:
        """A window's Gaussians are in the avatar: its frames become refinement targets, the refiner restarts."""
        self.keep_for_refinement(window)
        with self.lock:
            self.windows_done += 1
            self.refine_dirty = True

    def take_refine_restart(self) -> bool:
        """True once after each folded window: the refiner must start over from the new avatar."""
        with self.lock:
            dirty, self.refine_dirty = self.refine_dirty, False
        return dirty

    def refinement_spent(self, start: float, end: float, version: int | None = None) -> None:
        """One refinement burst ran from `start` to `end` (perf_counter seconds) and made `version` (None: it
        failed)."""
        with self.lock:
            self.refine_spent += end - start
            self.refine_since_window += end - start
            self.refine_bursts.append((start, end))
            if version is not None:
                self.version_log.append({"version": version, "made_by": "refine", "engine_s": round(end - start, 4)})

    def stop_refinement(self, reason: str | None = None) -> None:
        """No more refinement: it failed (the reason goes in the report) or the run was interrupted (no reason);
        the session goes on with feed-forward versions only."""
        self.refine_stopped = True
        if reason:
            self.report.error(reason)

    def fail(self, reason: str) -> None:
        """End this session with one clear reason; other sessions are untouched."""
        self.state, self.error = "failed", reason
        self.report.error(reason)

    def stats(self) -> dict:
        latest = self.latest
        return {
            "session": self.id, "name": self.name, "state": self.state, "error": self.error,
            "frames_read": self.report.frames_read, "frames_tracked": self.frames_tracked,
            "frames_unusable": self.frames_unusable, "windows": self.windows_done,
            "version": latest.version if latest else 0,
            "gaussians": len(latest.gaussians) if latest else 0,
            "refine_s": round(self.refine_spent, 3),
            "pose_latency_ms": None if self.pose_latency_s is None else round(1000 * self.pose_latency_s, 1),
        }


def _sample(frame: TrackedFrame, prepared: PreparedFrame) -> RefineSample:
    return RefineSample(frame.index, light_frame(frame), prepared, crop_matte(frame, prepared))


def crop_matte(frame: TrackedFrame, prepared: PreparedFrame) -> np.ndarray | None:
    """The tracker's full-frame matte cut and resized like the frame's model crop, or the preparer's own matte."""
    if prepared.alpha is not None:
        return prepared.alpha
    matte = frame.matte  # trackers without a segmenter give none
    if matte is None or frame.image.size == 0:
        return None
    size = prepared.image.shape[-1]
    grey = np.repeat((np.clip(matte, 0, 1) * 255).round().astype(np.uint8)[..., None], 3, axis=2)
    return crop_resize(grey, prepared.crop, size, fill=(0, 0, 0))[..., 0]


def light_frame(frame: TrackedFrame) -> TrackedFrame:
    """A copy without the full-resolution image (kept samples hold the model-size crop instead)."""
    return TrackedFrame(image=np.zeros((0, 0, 3), np.uint8), pts=frame.pts, index=frame.index, K=frame.K,
                        viewmat=frame.viewmat, flame=frame.flame, landmarks=frame.landmarks, box=frame.box,
                        flags=frame.flags, camera_id=frame.camera_id, t_capture=frame.t_capture)
