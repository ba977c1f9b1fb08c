"""The daemon: sessions, the tracking pool, the engine worker, publishing and control.

One asyncio event loop runs sources, control requests and publishing; it never runs model or tracking code.
Tracking runs in a thread pool (each session's frames in order), the model in an engine worker: one thread in
this process, or (`DaemonConfig.ray`) Ray actors on this machine or a cluster (`ray_engine`); both are an
`EngineBackend`. Every new avatar version is converted to world-space arrays on the worker's thread, then installed
on the loop in the session's `AvatarBuffer`, published on ZeroMQ (deltas) and handed to in-process subscribers
(WebRTC peers).
Live animation (`fastavatar_stream.animation`): every version also leaves as a rig, every tracked frame as a motion.

Lifecycle of a session: its reader (source -> frame queue) and its tracking loop run as two tasks; when either
fails or the session is stopped, the reader is cancelled and joined (the source is closed on its decode thread)
before anything else is released, so one failing session ends alone with one reason. When it has ended the
engine worker drops it, the last versions it published are installed, its final snapshot is written, and it
is retired: only the newest `keep_ended` ended sessions stay in memory (for `snapshot` and late readers);
older ones leave a one-line summary and, with a snapshot folder, their last snapshot on disk.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import itertools
import logging
import re
import time
from collections import OrderedDict
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
from fastavatar_stream.authority import SourcePolicy, SourceRefused, check_start
from fastavatar_stream.session import Session, SessionOptions
from fastavatar_stream.session_engine import EngineBackend
from fastavatar_stream.worker import EngineWorker
from protocols.avatar_buffer import AvatarBuffer
from protocols.errors import ProtocolError
from protocols.wire import Message

log = logging.getLogger(__name__)

Subscriber = Callable[[AvatarBuffer, dict], None]


#: snapshot files in the snapshot folder: <session>_v<version>.ply (written whole, then renamed into place)
SNAPSHOT_NAME = re.compile(r"^s(\d+)_v(\d+)\.ply$")
#: every file of a session's snapshot (the PLY and its drivable avatar npz)
SNAPSHOT_FILE = re.compile(r"^s(\d+)_v(\d+)(\.ply|_avatar\.npz)$")
#: one-line summaries of retired sessions kept for `list`/`stop` replies
MAX_ENDED_SUMMARIES = 1000


@dataclass
class DaemonConfig:
    """weights: what `--weights` names (None: the shipped default; `official:DIR`: the authors' release; see
    `AvatarModel.from_spec`). device: where the model runs ("cpu", "cuda", "cuda:N"). publish/control: ZeroMQ
    endpoints (None: off). max_sessions: concurrent sessions. max_batch: most windows of different sessions in one
    forward (None: 4 on CUDA, where batching raises throughput, 1 on the CPU, where it does not). snapshot_dir:
    each session's newest avatar is kept there as PLY, at most
    `snapshot_interval_s` old while it runs and final when it ends; after a restart those are served (None: off).
    source_policy: what remote `start` requests may open (default: nothing). open_timeout_s: how long opening
    and probing a source may take. keep_ended: ended sessions whose state stays in memory for late readers.
    zmq_security: CURVE keys for the ZeroMQ sockets (None: plain). ray: run the engine on Ray actors ("local",
    "auto" or a cluster address; None: one thread in this process); engine_actors: how many (None: one per GPU
    of the cluster). Snapshots hold the drivable avatar npz (`<session>_v<N>_avatar.npz`) beside the PLY.
    rig_expression_dtype: float32 (posing equals the engine's within 1e-5) or float16 (half the rig's expression
    basis; about 1e-5 m off). engine_nice: how many nice levels below the daemon the in-process engine runs (0: the
    same), so tracking and motion keep their camera rate while the engine computes."""

    weights: str | None = None
    device: str = "cpu"
    publish: str | None = None
    control: str | None = None
    max_sessions: int = 8
    max_batch: int | None = None
    tracking_workers: int = 2
    snapshot_dir: Path | None = None
    snapshot_interval_s: float = 10.0
    session_defaults: SessionOptions = field(default_factory=SessionOptions)
    refine: RefineConfig = field(default_factory=RefineConfig)
    source_policy: SourcePolicy = field(default_factory=SourcePolicy)
    open_timeout_s: float = 10.0
    keep_ended: int = 4
    zmq_security: Any = None
    ray: str | None = None
    engine_actors: int | None = None
    rig_expression_dtype: str = "float32"
    engine_nice: int = 10


class Daemon:
    """See the module docstring. Implements the SessionHub interface the WebRTC server uses."""

    def __init__(self, config: DaemonConfig | None = None, model: AvatarModel | None = None) -> None:
        self.config = config or DaemonConfig()
        self.model = model
        self.sessions: dict[str, Session] = {}  # running ones and the newest `keep_ended` ended ones
        self.buffers: dict[str, AvatarBuffer] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._readers: dict[str, asyncio.Task] = {}
        self._subscribers: dict[str, list[Subscriber]] = {}
        self._kept_ended: list[str] = []  # ended sessions still in memory, oldest first
        self._ended: OrderedDict[str, dict] = OrderedDict()  # summaries of every ended session, bounded
        self._saved: dict[str, int] = {}  # session -> version of its snapshot file
        self._snapshot_due: dict[str, float] = {}
        self._handed_over: dict[str, int] = {}  # newest version the engine handed over, per session
        self._ids = itertools.count(1)
        self._landmark_model = None
        self._mesh_landmark_model = None
        self.publisher = None
        self.control = None
        self.worker: EngineBackend | None = None
        self._track_pool = ThreadPoolExecutor(self.config.tracking_workers, thread_name_prefix="tracking")
        self._open_pool = ThreadPoolExecutor(2, thread_name_prefix="source-open")
        self._snapshot_pool = ThreadPoolExecutor(1, thread_name_prefix="snapshot")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._control_task: asyncio.Task | None = None
        self.animator: Animator | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> "Daemon":
        self._loop = asyncio.get_running_loop()
        if self.config.snapshot_dir is not None:
            self._restore_snapshot_index()
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
        security = self.config.zmq_security
        if self.config.publish:
            from protocols.zmq_transport import AvatarPublisher

            self.publisher = AvatarPublisher(self.config.publish, security=security)
            log.info("publishing avatars on %s", self.publisher.endpoint)
        self.animator = Animator(self.model, self._loop, self.publisher, self.config.rig_expression_dtype)
        if self.config.control:
            from protocols.zmq_transport import ControlServer

            self.control = ControlServer(self._control, self.config.control, security=security)
            self._control_task = asyncio.create_task(self.control.serve())
            log.info("control requests on %s", self.control.endpoint)
        return self

    def _make_worker(self) -> EngineBackend:
        if self.config.ray is None:
            from fastavatar_stream.worker import warm_up_renderer

            warm_up_renderer(self.config.refine.backend)
            max_batch = self.config.max_batch or (4 if self.model.device.type == "cuda" else 1)
            return EngineWorker(self.model, self._on_version, refine=self.config.refine, max_batch=max_batch,
                                nice=self.config.engine_nice)
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
        if self.config.zmq_security is not None:
            self.config.zmq_security.stop()
        self._track_pool.shutdown(wait=False, cancel_futures=True)
        self._open_pool.shutdown(wait=False, cancel_futures=True)
        await self._loop.run_in_executor(None, self._snapshot_pool.shutdown, True)  # final snapshots land

    # -- sessions (SessionHub) --------------------------------------------------------------------------------
    def running(self) -> int:
        return sum(s.state == "running" for s in self.sessions.values())

    def _check_capacity(self) -> None:
        if self.running() >= self.config.max_sessions:
            raise InputError(f"the daemon already runs {self.config.max_sessions} sessions; stop one first")

    async def open_session(self, source, *, name: str | None = None, options: SessionOptions | None = None) -> str:
        self._check_capacity()
        options = options or SessionOptions(**vars(self.config.session_defaults))
        if options.fusion is None:  # the model's own rule (the caller's options object stays as it was)
            options = dataclasses.replace(options, fusion=self.model.default_fusion)
        if options.surface is None:
            options = dataclasses.replace(options, surface=self.model.default_surface)
        if getattr(source, "live", False) or getattr(source, "realtime", False):
            options = dataclasses.replace(options, live=True)  # a file paced like a camera is served like one
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

    def stop_reading(self, session_id: str) -> bool:
        """Stop a session's source; what was read is still tracked, reconstructed and published. True when a
        reader was running."""
        reader = self._readers.get(session_id)
        if reader is None or reader.done():
            return False
        reader.cancel()
        return True

    async def wait_session(self, session_id: str) -> Session:
        session, task = self.sessions[session_id], self._tasks[session_id]
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            pass
        return session

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
        session = self.sessions.get(session_id)
        if session is not None:
            return session.stats()
        return dict(self._ended[session_id])

    # -- the per-session pipeline -----------------------------------------------------------------------------
    async def _run_session(self, session: Session, source) -> None:
        # live: one waiting frame (the newest), so a frame's motion leaves one tracking time after its capture
        # instead of queueing behind older frames; replay: a few, read ahead while tracking runs
        frames: asyncio.Queue = asyncio.Queue(maxsize=1 if session.options.live else 4)
        loop = asyncio.get_running_loop()
        reader = asyncio.create_task(self._read(session, source, frames), name=f"read-{session.id}")
        self._readers[session.id] = reader
        try:
            try:
                while (frame := await frames.get()) is not None:
                    await loop.run_in_executor(self._track_pool, self._track_one, session, frame)
            finally:
                await _cancel_and_join(reader)  # the decoder is closed before anything else is released
            if not reader.cancelled() and reader.exception() is not None:
                raise reader.exception()
            if getattr(source, "error", None):
                session.report.error(source.error)
                session.error = source.error
            await loop.run_in_executor(self._track_pool, session.finish_tracking)
            self.worker.notify()
            await self._drain(session)
            session.state = "ended" if session.error is None else "failed"
        except asyncio.CancelledError:
            if session.state == "running":
                session.state = "ended"
            raise
        except InputError as exc:
            session.fail(_one_line(exc))
        except Exception as exc:
            log.exception("session %s failed", session.id)
            session.fail(f"{exc.__class__.__name__}: {_one_line(exc)}")
        finally:
            await self._retire(session, source)

    async def _read(self, session: Session, source, frames: asyncio.Queue) -> None:
        """Source -> frame queue, then an end marker (also when cancelled or failing)."""
        ended = False
        try:
            async with contextlib.aclosing(source.aiter()) as stream:
                async for frame in stream:
                    session.report.frame_read(frame.pts, frame.t_capture)
                    if session.options.live and frames.full():
                        frames.get_nowait()  # latest frame wins; the dropped one is counted
                        session.report.frames_dropped += 1
                    await frames.put(frame)
                    if session.options.max_frames and session.report.frames_read >= session.options.max_frames:
                        break
            await frames.put(None)
            ended = True
        finally:
            if not ended:  # the tracking loop must see the end even when the queue is full
                if frames.full():
                    frames.get_nowait()
                    session.report.frames_dropped += 1
                frames.put_nowait(None)

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

    async def _retire(self, session: Session, source) -> None:
        """After a session ended: release its source, take it off the worker, save its last version, free it."""
        session.tracking_done.set()
        close_tracker = getattr(session.tracker, "close", None)
        if close_tracker is not None:
            close_tracker()
        try:
            source.close()
        except Exception:
            log.debug("closing source failed", exc_info=True)
        # Waits until the worker is done with the session; the versions it made before are already queued on
        # this loop ahead of this await's wake-up, so they are installed when it returns.
        await self._loop.run_in_executor(None, self.worker.remove_session, session.id)
        session.release()
        session.report.finish(session.timer, t=session.t_work_done)
        if self.config.snapshot_dir is not None:
            await self._save_snapshot(session.id)
        self._readers.pop(session.id, None)
        self._snapshot_due.pop(session.id, None)
        self._handed_over.pop(session.id, None)
        self._ended[session.id] = session.stats()
        while len(self._ended) > MAX_ENDED_SUMMARIES:
            self._ended.popitem(last=False)
        self._kept_ended.append(session.id)
        self._evict_ended()
        await self._loop.run_in_executor(None, return_freed_memory)
        log.info("session %s %s: %d frames, %d windows, version %d%s", session.id, session.state,
                 session.report.frames_read, session.windows_done,
                 session.latest.version if session.latest else 0,
                 f" ({session.error})" if session.error else "")

    def _evict_ended(self) -> None:
        while len(self._kept_ended) > self.config.keep_ended:
            sid = self._kept_ended.pop(0)
            self.sessions.pop(sid, None)
            self.buffers.pop(sid, None)
            self._tasks.pop(sid, None)
            self._subscribers.pop(sid, None)
            if self.publisher is not None:
                self.publisher.remove(sid)
            if self.animator is not None:
                self.animator.forget(sid)

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
        buffer = self.buffers.get(session.id)
        if buffer is None:
            return  # retired meanwhile
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
        if self.config.snapshot_dir is not None and time.monotonic() >= self._snapshot_due.get(session.id, 0.0):
            self._snapshot_due[session.id] = time.monotonic() + self.config.snapshot_interval_s
            asyncio.ensure_future(self._save_snapshot(session.id))

    # -- snapshots on disk ------------------------------------------------------------------------------------
    def _restore_snapshot_index(self) -> None:
        """Index the snapshot folder (the newest file of each session) and start session ids after it."""
        folder = Path(self.config.snapshot_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for path in folder.iterdir():
            match = SNAPSHOT_NAME.match(path.name)
            if match:
                sid, version = f"s{match.group(1)}", int(match.group(2))
                self._saved[sid] = max(version, self._saved.get(sid, -1))
        if self._saved:
            highest = max(int(sid[1:]) for sid in self._saved)
            self._ids = itertools.count(highest + 1)
            log.info("serving the last snapshots of %d earlier sessions from %s", len(self._saved), folder)

    async def _save_snapshot(self, session_id: str) -> None:
        """Write the session's installed version (never raises: a failed write is logged)."""
        buffer = self.buffers.get(session_id)
        if buffer is None or buffer.version <= self._saved.get(session_id, 0):
            return
        version, arrays = buffer.version, buffer.live_arrays()
        folder = Path(self.config.snapshot_dir)
        rig = self.animator.rig(session_id) if self.animator is not None else None
        ok = await self._loop.run_in_executor(self._snapshot_pool, _write_snapshot, folder, session_id, version,
                                              arrays, rig)
        if ok:
            self._saved[session_id] = max(version, self._saved.get(session_id, 0))

    async def _saved_snapshot(self, session_id: str) -> Message | None:
        version = self._saved.get(session_id)
        if version is None:
            return None
        path = Path(self.config.snapshot_dir) / f"{session_id}_v{version}.ply"
        return await self._loop.run_in_executor(self._snapshot_pool, _read_snapshot, path, session_id, version)

    # -- control requests -----------------------------------------------------------------------------------
    async def _control(self, request) -> Any:
        cmd, args = request.command, request.args
        if cmd == "snapshot":
            return await self._snapshot_reply(str(args.get("session")))
        if cmd == "list":
            return {"sessions": self._listing()}
        if cmd == "status":
            batches = getattr(self.worker, "batch_sizes", {})  # the in-process worker counts its batched forwards
            return {"sessions": len(self.sessions), "running": self.running(),
                    "windows": self.worker.windows_done if self.worker else 0,
                    "migrations": sum(s.report.migrations for s in self.sessions.values()),
                    # windows per forward -> how many forwards (several sessions batched on one device)
                    "batches": {str(k): v for k, v in sorted(batches.items())}}
        if cmd == "start":
            plan = check_start(args.get("source"), args.get("options"), self.config.source_policy)
            self._check_capacity()
            source = await self._open_remote(plan.spec, plan.source_options)
            options = SessionOptions(**vars(self.config.session_defaults))
            options.max_frames = plan.max_frames
            return {"session": await self.open_session(source, name=Path(plan.spec).name, options=options)}
        if cmd == "stop":
            sid = args.get("session")
            if sid not in self.sessions and sid not in self._ended:
                raise ProtocolError(f"unknown session {sid!r}; 'list' shows the sessions")
            await self.close_session(sid)
            return {"session": sid, "state": self.session_stats(sid)["state"]}
        if cmd == "rig":
            rig = self.animator.rig(args.get("session", ""))
            if rig is None:
                raise ProtocolError(f"no rig for session {args.get('session')!r} yet; 'list' shows the sessions")
            return rig.message()
        raise ProtocolError(f"unknown command {cmd!r}; known: list, status, start, stop, snapshot, rig")

    async def _snapshot_reply(self, sid: str) -> Message:
        if self.publisher is not None and sid in self.publisher.sessions():
            return self.publisher.snapshot(sid)  # the last *published* state, with its seq (clone pattern)
        if self.publisher is None and sid in self.buffers:
            return self.buffers[sid].snapshot()
        saved = await self._saved_snapshot(sid) if self.config.snapshot_dir is not None else None
        if saved is None:
            raise ProtocolError(f"unknown session {sid!r}; 'list' shows the sessions")
        return saved

    def _listing(self) -> list[dict]:
        """Every session this daemon knows: running, ended, and saved by an earlier run."""
        out: dict[str, dict] = {sid: dict(summary) for sid, summary in self._ended.items()}
        out.update({sid: s.stats() for sid, s in self.sessions.items()})
        for sid, version in self._saved.items():
            out.setdefault(sid, {"session": sid, "state": "saved", "version": version})
        if self.publisher is not None:  # subscribers compare with the version that really went out
            for sid in self.publisher.sessions():
                out.setdefault(sid, {"session": sid})["version"] = self.publisher.version(sid)
        return list(out.values())

    async def _open_remote(self, spec: str, options: dict):
        """Open a source a peer named, off the event loop and within `open_timeout_s`."""
        from fastavatar_stream.sources import open_source

        pending = self._open_pool.submit(lambda: open_source(spec, restricted=True, **options))
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(pending)), self.config.open_timeout_s)
        except asyncio.TimeoutError:
            pending.add_done_callback(_close_opened)  # if it ever opens, nobody will read it
            raise SourceRefused(f"the source did not open within {self.config.open_timeout_s:g} s") from None


async def _cancel_and_join(task: asyncio.Task) -> None:
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def _close_opened(future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else exc.__class__.__name__


def _write_snapshot(folder: Path, session_id: str, version: int, arrays: dict, rig=None) -> bool:
    """Write <session>_v<version>.ply (and its drivable <session>_v<version>_avatar.npz) whole, then renamed into
    place, and remove the session's older files."""
    from protocols.animation import save_avatar
    from protocols.ply import save_ply

    try:
        folder.mkdir(parents=True, exist_ok=True)
        if rig is not None:
            rig_path = folder / f"{session_id}_v{version}_avatar.npz"
            partial = rig_path.with_name(rig_path.name + ".part.npz")
            save_avatar(partial, rig)
            partial.replace(rig_path)
        save_ply(folder / f"{session_id}_v{version}.ply", arrays)
        for old in folder.glob(f"{session_id}_v*"):
            match = SNAPSHOT_FILE.match(old.name)
            if match and f"s{match.group(1)}" == session_id and int(match.group(2)) < version:
                old.unlink(missing_ok=True)
        return True
    except (OSError, ValueError) as exc:  # a full disk, a folder gone, arrays the PLY writer refuses
        log.error("session %s: snapshot v%d not written to %s: %s", session_id, version, folder,
                  getattr(exc, "strerror", None) or exc)
        return False


@functools.cache
def _libc_malloc_trim():
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def return_freed_memory() -> None:
    """Hand the heap pages freed by a retired session back to the operating system.

    glibc's allocator keeps freed pages in its per-thread arenas, and a session's tensors and frames come in sizes
    the next session does not reuse exactly, so without this the process keeps growing although nothing is held
    (benchmarks/sessions_memory.py measures it). A no-op where the C library has no malloc_trim."""
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


def _read_snapshot(path: Path, session_id: str, version: int) -> Message | None:
    from protocols.ply import PlyError, load_ply

    try:
        arrays = load_ply(path)
    except (OSError, PlyError) as exc:
        log.warning("saved snapshot %s unreadable: %s", path, exc)
        return None
    buffer = AvatarBuffer(session_id)
    buffer.assign(np.arange(len(arrays["means"]), dtype=np.uint32), arrays, version)
    return buffer.snapshot()
