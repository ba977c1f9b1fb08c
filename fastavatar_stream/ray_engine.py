"""Engine workers as Ray actors: the daemon's engine spread over the GPUs (or CPU slots) of a Ray cluster.

`EngineActor` owns one model on one device and the `SessionEngine` of every session placed on it. The daemon keeps
ingest, tracking, publishing, control and WebRTC; its `RayEngineWorker` (one thread, an `EngineBackend`) places each
session on the least loaded live actor and keeps it there, sends that actor the session's windows and refinement
bursts (one call in flight per actor, so a session's versions come back in order), and hands every version to the
daemon exactly as the in-process worker does.

Fault tolerance: every version comes back with the fuser's full state (`FuserState`), which the daemon keeps as the
session's resume point. When an actor dies, each of its sessions moves to a live actor, which resumes the fuser
from that state; a window that was in flight is sent again. Version numbers therefore continue without a gap and
nothing published is lost; a refinement burst in flight is dropped. `Session.report.migrations` counts the moves.

The daemon calls its actors `engine-0`, `engine-1`, ...; on a cluster (`--ray auto` or an address) these are their
Ray names in the `fastavatar-stream` namespace and they are detached, so several daemons on several machines share
them (sessions are keyed by daemon on an actor); a local instance's actors end with the daemon.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError

from engine.avatar_model import AvatarModel
from engine.errors import InputError
from engine.fusion import AvatarState, FuserState
from engine.refine import RefineConfig
from fastavatar_stream.frames import Window
from fastavatar_stream.session import Session
from fastavatar_stream.session_engine import RefineJob, SessionEngine, StageLog, WindowJob, refine_job

log = logging.getLogger(__name__)

NAMESPACE = "fastavatar-stream"
#: how long the daemon waits for its actors to load their model before it gives up with a clear error
ACTOR_START_TIMEOUT_S = 300.0
OnVersion = Callable[[Session, AvatarState, float], None]


@dataclass
class SessionOpening:
    """Sent with a session's first call to an actor: its Gaussian budget and the state to resume (None: new)."""

    budget: int
    state: FuserState | None


@dataclass
class EngineResult:
    """A new version (tensors on the CPU), the fuser's next free uid, and the stage timings on the actor."""

    version: AvatarState
    next_uid: int
    stages: list[tuple[str, float]]


@ray.remote(concurrency_groups={"control": 1})
class EngineActor:
    """One model on one device and the sessions placed on it (see the module docstring)."""

    def __init__(self, weights: str | None, refine: RefineConfig, threads: int | None = None) -> None:
        from fastavatar_stream.worker import warm_up_renderer

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.weights = str(weights) if weights else "default"
        self.model = AvatarModel.from_spec(weights, device=self.device)
        self.refine_config = refine
        warm_up_renderer(refine.backend)
        self._engines: dict[str, SessionEngine] = {}

    @ray.method(concurrency_group="control")
    def describe(self) -> dict:
        return {"weights": self.weights, "model": self.model.network.cfg.name, "device": self.device,
                "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    @ray.method(concurrency_group="control")
    def load(self, other_than: str = "") -> int:
        """Sessions open here for daemons other than `other_than` (a daemon id)."""
        return sum(not key.startswith(other_than + "/") for key in list(self._engines))

    def window(self, key: str, job: WindowJob, opening: SessionOpening | None) -> EngineResult:
        engine = self._engine(key, opening)
        stages = StageLog()
        with torch.no_grad():
            version = engine.run_window(self.model, job, stages)
        return self._result(engine, version, stages)

    def refine(self, key: str, job: RefineJob, opening: SessionOpening | None) -> EngineResult:
        engine = self._engine(key, opening)
        stages = StageLog()
        version = engine.refine(self.model, job, stages)
        return self._result(engine, version, stages)

    def close(self, key: str) -> None:
        self._engines.pop(key, None)

    def _engine(self, key: str, opening: SessionOpening | None) -> SessionEngine:
        if opening is not None:
            self._engines[key] = SessionEngine.resume(opening.state, opening.budget, self.refine_config)
        if key not in self._engines:
            raise RuntimeError(f"session {key} is not open on this engine actor")
        return self._engines[key]

    @staticmethod
    def _result(engine: SessionEngine, version: AvatarState, stages: StageLog) -> EngineResult:
        # results cross processes and machines: CPU tensors, whatever device the refiner used
        cpu = AvatarState(version.version, version.gaussians.to("cpu"),
                          None if version.shape is None else version.shape.cpu(), version.frames, version.stats)
        return EngineResult(cpu, engine.fuser.state().next_uid, stages.stages)


# -- the cluster ----------------------------------------------------------------------------------------------------
@dataclass
class RayConfig:
    """address: "local" (a Ray instance of this daemon's own, files under $RAY_TMPDIR or /tmp/ray; when this
    process already joined a Ray instance, that one), "auto" (the cluster this machine joined with `ray start`) or
    a cluster address. actors: engine actors (None: one per GPU of the cluster, else 1)."""

    address: str = "local"
    actors: int | None = None

    @property
    def local(self) -> bool:
        return self.address == "local"


def connect(config: RayConfig) -> bool:
    """Join (or, for "local", start) the Ray cluster; True when this call started Ray in this process.
    One clear InputError when that fails."""
    if ray.is_initialized():
        return False
    if not config.local and config.address != "auto":
        check_reachable(config.address)
    try:
        if config.local:
            ray.init(include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)
        else:
            ray.init(address=config.address, namespace=NAMESPACE, log_to_driver=False)
    except (OSError, RuntimeError, ValueError) as exc:
        raise InputError(f"--ray {config.address}: cannot reach the Ray cluster: {exc}") from None
    return True


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """InputError unless something accepts TCP connections at the cluster address (Ray itself would retry for
    minutes before it gives up)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--ray needs local, auto or HOST:PORT of a Ray head, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise InputError(f"--ray {address}: no Ray head answers there ({exc.strerror or exc}); start one with "
                         "'ray start --head' or use --ray local") from None


def start_actors(config: RayConfig, weights: str | None, refine: RefineConfig) -> list:
    """The engine actors (created, or found by name when another daemon created them), ready to take work."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    count = config.actors or max(gpus, 1)
    if count < 1:
        raise InputError(f"--engine-actors must be at least 1, got {count}")
    if gpus:
        placement = {"num_gpus": 1}
    else:  # CPU slots: share the cluster's CPUs among the actors, one thread each
        placement = {"num_cpus": min(1.0, float(resources.get("CPU", 1)) / count)}
    # a cluster's actors are named and detached so that every daemon joining it shares them; a local instance's
    # belong to this daemon alone
    shared = {} if config.local else {"get_if_exists": True, "lifetime": "detached"}
    actors = [EngineActor.options(**({"name": f"engine-{i}"} if shared else {}), **shared, max_restarts=0,
                                  **placement).remote(weights, refine, None if gpus else 1)
              for i in range(count)]
    try:
        described = ray.get([a.describe.remote() for a in actors], timeout=ACTOR_START_TIMEOUT_S)
    except GetTimeoutError:
        raise InputError(f"the Ray cluster could not start {count} engine actors in {ACTOR_START_TIMEOUT_S:.0f} s "
                         f"(it has {resources}); ask for fewer with --engine-actors") from None
    wanted = str(weights) if weights else "default"
    for i, info in enumerate(described):
        if info["weights"] != wanted:
            raise InputError(f"engine actor engine-{i} already runs weights {info['weights']}, not {wanted}; "
                             "every daemon sharing a cluster must use the same --weights")
        log.info("engine actor engine-%d: %s model on %s (node %s, pid %d)", i, info["model"], info["device"],
                 info["node"][:8], info["pid"])
    return actors


# -- the daemon side ------------------------------------------------------------------------------------------------
@dataclass
class _Call:
    """One call in flight on an actor."""

    ref: ray.ObjectRef
    session: Session
    t_start: float
    window: Window | None = None  # None: a refinement burst
    job: WindowJob | RefineJob | None = None


@dataclass
class _Actor:
    """The daemon's view of one engine actor."""

    name: str
    handle: object
    sessions: set[str] = field(default_factory=set)   # placed here by this daemon
    opened: set[str] = field(default_factory=set)     # sessions whose state the actor holds
    targets: dict[str, tuple[int, ...]] = field(default_factory=dict)  # refinement frames it holds per session
    call: _Call | None = None
    alive: bool = True


class RayEngineWorker(threading.Thread):
    """Implements `EngineBackend` on Ray actors; see the module docstring."""

    def __init__(self, actors: list, on_version: OnVersion, *, owns_actors: bool = False, started_ray: bool = False,
                 name: str = "ray-engine") -> None:
        super().__init__(name=name, daemon=True)
        self.on_version = on_version
        self.owns_actors = owns_actors  # a local instance's actors end with the daemon; a cluster's stay shared
        self.started_ray = started_ray
        self.daemon_id = uuid.uuid4().hex[:8]
        self.actors = [_Actor(f"engine-{i}", handle) for i, handle in enumerate(actors)]
        self._sessions: dict[str, Session] = {}
        self._placement: dict[str, _Actor] = {}
        self._resume: dict[str, FuserState] = {}
        self._retry: dict[str, tuple[Window, WindowJob]] = {}  # windows in flight on an actor that died
        self._closing: list[str] = []
        self._wake = threading.Condition()
        self._stopping = False
        self.windows_done = 0
        self.busy_s = 0.0

    @classmethod
    def launch(cls, config: RayConfig, weights: str | None, refine: RefineConfig,
               on_version: OnVersion) -> "RayEngineWorker":
        """Connect to the cluster, start (or find) the actors; the caller starts the thread."""
        started = connect(config)
        return cls(start_actors(config, weights, refine), on_version, owns_actors=config.local, started_ray=started)

    # -- control (any thread) ---------------------------------------------------------------------------------
    def add_session(self, session: Session) -> None:
        with self._wake:
            self._sessions[session.id] = session
            self._wake.notify()

    def remove_session(self, session_id: str) -> None:
        with self._wake:
            self._closing.append(session_id)
            self._wake.notify()

    def notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()

    def placement(self) -> dict[str, str]:
        """Which actor runs which session (session id -> actor name)."""
        with self._wake:
            return {sid: actor.name for sid, actor in self._placement.items()}

    def actor_handle(self, name: str):
        """The Ray handle of the actor called `name` (engine-0, ...)."""
        return next(a.handle for a in self.actors if a.name == name)

    # -- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            while True:
                with self._wake:
                    if self._stopping:
                        return
                    closing, self._closing = self._closing, []
                    sessions = dict(self._sessions)
                for sid in closing:
                    self._close(sid)
                    sessions.pop(sid, None)  # taken before it was closed: it must not be placed again
                self._place_waiting(sessions)
                for actor in self.actors:
                    if actor.alive and actor.call is None:
                        self._submit_next(actor, sessions)
                busy = [a for a in self.actors if a.call is not None]
                if not busy:
                    with self._wake:
                        if not self._stopping:
                            self._wake.wait(timeout=0.02)
                    continue
                done, _ = ray.wait([a.call.ref for a in busy], num_returns=1, timeout=0.02)
                for actor in busy:
                    if actor.call is not None and actor.call.ref in done:
                        self._collect(actor)
        finally:
            self._release()

    def _release(self) -> None:
        for sid in list(self._placement):
            self._close(sid)
        if self.owns_actors:
            for actor in self.actors:
                if actor.alive:
                    ray.kill(actor.handle)
        if self.started_ray:
            ray.shutdown()

    def _key(self, session_id: str) -> str:
        return f"{self.daemon_id}/{session_id}"

    def _close(self, session_id: str) -> None:
        with self._wake:
            self._sessions.pop(session_id, None)
            actor = self._placement.pop(session_id, None)
        self._resume.pop(session_id, None)
        self._retry.pop(session_id, None)
        if actor is not None:
            actor.sessions.discard(session_id)
            actor.targets.pop(session_id, None)
            if actor.alive and session_id in actor.opened:
                actor.opened.discard(session_id)
                actor.handle.close.remote(self._key(session_id))  # fire and forget

    # -- placement ---------------------------------------------------------------------------------------------
    def _has_work(self, session: Session) -> bool:
        return session.id in self._retry or (session.state != "failed" and (
            session.oldest_ready() is not None or session.wants_refinement()))

    def _place_waiting(self, sessions: dict[str, Session]) -> None:
        for sid, session in sessions.items():
            if sid not in self._placement and self._has_work(session):
                self._place(session)

    def _place(self, session: Session) -> None:
        """Put the session on the least loaded live actor: the sessions this daemon placed there plus those other
        daemons sharing it opened there."""
        live = [a for a in self.actors if a.alive]
        if not live:
            self._fail_all("every engine actor died")
            return
        loads = {a.name: self._load(a) for a in live}
        live = [a for a in live if a.alive]  # a load query may have found one dead
        if not live:
            self._fail_all("every engine actor died")
            return
        target = min(live, key=lambda a: (loads[a.name], a.name))
        with self._wake:
            self._placement[session.id] = target
        target.sessions.add(session.id)
        log.info("session %s placed on %s", session.id, target.name)

    def _load(self, actor: _Actor) -> int:
        try:
            others = ray.get(actor.handle.load.remote(self.daemon_id), timeout=5.0)
        except RayActorError:
            self._actor_died(actor)
            return 0
        except GetTimeoutError:
            others = 0
        return others + len(actor.sessions)

    # -- calls -------------------------------------------------------------------------------------------------
    def _opening(self, actor: _Actor, session: Session) -> SessionOpening | None:
        if session.id in actor.opened:
            return None
        actor.opened.add(session.id)
        return SessionOpening(session.options.budget, self._resume.get(session.id))

    def _submit_next(self, actor: _Actor, sessions: dict[str, Session]) -> None:
        mine = [sessions[sid] for sid in actor.sessions if sid in sessions]
        retry = next((s for s in mine if s.id in self._retry), None)
        if retry is not None:
            window, job = self._retry.pop(retry.id)
            self._send_window(actor, retry, window, job)
            return
        ready = sorted((t, s.id) for s in mine if s.state != "failed" and (t := s.oldest_ready()) is not None)
        for _, sid in ready:
            window = sessions[sid].take_window()
            if window is not None:
                self._send_window(actor, sessions[sid], window, WindowJob.from_window(sessions[sid], window))
                return
        candidates = [s for s in mine if s.wants_refinement()]
        if candidates:
            session = min(candidates, key=lambda s: s.refine_spent)
            job = refine_job(session, session.options.refine_burst_seconds, actor.targets.get(session.id))
            ref = actor.handle.refine.remote(self._key(session.id), job, self._opening(actor, session))
            actor.call = _Call(ref, session, time.perf_counter(), None, job)

    def _send_window(self, actor: _Actor, session: Session, window: Window, job: WindowJob) -> None:
        ref = actor.handle.window.remote(self._key(session.id), job, self._opening(actor, session))
        actor.call = _Call(ref, session, time.perf_counter(), window, job)

    def _collect(self, actor: _Actor) -> None:
        call, actor.call = actor.call, None
        session = call.session
        try:
            result: EngineResult = ray.get(call.ref)
        except RayActorError:
            self._actor_died(actor, call)
            return
        except Exception as exc:  # the job itself failed: like the in-process worker, only its session suffers
            self._job_failed(call, exc)
            return
        finally:
            self.busy_s += time.perf_counter() - call.t_start
        for stage, seconds in result.stages:
            session.timer.add(stage, seconds)
        version = result.version
        self._resume[session.id] = FuserState(version.version, version.gaussians, version.shape, result.next_uid)
        if call.window is not None:
            session.window_folded(call.window)
            self.windows_done += 1
            self.on_version(session, version, max(f.t_capture for f in call.window.frames))
            session.window_finished(time.perf_counter() - call.t_start, version.version)
        else:
            actor.targets[session.id] = call.job.key
            # handed over before the burst counts as spent: the daemon's drain waits for what was handed over
            self.on_version(session, version, time.time())
            session.refinement_spent(call.t_start, time.perf_counter(), version.version)

    def _job_failed(self, call: _Call, exc: Exception) -> None:
        session = call.session
        cause = getattr(exc, "cause", None) or exc
        if call.window is not None:
            log.error("session %s: window %d failed on an engine actor: %s", session.id, call.window.index, cause)
            session.fail(f"window {call.window.index} failed: {cause.__class__.__name__}: {cause}")
            session.window_finished()
        else:
            log.error("session %s: refinement failed on an engine actor; refinement turned off for it: %s",
                      session.id, cause)
            session.stop_refinement(f"refinement failed: {cause}")
            session.refinement_spent(call.t_start, time.perf_counter())

    # -- failures -----------------------------------------------------------------------------------------------
    def _actor_died(self, actor: _Actor, call: _Call | None = None) -> None:
        """Move the actor's sessions to live actors; the window it was running goes to the new actor first."""
        call, actor.call = call or actor.call, None
        actor.alive = False
        log.warning("engine actor %s died; moving its %d sessions", actor.name, len(actor.sessions))
        if call is not None and call.window is not None:
            self._retry[call.session.id] = (call.window, call.job)
        orphans = sorted(actor.sessions)
        actor.sessions.clear()
        actor.opened.clear()
        actor.targets.clear()
        for sid in orphans:
            with self._wake:
                self._placement.pop(sid, None)
                session = self._sessions.get(sid)
            if session is not None:
                session.report.migrations += 1
                self._place(session)

    def _fail_all(self, reason: str) -> None:
        with self._wake:
            sessions = list(self._sessions.values())
        for session in sessions:
            if session.state == "running":
                session.fail(reason)
            if self._retry.pop(session.id, None) is not None:
                session.window_finished()
