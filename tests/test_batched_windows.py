"""Windows of several sessions batched into one forward give each session exactly its own unbatched result."""
from __future__ import annotations

import torch

from engine.avatar_model import AvatarModel, WindowRequest
from engine.model import build_model
from engine.reconstruct import Views
from engine.types import FlameParams, orbit_cameras


def _window(model: AvatarModel, n: int, seed: int, pool: int = 0, fusion: str = "visibility") -> WindowRequest:
    g = torch.Generator().manual_seed(seed)
    size = model.input_size
    cams = orbit_cameras(n, radius=0.6, fov_x_degrees=30, width=size, height_px=size)
    params = FlameParams.zeros(n, model.prompts.shapedirs.shape[-1], model.prompts.exprdirs.shape[-1])
    params.rotation = (torch.rand(n, 3, generator=g) - 0.5) * 0.4
    views = Views(torch.rand(n, 3, size, size, generator=g), cams, params)
    return WindowRequest(views, list(range(10 * seed, 10 * seed + n)), shape=torch.randn(30, generator=g) * 0.5,
                         pool=torch.rand(pool, 3, size, size, generator=g) if pool else None, fusion=fusion)


def _assert_same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.frame, y.frame) and torch.equal(x.anchor, y.anchor)
        assert (x.seen is None) == (y.seen is None)
        for name in ("offset", "rotation", "log_scale", "opacity_logit", "color", "importance"):
            torch.testing.assert_close(getattr(x, name), getattr(y, name), rtol=1e-5, atol=1e-6)


def test_batched_sessions_equal_their_unbatched_runs() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = AvatarModel.create(build_model("micro"))
    windows = [_window(model, 4, 1), _window(model, 4, 2, fusion="concat"), _window(model, 2, 3),
               _window(model, 4, 4, pool=3), _window(model, 4, 5)]
    # sessions 1, 2 and 5 share one forward; 3 (two frames) and 4 (a pool) run alone
    assert len({w.batch_key() for w in windows}) == 3
    together = model.windows_gaussians(windows)
    for window, result in zip(windows, together):
        alone = model.window_gaussians(window.views, window.frame_ids, window.shape, window.pool, window.fusion)
        _assert_same(result, alone)
        assert [int(s.frame[0]) for s in result] == window.frame_ids + [-1]
    assert together[0][0].seen is not None and together[1][0].seen is None  # each window's own fusion
    # batching did not blur sessions together: different inputs, different Gaussians
    assert not torch.allclose(together[0][0].color, together[4][0].color)


def _first_versions(weights, clips, max_batch: int) -> tuple[dict, object]:
    """Open one session per clip with the engine worker held back until every session has a window ready, then
    let one worker with `max_batch` take them. Returns {clip name: first AvatarState} and the worker."""
    import asyncio
    import time

    from fastavatar_stream.daemon import Daemon, DaemonConfig
    from fastavatar_stream.session import SessionOptions
    from fastavatar_stream.sources import open_source
    from fastavatar_stream.worker import EngineWorker

    first: dict = {}

    async def run():
        daemon = Daemon(DaemonConfig(weights=str(weights), max_batch=max_batch))
        await daemon.start()
        daemon.worker.stop()
        daemon.worker.join(5)
        ids = [await daemon.open_session(open_source(str(c)), name=c.name,
                                         options=SessionOptions(refine_seconds=0.0, max_frames=4)) for c in clips]
        sessions = [daemon.sessions[i] for i in ids]
        deadline = time.monotonic() + 120
        while any(s.oldest_ready() is None for s in sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        worker = EngineWorker(daemon.model, lambda s, v, t: first.setdefault(s.name, v), max_batch=max_batch)
        for s in sessions:
            worker.add_session(s)
        worker.start()
        while len(first) < len(clips) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        worker.stop()
        worker.join(5)
        await daemon.shutdown()
        return worker

    worker = asyncio.run(run())
    return first, worker


def test_the_engine_worker_batches_sessions_without_changing_their_avatars(tmp_path, shared_dir) -> None:
    from engine.checkpoints import save_checkpoint
    from fastavatar_stream.demo import make_demo_clip

    torch.manual_seed(0)
    weights = save_checkpoint(tmp_path / "micro", build_model("micro"))
    clips = [make_demo_clip(tmp_path / "astronaut.mp4", n_frames=6, size=256),
             shared_dir / "data" / "real" / "obama_address_512.mp4"]
    batched, worker = _first_versions(weights, clips, max_batch=2)
    assert worker.batch_sizes[2] >= 1                      # the two sessions' first windows shared a forward
    alone, worker = _first_versions(weights, clips, max_batch=1)
    assert worker.batch_sizes[2] == 0
    for clip in clips:
        _assert_same([batched[clip.name].gaussians], [alone[clip.name].gaussians])
    a, b = (batched[c.name].gaussians for c in clips)
    assert not torch.allclose(a.color[: min(len(a), len(b))], b.color[: min(len(a), len(b))])
