"""The daemon's live-animation publishing: a rig with every avatar version, a motion per tracked frame.

`Animator` turns avatar versions into `rig`s (on the engine worker: `rig_arrays`; on the loop: the session's
shape version and the newest rig) and tracked frames into `motion`s (on the tracking thread), and hands both to
the ZeroMQ publisher and to in-process subscribers (WebRTC peers) on the event loop. Motion never waits for the
engine: it leaves as soon as its frame is tracked. Rigs are conflated: at most one per `rig_interval_s` per session
leaves (refinement makes several versions a second, each a whole rig); a newer version waits and the newest one
goes when the interval is over, so the last version always arrives.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from engine.fusion import AvatarState
from engine.rig import rig_arrays
from fastavatar_stream.frames import TrackedFrame
from protocols.animation import Motion, Rig

log = logging.getLogger(__name__)

OnRig = Callable[[Rig], None]
OnMotion = Callable[[Motion], None]


def motion_of(session_id: str, frame: TrackedFrame, shape_version: int = 0) -> Motion:
    """The motion message of a tracked frame that has a FLAME fit."""
    fit = frame.flame
    f32 = lambda a: np.asarray(a, np.float32).reshape(-1)  # noqa: E731
    return Motion(session=session_id, frame=int(frame.index), t_capture=float(frame.t_capture),
                  shape_version=shape_version, expression=f32(fit.expression), rotation=f32(fit.rotation),
                  neck=f32(fit.neck), jaw=f32(fit.jaw), eyes=f32(fit.eyes), translation=f32(fit.translation))


@dataclass
class _SessionRig:
    rig: Rig | None = None
    shape: np.ndarray | None = None
    shape_version: int = 0
    subscribers: list[tuple[OnRig, OnMotion]] = field(default_factory=list)
    motions: int = 0
    sent: Rig | None = None            # the rig subscribers hold
    t_sent: float = float("-inf")      # loop time it left
    flush: asyncio.TimerHandle | None = None


class Animator:
    """See the module docstring. `publisher`: a `protocols.zmq_transport.AvatarPublisher` or None."""

    def __init__(self, model, loop: asyncio.AbstractEventLoop, publisher=None,
                 expression_dtype: str = "float32", rig_interval_s: float = 1.0) -> None:
        self.model = model
        self.rig_interval_s = rig_interval_s
        self.loop = loop
        self.publisher = publisher
        self.expression_dtype = np.dtype(expression_dtype)
        self._sessions: dict[str, _SessionRig] = {}

    def _state(self, session_id: str) -> _SessionRig:
        return self._sessions.setdefault(session_id, _SessionRig())

    # -- engine worker thread -------------------------------------------------------------------------------
    def rig_arrays(self, version: AvatarState) -> dict[str, np.ndarray]:
        return rig_arrays(version.gaussians, self.model.prompts, self.model.head, version.shape,
                          expression_dtype=self.expression_dtype)

    # -- tracking thread ------------------------------------------------------------------------------------
    def on_tracked(self, session_id: str, frame: TrackedFrame) -> None:
        """Publish the frame's FLAME parameters (usable frames only) from the event loop."""
        if frame.usable:
            motion = motion_of(session_id, frame, self._state(session_id).shape_version)
            self.loop.call_soon_threadsafe(self._publish_motion, motion)

    # -- event loop -----------------------------------------------------------------------------------------
    def install(self, session_id: str, version: AvatarState, arrays: dict[str, np.ndarray],
                t_capture: float) -> Rig:
        """The rig of a new avatar version: bump the shape version when the identity changed, publish it."""
        state = self._state(session_id)
        shape = None if version.shape is None else np.asarray(version.shape, np.float32).reshape(-1)
        same = (shape is None and state.shape is None) or (
            shape is not None and state.shape is not None and np.array_equal(shape, state.shape))
        if state.rig is None or not same:
            state.shape_version += 1
            state.shape = shape
        state.rig = Rig(session_id, version.version, state.shape_version, arrays, t_capture)
        wait = state.t_sent + self.rig_interval_s - self.loop.time()
        if not same or wait <= 0:  # a new identity leaves at once: motions already name its shape version
            self._send_rig(session_id)
        elif state.flush is None:
            state.flush = self.loop.call_later(wait, self._send_rig, session_id)
        return state.rig

    def _send_rig(self, session_id: str) -> None:
        state = self._state(session_id)
        if state.flush is not None:
            state.flush.cancel()
            state.flush = None
        if state.rig is None or state.rig is state.sent:
            return
        state.sent, state.t_sent = state.rig, self.loop.time()
        if self.publisher is not None:
            self.publisher.publish_rig(state.rig)
        for on_rig, _ in list(state.subscribers):
            self._call(on_rig, state.rig)

    def _publish_motion(self, motion: Motion) -> None:
        state = self._state(motion.session)
        state.motions += 1
        if self.publisher is not None:
            self.publisher.publish_motion(motion)
        for _, on_motion in list(state.subscribers):
            self._call(on_motion, motion)

    @staticmethod
    def _call(callback, value) -> None:
        try:
            callback(value)
        except Exception:
            log.exception("an animation subscriber failed")

    def forget(self, session_id: str) -> None:
        """Drop a retired session's rig and subscribers (the daemon keeps memory bounded)."""
        state = self._sessions.pop(session_id, None)
        if state is not None and state.flush is not None:
            state.flush.cancel()

    def rig(self, session_id: str) -> Rig | None:
        state = self._sessions.get(session_id)
        return state.rig if state else None

    def subscribe(self, session_id: str, on_rig: OnRig, on_motion: OnMotion) -> Callable[[], None]:
        """Call on_rig(rig) with the newest rig now (when there is one) and with every new one, and
        on_motion(motion) with every motion, on the event loop. Returns the unsubscribe function."""
        state = self._state(session_id)
        entry = (on_rig, on_motion)
        state.subscribers.append(entry)
        if state.rig is not None:
            self._call(on_rig, state.rig)
        return lambda: state.subscribers.remove(entry) if entry in state.subscribers else None
