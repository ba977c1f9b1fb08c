"""Sliding windows: schedule, overlap, pose coverage, live stride growth, FramePack pools."""
from __future__ import annotations

import numpy as np
import pytest

from fastavatar_stream.frames import EXTREME_POSE, NO_FACE, FlameFit, TrackedFrame
from fastavatar_stream.windowing import Windower, farthest_point_order, pose_features, take_oldest

_IMG = np.zeros((4, 4, 3), np.uint8)


def frame(index: int, yaw: float = 0.0, pitch: float = 0.0, jaw: float = 0.0, flags=frozenset(),
          fitted: bool = True) -> TrackedFrame:
    fit = FlameFit(shape=np.zeros(10, np.float32), expression=np.zeros(10, np.float32),
                   rotation=np.array([pitch, yaw, 0.0], np.float32), neck=np.zeros(3, np.float32),
                   jaw=np.array([jaw, 0, 0], np.float32), eyes=np.zeros(6, np.float32),
                   translation=np.zeros(3, np.float32))
    return TrackedFrame(image=_IMG, pts=index / 25, index=index, K=np.eye(3), viewmat=np.eye(4),
                        flame=fit if fitted else None, landmarks=np.zeros((68, 3)), box=np.zeros(4),
                        flags=frozenset(flags))


def replay(n: int, **kw):
    w = Windower("s", **kw)
    windows = [win for i in range(n) if (win := w.push(frame(i, yaw=0.3 * np.sin(i / 7)))) is not None]
    return w, windows


def expected_schedule(n: int) -> list[tuple[int, int]]:
    """(frames seen when the window is emitted, sparse size) for n frames: 1, 4, 8, then every 12."""
    points = [t for t in (1, 4, 8) if t <= n] + list(range(20, n + 1, 12))
    sizes = {1: 1, 4: 4, 8: 8}
    return [(t, sizes.get(t, 16)) for t in points]


@pytest.mark.parametrize("n", range(1, 201))
def test_replay_schedule_for_every_length(n):
    w, windows = replay(n)
    sched = expected_schedule(n)
    assert [len(win.frames) for win in windows] == [size for _, size in sched]
    # each window's newest frame is the frame that made it due
    assert [win.frames[-1].index + 1 for win in windows] == [t for t, _ in sched]
    assert [win.index for win in windows] == list(range(len(windows)))
    assert all(win.pool == [] for win in windows)  # replay keeps up: no frame skipped
    assert list(w.strides) == [1, 3, 4][: len(windows)] + [12] * max(0, len(windows) - 3)
    # the tail is flushed as a last, smaller window so no frame is lost
    tail = w.flush()
    covered = {f.index for win in windows for f in win.frames}
    if tail is not None:
        assert 1 <= tail.stride < 12
        covered |= {f.index for f in tail.frames}
    assert covered == set(range(n))
    assert w.flush() is None


def test_overlap_frames_come_from_the_previous_window():
    _, windows = replay(100)
    for prev, win in zip(windows, windows[1:]):
        over = [win.frames[i] for i in win.overlap]
        assert len(over) == min(4, len(prev.frames))
        assert all(any(o is p for p in prev.frames) for o in over)
        new = [f for i, f in enumerate(win.frames) if i not in win.overlap]
        assert min(f.index for f in new) > max(f.index for f in prev.frames)  # new frames are new
        assert [f.index for f in win.frames] == sorted(f.index for f in win.frames)
    assert [len(w.overlap) for w in windows[:4]] == [0, 1, 4, 4]


def test_overlap_prefers_frames_covering_different_poses():
    w = Windower("s")
    # window at 8 frames: poses 0,0,0,0,0,0,+0.5,-0.5 -> the 4 overlap frames must include both extremes
    yaws = [0, 0, 0, 0, 0, 0, 0.5, -0.5]
    wins = [w.push(frame(i, yaw=y)) for i, y in enumerate(yaws)]
    last = [x for x in wins if x is not None][-1]
    assert len(last.frames) == 8
    for i in range(8, 20):
        win = w.push(frame(i))
    over_yaws = sorted(round(float(win.frames[i].flame.rotation[1]), 2) for i in win.overlap)
    assert 0.5 in over_yaws and -0.5 in over_yaws


def test_unusable_frames_never_enter_a_window():
    w = Windower("s")
    windows = []
    for i in range(60):
        if i % 3 == 0:
            f = frame(i, flags={NO_FACE}, fitted=False)
        elif i % 3 == 1:
            f = frame(i, flags={EXTREME_POSE})
        else:
            f = frame(i)
        if (win := w.push(f)) is not None:
            windows.append(win)
    assert w.stats.rejected == 40 and w.stats.frames_in == 60
    assert all(f.index % 3 == 2 for win in windows for f in win.frames + win.pool)
    assert [len(x.frames) for x in windows] == [1, 4, 8, 16]  # schedule counts usable frames only


def covering_radius(feats: np.ndarray, picked: list[int]) -> float:
    d = np.linalg.norm(feats[:, None] - feats[picked][None], axis=2)
    return float(d.min(axis=1).max())


def test_pose_coverage_beats_uniform_sampling():
    # 48 pending frames (engine was busy): mostly frontal, a brief look left, up and a mouth opening
    yaw = np.zeros(48)
    pitch = np.zeros(48)
    jaw = np.zeros(48)
    yaw[10] = 0.6      # single frames that uniform sampling (0, 3, 6, 9, 13, ...) steps over
    pitch[27] = 0.4
    jaw[40] = 0.3
    w = Windower("s", early=())
    for i in range(48):
        w.add(frame(i, yaw=yaw[i], pitch=pitch[i], jaw=jaw[i]))
    win = w.take()
    assert win.stride == 48 and len(win.frames) == 16  # first window: no overlap, 16 free slots
    chosen = sorted(f.index for f in win.frames)
    assert chosen[-1] == 47  # the newest frame is always in
    feats = np.stack([pose_features(frame(i, yaw=yaw[i], pitch=pitch[i], jaw=jaw[i])) for i in range(48)])
    uniform = list(np.linspace(0, 47, 16).round().astype(int))
    assert covering_radius(feats, chosen) < 0.5 * covering_radius(feats, uniform)
    assert {10, 27, 40} <= set(chosen)
    # time spread: frontal frames still span the whole candidate range, not one clump
    assert chosen[0] < 12 and max(np.diff(chosen)) <= 12
    # the other 32 go to the FramePack pool
    assert sorted(f.index for f in win.pool) == sorted(set(range(48)) - set(chosen))


def test_live_stride_grows_under_a_slow_consumer():
    """The engine takes a window only every 30 frames; windows jump to the newest frames."""
    w = Windower("s", pool_size=8)
    windows = []
    for i in range(200):
        w.add(frame(i, yaw=0.2 * np.sin(i / 5)))
        if i % 30 == 29 and (win := w.take()) is not None:  # engine free again
            windows.append(win)
    assert [x.stride for x in windows] == [30] * 6 == list(w.strides)
    for win in windows:
        assert win.frames[-1].index == 30 * (win.index + 1) - 1  # starts from the newest frame
        assert len(win.frames) == 16  # first: 16 new; then 4 overlap + 12 new
        assert len(win.pool) == 8  # bounded pool, most informative
    assert w.stats.pool_dropped == (30 - 16 - 8) + 5 * (30 - 12 - 8)
    # a fast consumer takes the 21 frames pending since frame 180, then gets the regular schedule back
    for i in range(200, 225):
        w.add(frame(i))
        if (win := w.take()) is not None:
            windows.append(win)
    assert list(w.strides)[6:] == [21, 12, 12]


def test_pool_keeps_the_most_informative_frames():
    w = Windower("s", pool_size=2, early=())
    yaws = [0.0] * 30
    yaws[3] = 0.7   # two distinctive frames among many duplicates
    yaws[5] = -0.7
    for i, y in enumerate(yaws):
        w.add(frame(i, yaw=y))
    win = w.take()
    sparse = {f.index for f in win.frames}
    pool = {f.index for f in win.pool}
    assert {3, 5} <= sparse | pool and len(pool) == 2 and not sparse & pool


def test_pending_frames_are_bounded_when_the_engine_stalls():
    w = Windower("s", max_pending=40, early=())
    for i in range(100):
        w.add(frame(i, yaw=0.3 * np.sin(i / 4)))
    assert w.pending == 40 and w.stats.thinned == 60
    win = w.take()
    assert win.stride == 100 and win.frames[-1].index == 99


def test_farthest_point_order_basics():
    pts = np.array([[0.0], [0.1], [1.0], [0.45], [0.05]])  # mean 0.32
    assert farthest_point_order(pts, 3) == [3, 2, 0]  # nearest the mean, then farthest each time
    assert farthest_point_order(pts, 2, seeds=[2]) == [2, 0]
    assert farthest_point_order(pts, 1, anchors=np.array([[0.0], [1.0]])) == [3]  # fills the gap
    assert sorted(farthest_point_order(pts, 10)) == [0, 1, 2, 3, 4]


def test_invalid_configuration_is_refused():
    with pytest.raises(ValueError):
        Windower("s", overlap=16)
    with pytest.raises(ValueError):
        Windower("s", stride=13)


def test_engine_takes_the_oldest_ready_window_across_sessions():
    a, b, c = Windower("a"), Windower("b"), Windower("c")
    fa, fb, fc = frame(0), frame(0), frame(0)
    fa.t_capture, fb.t_capture, fc.t_capture = 10.0, 5.0, 1.0
    a.add(fa)
    b.add(fb)
    c.add(frame(0, flags={NO_FACE}, fitted=False))  # nothing usable: never ready
    assert c.oldest_ready_capture() is None
    assert take_oldest([a, b, c]).session == "b"
    assert take_oldest([a, b, c]).session == "a"
    assert take_oldest([a, b, c]) is None
