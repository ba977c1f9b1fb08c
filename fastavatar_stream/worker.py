"""The engine worker: one thread per device that owns the model (the in-process `EngineBackend`).

It takes ready windows from all sessions, oldest first, runs the LGRT on them, folds the result into the
session's avatar (each session's `SessionEngine`, the same code Ray engine actors run) and hands the new version
to the event loop. Up to `max_batch` ready windows of different sessions are taken at once and those of the same
shape share one batched forward (on a GPU that is more windows per second; each session's result is what it
would get alone). When no window is ready it spends short bursts
refining the avatar of a session that asked for it; a burst is short and ends after the optimiser step during
which any session's window became ready, so a ready window waits at most one burst (usually one step).
In live mode a session holds its next window back while that window would add little pose coverage and
refinement has not had its share of the engine yet (`Session.window_deferred`), so a live avatar is refined
too, and more so once the camera has shown every side it is going to show.
A failure in one session's window ends that session, never the worker. `remove_session` returns only once the
worker is not working on that session (a burst in progress ends at its next step), so no version of a removed
session comes after it and everything the worker held for it (its SessionEngine) is freed.
The worker runs `nice` steps below the daemon's priority (with the torch threads it starts), so on a machine
with few cores tracking, motion and the event loop get the CPU when they need it and the engine the rest.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import Counter
from typing import Callable

import torch

from engine.avatar_model import AvatarModel, WindowRequest
from engine.fusion import AvatarState
from engine.refine import RefineConfig
from fastavatar_stream.frames import Window
from fastavatar_stream.session import Session
from fastavatar_stream.session_engine import SessionEngine, WindowJob, refine_job

log = logging.getLogger(__name__)

OnVersion = Callable[[Session, AvatarState, float], None]


def warm_up_renderer(backend: str = "auto") -> float:
    """Render a few Gaussians forward and backward once; returns the seconds it took.

    The first render of a process loads the compiled CPU kernels (about 1 s); done at daemon start it stays off
    the stream's clock instead of delaying the window that arrives during the first refinement burst."""
    from engine.render import render
    from engine.types import orbit_cameras

    start = time.perf_counter()
    cams = orbit_cameras(1, radius=0.65, fov_x_degrees=28, width=16, height_px=16)
    n = 8
    means = torch.zeros(1, n, 3, requires_grad=True)
    with torch.enable_grad():
        out = render(means, torch.tensor([1.0, 0, 0, 0]).expand(1, n, 4).contiguous(), torch.full((1, n, 3), 0.01),
                     torch.full((1, n), 0.5), torch.full((1, n, 3), 0.5), cams.viewmats, cams.Ks, 16, 16,
                     backend=backend)
        out["rgb"].sum().backward()
    return time.perf_counter() - start


def lower_thread_priority(steps: int) -> None:
    """Lower the calling thread's scheduling priority by `steps` nice levels (at most to 19). On Linux a thread
    id names that thread alone, and threads it starts inherit the value; elsewhere this does nothing."""
    if steps <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps))
    except OSError as exc:
        log.warning("could not lower the engine's priority: %s", exc)


class EngineWorker(threading.Thread):
    """Owns the AvatarModel; see the module docstring."""

    def __init__(self, model: AvatarModel, on_version: OnVersion, *, refine: RefineConfig | None = None,
                 max_batch: int = 1, nice: int = 0, name: str = "engine-worker") -> None:
        super().__init__(name=name, daemon=True)
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model = model
        self.max_batch = max_batch
        self.nice = nice
        self.batch_sizes: Counter = Counter()  # windows per forward -> how many forwards
        self.on_version = on_version
        self.refine_config = refine or RefineConfig()
        self._sessions: dict[str, Session] = {}
        self._engines: dict[str, SessionEngine] = {}
        self._wake = threading.Condition()
        self._busy: set[str] = set()  # sessions whose window or burst is running now
        self._leaving: set[str] = set()  # sessions being removed: a running burst ends early
        self._stopping = False
        self.windows_done = 0
        self.busy_s = 0.0

    # -- control (any thread) ---------------------------------------------------------------------------
    def add_session(self, session: Session) -> None:
        with self._wake:
            self._sessions[session.id] = session
            self._engines[session.id] = SessionEngine(session.fuser, self.refine_config)
            self._wake.notify()

    def remove_session(self, session_id: str) -> None:
        """Forget a session; returns once the worker is not working on it (call it off the event loop)."""
        with self._wake:
            self._sessions.pop(session_id, None)
            self._leaving.add(session_id)
            while session_id in self._busy and self.is_alive():
                self._wake.wait(timeout=0.1)
            self._leaving.discard(session_id)
            self._engines.pop(session_id, None)

    def notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()

    def window_waiting(self) -> bool:
        """True when any session has a window ready for the engine, or one is being removed (ends a refinement
        burst early)."""
        with self._wake:
            if self._leaving:
                return True
            sessions = list(self._sessions.values())
        return any(s.state != "failed" and s.oldest_ready() is not None for s in sessions)

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> None:
        lower_thread_priority(self.nice)  # before the first torch op: its thread team inherits the priority
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                if self._stopping:
                    return
                sessions = list(self._sessions.values())
            picked = self._oldest_ready(sessions)
            if picked:
                claimed = self._claim([session for session, _ in picked])
                for session, _ in picked:
                    if session not in claimed:  # removed meanwhile: its window is dropped
                        session.window_finished()
                try:
                    self._run_windows([(s, w) for s, w in picked if s in claimed])
                finally:
                    self._release(claimed)
                continue
            candidates = [s for s in sessions if s.wants_refinement() and s.state != "failed"]
            if candidates:
                claimed = self._claim([min(candidates, key=lambda s: s.refine_spent)])
                try:
                    for session in claimed:
                        self._refine_burst(session)
                finally:
                    self._release(claimed)
                continue
            with self._wake:
                if not self._stopping:
                    self._wake.wait(timeout=0.05)

    def _claim(self, sessions: list[Session]) -> list[Session]:
        """Mark these sessions as worked on, leaving out any removed meanwhile."""
        with self._wake:
            claimed = [s for s in sessions if s.id in self._sessions]
            self._busy.update(s.id for s in claimed)
        return claimed

    def _release(self, sessions: list[Session]) -> None:
        with self._wake:
            self._busy.difference_update(s.id for s in sessions)
            self._wake.notify_all()

    def _oldest_ready(self, sessions: list[Session]) -> list[tuple[Session, Window]]:
        """Up to `max_batch` ready windows, one per session, oldest first."""
        ready = [(t, s) for s in sessions if s.state != "failed" and (t := s.oldest_ready()) is not None]
        picked = []
        for _, session in sorted(ready, key=lambda x: x[0]):
            window = session.take_window()
            if window is not None:
                picked.append((session, window))
            if len(picked) == self.max_batch:
                break
        return picked

    def _run_windows(self, picked: list[tuple[Session, Window]]) -> None:
        """Prepare every picked window, run them (batched where shapes allow), fold each into its session."""
        start = time.perf_counter()
        requests = []
        made: dict[str, int] = {}
        for session, window in picked:
            try:
                with self._wake:
                    engine = self._engines[session.id]
                request = engine.window_request(self.model, WindowJob.from_window(session, window), session.timer)
                requests.append((session, window, engine, request))
            except Exception as exc:  # one session's failure ends that session only
                self._fail(session, window, exc)
        try:
            if requests:
                made = self._forward_and_fold(requests)
        finally:
            spent = time.perf_counter() - start
            self.busy_s += spent
            for session, _ in picked:  # a batch's engine time is shared equally by its windows
                session.window_finished(spent / len(picked), made.get(session.id))

    def _forward_and_fold(self, requests: list[tuple[Session, Window, SessionEngine, WindowRequest]]
                          ) -> dict[str, int]:
        """Run and fold the windows; returns the version each session got (sessions whose window failed: none)."""
        start = time.perf_counter()
        made: dict[str, int] = {}
        try:
            results = self.model.windows_gaussians([r for *_, r in requests])
        except Exception as exc:
            if len(requests) == 1:
                session, window, *_ = requests[0]
                self._fail(session, window, exc)
                return made
            log.warning("a batch of %d windows failed; running them one by one", len(requests), exc_info=True)
            for request in requests:
                made.update(self._forward_and_fold([request]))
            return made
        elapsed = time.perf_counter() - start
        for key in {r.batch_key() for *_, r in requests}:
            self.batch_sizes[sum(r.batch_key() == key for *_, r in requests)] += 1
        for (session, window, engine, request), sets in zip(requests, results):
            session.timer.add("engine", elapsed)
            try:
                version = engine.fold(self.model, sets, request.shape, session.timer)
                session.window_folded(window)
                self.windows_done += 1
                self.on_version(session, version, max(f.t_capture for f in window.frames))
                made[session.id] = version.version
            except Exception as exc:
                self._fail(session, window, exc)
        return made

    @staticmethod
    def _fail(session: Session, window: Window, exc: BaseException) -> None:
        """One session's failure ends that session only."""
        log.error("session %s: window %d failed", session.id, window.index, exc_info=exc)
        session.fail(f"window {window.index} failed: {exc.__class__.__name__}: {exc}")

    def _refine_burst(self, session: Session) -> None:
        with self._wake:
            engine = self._engines[session.id]
        start = time.perf_counter()
        version = None
        try:
            job = refine_job(session, session.options.refine_burst_seconds, engine.targets_key)
            version = engine.refine(self.model, job, session.timer, stop=self.window_waiting)
        except Exception as exc:
            log.exception("session %s: refinement failed; refinement turned off for it", session.id)
            session.stop_refinement(f"refinement failed: {exc}")
            session.refinement_spent(start, time.perf_counter())
            return
        finally:
            self.busy_s += time.perf_counter() - start
        # handed over before the burst counts as spent: the daemon's drain waits for what was handed over
        self.on_version(session, version, time.time())
        session.refinement_spent(start, time.perf_counter(), version.version)
