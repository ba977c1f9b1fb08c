"""A stand-in for the daemon behind the WebRTC server (implements webrtc_server.SessionHub).

Each session reads its source and, every `frames_per_version` frames, publishes a new version of a
deterministic fake avatar: `gaussians_per_frame` Gaussians per frame received so far (capped at
`max_gaussians`), laid out on a coloured sphere of radius 0.12 m around the origin; from the third
version on, every fifth Gaussian of the oldest ones is retired and a few colours change, so deltas
carry appends, rewrites and retirements. The arrays depend only on the frame count.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from protocols.avatar_buffer import AvatarBuffer


def fake_avatar(n: int, version: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """ids (M,) and activated arrays of the fake avatar with `n` Gaussians ever made, at `version`."""
    ids = np.arange(n, dtype=np.uint32)
    if version >= 3:
        ids = ids[(ids % 5 != 0) | (ids >= n // 2)]  # prune some old ones
    i = ids.astype(np.float64)
    golden = np.pi * (3.0 - np.sqrt(5.0))
    z = 1.0 - 2.0 * ((i * 0.7548776662) % 1.0)
    r = np.sqrt(1.0 - z * z)
    theta = golden * i
    means = 0.12 * np.stack([r * np.cos(theta), z, r * np.sin(theta)], axis=1)
    colors = np.stack([0.5 + 0.5 * np.cos(theta), 0.5 + 0.5 * z, 0.5 + 0.5 * np.sin(theta)], axis=1)
    colors[ids % 7 == 0] = (version % 4) / 4.0  # a few colours change every version
    m = ids.size
    quats = np.zeros((m, 4)); quats[:, 0] = 1.0
    arrays = {"means": means.astype(np.float32), "quats": quats.astype(np.float32),
              "scales": np.full((m, 3), 0.008, np.float32), "opacities": np.full(m, 0.9, np.float32),
              "colors": np.clip(colors, 0, 1).astype(np.float32)}
    return ids, arrays


@dataclass
class FakeSession:
    id: str
    source: Any
    buffer: AvatarBuffer
    frames: int = 0
    windows: int = 0
    pose_latency_s: float | None = None
    subscribers: list = field(default_factory=list)
    task: asyncio.Task | None = None
    closed: bool = False
    done: bool = False


class FakeHub:
    def __init__(self, frames_per_version: int = 3, gaussians_per_frame: int = 40, max_gaussians: int = 20_000,
                 work_seconds: float = 0.0) -> None:
        self.frames_per_version = frames_per_version
        self.gaussians_per_frame = gaussians_per_frame
        self.max_gaussians = max_gaussians
        self.work_seconds = work_seconds
        self.sessions: dict[str, FakeSession] = {}
        self.closed: list[str] = []
        self.frame_log: list[tuple[str, float, tuple[int, ...]]] = []  # (session, pts, image shape)
        self._ids = itertools.count(1)

    async def open_session(self, source, *, name: str | None = None) -> str:
        sid = f"s{next(self._ids)}"
        session = FakeSession(sid, source, AvatarBuffer(sid))
        self.sessions[sid] = session
        session.task = asyncio.ensure_future(self._run(session))
        return sid

    async def _run(self, session: FakeSession) -> None:
        try:
            async for frame in session.source.aiter():
                session.frames += 1
                session.pose_latency_s = time.time() - frame.t_capture  # "tracked" on arrival
                self.frame_log.append((session.id, frame.pts, frame.image.shape))
                if session.frames % self.frames_per_version == 0:
                    await self._publish(session, frame.t_capture)
            if session.frames % self.frames_per_version:
                await self._publish(session, 0.0)
        finally:
            session.done = True

    async def _publish(self, session: FakeSession, t_capture: float) -> None:
        n = min(self.max_gaussians, session.frames * self.gaussians_per_frame)
        version = session.buffer.version + 1
        # the "model work": off the event loop, like the daemon's engine worker
        ids, arrays = await asyncio.to_thread(fake_avatar, n, version)
        if self.work_seconds:
            await asyncio.sleep(self.work_seconds)
        session.buffer.assign(ids, arrays, version)
        session.windows += 1
        stats = {"t_capture": t_capture, **self.session_stats(session.id)}
        for callback in list(session.subscribers):
            callback(session.buffer, stats)

    async def close_session(self, session_id: str) -> None:
        session = self.sessions.get(session_id)
        if session is None or session.closed:
            return
        session.closed = True
        self.closed.append(session_id)
        session.source.close()
        if session.task is not None:
            session.task.cancel()

    def subscribe(self, session_id: str, callback: Callable) -> Callable[[], None]:
        subscribers = self.sessions[session_id].subscribers
        subscribers.append(callback)
        return lambda: callback in subscribers and subscribers.remove(callback)

    def session_stats(self, session_id: str) -> dict:
        s = self.sessions[session_id]
        # the daemon's keys (frames_tracked, pose_latency_ms) and the short one older pages read
        return {"frames": s.frames, "frames_tracked": s.frames, "windows": s.windows, "gaussians": s.buffer.n_live,
                "version": s.buffer.version,
                "pose_latency_ms": None if s.pose_latency_s is None else round(1000 * s.pose_latency_s, 1)}
