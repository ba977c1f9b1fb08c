"""Scheduling for likeness (issue 16): in a live session the engine weighs the next window against refinement.

A window that shows the avatar head poses no earlier window covered goes to the engine at once; once windows
repeat poses the avatar already has, the next window waits until refinement has had its share of the engine
(min(refine_share_max, 1 - coverage gain) of it), and the first windows never wait. The real Session and
Windower are driven with tracked frames of chosen head poses; engine time is reported to them as the worker does.
"""
from __future__ import annotations

import numpy as np
import pytest

from fastavatar_stream.frames import FlameFit, TrackedFrame
from fastavatar_stream.session import Session, SessionOptions
from fastavatar_stream.windowing import Windower

_IMG = np.full((8, 8, 3), 128, np.uint8)


def frame(index: int, yaw: float = 0.0) -> TrackedFrame:
    fit = FlameFit(shape=np.zeros(10, np.float32), expression=np.zeros(10, np.float32),
                   rotation=np.array([0.0, yaw, 0.0], np.float32), neck=np.zeros(3, np.float32),
                   jaw=np.zeros(3, np.float32), eyes=np.zeros(6, np.float32), translation=np.zeros(3, np.float32))
    return TrackedFrame(image=_IMG, pts=index / 25, index=index, K=np.eye(3), viewmat=np.eye(4), flame=fit,
                        landmarks=np.zeros((68, 3)), box=np.array([0.0, 0.0, 8.0, 8.0]))


class LiveSession:
    """A live Session fed frame by frame; `run_window` does what the engine worker does with a window."""

    def __init__(self, **options) -> None:
        self.session = Session("s", "test", SessionOptions(live=True, refine_seconds=60.0, **options),
                               input_size=8, tracker=None)
        self.next_index = 0
        self.version = 0

    def feed(self, n: int, yaw: float) -> None:
        for _ in range(n):
            self.session.add_tracked(frame(self.next_index, yaw))
            self.next_index += 1

    def window_ready(self) -> bool:
        return self.session.oldest_ready() is not None

    def run_window(self, engine_s: float) -> None:
        window = self.session.take_window()
        assert window is not None
        self.session.window_folded(window)
        self.version += 1
        self.session.latest = object()  # an avatar exists: refinement has something to refine
        self.session.window_finished(engine_s, self.version)

    def refine(self, engine_s: float) -> None:
        self.version += 1
        self.session.refinement_spent(0.0, engine_s, self.version)

    def early_windows(self) -> None:
        for n in (1, 3, 4):  # windows are due at 1, 4 and 8 frames
            self.feed(n, yaw=0.0)
            assert self.window_ready(), "an early window waited"
            self.run_window(engine_s=1.0)


def test_coverage_gain_is_the_share_of_pending_frames_in_uncovered_head_poses():
    w = Windower("s", early=(4,))
    for i in range(4):
        w.add(frame(i, yaw=0.0))
    assert w.coverage_gain() == 1.0
    first = w.take()
    assert first.coverage_gain == 1.0 and w.covered_cells == 1
    for i in range(4, 10):
        w.add(frame(i, yaw=0.0))
    assert w.coverage_gain() == 0.0
    for i in range(10, 12):
        w.add(frame(i, yaw=0.5))
    assert w.coverage_gain() == pytest.approx(2 / 8)


def test_a_window_of_repeated_poses_waits_for_its_refinement_share():
    live = LiveSession(refine_share_max=0.8)
    live.early_windows()
    live.feed(12, yaw=0.0)  # a window is due, but every frame repeats a covered pose
    assert live.session.windower.ready() and live.session.window_deferred()
    assert not live.window_ready()
    live.refine(2.0)
    assert not live.window_ready()  # 0.8 share of the engine: 4 s of refinement per 1 s window
    live.refine(2.0)
    assert live.window_ready()
    live.run_window(engine_s=1.0)
    log = list(live.session.version_log)
    assert [v["made_by"] for v in log] == ["window"] * 3 + ["refine", "refine", "window"]
    split = live.session.engine_split()
    assert split["window_s"] == 4.0 and split["refine_s"] == 4.0 and split["refine_share"] == 0.5


def test_a_window_of_new_head_poses_goes_at_once():
    live = LiveSession(refine_share_max=0.8)
    live.early_windows()
    live.feed(12, yaw=0.6)  # the head turned: none of these poses is covered
    assert live.window_ready() and not live.session.window_deferred()
    live.run_window(engine_s=1.0)
    assert live.session.window_timings[-1].coverage_gain == 1.0


def test_without_refinement_windows_never_wait():
    live = LiveSession(refine_share_max=0.8)
    live.session.options.refine_seconds = 0.0
    live.early_windows()
    live.feed(12, yaw=0.0)
    assert live.window_ready()


def test_a_live_replay_refines_between_its_windows_and_reports_the_split(tmp_path):
    import json
    import subprocess
    import sys

    import torch

    from engine.checkpoints import save_checkpoint
    from engine.model import build_model
    from fastavatar_stream.demo import make_demo_clip

    torch.manual_seed(0)
    weights = save_checkpoint(tmp_path / "micro", build_model("micro"), metadata={"test": True})
    clip = make_demo_clip(tmp_path / "face.mp4", n_frames=72, size=192)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fastavatar_stream", "replay", str(clip), "--out", str(out),
                           "--weights", str(weights), "--realtime", "--refine", "60", "--no-progress"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr

    extra = json.loads((out / "report.json").read_text())["extra"]
    log = extra["version_log"]
    made_by = [v["made_by"] for v in log]
    assert set(made_by) == {"window", "refine"}
    last_window = max(i for i, m in enumerate(made_by) if m == "window")
    assert "refine" in made_by[:last_window], "no refinement between live windows"
    split = extra["engine_split"]
    assert split["refine_s"] > 0 and split["window_s"] > 0 and 0 < split["refine_share"] < 1
    # a live stream ends with its stream: the 60 s budget was not waited for
    assert split["refine_s"] < 60
    assert [v["version"] for v in log] == sorted(v["version"] for v in log)
