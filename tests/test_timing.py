"""Stage timing statistics: percentiles, bounded memory, thread safety."""
import threading
import time

import numpy as np
import pytest

from fastavatar_stream.timing import StageTimer, percentiles


def test_percentiles_and_stage_timer():
    p = percentiles(range(1, 101))
    assert p["p50"] == pytest.approx(50.5) and p["p95"] == pytest.approx(95.05) and p["p99"] == pytest.approx(99.01)
    assert np.isnan(percentiles([])["p50"])
    timer = StageTimer(window=50)
    for i in range(100):
        timer.add("track", i / 1000)
    with timer.time("engine"):
        time.sleep(0.01)
    stats = timer.stats()
    assert stats["track"]["n"] == 100 and stats["track"]["mean"] == pytest.approx(0.0495)
    assert stats["track"]["p50"] == pytest.approx(0.0745)  # percentiles over the last 50 samples only
    assert 0.009 < stats["engine"]["p99"] < 0.2


def test_stage_timer_is_thread_safe():
    timer = StageTimer()
    threads = [threading.Thread(target=lambda: [timer.add("s", 0.001) for _ in range(2000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert timer.stats()["s"]["n"] == 8000
