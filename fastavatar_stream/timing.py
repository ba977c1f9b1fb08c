"""Per-stage timing statistics of a session: bounded in memory however long the stream runs."""
from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Iterator

import numpy as np


def percentiles(values, qs=(50, 95, 99)) -> dict[str, float]:
    """{'p50': .., 'p95': .., 'p99': ..} of values (NaN when empty)."""
    arr = np.asarray(list(values), np.float64)
    if arr.size == 0:
        return {f"p{q}": float("nan") for q in qs}
    return {f"p{q}": float(v) for q, v in zip(qs, np.percentile(arr, qs))}


class StageTimer:
    """Per-stage durations (seconds), thread-safe, memory-bounded (keeps the last `window` samples per
    stage for percentiles; counts and totals cover every sample)."""

    def __init__(self, window: int = 20000) -> None:
        self._window = window
        self._samples: dict[str, deque] = {}
        self._count: dict[str, int] = {}
        self._total: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._samples.setdefault(stage, deque(maxlen=self._window)).append(float(seconds))
            self._count[stage] = self._count.get(stage, 0) + 1
            self._total[stage] = self._total.get(stage, 0.0) + float(seconds)

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def stats(self) -> dict[str, dict[str, float]]:
        """{stage: {n, mean, max, total, p50, p95, p99}} in seconds."""
        with self._lock:
            snap = {k: (list(v), self._count[k], self._total[k]) for k, v in self._samples.items()}
        out = {}
        for stage, (vals, n, total) in snap.items():
            out[stage] = {"n": n, "mean": total / n, "max": max(vals), "total": total, **percentiles(vals)}
        return out
