"""What a person sees of themselves (issue 16): the browser page after --seconds of camera, scored for likeness.

    python benchmarks/page_likeness.py                    # obama_talk_834x884 as the camera, 30 s, 2 runs
    python benchmarks/page_likeness.py --clip CLIP --seconds 60 --runs 3

Each run starts the real daemon in this process with `serve`'s defaults (embedded default model, budget 60,000
Gaussians, refinement budget 30 s, MediaPipe tracking) behind the page server, and a fresh headless Chromium whose
fake camera is a y4m of the clip (Chromium loops it, like a person in front of a webcam). --seconds after the page's
first tracked frame the page is captured twice, a few seconds apart (software GL draws about a frame a second); the
second capture's 3D view is scored: dlib's 128-d face-descriptor distance between the face in it and --references
frames of the clip (same person below 0.6; two frames of one clip 0.25-0.29, the two real clips of this person
0.34, another person 0.95), or "no face found". The page's counters (frames, windows, Gaussians, version, latencies)
and the daemon's session (windows, refinement seconds) are recorded too.

Writes JSON (--out, default benchmarks/results/page_likeness.json) and the last run's page (--shot, default
benchmarks/results/page_likeness.png: the whole page, camera column and counters included).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# run as a script, this folder comes first on sys.path and benchmarks/engine.py would hide the engine package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO / "tests"))  # the browser tests' headless-Chromium helpers (one copy, used by both)

import numpy as np  # noqa: E402
from test_animation_browser import page_state, screenshot, view  # noqa: E402
from test_webrtc_browser import make_y4m, open_page  # noqa: E402

DEFAULT_CLIP = REPO.parent / "shared" / "data" / "real" / "obama_talk_834x884.mp4"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "page_likeness.json"
DEFAULT_SHOT = REPO / "benchmarks" / "results" / "page_likeness.png"
COUNTERS = ("frames", "windows", "gaussians", "version", "latency", "pose-latency")


def reference_descriptors(clip: Path, count: int) -> list[np.ndarray]:
    """dlib descriptors of `count` frames spread over the clip (frames without a face are skipped)."""
    import av

    from fastavatar_stream.identity import FaceIdentity

    with av.open(str(clip)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    identity = FaceIdentity()
    picked = np.linspace(0, len(frames) - 1, count).round().astype(int)
    return [d for d in (identity.descriptor(frames[i]) for i in picked) if d is not None]


def identity_distance(image: np.ndarray, references: list[np.ndarray]) -> float | None:
    """Mean distance of the face in `image` to the reference descriptors; None when dlib finds no face."""
    from fastavatar_stream.identity import FaceIdentity

    found = FaceIdentity(upsample=2).descriptor(image.astype(np.uint8))
    if found is None:
        return None
    return float(np.mean([np.linalg.norm(found - r) for r in references]))


async def _counters(cdp) -> dict:
    """The page's counters as shown (empty while the page is still loading)."""
    script = "Object.fromEntries(%s.map((id) => [id, document.getElementById(id)?.textContent ?? '']))" % json.dumps(
        list(COUNTERS))
    return await cdp.evaluate(script) or {}


async def one_run(args, y4m: Path, profile: Path, references: list[np.ndarray], shot: Path | None) -> dict:
    from engine.avatar_model import AvatarModel
    from fastavatar_stream.daemon import Daemon, DaemonConfig
    from fastavatar_stream.session import SessionOptions
    from fastavatar_stream.webrtc_server import start_http
    from protocols.webrtc import loopback_ice

    config = DaemonConfig(session_defaults=SessionOptions(budget=args.budget, refine_seconds=args.refine))
    daemon = await Daemon(config, model=AvatarModel.load(args.weights)).start()
    try:
        with loopback_ice():
            runner = await start_http(daemon, "127.0.0.1", 0)
            try:
                async with open_page(f"http://127.0.0.1:{runner.addresses[0][1]}/", y4m, profile) as cdp:
                    t_open = time.monotonic()
                    while (await _counters(cdp)).get("frames", "") in ("0", ""):  # the first frame the daemon tracked
                        if time.monotonic() - t_open > args.wait:
                            raise RuntimeError(f"the page showed no tracked frame within {args.wait:.0f} s: "
                                               f"{(await page_state(cdp)).get('errors')}")
                        await asyncio.sleep(0.5)
                    t_camera = time.monotonic()
                    await asyncio.sleep(max(args.seconds - (time.monotonic() - t_camera), 0.0))
                    counters = await _counters(cdp)
                    session = next(iter(daemon.sessions.values()))
                    daemon_side = {"windows": session.windows_done, "refine_s": round(session.refine_spent, 2),
                                   "version": session.latest.version if session.latest else 0,
                                   "frames_tracked": session.frames_tracked}
                    await screenshot(cdp)
                    await asyncio.sleep(args.settle)  # the frame being drawn when the time was up is on screen now
                    page = await screenshot(cdp)
                    seconds = time.monotonic() - t_camera
            finally:
                await runner.cleanup()
    finally:
        await daemon.shutdown()
    if shot is not None:
        from PIL import Image

        Image.fromarray(page.astype(np.uint8)).save(shot)
    distance = identity_distance(view(page), references)
    return {"camera_seconds": round(seconds, 1), "page_opened_to_first_frame_s": round(t_camera - t_open, 1),
            "identity_distance": None if distance is None else round(distance, 3), "face_found": distance is not None,
            "page_counters": counters, "daemon": daemon_side}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", type=Path, default=DEFAULT_CLIP, help="the camera (default: obama_talk_834x884.mp4)")
    p.add_argument("--weights", default=None, help="checkpoint folder (default: the embedded default model)")
    p.add_argument("--seconds", type=float, default=30.0, help="seconds of camera before the page is scored")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--budget", type=int, default=60_000, help="Gaussians per avatar (serve's default)")
    p.add_argument("--refine", type=float, default=30.0, help="refinement budget in seconds (serve's default)")
    p.add_argument("--size", type=int, default=384, help="the fake camera's side in pixels")
    p.add_argument("--references", type=int, default=16, help="clip frames the page's face is compared with")
    p.add_argument("--settle", type=float, default=4.0, help="seconds between the two captures")
    p.add_argument("--wait", type=float, default=120.0, help="most seconds until the first tracked frame")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--shot", type=Path, default=DEFAULT_SHOT)
    args = p.parse_args()
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "host": platform.node(),
              "cpus": os.cpu_count(), "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
              "clip": args.clip.name, "seconds": args.seconds, "budget": args.budget, "refine_s": args.refine,
              "note": "headless Chromium, software GL (SwiftShader), on the CPU host that also runs the daemon",
              "runs": []}
    references = reference_descriptors(args.clip, args.references)
    result["reference_frames_with_a_face"] = len(references)
    with tempfile.TemporaryDirectory(prefix="page-likeness-") as tmp:
        y4m = make_y4m(args.clip, Path(tmp) / "camera.y4m", frames=10_000, size=args.size)
        for run in range(args.runs):
            profile = Path(tmp) / f"profile{run}"
            profile.mkdir()
            shot = args.shot if run == args.runs - 1 else None
            outcome = asyncio.run(one_run(args, y4m, profile, references, shot))
            result["runs"].append(outcome)
            print(f"run {run + 1}: identity distance {outcome['identity_distance']} after "
                  f"{outcome['camera_seconds']} s; page {outcome['page_counters']}; daemon {outcome['daemon']}",
                  flush=True)
    found = [r["identity_distance"] for r in result["runs"] if r["face_found"]]
    result["identity_distance_range"] = [min(found), max(found)] if found else None
    result["face_found_runs"] = len(found)
    result["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} and {args.shot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
