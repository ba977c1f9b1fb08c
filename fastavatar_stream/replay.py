"""Replay: run one recorded stream through the whole daemon pipeline in this process and write its results.

`DIR/avatar.ply` (final avatar, world space at the neutral pose), `DIR/avatar.npz` (the same avatar, drivable:
canonical Gaussians and rig, see `protocols.animation`), `DIR/report.json` (counts, per-stage
timings, latency, real-time factor), `DIR/preview.png` (the avatar from 8 views beside input frames) and, with
a hold-out, `DIR/holdout.png` (held-out real frames beside the avatar rendered with their tracked pose).

Two hold-outs: every K-th frame (`holdout`, close to interpolation: its neighbours are reconstructed) and the
tail of the stream (`holdout_tail`, a fraction: the avatar is built from the first part and scored on a
stretch it never saw). Held-out frames never enter a window, a FramePack pool or refinement. The report scores
the final avatar (`holdout`) and, in `holdout_timeline`, the avatar as it was when the stream ended and every
`TIMELINE_EVERY_S` seconds of lingering after it.

SIGINT/SIGTERM stop the reading: frames already read are tracked, pending windows reconstructed, refinement
stops, and what was built is written with `"interrupted": true` and the signal's name in report.json; a
second signal abandons the pending work too. avatar.ply and report.json hold the last published version.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.avatar_model import AvatarModel
from engine.errors import InputError
from engine.fusion import AvatarState
from fastavatar_stream.daemon import Daemon, DaemonConfig
from fastavatar_stream.session import RefineSample, Session, SessionOptions

log = logging.getLogger(__name__)

#: while a session lingers after its stream, its avatar is scored again this often (seconds)
TIMELINE_EVERY_S = 10.0


@dataclass
class ReplayOptions:
    source: str
    out: Path
    weights: str | None = None
    realtime: bool = False
    publish: str | None = None
    control: str | None = None
    holdout: int = 0
    holdout_tail: float = 0.0
    holdout_max_frames: int = 48
    refine_seconds: float = 0.0
    budget: int = 60_000
    max_frames: int | None = None
    detector: str = "auto"
    fov_degrees: float = 40.0
    progress: bool = True
    linger_s: float = 0.0
    fusion: str | None = None
    surface: bool | None = None
    device: str = "cpu"


@dataclass
class ReplayResult:
    """What a replay leaves behind in memory: the report dict, the ended session (its avatar, kept and held-out
    frames), the model that built it and the avatar as it was at the stream's end and while lingering."""

    report: dict
    session: Session
    model: AvatarModel
    timeline: list[tuple[float, AvatarState | None]]  # (seconds after the stream's end, avatar then)


async def run_replay(opts: ReplayOptions) -> dict:
    """Replay `opts.source`; returns the report dict (also written to DIR/report.json)."""
    return (await replay(opts)).report


async def replay(opts: ReplayOptions) -> ReplayResult:
    """Replay `opts.source` and write DIR's files; returns the report with the session and model."""
    from fastavatar_stream.sources import open_source

    loop = asyncio.get_running_loop()
    stop = _Interrupt()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.signal, sig)
    try:
        source = open_source(opts.source, realtime=opts.realtime)
        options = SessionOptions(live=opts.realtime, budget=opts.budget, holdout=opts.holdout,
                                 holdout_from=tail_start(source, opts), refine_seconds=opts.refine_seconds,
                                 max_frames=opts.max_frames, detector=opts.detector, fov_degrees=opts.fov_degrees,
                                 fusion=opts.fusion, surface=opts.surface, linger_s=opts.linger_s)
        daemon = Daemon(DaemonConfig(weights=opts.weights, device=opts.device, publish=opts.publish,
                                     control=opts.control))
        await daemon.start()
        try:
            session_id = await daemon.open_session(source, name=str(opts.source), options=options)
            stop.attach(daemon, session_id)
            progress = _progress(daemon, session_id, source) if opts.progress else None
            marks: list[tuple[float, AvatarState | None]] = []
            timeline = asyncio.create_task(_timeline(daemon.sessions[session_id], marks))
            session = await daemon.wait_session(session_id)
            timeline.cancel()
            if session.stream_end is not None:
                marks.insert(0, (0.0, session.stream_end[1]))
            if progress is not None:
                progress.cancel()
            report = await loop.run_in_executor(None, _write_outputs, daemon, session, opts, marks, stop.name)
            return ReplayResult(report, session, daemon.model, marks)
        finally:
            await daemon.shutdown()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


class _Interrupt:
    """SIGINT/SIGTERM during a replay: the first stops reading and refinement, a second abandons the session's
    pending work; either way what was built is written."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.count = 0
        self._daemon: Daemon | None = None
        self._session_id: str | None = None

    def signal(self, sig: signal.Signals) -> None:
        self.count += 1
        self.name = self.name or signal.Signals(sig).name
        log.warning("%s: %s", self.name, "stopping the reading; writing what was built" if self.count == 1
                    else "abandoning the pending work")
        self._act()

    def attach(self, daemon: Daemon, session_id: str) -> None:
        self._daemon, self._session_id = daemon, session_id
        self._act()

    def _act(self) -> None:
        if self._daemon is None or self.count == 0:
            return
        session = self._daemon.sessions.get(self._session_id)
        if session is not None:
            session.stop_refinement()
        self._daemon.stop_reading(self._session_id)
        if self.count > 1:
            asyncio.ensure_future(self._daemon.close_session(self._session_id))


def tail_start(source, opts: ReplayOptions) -> int | None:
    """First frame index of the tail hold-out (None without one): the last `holdout_tail` of the frames the
    replay will read."""
    if not opts.holdout_tail:
        return None
    total = source_length(source)
    if opts.max_frames:
        total = min(total, opts.max_frames) if total else opts.max_frames
    if not total:
        raise InputError(f"{opts.source}: --holdout-tail needs a source of known length (a video file or folder)")
    start = int(round(total * (1.0 - opts.holdout_tail)))
    if not 0 < start < total:
        raise InputError(f"--holdout-tail {opts.holdout_tail:g} leaves no frames to build from or none to score "
                         f"on in {total} frames")
    return start


def source_length(source) -> int | None:
    """Frames (time steps for a multi-view capture) the source will deliver, when it says."""
    if getattr(source, "steps", None) is not None:
        return len(source.steps)
    if isinstance(getattr(source, "files", None), list):
        return len(source.files)
    n = getattr(source, "n_frames", None)
    if n:
        return int(n)
    duration, fps = getattr(source, "duration", None), getattr(source, "fps", None)
    return int(round(duration * fps)) if duration and fps else None


async def _timeline(session: Session, marks: list[tuple[float, AvatarState | None]]) -> None:
    """Append (seconds after the stream's end, avatar version) every TIMELINE_EVERY_S while the session lingers
    (the avatar at the end itself is `session.stream_end`)."""
    while session.stream_end is None:
        await asyncio.sleep(0.05)
    t_end = session.stream_end[0]
    while True:
        await asyncio.sleep(TIMELINE_EVERY_S - (time.time() - t_end) % TIMELINE_EVERY_S)
        marks.append((round(time.time() - t_end, 1), session.latest))


def _progress(daemon: Daemon, session_id: str, source) -> asyncio.Task:
    from tqdm import tqdm

    total = getattr(source, "frame_count", None)

    async def tick() -> None:
        bar = tqdm(total=total, unit="frame", desc="replay", dynamic_ncols=True, leave=False)
        try:
            while True:
                stats = daemon.session_stats(session_id)
                bar.n = stats["frames_tracked"]
                bar.set_postfix(windows=stats["windows"], version=stats["version"], gaussians=stats["gaussians"])
                bar.refresh()
                await asyncio.sleep(0.2)
        finally:
            bar.close()

    return asyncio.create_task(tick())


def _write_outputs(daemon: Daemon, session: Session, opts: ReplayOptions,
                   marks: list[tuple[float, AvatarState | None]], interrupted: str | None = None) -> dict:
    from protocols.animation import save_avatar
    from protocols.ply import save_ply

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    report = session.report
    report.frames_tracked = session.frames_tracked
    report.frames_unusable = session.frames_unusable
    report.frames_dropped += session.windower.stats.thinned
    report.windows = session.windows_done
    if interrupted:
        report.extra.update(interrupted=True, signal=interrupted)
    if session.latest is None:
        reason = session.error or (f"no usable face was found in any of the {report.frames_read} frames"
                                   if report.frames_read else "the source gave no frames")
        if interrupted:
            data = {**report.to_dict(), "interrupted": True, "signal": interrupted}
            (out / "report.json").write_text(json.dumps(data, indent=2))
            return data
        report.error(reason)
        report.write(out / "report.json")
        raise InputError(f"{opts.source}: no avatar was built: {reason}")
    buffer = daemon.buffers[session.id]
    arrays = buffer.live_arrays()
    save_ply(out / "avatar.ply", arrays)
    rig = daemon.animator.rig(session.id)
    if rig is not None:
        save_avatar(out / "avatar.npz", rig)
    model = daemon.model
    extra = {"session": session.stats(), "tracker": dict(session.tracker.counts),
             "model": model.network.cfg.name, "weights": str(opts.weights or "default"),
             "windower": vars(session.windower.stats), "input": input_preparation(model, session),
             **window_log(session)}
    if (opts.holdout or opts.holdout_tail) and session.holdout:
        samples = holdout_samples(session, opts.holdout_max_frames)
        scored = evaluate_holdout(model, samples, session.latest, out / "holdout.png")
        scored.update(kind="tail" if opts.holdout_tail else "every_kth", every_k=opts.holdout or None,
                      tail_from_frame=session.options.holdout_from, frames_held_out=len(session.holdout),
                      version=session.latest.version)
        report.extra["holdout"] = scored
        report.extra["holdout_timeline"] = [
            {"after_end_s": after, "version": version.version,
             **{k: v for k, v in evaluate_holdout(model, samples, version).items() if k != "per_frame"}}
            for after, version in marks if version is not None]
    write_preview(model, session, out / "preview.png")
    report.extra.update(extra)
    data = report.to_dict()
    data["versions_published"] = data["versions"]
    data["versions"] = report.versions_total
    data["n_gaussians_final"] = report.n_gaussians[-1] if report.n_gaussians else 0
    data["version_final"] = buffer.version  # the version avatar.ply holds: the last one published
    data["interrupted"] = bool(interrupted)
    if interrupted:
        data["signal"] = interrupted
    for key in ("holdout", "holdout_timeline"):
        if key in data["extra"]:
            data[key] = data["extra"][key]
    (out / "report.json").write_text(json.dumps(data, indent=2))
    return data


def input_preparation(model, session: Session) -> dict:
    """How this session's frames were framed and matted for the model, and how its Gaussians were fused."""
    preparer = session.preparer
    matte = ("not used (the model takes unmatted crops)" if not model.expects_matted else
             f"tracker matte on {preparer.mattes_used} of {session.frames_tracked} frames" if preparer.mattes_used
             else "none available: crops keep their own background")
    return {"tracking_head": getattr(model.landmark_head, "source", "unknown"), "framing": model.framing,
            "crop_scale": preparer.scale, "size": preparer.size, "matte": matte, "fusion": session.options.fusion,
            "surface": session.options.surface}


def holdout_samples(session: Session, limit: int) -> list[RefineSample]:
    """At most `limit` held-out frames with a FLAME fit, evenly spread over the hold-out (scoring is slow)."""
    samples = [s for s in session.holdout if s.frame.flame is not None]
    if len(samples) <= limit:
        return samples
    keep = np.linspace(0, len(samples) - 1, limit).round().astype(int)
    return [samples[i] for i in sorted(set(keep.tolist()))]


def window_log(session: Session) -> dict:
    """Per-window frames, coverage gain and ready -> engine wait, the frames refinement fits, what made each
    version, how the engine's time was split, and refinement burst lengths (seconds)."""
    from fastavatar_stream.timing import percentiles

    timings = list(session.window_timings)
    bursts = [end - start for start, end in list(session.refine_bursts)]
    return {
        "window_log": [{"index": t.index, "frames": list(t.frames), "pool": list(t.pool),
                        "wait_s": round(t.wait, 4), "coverage_gain": round(t.coverage_gain, 3),
                        "engine_s": round(t.t_done - t.t_started, 4) if t.t_done is not None else None}
                       for t in timings],
        "refine_frames": [s.index for s in session.refine_pool],
        "version_log": list(session.version_log),  # per version: made by a window or by refinement
        "engine_split": session.engine_split(),
        "window_wait": percentiles([t.wait for t in timings]),
        "refine_bursts": {"n": len(bursts), **percentiles(bursts), "max": max(bursts) if bursts else None},
    }


def render_views(model, gaussians, shape: torch.Tensor | None, n_views: int = 8, size: int = 256,
                 background: float = 1.0) -> np.ndarray:
    """(n_views, size, size, 3) uint8 renders of the avatar at the neutral pose on a circle around the head."""
    from engine.render import render
    from engine.types import FlameParams, orbit_cameras

    prompts = model.prompts
    params = FlameParams.zeros(1, prompts.shapedirs.shape[-1], prompts.exprdirs.shape[-1])
    if shape is not None:
        s = torch.as_tensor(shape, dtype=torch.float32).reshape(-1)[: params.shape.shape[1]]
        params.shape[0, : s.numel()] = s
    with torch.no_grad():
        world = gaussians.to_world(prompts, model.head, params)
        centre = world["means"][0].median(dim=0).values if len(gaussians) else torch.zeros(3)
        cams = orbit_cameras(n_views, radius=0.65, target=tuple(centre.tolist()), fov_x_degrees=28,
                             width=size, height_px=size)
        c = len(cams)
        out = render(world["means"].expand(c, -1, -1), world["quats"].expand(c, -1, -1),
                     world["scales"].expand(c, -1, -1), world["opacities"].expand(c, -1),
                     world["colors"].expand(c, -1, -1), cams.viewmats, cams.Ks, size, size,
                     background=torch.full((3,), background))
    return (out["rgb"].clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def write_preview(model, session: Session, path: Path, size: int = 256) -> Path:
    """Top row: the avatar from 8 views; bottom row: up to 8 input crops the model saw."""
    latest = session.latest
    views = render_views(model, latest.gaussians, latest.shape, 8, size)
    samples = session.refine_pool[:: max(1, math.ceil(len(session.refine_pool) / 8))][:8]
    inputs = [np.asarray(Image.fromarray((s.prepared.image.transpose(1, 2, 0) * 255).round().astype(np.uint8))
                         .resize((size, size))) for s in samples]
    while len(inputs) < 8:
        inputs.append(np.full((size, size, 3), 255, np.uint8))
    grid = np.concatenate([np.concatenate(list(views), axis=1), np.concatenate(inputs, axis=1)], axis=0)
    Image.fromarray(grid).save(path)
    return path


def evaluate_holdout(model, samples: list[RefineSample], version: AvatarState, path: Path | None = None) -> dict:
    """Render `version`'s avatar with each held-out frame's tracked pose and camera; PSNR/SSIM in the head region
    and dlib identity distance where a face is found in both images. Writes real-vs-rendered pairs to `path`."""
    if not samples:
        return {"frames": [], "psnr": None, "ssim": None, "identity_distance": None}
    real, fake, frames = holdout_renders(model, samples, version)
    psnrs = [region_psnr(fake[i], frames.images[i], frames.masks[i]) for i in range(len(samples))]
    ssims = [region_ssim(fake[i], frames.images[i], frames.masks[i]) for i in range(len(samples))]
    real_u8, fake_u8 = to_u8(real), to_u8(fake)
    distance = identity_distances(real_u8, fake_u8)
    if path is not None:
        shown = np.linspace(0, len(samples) - 1, min(6, len(samples))).round().astype(int)
        pairs = [np.concatenate([real_u8[i], fake_u8[i]], axis=1) for i in shown]
        Image.fromarray(np.concatenate(pairs, axis=0)).save(path)
    faces = [i for i, d in enumerate(distance) if d is not None]
    return {"frames": [s.index for s in samples], "psnr": _mean(psnrs), "ssim": _mean(ssims),
            "identity_distance": _mean([distance[i] for i in faces]), "identity_pairs": len(faces),
            # the same metrics restricted to the frames where dlib found a face in both images
            "psnr_face_pairs": _mean([psnrs[i] for i in faces]), "ssim_face_pairs": _mean([ssims[i] for i in faces]),
            "per_frame": [{"frame": s.index, "psnr": p, "ssim": q, "identity_distance": d}
                          for s, p, q, d in zip(samples, psnrs, ssims, distance)]}


@torch.no_grad()
def holdout_renders(model, samples: list[RefineSample], version: AvatarState):
    """(real crops, renders of `version` with their tracked pose and camera, the RefineFrames): (H,W,3) in [0,1]."""
    from fastavatar_stream.views import refine_frames
    from engine.refine import RefineSession

    frames = refine_frames(samples, model)
    renderer = RefineSession(version.gaussians, model.prompts, model.head)
    renders = [renderer.render_frames(frames, torch.tensor([i]), version.gaussians)["rgb"][0]
               for i in range(len(samples))]
    return list(frames.images), renders, frames


def to_u8(images: list[torch.Tensor]) -> list[np.ndarray]:
    return [(im.clamp(0, 1).numpy() * 255).round().astype(np.uint8) for im in images]


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def region_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """PSNR (dB) over the pixels inside `mask` only: pred/target (H,W,3) in [0,1], mask (H,W,1).
    (Compositing both images on one background and averaging over the whole image would add
    10*log10(1/mask fraction) dB for free.)"""
    m = mask.float()
    n = float(m.sum()) * pred.shape[-1]
    if n == 0:
        return float("nan")
    mse = float((((pred.float() - target.float()) ** 2) * m).sum()) / n
    return float(-10.0 * math.log10(max(mse, 1e-10)))


def region_ssim(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """SSIM on the bounding box of `mask`, both images composited on white outside the mask:
    pred/target (H,W,3) in [0,1], mask (H,W,1)."""
    from engine.losses import ssim

    ys, xs = torch.nonzero(mask[..., 0] > 0.5, as_tuple=True)
    if ys.numel() == 0:
        return float("nan")
    box = (slice(int(ys.min()), int(ys.max()) + 1), slice(int(xs.min()), int(xs.max()) + 1))
    m = mask.float()[box]
    a, b = pred.float()[box] * m + (1 - m), target.float()[box] * m + (1 - m)
    return float(ssim(a[None], b[None])[0])


def identity_distances(real: list[np.ndarray], fake: list[np.ndarray]) -> list[float | None]:
    """dlib 128-d face-descriptor distance per pair (None where a face is not found in both images)."""
    try:
        from fastavatar_stream.identity import FaceIdentity
    except ImportError:
        return [None] * len(real)
    ident = FaceIdentity()
    return [ident.distance(a, b) for a, b in zip(real, fake)]
