"""A session's report: what a stream read, tracked, dropped, published, and how fast (report.json); bounded
however long the session runs."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .timing import StageTimer, percentiles

#: newest per-version and per-window records a report keeps
MAX_RECORDS = 10_000
MAX_ERRORS = 100


def append_bounded(records: list, value, limit: int = MAX_RECORDS) -> None:
    """Append, keeping at most the newest `limit` entries (trimmed in halves, so appending stays O(1))."""
    records.append(value)
    if len(records) > 2 * limit:
        del records[: len(records) - limit]


def trimmed(records: list, limit: int = MAX_RECORDS) -> list:
    return records[-limit:]


def json_safe(x):
    """JSON has no NaN/inf: map them to None, recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


@dataclass
class SessionReport:
    """Counts and timings of one session (a replay or a live stream). Times are seconds; `t_*` arguments are
    time.time() values.

    versions / n_gaussians: avatar version numbers published and the Gaussian count of each (same order), the
    newest `MAX_RECORDS` of them (a daemon session may run for days); versions_total counts every version.
    Latency percentiles cover the newest `MAX_RECORDS` versions, strides the newest `MAX_RECORDS` windows.
    stages: per-stage {n, mean, max, total, p50, p95, p99}; latency: capture -> publish p50/p95/p99 over
    the newest frame of each published version. realtime_factor: media seconds processed per wall second.
    first_avatar_s: first publish minus the capture time of the first frame. migrations: times the session moved to
    another engine worker because its worker died (Ray engine actors).
    """

    source: str = ""
    fps: float = 0.0
    frames_read: int = 0
    frames_tracked: int = 0
    frames_dropped: int = 0
    frames_unusable: int = 0
    windows: int = 0
    migrations: int = 0
    strides: list[int] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    versions_total: int = 0
    n_gaussians: list[int] = field(default_factory=list)
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    media_s: float = 0.0
    realtime_factor: float = 0.0
    first_avatar_s: float | None = None
    realtime: bool = False
    software: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._t_start: float | None = None
        self._t_first_frame: float | None = None
        self._latencies: list[float] = []
        self._first_pts: float | None = None
        self._last_pts: float | None = None

    # -- recording --------------------------------------------------------------------------------------
    def start(self, t: float | None = None) -> None:
        self._t_start = time.time() if t is None else t

    def frame_read(self, pts: float, t_capture: float) -> None:
        self.frames_read += 1
        if self._t_first_frame is None:
            self._t_first_frame = t_capture
        self._first_pts = pts if self._first_pts is None else min(self._first_pts, pts)
        self._last_pts = pts if self._last_pts is None else max(self._last_pts, pts)

    def version_published(self, version: int, n_gaussians: int, t_capture: float, t_publish: float) -> None:
        """t_capture: capture time of the newest frame that went into this version."""
        if self.versions and version <= self.versions[-1]:
            raise ValueError(f"avatar versions must increase: {version} after {self.versions[-1]}")
        append_bounded(self.versions, int(version))
        append_bounded(self.n_gaussians, int(n_gaussians))
        append_bounded(self._latencies, t_publish - t_capture)
        self.versions_total += 1
        if self.first_avatar_s is None and self._t_first_frame is not None:
            self.first_avatar_s = t_publish - self._t_first_frame

    def finish(self, timer: StageTimer | None = None, t: float | None = None) -> "SessionReport":
        """Close the run: wall time, media time, real-time factor, stage and latency percentiles."""
        t_end = time.time() if t is None else t
        if self._t_start is not None:
            self.wall_s = max(t_end - self._t_start, 0.0)
        if self._first_pts is not None:
            step = 1.0 / self.fps if self.fps > 0 else 0.0
            self.media_s = self._last_pts - self._first_pts + step
        self.realtime_factor = self.media_s / self.wall_s if self.wall_s > 0 else 0.0
        if timer is not None:
            self.stages = timer.stats()
        self.latency = percentiles(trimmed(self._latencies))
        return self

    def error(self, text: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(text)

    def stride(self, stride: int) -> None:
        append_bounded(self.strides, int(stride))

    # -- output -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = json_safe(asdict(self))
        for name in ("versions", "n_gaussians", "strides"):
            data[name] = trimmed(data[name])
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path
