"""Browser frames per second (issue 19): how fast the page animates a ~20k-splat avatar while the daemon works.

    python benchmarks/browser_fps.py                          # 3 runs of 15 s, budget 20,000 Gaussians
    python benchmarks/browser_fps.py --seconds 30 --runs 5

Each run starts the real daemon in this process (embedded default model, session budget --budget Gaussians,
refinement budget --refine s, so the engine works the whole time), serves the page, and opens it in a fresh headless
Chromium whose fake camera is a y4m of the real clip. Once the rig has arrived, the page animates and the animated
mesh holds at least --min-splats splats, it records for --seconds, from the page's own counters
(`window.fastavatar`, `window.fastavatar.renderStats()`):
  frames   requestAnimationFrame renders of the viewer's frame loop: mean frames per second and frame time
           p50/p95/max, from the frames' rAF timestamps
  splats   the animated mesh's splats and the splats Spark's newest depth sort left to draw (min-max over the window)
  motions  motions received and poses shown per second; capture -> pose on screen latency p50/p95 (the figures the
           page's "pose latency" counter shows every 10th of; its text at the end is kept too)
  daemon   engine seconds per second over the window (the engine time of the jobs that ended in it / its length:
           about its busy fraction, above 1 when a job started before the window), windows done, rigs received
That is the `busy` scenario; after it two screenshots are taken, two frames and a new pose apart: the share of the
3D view the avatar covers and the share of those pixels that changed (it moves); the last run's pair is saved
(--shot). Then the `idle` scenario (--no-idle skips it): the daemon's sessions are closed (no tracking, no engine
work, no motions or rigs) and, once the page has shown the motions it still held, it is measured again for
--seconds while it keeps drawing the last rig at its last pose.

Chromium draws with SwiftShader (software GL, no GPU) on the CPU host that also runs the daemon: on the 2-core host
these figures are a lower bound, not what a browser on a GPU does. The page's WebGL renderer string is recorded.
Prints a summary and writes JSON (`--out`, default benchmarks/results/browser_fps.json).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# run as a script, this folder comes first on sys.path and benchmarks/engine.py would hide the engine package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO / "tests"))  # the browser tests' headless-Chromium helpers (one copy, used by both)

import numpy as np  # noqa: E402
from test_animation_browser import changed, page_state, screenshot, view  # noqa: E402
from test_webrtc_browser import CHROMIUM, CLEAR_RGB, make_y4m, open_page  # noqa: E402

DEFAULT_VIDEO = REPO.parent / "shared" / "data" / "real" / "obama_address_512.mp4"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "browser_fps.json"
DEFAULT_SHOT = REPO / "benchmarks" / "results" / "browser_fps.png"

# One poll of the page's counters. Polls are a second apart (a few when the page is slow to answer): far fewer frames
# and poses than the 1000 the page keeps arrive between two, so every frame of the window is seen.
SAMPLE = """(() => {
  const f = window.fastavatar, r = f.renderStats();
  return { t: performance.now(), frames: r.frames, frameTimes: r.frameTimes, splatsDrawn: r.splatsDrawn,
    splatsAnimated: r.splatsAnimated, motions: f.motions, posesShown: f.posesShown, poseLatencies: f.poseLatencies,
    rigs: f.rigs };
})()"""
WEBGL_RENDERER = """(() => {
  const gl = document.createElement("canvas").getContext("webgl2"), info = gl.getExtension("WEBGL_debug_renderer_info");
  return info ? gl.getParameter(info.UNMASKED_RENDERER_WEBGL) : gl.getParameter(gl.RENDERER);
})()"""


def percentiles(values: list[float], qs: tuple[int, ...] = (50, 95)) -> dict:
    arr = np.asarray(values, np.float64)
    if arr.size == 0:
        return {"n": 0}
    return {"n": int(arr.size), **{f"p{q}": round(float(np.percentile(arr, q)), 1) for q in qs},
            "max": round(float(arr.max()), 1)}


def newest(values: list[float], count: int, since: int) -> dict[int, float]:
    """The entries of a page list that keeps the newest `values` of `count` so far, by index, from index `since`."""
    first = count - len(values)
    return {first + i: v for i, v in enumerate(values) if first + i >= since}


async def _wait_animating(cdp, min_splats: int, timeout: float) -> dict:
    """Poll until the rig arrived, poses are shown and the animated mesh holds `min_splats`; the last state."""
    deadline, state = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        state = await page_state(cdp)
        if state.get("viewer") not in ("loading", "ready", None):
            raise RuntimeError(f"the page's viewer is {state['viewer']}")
        if state.get("rigs", 0) >= 1 and state.get("posesShown", 0) >= 10 and state.get("viewer") == "ready":
            render = await cdp.evaluate("window.fastavatar.renderStats()")
            if render["splatsAnimated"] >= min_splats:
                return state
    raise TimeoutError(f"the page did not animate {min_splats} splats within {timeout:.0f} s: {state} "
                       f"{cdp.console[-10:]}")


async def _wait_still(cdp, timeout: float) -> None:
    """Wait until the page shows no new pose for 3 s: the motions its jitter buffer still held have been shown
    (at about a frame a second that takes a while), so the idle window redraws one pose."""
    deadline, last, since = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() < deadline:
        shown = await cdp.evaluate("window.fastavatar.posesShown")
        if shown != last:
            last, since = shown, time.monotonic()
        elif time.monotonic() - since >= 3.0:
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"the page still showed new poses {timeout:.0f} s after the sessions closed")


async def _measure(cdp, daemon, seconds: float) -> dict:
    """Poll the page once a second for `seconds`; frame, motion and latency figures over that window."""
    first = last = await cdp.evaluate(SAMPLE)
    # after the first sample: a page busy drawing may answer seconds late, and the engine's window is the page's
    busy0, windows0, t0 = daemon.worker.busy_s, daemon.worker.windows_done, time.monotonic()
    frame_times = newest(first["frameTimes"], first["frames"], first["frames"] - 1)  # the frame before the window
    latencies: dict[int, float] = {}
    drawn, animated = [first["splatsDrawn"]], [first["splatsAnimated"]]
    while time.monotonic() - t0 < seconds:
        await asyncio.sleep(min(1.0, max(0.0, seconds - (time.monotonic() - t0))))
        last = await cdp.evaluate(SAMPLE)
        frame_times.update(newest(last["frameTimes"], last["frames"], first["frames"]))
        latencies.update(newest(last["poseLatencies"], last["posesShown"], first["posesShown"] + 1))
        drawn.append(last["splatsDrawn"])
        animated.append(last["splatsAnimated"])
    wall = time.monotonic() - t0
    page_s = (last["t"] - first["t"]) / 1000
    stamps = [frame_times[i] for i in sorted(frame_times)]
    missed = (last["frames"] - first["frames"] + 1) - len(stamps)
    if missed:
        raise RuntimeError(f"{missed} frame timestamps were not seen: poll more often")
    intervals = np.diff(stamps)
    return {
        "page_seconds": round(page_s, 2), "frames": len(intervals),
        "fps_mean": round(len(intervals) / ((stamps[-1] - stamps[0]) / 1000), 2),
        "frame_ms": percentiles(intervals.tolist()),
        "splats_animated": [min(animated), max(animated)], "splats_drawn": [min(drawn), max(drawn)],
        "motions_per_s": round((last["motions"] - first["motions"]) / page_s, 2),
        "poses_shown_per_s": round((last["posesShown"] - first["posesShown"]) / page_s, 2),
        "pose_latency_ms": percentiles(list(latencies.values())),
        "rigs_received": last["rigs"] - first["rigs"],
        "engine_s_per_s": round((daemon.worker.busy_s - busy0) / wall, 3),
        "engine_windows": daemon.worker.windows_done - windows0,
    }


async def _screens(cdp, shot: Path | None, timeout: float = 30.0) -> dict:
    """Two screenshots with at least two new frames and a new pose between them (at under a frame a second, a fixed
    gap could catch one frame twice): how much of the view the avatar covers and how much of it moved."""
    count = "[window.fastavatar.renderStats().frames, window.fastavatar.posesShown]"
    a = view(await screenshot(cdp))
    frames0, poses0 = await cdp.evaluate(count)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        frames, poses = await cdp.evaluate(count)
        if frames >= frames0 + 2 and poses > poses0:
            break
    b = view(await screenshot(cdp))
    drawn = (np.abs(a - CLEAR_RGB).sum(axis=2) > 40) | (np.abs(b - CLEAR_RGB).sum(axis=2) > 40)
    moved = changed(a, b) & drawn
    if shot is not None:
        from PIL import Image

        rows, cols = np.nonzero(drawn.any(axis=1))[0], np.nonzero(drawn.any(axis=0))[0]
        box = (slice(max(rows.min() - 20, 0), rows.max() + 20), slice(max(cols.min() - 20, 0), cols.max() + 20)) \
            if rows.size else (slice(None), slice(None))  # the avatar and a margin: a small PNG
        Image.fromarray(np.concatenate([a[box], b[box]], axis=1).astype(np.uint8)).save(shot)
    return {"view_drawn_fraction": round(float(drawn.mean()), 4), "frames_between_shots": frames - frames0,
            "drawn_pixels_changed_between_shots": round(float(moved.sum() / max(drawn.sum(), 1)), 4)}


async def one_run(args, y4m: Path, profile: Path, shot: Path | None) -> dict:
    """A fresh daemon and a fresh Chromium: wait until the page animates, measure it (`busy`), then close the
    daemon's sessions and measure the page again (`idle`)."""
    import torch

    from engine.avatar_model import AvatarModel
    from fastavatar_stream.daemon import Daemon, DaemonConfig
    from fastavatar_stream.session import SessionOptions
    from fastavatar_stream.webrtc_server import start_http
    from protocols.webrtc import loopback_ice

    torch.set_num_threads(args.threads)
    config = DaemonConfig(engine_nice=args.engine_nice,
                          session_defaults=SessionOptions(refine_seconds=args.refine, budget=args.budget))
    daemon = await Daemon(config, model=AvatarModel.load(args.weights)).start()
    try:
        with loopback_ice():
            runner = await start_http(daemon, "127.0.0.1", 0)
            try:
                async with open_page(f"http://127.0.0.1:{runner.addresses[0][1]}/", y4m, profile) as cdp:
                    t_open = time.monotonic()
                    await _wait_animating(cdp, args.min_splats, args.wait)
                    result = {"animating_after_s": round(time.monotonic() - t_open, 1),
                              "canvas_px": await cdp.evaluate("[...['width', 'height']].map("
                                                              "(k) => document.querySelector('#view canvas')[k])"),
                              "webgl_renderer": await cdp.evaluate(WEBGL_RENDERER)}
                    result["busy"] = await _measure(cdp, daemon, args.seconds)
                    result["busy"]["pose_latency_counter"] = await cdp.evaluate(
                        "document.getElementById('pose-latency').textContent")  # what the page's counter shows
                    result["busy"].update(await _screens(cdp, shot))
                    if args.idle:
                        for session_id in list(daemon.sessions):
                            await daemon.close_session(session_id)
                        await _wait_still(cdp, timeout=60.0)
                        result["idle"] = await _measure(cdp, daemon, args.seconds)
                    result["page_errors"] = (await page_state(cdp)).get("errors", [])[-5:]
                    return result
            finally:
                await runner.cleanup()
    finally:
        await daemon.shutdown()


def spread(runs: list[dict], scenario: str) -> dict:
    """Min-max over the runs of one scenario's headline figures."""
    picks = {"fps_mean": ("fps_mean", None), "frame_ms_p50": ("frame_ms", "p50"), "frame_ms_p95": ("frame_ms", "p95"),
             "motions_per_s": ("motions_per_s", None), "poses_shown_per_s": ("poses_shown_per_s", None),
             "pose_latency_ms_p50": ("pose_latency_ms", "p50"), "pose_latency_ms_p95": ("pose_latency_ms", "p95"),
             "engine_s_per_s": ("engine_s_per_s", None)}
    out = {}
    for name, (key, sub) in picks.items():
        values = [r[scenario][key].get(sub) if sub else r[scenario][key] for r in runs]
        values = [v for v in values if v is not None]
        if values:
            out[name] = [min(values), max(values)]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", type=Path, default=DEFAULT_VIDEO, help="the clip the fake camera shows")
    p.add_argument("--weights", default=None, help="checkpoint folder (default: the embedded default model)")
    p.add_argument("--seconds", type=float, default=15.0, help="seconds measured per run")
    p.add_argument("--runs", type=int, default=3, help="runs, each with a fresh daemon and browser")
    p.add_argument("--budget", type=int, default=20_000, help="session budget (Gaussians)")
    p.add_argument("--min-splats", type=int, default=18_000,
                   help="measure once the animated mesh holds this many splats")
    p.add_argument("--refine", type=float, default=60.0, help="refinement budget: keeps the engine busy")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the daemon")
    p.add_argument("--engine-nice", type=int, default=10, help="nice levels of the engine below the daemon")
    p.add_argument("--idle", action=argparse.BooleanOptionalAction, default=True,
                   help="after each run, close the daemon's sessions and measure the page again")
    p.add_argument("--wait", type=float, default=300.0, help="longest wait for the page to animate (s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--shot", type=Path, default=DEFAULT_SHOT, help="the last run's screenshot pair (PNG)")
    args = p.parse_args()
    if not CHROMIUM.exists():
        raise SystemExit(f"needs Debian's chromium at {CHROMIUM} (apt-get install -y chromium)")
    chromium = subprocess.run([str(CHROMIUM), "--version"], capture_output=True, text=True).stdout.strip()
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "host": platform.node(),
               "cpus": os.cpu_count(), "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
               "chromium": chromium, "video": args.video.name, "seconds": args.seconds, "budget": args.budget,
               "min_splats": args.min_splats, "refine_s": args.refine, "threads": args.threads,
               "engine_nice": args.engine_nice, "idle": args.idle,
               "note": "headless Chromium with SwiftShader (software GL, no GPU) on a CPU host whose cores also run "
                       "the daemon: a lower bound, not what a browser on a GPU does", "runs": []}
    folder = Path(tempfile.mkdtemp(prefix="browser-fps-"))
    y4m = make_y4m(args.video, folder / "camera.y4m", frames=250)
    for i in range(args.runs):
        shot = args.shot if i == args.runs - 1 else None
        r = asyncio.run(one_run(args, y4m, folder / f"profile{i}", shot))
        results["runs"].append(r)
        for scenario in ("busy", "idle"):
            if scenario in r:
                m = r[scenario]
                print(f"run {i + 1} {scenario}: {m['fps_mean']} fps (frame p50 {m['frame_ms']['p50']} ms, "
                      f"p95 {m['frame_ms']['p95']} ms), {m['splats_animated'][1]} splats animated, "
                      f"{m['splats_drawn'][1]} drawn, {m['motions_per_s']} motions/s, "
                      f"{m['poses_shown_per_s']} poses/s, pose latency p50 {m['pose_latency_ms'].get('p50')} ms "
                      f"p95 {m['pose_latency_ms'].get('p95')} ms, engine {m['engine_s_per_s']} s/s", flush=True)
    runs = results["runs"]
    results["spread"] = {scenario: spread(runs, scenario) for scenario in ("busy", "idle") if scenario in runs[0]}
    for scenario, figures in results["spread"].items():
        print(f"{scenario}, min-max over {len(runs)} runs: "
              + ", ".join(f"{k} {v[0]}-{v[1]}" for k, v in figures.items()))
    print("software GL (SwiftShader) on a CPU host shared with the daemon: a lower bound, not a GPU browser")
    results["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]  # other work shares the host
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out} and {args.shot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
