"""The daemon: sessions, the tracking pool, the engine worker, publishing and control.

One asyncio event loop runs sources, control requests and publishing; it never runs model or tracking code.
Tracking runs in a thread pool (each session's frames in order), the model in an engine worker: one thread in
this process, or (`DaemonConfig.ray`) Ray actors on this machine or a cluster (`ray_engine`); both are an
`EngineBackend`. Every new avatar version is converted to world-space arrays on the worker's thread, then installed
on the loop in the session's `AvatarBuffer`, published on ZeroMQ (deltas) and handed to in-process subscribers
(WebRTC peers).
Live animation (`fastavatar_stream.animation`): every version also leaves as a rig, every tracked frame as a motion.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engine.avatar_model import AvatarModel
from engine.errors import InputError
from engine.fusion import AvatarState
from engine.refine import RefineConfig
from fastavatar_stream.animation import Animator
from fastavatar_stream.session import Session, SessionOptions
from fastavatar_stream.session_engine import EngineBackend
from fastavatar_stream.worker import EngineWorker
from protocols.avatar_buffer import AvatarBuffer
from protocols.errors import ProtocolError

log = logging.getLogger(__name__)

Subscriber = Callable[[AvatarBuffer, dict], None]


@dataclass
class DaemonConfig:
    """weights: what `--weights` names (None: the shipped default; `official:DIR`: the authors' release; see
    `AvatarModel.from_spec`). device: where the model runs ("cpu", "cuda", "cuda:N"). publish/control: ZeroMQ
    endpoints (None: off). max_sessions: concurrent sessions. max_batch: most windows of different sessions in one
    forward (None: 4 on CUDA, where batching raises throughput, 1 on the CPU, where it does not). snapshot_dir:
    final avatars are written there as PLY and as drivable avatar npz (None: off). ray: run the engine on Ray
    actors ("local", "auto" or a cluster address; None: one thread in this process); engine_actors: how many (None:
    one per GPU of the cluster). rig_expression_dtype: float32 (posing equals the engine's within 1e-5) or float16 (half the rig's
    expression basis; about 1e-5 m off)."""

    weights: str | None = None
    device: str = "cpu"
    publish: str | None = None
    control: str | None = None
    max_sessions: int = 8
    max_batch: int | None = None
    tracking_workers: int = 2
    snapshot_dir: Path | None = None
    session_defaults: SessionOptions = field(default_factory=SessionOptions)
    refine: RefineConfig = field(default_factory=RefineConfig)
    ray: str | None = None
    engine_actors: int | None = None
    rig_expression_dtype: str = "float32"


class Daemon:
    """See the module docstring. Implements the SessionHub interface the WebRTC server uses."""

    def __init__(self, config: DaemonConfig | None = None, model: AvatarModel | None = None) -> None:
        self.config = config or DaemonConfig()
        self.model = model
        self.sessions: dict[str, Session] = {}
        self.buffers: dict[str, AvatarBuffer] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._subscribers: dict[str, list[Subscriber]] = {}
        self._handed_over: dict[str, int] = {}  # newest version the engine handed over, per session
        self._ids = itertools.count(1)
        self._landmark_model = None
        self._mesh_landmark_model = None
        self.publisher = None
        self.control = None
        self.worker: EngineBackend | None = None
        self._track_pool = ThreadPoolExecutor(self.config.tracking_workers, thread_name_prefix="tracking")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._control_task: asyncio.Task | None = None
        self.animator: Animator | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> "Daemon":
        self._loop = asyncio.get_running_loop()
        if self.model is None:
            self.model = await self._loop.run_in_executor(
                None, lambda: AvatarModel.from_spec(self.config.weights, device=self.config.device))
        from fastavatar_stream.tracking import LandmarkModel

        # the tracker fits the model's own head: the user's FLAME 2023 for the official weights
        self._landmark_model = LandmarkModel.from_head(self.model.landmark_head)
        self._mesh_landmark_model = LandmarkModel.mesh_from_head(self.model.landmark_head)
        # Ray wants its first call in the main thread (signal handlers); nothing else runs on the loop yet
        self.worker = (self._make_worker() if self.config.ray else
                       await self._loop.run_in_executor(None, self._make_worker))
        self.worker.start()
        if self.config.publish:
            from protocols.zmq_transport import AvatarPublisher

            self.publisher = AvatarPublisher(self.config.publish)
            log.info("publishing avatars on %s", self.publisher.endpoint)
        self.animator = Animator(self.model, self._loop, self.publisher, self.config.rig_expression_dtype)
        if self.config.control:
            from protocols.zmq_transport import ControlServer, publisher_handler

            handler = publisher_handler(self.publisher, self._control) if self.publisher else self._control
            self.control = ControlServer(handler, self.config.control)
            self._control_task = asyncio.create_task(self.control.serve())
            log.info("control requests on %s", self.control.endpoint)
        return self

    def _make_worker(self) -> EngineBackend:
        if self.config.ray is None:
            from fastavatar_stream.worker import warm_up_renderer

            warm_up_renderer(self.config.refine.backend)
            max_batch = self.config.max_batch or (4 if self.model.device.type == "cuda" else 1)
            return EngineWorker(self.model, self._on_version, refine=self.config.refine, max_batch=max_batch)
        try:
            from fastavatar_stream.ray_engine import RayConfig, RayEngineWorker
        except ImportError as exc:
            raise InputError(f"--ray needs Ray ({exc}); install it with pip install 'fastavatar-stream[ray]'") from None
        config = RayConfig(self.config.ray, self.config.engine_actors)
        return RayEngineWorker.launch(config, self.config.weights, self.config.refine, self._on_version)

    async def shutdown(self) -> None:
        """Stop sources, let queued work finish briefly, write final snapshots, close sockets."""
        for sid in list(self._tasks):
            await self.close_session(sid)
        if self.worker is not None:
            self.worker.stop()
            await self._loop.run_in_executor(None, self.worker.join, 5.0)
        if self._control_task is not None:
            self._control_task.cancel()
        if self.control is not None:
            self.control.close()
        if self.publisher is not None:
            self.publisher.close()
        self._track_pool.shutdown(wait=False, cancel_futures=True)

    # -- sessions (SessionHub) --------------------------------------------------------------------------------
    async def open_session(self, source, *, name: str | None = None, options: SessionOptions | None = None) -> str:
        if len([s for s in self.sessions.values() if s.state == "running"]) >= self.config.max_sessions:
            raise InputError(f"the daemon already runs {self.config.max_sessions} sessions; stop one first")
        options = options or SessionOptions(**vars(self.config.session_defaults))
        if options.fusion is None:  # the model's own rule (the caller's options object stays as it was)
            options = dataclasses.replace(options, fusion=self.model.default_fusion)
        if getattr(source, "live", False):
            options.live = True
        session_id = f"s{next(self._ids)}"
        from fastavatar_stream.tracking import FaceTracker, TrackerConfig

        config = TrackerConfig(detector=options.detector, fov_degrees=options.fov_degrees)
        tracker = await asyncio.get_running_loop().run_in_executor(
            self._track_pool, functools.partial(FaceTracker, self._landmark_model, config,
                                                mesh_model=self._mesh_landmark_model))
        session = Session(session_id, name or getattr(source, "name", session_id), options,
                          self.model.input_size, tracker, expects_matted=self.model.expects_matted,
                          crop_scale=self.model.crop_scale, head_box=self._head_box())
        self.sessions[session_id] = session
        self.buffers[session_id] = AvatarBuffer(session_id)
        session.report.fps = float(getattr(source, "fps", 0.0) or 0.0)  # media time counts the last frame too
        session.report.start()
        self.worker.add_session(session)
        self._tasks[session_id] = asyncio.create_task(self._run_session(session, source))
        log.info("session %s started: %s", session_id, session.name)
        return session_id

    def _head_box(self):
        """The official framing measures the crop on the tracked head's box (see views.HeadBox); ours on the
        68-landmark box (None)."""
        if self.model.framing != "head":
            return None
        from fastavatar_stream.views import HeadBox

        return HeadBox(self.model.landmark_head)

    async def close_session(self, session_id: str) -> None:
        task = self._tasks.get(session_id)
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    async def wait_session(self, session_id: str) -> Session:
        task = self._tasks[session_id]
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            pass
        return self.sessions[session_id]

    def subscribe(self, session_id: str, callback: Subscriber) -> Callable[[], None]:
        if session_id not in self.sessions:
            raise KeyError(f"unknown session {session_id!r}")
        callbacks = self._subscribers.setdefault(session_id, [])
        callbacks.append(callback)
        return lambda: callbacks.remove(callback) if callback in callbacks else None

    def subscribe_animation(self, session_id: str, on_rig, on_motion) -> Callable[[], None]:
        """Rigs and motions of a session on the loop (see `Animator.subscribe`)."""
        if session_id not in self.sessions:
            raise KeyError(f"unknown session {session_id!r}")
        return self.animator.subscribe(session_id, on_rig, on_motion)

    def session_stats(self, session_id: str) -> dict:
        return self.sessions[session_id].stats()

    # -- the per-session pipeline -----------------------------------------------------------------------------
    async def _run_session(self, session: Session, source) -> None:
        # live: one waiting frame (the newest), so a frame's motion leaves one tracking time after its capture
        # instead of queueing behind older frames; replay: a few, read ahead while tracking runs
        frames: asyncio.Queue = asyncio.Queue(maxsize=1 if session.options.live else 4)
        loop = asyncio.get_running_loop()

        async def read() -> None:
            try:
                async for frame in source.aiter():
                    session.report.frame_read(frame.pts, frame.t_capture)
                    if session.options.live and frames.full():
                        frames.get_nowait()  # latest frame wins; the dropped one is counted
                        session.report.frames_dropped += 1
                    await frames.put(frame)
                    if session.options.max_frames and session.report.frames_read >= session.options.max_frames:
                        break
            finally:
                await frames.put(None)

        async def track() -> None:
            while (frame := await frames.get()) is not None:
                await loop.run_in_executor(self._track_pool, self._track_one, session, frame)

        try:
            await asyncio.gather(read(), track())
            if getattr(source, "error", None):
                session.report.errors.append(source.error)
                session.error = source.error
            await loop.run_in_executor(self._track_pool, session.finish_tracking)
            self.worker.notify()
            await self._drain(session)
            session.state = "ended" if session.error is None else "failed"
        except asyncio.CancelledError:
            session.state = "ended"
            raise
        except InputError as exc:
            session.state, session.error = "failed", str(exc)
            session.report.errors.append(str(exc))
        except Exception as exc:
            log.exception("session %s failed", session.id)
            session.state, session.error = "failed", f"{exc.__class__.__name__}: {exc}"
            session.report.errors.append(session.error)
        finally:
            session.tracking_done.set()
            close_tracker = getattr(session.tracker, "close", None)
            if close_tracker is not None:
                close_tracker()
            try:
                source.close()
            except Exception:
                log.debug("closing source failed", exc_info=True)
            self.worker.remove_session(session.id)
            session.report.finish(session.timer, t=session.t_work_done)
            self._write_snapshot(session)
            log.info("session %s %s: %d frames, %d windows, version %d%s", session.id, session.state,
                     session.report.frames_read, session.windows_done,
                     session.latest.version if session.latest else 0,
                     f" ({session.error})" if session.error else "")

    def _track_one(self, session: Session, frame) -> None:
        with session.timer.time("track"):
            tracked = session.tracker.track(frame.image, frame.pts, frame.index, frame.t_capture)
        self.animator.on_tracked(session.id, tracked)
        session.add_tracked(tracked)
        self.worker.notify()
        if not session.options.live:
            while session.backlog_full() and session.state == "running":
                time.sleep(0.002)  # replay back-pressure: wait for the engine, never skip a window

    async def _drain(self, session: Session) -> None:
        """Wait until the engine has done every window and every version it handed over is installed (engines hand
        a version over before they count its work done); then a replay spends the rest of its refinement budget
        (a live stream ends here: what it shows at its end is what it has); then the session lingers `linger_s`
        seconds, refining while its budget lasts."""
        while session.state == "running" and not (session.engine_idle() and self._installed_all(session)):
            await asyncio.sleep(0.01)
        session.mark_stream_end()
        while session.state == "running" and not session.options.live and (
                session.wants_refinement() or not self._installed_all(session)):
            await asyncio.sleep(0.01)
        session.t_work_done = time.time()  # the report's wall time ends here, lingering is not work
        if session.options.linger_s > 0 and session.state == "running":
            await asyncio.sleep(session.options.linger_s)

    def _installed_all(self, session: Session) -> bool:
        installed = session.latest.version if session.latest is not None else 0
        return installed >= self._handed_over.get(session.id, 0)

    # -- versions (worker thread -> loop) ---------------------------------------------------------------------
    def _on_version(self, session: Session, version: AvatarState, t_capture: float) -> None:
        with session.timer.time("to_world"):
            arrays = version.gaussians.to_arrays(self.model.prompts, self.model.head, shape=version.shape)
            uids = version.gaussians.uid.numpy().astype(np.uint32)
        self._handed_over[session.id] = version.version
        with session.timer.time("rig"):
            rig = self.animator.rig_arrays(version)
        self._loop.call_soon_threadsafe(self._install, session, version, uids, arrays, t_capture)
        self._loop.call_soon_threadsafe(self.animator.install, session.id, version, rig, t_capture)

    def _install(self, session: Session, version: AvatarState, uids, arrays, t_capture: float) -> None:
        buffer = self.buffers[session.id]
        t0 = time.perf_counter()
        buffer.assign(uids, arrays, version.version)
        session.latest = version
        stats = dict(session.stats(), t_capture=t_capture)
        if self.publisher is not None:
            self.publisher.publish(buffer, t_capture=t_capture, stats=stats)
        for callback in list(self._subscribers.get(session.id, [])):
            try:
                callback(buffer, stats)
            except Exception:
                log.exception("session %s: a subscriber failed", session.id)
        session.timer.add("publish", time.perf_counter() - t0)
        session.report.version_published(version.version, len(version.gaussians), t_capture, time.time())

    def _write_snapshot(self, session: Session) -> None:
        if self.config.snapshot_dir is None or session.latest is None:
            return
        from protocols.animation import save_avatar
        from protocols.ply import save_ply

        path = Path(self.config.snapshot_dir) / f"{session.id}_v{session.latest.version}.ply"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_ply(path, self.buffers[session.id].live_arrays())
        rig = self.animator.rig(session.id)
        if rig is not None:
            save_avatar(path.with_name(f"{path.stem}_avatar.npz"), rig)

    # -- control requests -----------------------------------------------------------------------------------
    async def _control(self, request) -> Any:
        cmd, args = request.command, request.args
        if cmd == "list":
            return {"sessions": [s.stats() for s in self.sessions.values()]}
        if cmd == "status":
            running = sum(s.state == "running" for s in self.sessions.values())
            batches = getattr(self.worker, "batch_sizes", {})  # the in-process worker counts its batched forwards
            return {"sessions": len(self.sessions), "running": running,
                    "windows": self.worker.windows_done if self.worker else 0,
                    "migrations": sum(s.report.migrations for s in self.sessions.values()),
                    # windows per forward -> how many forwards (several sessions batched on one device)
                    "batches": {str(k): v for k, v in sorted(batches.items())}}
        if cmd == "start":
            from fastavatar_stream.sources import open_source

            if "source" not in args:
                raise ProtocolError("start needs a 'source' (a file path, folder or device:NAME)")
            opts = dict(args.get("options") or {})
            source = open_source(str(args["source"]), **opts)
            return {"session": await self.open_session(source)}
        if cmd == "stop":
            sid = args.get("session")
            if sid not in self.sessions:
                raise ProtocolError(f"unknown session {sid!r}; 'list' shows the sessions")
            await self.close_session(sid)
            return {"session": sid, "state": self.sessions[sid].state}
        if cmd == "rig":
            rig = self.animator.rig(args.get("session", ""))
            if rig is None:
                raise ProtocolError(f"no rig for session {args.get('session')!r} yet; 'list' shows the sessions")
            return rig.message()
        if cmd == "snapshot":
            sid = args.get("session")
            if sid not in self.buffers:
                raise ProtocolError(f"unknown session {sid!r}; 'list' shows the sessions")
            return self.buffers[sid].snapshot()
        raise ProtocolError(f"unknown command {cmd!r}; known: list, status, start, stop, snapshot, rig")
