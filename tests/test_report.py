"""The replay report holds the contract keys and computes its derived figures correctly."""
from __future__ import annotations

import json

import pytest

from fastavatar_stream.timing import StageTimer
from fastavatar_stream.report import SessionReport

CONTRACT_KEYS = {"frames_read", "frames_tracked", "frames_dropped", "windows", "versions", "n_gaussians",
                 "wall_s", "realtime_factor", "first_avatar_s", "stages"}


def test_report_figures_and_json(tmp_path):
    rep = SessionReport(source="clip.mp4", fps=25.0)
    rep.start(t=1000.0)
    for i in range(50):  # 2 s of media read in 1 s of wall time
        rep.frame_read(pts=i / 25, t_capture=1000.0 + i * 0.02)
    rep.frames_tracked, rep.frames_dropped, rep.windows = 48, 2, 4
    rep.strides = [1, 3, 4, 12]
    rep.version_published(1, 1000, t_capture=1000.0, t_publish=1000.3)
    rep.version_published(2, 1800, t_capture=1000.5, t_publish=1000.6)
    with pytest.raises(ValueError, match="increase"):
        rep.version_published(2, 1900, t_capture=1000.5, t_publish=1000.7)
    timer = StageTimer()
    for s in (0.01, 0.02, 0.03):
        timer.add("track", s)
    rep.finish(timer, t=1001.0)
    assert rep.wall_s == pytest.approx(1.0)
    assert rep.media_s == pytest.approx(2.0)
    assert rep.realtime_factor == pytest.approx(2.0)
    assert rep.first_avatar_s == pytest.approx(0.3)
    assert rep.latency["p50"] == pytest.approx(0.2)
    data = json.loads(rep.to_json())
    assert CONTRACT_KEYS <= set(data)
    assert data["versions"] == [1, 2] and data["n_gaussians"] == [1000, 1800]
    assert set(data["stages"]["track"]) >= {"p50", "p95", "p99"}
    assert data["stages"]["track"]["p50"] == pytest.approx(0.02)
    assert json.loads(rep.write(tmp_path / "report.json").read_text()) == data


def test_empty_report_is_valid_json():
    rep = SessionReport(source="x")
    rep.start()
    data = json.loads(rep.finish().to_json())  # NaN percentiles become null
    assert data["latency"]["p50"] is None and data["first_avatar_s"] is None and data["realtime_factor"] == 0.0
