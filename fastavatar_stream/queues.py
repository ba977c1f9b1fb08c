"""Bounded queues between pipeline stages, and per-stage timing statistics.

`DropQueue` is thread-safe and awaitable: worker threads use `put` / `get(timeout=...)`; the asyncio
loop uses `await aget()` / `await aput_wait(...)`, which never block the loop. When full, `put` drops the
oldest item that is not needed (`keep(item)` is False) and counts it; items the `keep` predicate protects
(e.g. the overlap frames of the next window) are never dropped: if nothing can be dropped, a new
droppable item is refused (counted as dropped) and a new protected item is accepted over the bound
(counted in `overflow`). `put_wait` / `aput_wait` wait for room instead (replays that must lose nothing).
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Generic, Iterator, TypeVar

import numpy as np

T = TypeVar("T")


class QueueClosed(Exception):
    """The queue was closed and is empty (get), or closed (put)."""


@dataclass
class QueueCounters:
    put: int = 0          # items accepted
    got: int = 0          # items taken
    dropped: int = 0      # items lost to the drop policy (old ones evicted or new ones refused)
    overflow: int = 0     # protected items accepted beyond maxsize
    max_depth: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class DropQueue(Generic[T]):
    """A bounded FIFO with a drop-oldest-unneeded policy (see the module docstring)."""

    def __init__(self, maxsize: int, keep: Callable[[T], bool] | None = None, name: str = "queue",
                 on_drop: Callable[[T], None] | None = None) -> None:
        if maxsize < 1:
            raise ValueError(f"queue {name}: maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self.name = name
        self._keep = keep or (lambda item: False)
        self._on_drop = on_drop
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._closed = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self.counters = QueueCounters()

    # -- state ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """No more puts; getters drain what is left, then get QueueClosed."""
        with self._lock:
            self._closed = True
            self._notify_locked()

    def _notify_locked(self) -> None:
        self._cond.notify_all()
        waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_wake, fut)
            except RuntimeError:  # that loop is closed
                pass

    # -- put ----------------------------------------------------------------------------------------------
    def put(self, item: T) -> list[T]:
        """Add without waiting, applying the drop policy. Returns the items dropped (possibly `item`)."""
        dropped: list[T] = []
        with self._lock:
            if self._closed:
                raise QueueClosed(self.name)
            if len(self._items) >= self.maxsize:
                victim = next((i for i, old in enumerate(self._items) if not self._keep(old)), None)
                if victim is not None:
                    dropped.append(self._items[victim])
                    del self._items[victim]
                elif not self._keep(item):
                    dropped.append(item)
                else:
                    self.counters.overflow += 1
            if not dropped or dropped[-1] is not item:
                self._items.append(item)
                self.counters.put += 1
                self.counters.max_depth = max(self.counters.max_depth, len(self._items))
            self.counters.dropped += len(dropped)
            self._notify_locked()
        if self._on_drop is not None:
            for d in dropped:
                self._on_drop(d)
        return dropped

    def put_wait(self, item: T, timeout: float | None = None) -> bool:
        """Add, waiting for room (no drop). Returns False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while len(self._items) >= self.maxsize and not self._closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            if self._closed:
                raise QueueClosed(self.name)
            self._items.append(item)
            self.counters.put += 1
            self.counters.max_depth = max(self.counters.max_depth, len(self._items))
            self._notify_locked()
            return True

    # -- get ----------------------------------------------------------------------------------------------
    def get_nowait(self) -> T:
        """Oldest item; raises IndexError when empty (QueueClosed when empty and closed)."""
        with self._lock:
            return self._pop_locked()

    def _pop_locked(self) -> T:
        if not self._items:
            if self._closed:
                raise QueueClosed(self.name)
            raise IndexError(f"queue {self.name} is empty")
        item = self._items.popleft()
        self.counters.got += 1
        self._notify_locked()
        return item

    def get(self, timeout: float | None = None) -> T:
        """Oldest item, waiting (in a thread) up to timeout; raises TimeoutError or QueueClosed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not self._items and not self._closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"queue {self.name}: nothing within {timeout} s")
                self._cond.wait(remaining)
            return self._pop_locked()

    def drain(self) -> list[T]:
        """Take everything queued now."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self.counters.got += len(items)
            self._notify_locked()
            return items

    # -- asyncio -------------------------------------------------------------------------------------------
    async def _wait_change(self, ready: Callable[[], bool]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if ready() or self._closed:
                    return
                fut = loop.create_future()
                self._waiters.append((loop, fut))
            await fut

    async def aget(self) -> T:
        """Oldest item, awaiting without blocking the loop; QueueClosed once closed and drained."""
        while True:
            await self._wait_change(lambda: bool(self._items))
            try:
                return self.get_nowait()
            except IndexError:  # another consumer was faster
                continue

    async def aput_wait(self, item: T) -> None:
        """Add, awaiting room (no drop)."""
        while True:
            await self._wait_change(lambda: len(self._items) < self.maxsize)
            if self.put_wait(item, timeout=0):
                return


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


# ---------------------------------------------------------------------------------------------------------
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
