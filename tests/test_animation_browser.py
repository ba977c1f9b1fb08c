"""The page animates the avatar live, in headless Chromium, against the real daemon: a fake camera (a y4m made
from the real clip) feeds the daemon over WebRTC (embedded default model), the rig arrives on the avatar channel,
motions on the unordered motion channel, and the Spark dyno modifier poses the splats on the GPU (software GL).

Checks: the animated avatar renders, poses keep being shown and never step back, opening the jaw changes the
pixels of the lower face, and the page's jitter buffer survives lost and reordered motions.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_webrtc_browser import CHROMIUM, CLEAR_RGB, Cdp, make_y4m, open_page  # noqa: E402

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                               "(apt-get install -y chromium)")

JITTER_CHECK = """
import('/static/animation.js').then(({ JitterBuffer }) => {
  const buffer = new JitterBuffer({ minDelay: 50 });
  const t0 = Date.now() / 1000 - 1.0;
  const motion = (f) => ({ frame: f, t_capture: t0 + 0.04 * f, expression: new Float32Array([f, 0]),
                           pose: new Float32Array(18) });
  const shown = [];
  // frame 4 is lost, 3 arrives after 5, 1 arrives twice (the second time late)
  for (const f of [0, 1, 2, 5, 3, 6]) {
    buffer.push(motion(f), 1000 * (t0 + 0.04 * f) + 30);
    shown.push(buffer.sample(1000 * (t0 + 0.04 * f) + 30 + 80).frame);
  }
  buffer.push(motion(1), 1000 * (t0 + 0.5));
  for (const dt of [0.3, 0.6, 1.2]) shown.push(buffer.sample(1000 * (t0 + dt) + 200).frame);
  return { shown, stats: buffer.stats };
})
"""


TEST_MOTION = {"pose": [0.1, -0.2, 0.05, 0.05, 0.1, 0.0, 0.3, 0.02, -0.01, 0.1, 0.0, 0.0, 0.0, 0.1, 0.0, 0.01, -0.02, 0.03],
               "expression": [0.8, -0.5, 0.3, 1.2, -1.0]}


def expected_pose_inputs(rig) -> tuple[np.ndarray, np.ndarray]:
    """What the page's CPU half must compute for TEST_MOTION: per-anchor expression offsets (A,3) and the joints'
    relative transforms with the translation folded in (5,3,4), from protocols.animation's numpy posing."""
    from protocols.animation import Motion, joint_transforms, rodrigues

    pose = np.asarray(TEST_MOTION["pose"], np.float32)
    expression = np.zeros(rig.n_expression, np.float32)
    given = np.asarray(TEST_MOTION["expression"], np.float32)[: rig.n_expression]
    expression[: given.size] = given
    motion = Motion("s", 0, 0.0, 0, expression, pose[0:3], pose[3:6], pose[6:9], pose[9:15], pose[15:18])
    a = rig.arrays
    offsets = np.einsum("ade,e->ad", a["anchor_expression"].astype(np.float32), expression)
    joints = a["joint_rest"] + np.einsum("jde,e->jd", a["joint_expression"], expression)
    transforms = joint_transforms(joints, rodrigues(motion.joint_rotations()), a["parents"])[:, :3, :]
    transforms[:, :, 3] += motion.translation
    return offsets, transforms


async def screenshot(cdp: Cdp) -> np.ndarray:
    """The page as an (H, W, 3) int RGB array."""
    from PIL import Image

    data = base64.b64decode((await cdp.send("Page.captureScreenshot", {"format": "png"}))["data"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def view(image: np.ndarray) -> np.ndarray:
    """The 3D view of a page screenshot (right of the camera column, below the header)."""
    return image[60:, 360:]


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Where two screenshots differ by more than compression-like noise (bool per pixel)."""
    return np.abs(a - b).sum(axis=2) > 30


async def _posed(cdp: Cdp, jaw: float) -> np.ndarray:
    """A screenshot with the newest pose held, its jaw opened `jaw` radians (after the software renderer drew it)."""
    await cdp.evaluate(f"window.fastavatar.holdPose({{jaw: [{jaw}, 0, 0]}})")
    await asyncio.sleep(2.5)
    return await screenshot(cdp)


async def page_state(cdp: Cdp) -> dict:
    """What the page has seen so far (`window.fastavatar`, as JSON)."""
    return await cdp.evaluate("JSON.parse(JSON.stringify(window.fastavatar || null))") or {}


async def _drive_page(url: str, y4m: Path, profile: Path, artifacts: Path, stop_sessions) -> dict:
    async with open_page(url, y4m, profile) as cdp:
        state: dict = {}
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            state = await page_state(cdp)
            if state.get("rigs", 0) >= 1 and state.get("posesShown", 0) >= 10 and state.get("viewer") == "ready":
                break
        first = state
        await asyncio.sleep(4.0)
        live = await page_state(cdp)
        render = await cdp.evaluate("window.fastavatar.renderStats()")
        await stop_sessions()  # no new avatar versions: the pictures below differ by the jaw alone
        for _ in range(3):  # a version already on its way may still arrive: then look again
            closed, opened, again = [await _posed(cdp, jaw) for jaw in (0.0, 0.45, 0.0)]
            if changed(view(closed), view(again)).mean() < 0.002:
                break
        jitter = await cdp.evaluate(JITTER_CHECK)
        inputs = await cdp.evaluate(f"window.fastavatar.poseInputs({json.dumps(TEST_MOTION)})")
        from PIL import Image

        Image.fromarray(np.concatenate([closed, opened], axis=1).astype(np.uint8)).save(artifacts / "jaw.png")
        return {"first": first, "live": live, "render": render, "closed": closed, "opened": opened, "jitter": jitter,
                "inputs": inputs, "console": cdp.console}


def test_the_page_animates_the_live_avatar_and_the_jaw_moves_the_mouth(real_clip, tmp_path):
    import torch

    from engine.avatar_model import AvatarModel
    from fastavatar_stream.daemon import Daemon, DaemonConfig
    from fastavatar_stream.session import SessionOptions
    from fastavatar_stream.webrtc_server import NODE_MODULES, VENDOR, start_http
    from protocols.webrtc import loopback_ice

    missing = [p for p in VENDOR.values() if not (NODE_MODULES / p / "package.json").is_file()]
    assert not missing, f"viewer modules {missing} are not installed: run `fastavatar-stream setup-web`"
    torch.set_num_threads(1)
    artifacts = Path(tempfile.mkdtemp(prefix="fastavatar-animation-"))
    y4m = make_y4m(real_clip, tmp_path / "camera.y4m", frames=75)

    async def scenario() -> dict:
        daemon = Daemon(DaemonConfig(session_defaults=SessionOptions(refine_seconds=0.0, budget=10_000)),
                        model=AvatarModel.load(None))
        await daemon.start()
        with loopback_ice():
            runner = await start_http(daemon, "127.0.0.1", 0)
            try:
                url = f"http://127.0.0.1:{runner.addresses[0][1]}/"
                async def stop_sessions() -> None:
                    for session_id in list(daemon.sessions):
                        await daemon.close_session(session_id)

                result = await _drive_page(url, y4m, tmp_path / "profile", artifacts, stop_sessions)
                result["rigs"] = {daemon.animator.rig(s).version: daemon.animator.rig(s) for s in daemon.sessions
                                  if daemon.animator.rig(s) is not None}
                return result
            finally:
                await runner.cleanup()
                await daemon.shutdown()

    result = asyncio.run(scenario())
    print(f"\nscreenshots: {artifacts / 'jaw.png'}")
    first, live = result["first"], result["live"]
    assert first.get("rigs", 0) >= 1, (first, result["console"][-10:])
    assert first["motionErrors"] == 0 and first["errors"] == [], first
    assert live["posesShown"] > first["posesShown"], "the avatar stopped animating"
    frames = live["shownFrames"]
    assert frames == sorted(frames), "a shown pose stepped back"
    # the frame counter counts renders of the animated mesh (benchmarks/browser_fps.py reads it)
    render = result["render"]
    times = render["frameTimes"]
    assert render["frames"] >= len(times) > 10 and all(b > a for a, b in zip(times, times[1:])), render["frames"]
    assert render["splatsAnimated"] > 0 and render["splatsDrawn"] > 0, render
    lat = live["poseLatencies"]
    print(f"pose latency over {len(lat)} poses: p50 {np.percentile(lat, 50):.0f} ms, p95 {np.percentile(lat, 95):.0f} ms "
          f"(jitter buffer {live['jitter'].get('delay', 0):.0f} ms; software WebGL on a shared machine)")

    closed, opened = view(result["closed"]), view(result["opened"])
    drawn = np.abs(closed - CLEAR_RGB).sum(axis=2) > 40
    assert drawn.mean() > 0.01, f"the animated avatar does not render; see {artifacts / 'jaw.png'}"
    moved = changed(opened, closed)
    assert moved.sum() > 200, f"opening the jaw changed {moved.sum()} pixels; see {artifacts / 'jaw.png'}"
    assert moved.sum() < 0.3 * drawn.sum(), "opening the jaw changed most of the avatar, not the mouth"
    rows = np.nonzero(drawn.any(axis=1))[0]
    top, bottom = rows.min(), rows.max()
    upper = moved[top: int(top + 0.35 * (bottom - top))].sum()
    assert upper < 0.02 * moved.sum(), f"the jaw changed the upper head ({upper} of {moved.sum()} pixels)"

    jitter = result["jitter"]
    shown = jitter["shown"]
    assert shown == sorted(shown) and shown[-1] == 6, jitter
    assert jitter["stats"]["late"] >= 1 and jitter["stats"]["reordered"] >= 1, jitter

    # the page's CPU half of posing (expression offsets per anchor, joint transforms) is protocols.animation's
    inputs = result["inputs"]
    rig = result["rigs"].get(inputs["rigVersion"])
    assert rig is not None, f"the page holds rig version {inputs['rigVersion']}, the daemon {list(result['rigs'])}"
    offsets, transforms = expected_pose_inputs(rig)
    page_offsets = np.asarray(inputs["anchorOffset"]).reshape(-1, 4)[:, :3]
    page_joints = np.asarray(inputs["joints"]).reshape(5, 4, 4)[:, :3, :]
    np.testing.assert_allclose(page_offsets, offsets, atol=1e-6)
    np.testing.assert_allclose(page_joints, transforms, atol=1e-5)
