"""Bounded stage queues (drop-oldest-unneeded, counters, threads + asyncio) and stage timing stats."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from fastavatar_stream.queues import DropQueue, QueueClosed, StageTimer, percentiles


def test_full_queue_drops_the_oldest_item_not_needed():
    dropped_seen = []
    q = DropQueue(3, keep=lambda x: x.startswith("keep"), on_drop=dropped_seen.append)
    for item in ("keep-a", "b", "keep-c"):
        assert q.put(item) == []
    assert q.put("d") == ["b"]            # 'keep-a' is older but needed
    assert q.drain() == ["keep-a", "keep-c", "d"]
    assert dropped_seen == ["b"]
    assert q.counters.dropped == 1 and q.counters.put == 4 and q.counters.got == 3 and q.counters.max_depth == 3


def test_protected_items_are_never_dropped():
    q = DropQueue(2, keep=lambda x: x < 0)
    q.put(-1)
    q.put(-2)
    assert q.put(5) == [5]                # nothing droppable: the new droppable item is refused
    assert q.put(-3) == []                # a needed item goes in over the bound
    assert q.counters.overflow == 1 and len(q) == 3
    assert q.drain() == [-1, -2, -3]


def test_without_keep_it_is_drop_oldest():
    q = DropQueue(2)
    for i in range(5):
        q.put(i)
    assert q.drain() == [3, 4] and q.counters.dropped == 3


def test_threads_wait_and_close_wakes_getters():
    q = DropQueue(2, name="t")
    got = []

    def consumer():
        try:
            while True:
                got.append(q.get(timeout=2))
        except QueueClosed:
            got.append("closed")

    t = threading.Thread(target=consumer)
    t.start()
    for i in range(20):
        assert q.put_wait(i, timeout=2)  # waits for room: nothing lost
    q.close()
    t.join(2)
    assert got == list(range(20)) + ["closed"] and q.counters.dropped == 0
    with pytest.raises(QueueClosed):
        q.put(1)
    with pytest.raises(TimeoutError):
        DropQueue(1).get(timeout=0.01)
    full = DropQueue(1)
    full.put(0)
    assert full.put_wait(1, timeout=0.02) is False


def test_asyncio_consumer_with_thread_producer_does_not_block_the_loop():
    q = DropQueue(4)

    async def main():
        ticks = 0
        stop = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.002)

        tick_task = asyncio.create_task(ticker())

        def producer():
            for i in range(30):
                time.sleep(0.003)
                q.put_wait(i, timeout=2)
            q.close()

        thread = threading.Thread(target=producer)
        thread.start()
        out = []
        try:
            while True:
                out.append(await q.aget())
        except QueueClosed:
            pass
        thread.join()
        stop.set()
        await tick_task
        return out, ticks

    out, ticks = asyncio.run(main())
    assert out == list(range(30))
    assert ticks >= 10


def test_asyncio_producer_waits_for_room_from_a_thread_consumer():
    q = DropQueue(1)
    got = []

    def consumer():
        for _ in range(10):
            got.append(q.get(timeout=2))

    async def main():
        thread = threading.Thread(target=consumer)
        thread.start()
        for i in range(10):
            await asyncio.wait_for(q.aput_wait(i), 2)
        await asyncio.to_thread(thread.join, 2)

    asyncio.run(main())
    assert got == list(range(10)) and q.counters.dropped == 0


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
