"""Slot buffers: snapshot + deltas reproduce the producer exactly; slots are stable and reused."""
from __future__ import annotations

import numpy as np
import pytest

from protocols.avatar_buffer import AvatarBuffer, DeltaStream, diff
from protocols.errors import ProtocolError
from protocols.wire import decode, encode


def values(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {
        "means": rng.normal(size=(n, 3)).astype(np.float32),
        "quats": rng.normal(size=(n, 4)).astype(np.float32),
        "scales": rng.uniform(0.001, 0.05, size=(n, 3)).astype(np.float32),
        "opacities": rng.uniform(0, 1, size=n).astype(np.float32),
        "colors": rng.uniform(0, 1, size=(n, 3)).astype(np.float32),
    }


class Producer:
    """A daemon-like avatar: random grow / retire / change steps over stable ids."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.ids = np.zeros(0, np.int64)
        self.vals = values(self.rng, 0)
        self.next_id = 0

    def step(self) -> None:
        rng = self.rng
        keep = rng.random(self.ids.size) > rng.choice([0.0, 0.1, 0.5])
        self.ids = self.ids[keep]
        self.vals = {k: v[keep] for k, v in self.vals.items()}
        changed = rng.random(self.ids.size) < rng.choice([0.0, 0.05, 1.0])
        fresh = values(rng, int(changed.sum()))
        for k in self.vals:
            self.vals[k][changed] = fresh[k]
        n_new = int(rng.integers(0, 60))
        self.ids = np.concatenate([self.ids, np.arange(self.next_id, self.next_id + n_new)])
        self.next_id += n_new
        new = values(rng, n_new)
        self.vals = {k: np.concatenate([self.vals[k], new[k]]) for k in self.vals}
        order = rng.permutation(self.ids.size)  # the producer's own order must not matter
        self.ids, self.vals = self.ids[order], {k: v[order] for k, v in self.vals.items()}


def as_dict(ids: np.ndarray, arrays: dict[str, np.ndarray]) -> dict[int, tuple]:
    return {int(i): tuple(arrays[k][j].tobytes() for k in sorted(arrays)) for j, i in enumerate(ids)}


@pytest.mark.parametrize("seed", range(4))
def test_snapshot_plus_deltas_reproduce_every_version_exactly(seed):
    producer = Producer(seed)
    daemon = AvatarBuffer("s")
    receiver = None
    previous = daemon.copy()
    for version in range(1, 40):
        producer.step()
        daemon.assign(producer.ids, producer.vals, version)
        delta = decode(encode(diff(previous, daemon, seq=version)))  # through the wire
        previous = daemon.copy()
        if version == 5:  # a late joiner starts from a snapshot
            receiver = AvatarBuffer.from_snapshot(decode(encode(daemon.snapshot(seq=version))))
        elif receiver is not None:
            receiver.apply(delta)
        if receiver is not None:
            assert receiver.equals(daemon)
        live = daemon.live_arrays()
        assert as_dict(live["ids"], {k: v for k, v in live.items() if k != "ids"}) == as_dict(producer.ids, producer.vals)


def test_kept_gaussians_keep_their_slot_and_freed_slots_are_reused_lowest_first():
    rng = np.random.default_rng(0)
    buf = AvatarBuffer("s")
    buf.assign(np.arange(10), values(rng, 10), 1)
    slot_of = {int(i): s for s, i in enumerate(buf.ids)}
    keep = np.array([0, 2, 4, 6, 8, 9])
    buf.assign(np.concatenate([keep[::-1], [100, 101]]), values(rng, 8), 2)
    for i in keep:
        assert buf.ids[slot_of[int(i)]] == i
    assert buf.n_slots == 10  # new ids filled freed slots instead of growing
    assert sorted(buf.ids[[1, 3]].tolist()) == [100, 101]
    assert buf.n_live == 8
    free = ~buf.live
    assert np.all(buf.fields["opacities"][free] == 0) and np.all(buf.ids[free] == 0xFFFFFFFF)


def test_delta_describes_appended_retired_and_changed_slots():
    rng = np.random.default_rng(1)
    old = AvatarBuffer("s")
    old.assign(np.arange(100), values(rng, 100), 1)
    new = old.copy()
    ids = np.concatenate([np.arange(0, 30), np.arange(31, 100), np.arange(1000, 1003)])
    vals = {k: v[np.r_[0:30, 31:100]] for k, v in old.live_arrays().items() if k != "ids"}
    vals = {k: np.concatenate([v, values(rng, 3)[k]]) for k, v in vals.items()}
    vals["colors"][60] += 0.25  # id 61 changes colour
    new.assign(ids, vals, 2)
    delta = diff(old, new, merge_gap=0)
    # slot 30 (id 30) is reused by one new id; two more are appended at 100, 101; slot 61 changed
    assert delta.arrays["retired"].tolist() == []
    assert delta.arrays["ranges"].tolist() == [[30, 31], [61, 62], [100, 102]]
    delta2 = diff(new, _retire(new, [5, 6]), merge_gap=0)
    assert delta2.arrays["retired"].tolist() == [5, 6] and delta2.arrays["ranges"].shape == (0, 2)


def _retire(buf: AvatarBuffer, slots: list[int]) -> AvatarBuffer:
    out = buf.copy()
    live = out.live_arrays()
    keep = ~np.isin(live["ids"], buf.ids[slots])
    out.assign(live["ids"][keep], {k: v[keep] for k, v in live.items() if k != "ids"}, buf.version + 1)
    return out


def test_apply_rejects_deltas_that_do_not_chain_or_overreach():
    rng = np.random.default_rng(2)
    a = AvatarBuffer("s")
    a.assign(np.arange(5), values(rng, 5), 1)
    b = a.copy()
    b.assign(np.arange(8), values(rng, 8), 2)
    c = b.copy()
    c.assign(np.arange(3), values(rng, 3), 3)
    receiver = AvatarBuffer.from_snapshot(a.snapshot())
    with pytest.raises(ProtocolError, match="base_version"):
        receiver.apply(diff(b, c))
    bad = diff(a, b)
    bad.arrays["ranges"] = np.array([[7, 8]], np.uint32)  # grows to 8 slots but writes only slot 7
    for k in ("ids", "means", "quats", "scales", "opacities", "colors"):
        bad.arrays[k] = bad.arrays[k][-1:]
    with pytest.raises(ProtocolError, match="new slots"):
        receiver.apply(bad)
    receiver.apply(diff(a, b))
    receiver.apply(diff(b, c))
    assert receiver.equals(c)


def test_assign_validates_input():
    rng = np.random.default_rng(3)
    buf = AvatarBuffer("s")
    with pytest.raises(ValueError, match="unique"):
        buf.assign(np.array([1, 1]), values(rng, 2), 1)
    with pytest.raises(ValueError, match="shape"):
        buf.assign(np.arange(2), values(rng, 3), 1)
    with pytest.raises(ValueError, match="ids must lie"):
        buf.assign(np.array([0xFFFFFFFF]), values(rng, 1), 1)
    buf.assign(np.arange(2), values(rng, 2), 1)
    with pytest.raises(ValueError, match="increase"):
        buf.assign(np.arange(2), values(rng, 2), 1)


def test_delta_stream_conflates_unsent_versions():
    rng = np.random.default_rng(4)
    stream = DeltaStream("s")
    buf = AvatarBuffer("s")
    receiver = AvatarBuffer.from_snapshot(stream.snapshot())
    for version in range(1, 8):
        buf.assign(np.arange(version * 10), values(rng, version * 10), version)
        msg = stream.next_delta(buf)
        if version % 3 == 0:  # only every third version goes out
            stream.sent(buf, msg)
            receiver.apply(decode(encode(msg)))
            assert receiver.equals(buf) and msg.base_version == version - 3
    assert stream.seq == 2 and stream.snapshot().version == 6
