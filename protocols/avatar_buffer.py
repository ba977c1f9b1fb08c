"""Slot arrays of one avatar, shared by the daemon (producer) and every receiver.

The daemon keeps an `AvatarBuffer` per session and calls `assign(ids, arrays, version)` with the
fused avatar of each new version (ids are the Gaussians' stable identities, e.g. a per-session
running counter the fuser hands out; a Gaussian that keeps its id keeps its slot). Publishers turn
consecutive states into deltas with `diff(old, new)` (through a `DeltaStream`, which remembers what
its receivers last got, so skipped versions fold into one delta: conflation). Receivers `apply`
snapshots and deltas and end with bit-identical slot arrays. See `protocols.wire` for the layout.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from protocols.errors import ProtocolError
from protocols.wire import CORE_FIELDS, DTYPES, Message, free_id, range_slots, slots_to_ranges


@dataclass(frozen=True)
class FieldSpec:
    """One per-Gaussian field: slot array shape (n_slots, *shape), little-endian dtype."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]


CORE_SPECS = tuple(FieldSpec(name, DTYPES["float32"], shape) for name, shape in CORE_FIELDS.items())


def _bits(a: np.ndarray) -> np.ndarray:
    """View rows of `a` as raw bytes (n, itemsize*prod(shape)) so comparisons are bitwise (NaN, -0.0)."""
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).reshape(a.shape[0], a.dtype.itemsize * int(np.prod(a.shape[1:], dtype=np.int64)))


class AvatarBuffer:
    """The avatar of one session as slot arrays: `ids (n_slots,)` and one array per field.

    Free slots hold `free_id(id_dtype)` and zeros in every field. Arrays are over-allocated
    (capacity doubles) so appends are amortised O(1); `ids`/`fields` views expose `[:n_slots]`.
    """

    def __init__(self, session: str, extra_fields: tuple[FieldSpec, ...] = (), id_dtype: str = "uint32",
                 version: int = 0) -> None:
        if id_dtype not in ("uint32", "int64"):
            raise ValueError(f"id_dtype must be uint32 or int64, got {id_dtype!r}")
        self.session = session
        self.version = version
        self.specs: tuple[FieldSpec, ...] = CORE_SPECS + tuple(extra_fields)
        self.id_dtype = DTYPES[id_dtype]
        self.free = free_id(self.id_dtype)
        self.n_slots = 0
        self._ids = np.full(0, self.free, self.id_dtype)
        self._fields = {s.name: np.zeros((0, *s.shape), s.dtype) for s in self.specs}

    # ----- views -------------------------------------------------------------------------------
    @property
    def ids(self) -> np.ndarray:
        return self._ids[: self.n_slots]

    @property
    def fields(self) -> dict[str, np.ndarray]:
        return {name: a[: self.n_slots] for name, a in self._fields.items()}

    @property
    def live(self) -> np.ndarray:
        """(n_slots,) bool: slots holding a Gaussian."""
        return self.ids != self.free

    @property
    def n_live(self) -> int:
        return int(np.count_nonzero(self.live))

    def live_arrays(self) -> dict[str, np.ndarray]:
        """Compacted copies of the live Gaussians in slot order: ids (M,), means (M,3), ..."""
        mask = self.live
        out = {"ids": self.ids[mask].copy()}
        out.update({name: a[mask].copy() for name, a in self.fields.items()})
        return out

    def copy(self) -> "AvatarBuffer":
        other = AvatarBuffer.__new__(AvatarBuffer)
        other.session, other.version, other.specs = self.session, self.version, self.specs
        other.id_dtype, other.free, other.n_slots = self.id_dtype, self.free, self.n_slots
        other._ids = self.ids.copy()
        other._fields = {name: a.copy() for name, a in self.fields.items()}
        return other

    def equals(self, other: "AvatarBuffer") -> bool:
        """Bit-identical slot arrays, same version and field set."""
        return (self.version == other.version and self.n_slots == other.n_slots
                and self.id_dtype == other.id_dtype and [s for s in self.specs] == [s for s in other.specs]
                and np.array_equal(self.ids, other.ids)
                and all(np.array_equal(_bits(a), _bits(other.fields[n])) for n, a in self.fields.items()))

    # ----- storage ------------------------------------------------------------------------------
    def _reserve(self, n: int) -> None:
        if n <= self._ids.shape[0]:
            return
        cap = max(n, 2 * self._ids.shape[0], 64)
        ids = np.full(cap, self.free, self.id_dtype)
        ids[: self.n_slots] = self.ids
        self._ids = ids
        for name, a in self._fields.items():
            grown = np.zeros((cap, *a.shape[1:]), a.dtype)
            grown[: self.n_slots] = a[: self.n_slots]
            self._fields[name] = grown

    def _clear(self, slots: np.ndarray) -> None:
        self._ids[slots] = self.free
        for a in self._fields.values():
            a[slots] = 0

    # ----- producer side -------------------------------------------------------------------------
    def assign(self, ids: np.ndarray, arrays: Mapping[str, np.ndarray], version: int) -> None:
        """Make the buffer hold exactly these Gaussians at `version`.

        ids (M,) unique stable ids; arrays: every field with leading dimension M (means (M,3),
        quats (M,4) wxyz, scales (M,3) linear, opacities (M,) or (M,1), colors (M,3), extras).
        Kept ids keep their slot; dropped ids free theirs; new ids fill free slots lowest first.
        """
        if version <= self.version:
            raise ValueError(f"avatar versions must increase: {version} after {self.version}")
        ids = np.asarray(ids)
        m = ids.shape[0]
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        top = self.free if self.free > 0 else np.iinfo(np.int64).max
        if m and (int(ids.min()) < 0 or int(ids.max()) >= top):
            raise ValueError(f"ids must lie in [0, {top}) for {self.id_dtype.name} ids")
        ids = ids.astype(self.id_dtype)
        values = {}
        for spec in self.specs:
            if spec.name not in arrays:
                raise ValueError(f"missing field {spec.name!r}")
            a = np.asarray(arrays[spec.name])
            if spec.name == "opacities" and a.shape == (m, 1):
                a = a[:, 0]
            if a.shape != (m, *spec.shape):
                raise ValueError(f"field {spec.name!r} must have shape {(m, *spec.shape)}, got {a.shape}")
            values[spec.name] = a.astype(spec.dtype, copy=False)
        order = np.argsort(ids, kind="stable")
        if m > 1 and np.any(ids[order][1:] == ids[order][:-1]):
            raise ValueError("ids must be unique")

        live_slots = np.flatnonzero(self.live)
        live_ids = self.ids[live_slots]
        kept = np.isin(live_ids, ids, assume_unique=True)
        self._clear(live_slots[~kept])

        slot_of = np.empty(m, np.int64)
        known = np.isin(ids, live_ids[kept], assume_unique=True)
        if np.any(known):
            by_id = np.argsort(live_ids[kept])
            sorted_ids = live_ids[kept][by_id]
            slot_of[known] = live_slots[kept][by_id][np.searchsorted(sorted_ids, ids[known])]
        n_new = int(m - np.count_nonzero(known))
        free_slots = np.flatnonzero(~self.live)[:n_new]
        n_append = n_new - free_slots.size
        appended = np.arange(self.n_slots, self.n_slots + n_append, dtype=np.int64)
        slot_of[~known] = np.concatenate([free_slots, appended])
        self._reserve(self.n_slots + n_append)
        self.n_slots += n_append
        self._ids[slot_of] = ids
        for name, a in values.items():
            self._fields[name][slot_of] = a
        self.version = version

    def snapshot(self, seq: int = 0, t_capture: float = 0.0, t_publish: float | None = None,
                 stats: Mapping[str, Any] | None = None) -> Message:
        """The whole avatar (all slots, free ones included) as a `snapshot` message (arrays are copies)."""
        arrays = {"ids": self.ids.copy()}
        arrays.update({name: a.copy() for name, a in self.fields.items()})
        return Message("snapshot", self.session, self.version, -1, seq, t_capture,
                       time.time() if t_publish is None else t_publish, arrays, dict(stats or {}))

    # ----- receiver side -----------------------------------------------------------------------
    @classmethod
    def from_snapshot(cls, msg: Message) -> "AvatarBuffer":
        buf = cls.__new__(cls)
        buf._load_snapshot(msg)
        return buf

    def _load_snapshot(self, msg: Message) -> None:
        ids = msg.arrays["ids"]
        self.session, self.version = msg.session, msg.version
        self.id_dtype = ids.dtype
        self.free = free_id(ids.dtype)
        extras = tuple(FieldSpec(n, a.dtype, a.shape[1:]) for n, a in msg.arrays.items()
                       if n != "ids" and n not in CORE_FIELDS)
        self.specs = CORE_SPECS + extras
        self.n_slots = ids.shape[0]
        self._ids = ids.copy()
        self._fields = {s.name: np.array(msg.arrays[s.name], dtype=s.dtype, copy=True) for s in self.specs}

    def apply(self, msg: Message) -> None:
        """Apply a decoded snapshot (replaces everything) or a delta whose base is this version."""
        if msg.type == "snapshot":
            self._load_snapshot(msg)
            return
        if msg.session != self.session:
            raise ProtocolError(f"delta for session {msg.session!r} applied to {self.session!r}")
        if msg.base_version != self.version:
            raise ProtocolError(f"delta base_version {msg.base_version} does not match held version {self.version}")
        names = set(msg.arrays) - {"ranges", "retired", "ids"}
        if names != {s.name for s in self.specs}:
            raise ProtocolError(f"delta fields {sorted(names)} differ from the avatar's {[s.name for s in self.specs]}")
        if msg.arrays["ids"].dtype != self.id_dtype:
            raise ProtocolError(f"delta ids are {msg.arrays['ids'].dtype.name}, avatar ids {self.id_dtype.name}")
        for s in self.specs:
            a = msg.arrays[s.name]
            if a.dtype != s.dtype or a.shape[1:] != s.shape:
                raise ProtocolError(f"delta field {s.name!r} is {a.dtype.name} {a.shape}, expected {s.dtype.name} "
                                    f"(K, {s.shape})")
        ranges, retired = msg.arrays["ranges"], msg.arrays["retired"].astype(np.int64)
        slots = range_slots(ranges)
        new_n = max(self.n_slots, int(slots[-1]) + 1 if slots.size else 0)
        grown = slots[slots >= self.n_slots]
        if grown.size != new_n - self.n_slots:
            raise ProtocolError(f"delta grows the avatar to {new_n} slots without writing all new slots")
        if retired.size and (retired[-1] >= self.n_slots or np.any(self.ids[retired] == self.free)):
            raise ProtocolError("delta retires a slot that is not live")
        self._reserve(new_n)
        self.n_slots = new_n
        self._clear(retired)
        self._ids[slots] = msg.arrays["ids"]
        for s in self.specs:
            self._fields[s.name][slots] = msg.arrays[s.name]
        self.version = msg.version


def diff(old: AvatarBuffer, new: AvatarBuffer, seq: int = 0, t_capture: float = 0.0,
         t_publish: float | None = None, stats: Mapping[str, Any] | None = None,
         merge_gap: int = 8) -> Message:
    """The delta turning `old` into `new` (same session and fields; `new` never has fewer slots).

    Slots whose id or any field bit differs are written (as ranges, merging runs `merge_gap`
    apart); slots live in `old` and free in `new` are listed in `retired` instead.
    """
    if old.session != new.session or old.specs != new.specs or old.id_dtype != new.id_dtype:
        raise ValueError("diff needs two states of the same avatar (session, fields, id dtype)")
    if new.version <= old.version:
        raise ValueError(f"diff from version {old.version} to {new.version}: versions must increase")
    if new.n_slots < old.n_slots:
        raise ValueError("slot count shrank; send a snapshot instead")
    n_old = old.n_slots
    changed = np.zeros(new.n_slots, bool)
    changed[n_old:] = True
    changed[:n_old] = new.ids[:n_old] != old.ids
    for name, a in new.fields.items():
        changed[:n_old] |= np.any(_bits(a[:n_old]) != _bits(old.fields[name]), axis=1)
    retired_mask = np.zeros(new.n_slots, bool)
    retired_mask[:n_old] = (old.ids != old.free) & (new.ids[:n_old] == new.free)
    written = changed & ~retired_mask
    ranges = slots_to_ranges(np.flatnonzero(written), merge_gap=merge_gap)
    # merging may swallow retired slots in a gap: those are then written (as free) instead of retired
    slots = range_slots(ranges)
    retired_mask[slots] = False
    arrays: dict[str, np.ndarray] = {"ranges": ranges, "retired": np.flatnonzero(retired_mask).astype(np.uint32),
                                     "ids": new.ids[slots].copy()}
    arrays.update({name: a[slots].copy() for name, a in new.fields.items()})
    return Message("delta", new.session, new.version, old.version, seq, t_capture,
                   time.time() if t_publish is None else t_publish, arrays, dict(stats or {}))


class DeltaStream:
    """What one stream's receivers hold: the last state sent and its seq (per session, per peer).

    `next_delta(current)` diffs against the last *sent* state, so versions that were never sent
    (the transport was busy) fold into one delta: conflation. Call `sent(current, msg)` only once
    the message really left; `snapshot()` returns the last sent state with its seq (clone pattern).
    """

    def __init__(self, session: str, extra_fields: tuple[FieldSpec, ...] = (), id_dtype: str = "uint32") -> None:
        self.last = AvatarBuffer(session, extra_fields, id_dtype)
        self.seq = 0
        self.t_capture = 0.0

    def next_delta(self, current: AvatarBuffer, t_capture: float = 0.0,
                   stats: Mapping[str, Any] | None = None) -> Message:
        return diff(self.last, current, seq=self.seq + 1, t_capture=t_capture, stats=stats)

    def sent(self, current: AvatarBuffer, msg: Message) -> None:
        if msg.seq != self.seq + 1 or msg.version != current.version:
            raise ValueError("sent() must follow the next_delta() it confirms")
        self.last = current.copy()
        self.seq = msg.seq
        self.t_capture = msg.t_capture

    def snapshot(self, stats: Mapping[str, Any] | None = None) -> Message:
        return self.last.snapshot(seq=self.seq, t_capture=self.t_capture, stats=stats)
