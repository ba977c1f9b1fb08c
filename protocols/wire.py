"""Avatar message schema v1: a small msgpack header plus raw little-endian array buffers.

One message is a list of frames (ZeroMQ multipart; on WebRTC the same frames go through
`protocols.chunking`):

    frame 0     msgpack map {v, type, session, version, base_version, seq, t_capture, t_publish,
                             arrays: [{name, dtype, shape}], stats}
    frame 1..n  the raw bytes of each array named in `arrays`, in order, C order, little-endian

Never pickle, never msgpack-numpy: a decoder only ever builds numpy arrays of whitelisted dtypes
from byte lengths it has checked against the header and against `Limits`.

Slot-based avatar buffer (what the arrays mean)
-----------------------------------------------
Receivers keep the avatar in *slots*: dense arrays of length ``n_slots``. A Gaussian lives in one
slot for its whole life, so a splat viewer can keep GPU buffers indexed by slot and update them in
place. A slot is either live (``ids[slot]`` is the Gaussian's stable id) or free
(``ids[slot] == FREE_ID``: all bits set, i.e. 0xFFFFFFFF for uint32 ids, -1 for int64 ids; every
other field of a free slot is exactly zero, so its opacity is 0 and it renders as nothing).
When Gaussians are pruned their slots are freed; new Gaussians fill free slots lowest-first and only
then grow ``n_slots``. ``n_slots`` never shrinks within a chain of deltas.

``snapshot`` (whole avatar at ``version``; ``base_version`` is -1):
    ids        (N,)    uint32 or int64   N = n_slots, free slots hold FREE_ID
    means      (N,3)   float32           world-space centres, metres
    quats      (N,4)   float32           rotation, wxyz
    scales     (N,3)   float32           linear (activated) scales
    opacities  (N,)    float32           in [0, 1]
    colors     (N,3)   float32           RGB in [0, 1]
    ...        (N,...) optional extra per-Gaussian fields (e.g. canonical/animation arrays)

``delta`` (turns the avatar at ``base_version`` into the avatar at ``version``):
    ranges     (R,2)   uint32   [start, stop) slot ranges written by this delta: sorted, disjoint.
                                 Ranges at or beyond the base's n_slots are the appended range; the
                                 new n_slots is max(base n_slots, last stop) and every new slot must
                                 be covered by a range.
    retired    (Q,)    uint32   slots freed by this delta (sorted, unique, outside every range):
                                 set ids to FREE_ID and every field to 0.
    ids        (K,)             K = sum(stop - start): the values of the written slots, ranges
    means...   (K,...)           concatenated in order; same field set as the snapshot.

Applying a snapshot and then every delta in order reproduces the publisher's slot arrays bit for
bit (see `protocols.avatar_buffer`). ``seq`` numbers the messages of one session's stream: a
snapshot carries the seq of the last delta already folded into it (the clone pattern: apply deltas
with seq > snapshot seq whose base_version equals the version you hold).

``rig`` (what a subscriber needs to pose avatar ``version`` itself; ``base_version`` is -1;
``stats.shape_version`` names the identity shape baked in; see `protocols.animation` for posing):
    M Gaussians, A anchors in use (point prompts they hang on), J = 5 FLAME joints, E expressions
    ids                (M,)     uint32 or int64   the Gaussians' stable ids (the avatar's slot ids)
    anchor             (M,)     uint32            index into the anchor arrays (< A)
    offset             (M,3)    float32           canonical offset from the anchor, metres
    rotation           (M,4)    float32           canonical rotation wxyz (in the anchor's frame)
    scales             (M,3)    float32           linear scales
    opacities          (M,)     float32           in [0, 1]
    colors             (M,3)    float32           RGB in [0, 1]
    anchor_point       (A,)     uint32            the point prompt each anchor is (for reference)
    anchor_rest        (A,3)    float32           rest position with the identity shape applied
    anchor_expression  (A,3,E)  float16/float32   displacement per expression coefficient
    anchor_weights     (A,J)    float32           linear-blend-skinning weights (rows sum to 1)
    joint_rest         (J,3)    float32           rest joints with the identity shape, zero expression
    joint_expression   (J,3,E)  float32           rest-joint offset per expression coefficient
    parents            (J,)     int32             kinematic tree: parents[0] = -1, parents[j] < j
No pose correctives: the avatar's LBS has none (the embedded head and the official rig carry none).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import msgpack
import numpy as np

from protocols.errors import ProtocolError

WIRE_VERSION = 1
MESSAGE_TYPES = ("snapshot", "delta", "rig")
HEADER_KEYS = frozenset(
    ("v", "type", "session", "version", "base_version", "seq", "t_capture", "t_publish", "arrays", "stats"))

#: wire dtype name -> numpy dtype (always little-endian on the wire)
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "uint64",
                 "float16", "float32", "float64")
}
ID_DTYPES = ("uint32", "int64")

#: the per-Gaussian fields every avatar carries: name -> trailing shape (all float32)
CORE_FIELDS: dict[str, tuple[int, ...]] = {
    "means": (3,), "quats": (4,), "scales": (3,), "opacities": (), "colors": (3,),
}
STRUCTURE_ARRAYS = ("ids", "ranges", "retired")
_MAX_NAME = 64
_MAX_INT = 2**63 - 1


def free_id(dtype: np.dtype | str) -> int:
    """The id value marking a free slot: all bits set (0xFFFFFFFF for uint32, -1 for int64)."""
    dtype = np.dtype(dtype)
    return int(np.iinfo(dtype).max) if dtype.kind == "u" else -1


@dataclass(frozen=True)
class Limits:
    """Bounds a decoder enforces before it allocates or trusts anything.

    max_elements bounds each array's element count (product of its shape), max_bytes the sum of
    all array buffers of one message, max_header_bytes the msgpack header frame.
    """

    max_header_bytes: int = 64 * 1024
    max_arrays: int = 32
    max_rank: int = 4
    max_elements: int = 64 * 1024 * 1024
    max_bytes: int = 1024 * 1024 * 1024
    max_session_chars: int = 128

    @property
    def max_message_bytes(self) -> int:
        """Upper bound of all frames of one message together."""
        return self.max_header_bytes + self.max_bytes


@dataclass
class Message:
    """One decoded (or to-be-encoded) avatar message; `arrays` keep their order on the wire."""

    type: str
    session: str
    version: int
    base_version: int = -1
    seq: int = 0
    t_capture: float = 0.0
    t_publish: float = 0.0
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays.values())


def _dtype_name(dtype: np.dtype) -> str:
    for name, wire in DTYPES.items():
        if np.dtype(dtype).newbyteorder("<") == wire and np.dtype(dtype).kind == wire.kind:
            return name
    raise ProtocolError(f"dtype {dtype} is not allowed on the wire (allowed: {', '.join(DTYPES)})")


def encode(msg: Message, limits: Limits = Limits()) -> list[bytes]:
    """Message -> frames [header, buffer...]. Validates the message like a decoder would."""
    arrays = {name: np.asarray(a) for name, a in msg.arrays.items()}
    specs = []
    buffers = []
    for name, a in arrays.items():
        wire_name = _dtype_name(a.dtype)
        specs.append({"name": name, "dtype": wire_name, "shape": [int(s) for s in a.shape]})
        buffers.append(np.ascontiguousarray(a, dtype=DTYPES[wire_name]).tobytes())
    header = {
        "v": WIRE_VERSION, "type": msg.type, "session": msg.session, "version": int(msg.version),
        "base_version": int(msg.base_version), "seq": int(msg.seq), "t_capture": float(msg.t_capture),
        "t_publish": float(msg.t_publish), "arrays": specs, "stats": dict(msg.stats),
    }
    try:
        head = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"message header cannot be encoded: {exc}") from exc
    frames = [head, *buffers]
    decode(frames, limits)  # the same checks as every receiver: never send what a peer must reject
    return frames


def _unpack_header(data: bytes, limits: Limits) -> dict:
    if len(data) > limits.max_header_bytes:
        raise ProtocolError(f"header is {len(data)} bytes, limit is {limits.max_header_bytes}")
    n = limits.max_header_bytes
    try:
        header = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True,
                                 max_str_len=n, max_bin_len=n, max_array_len=n, max_map_len=n, max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types for corrupt input
        raise ProtocolError(f"header is not valid msgpack: {exc.__class__.__name__}: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a map, got {type(header).__name__}")
    return header


def _int(header: dict, key: str, lo: int) -> int:
    value = header[key]
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= _MAX_INT:
        raise ProtocolError(f"header field {key!r} must be an integer >= {lo}, got {value!r}")
    return value


def _float(header: dict, key: str) -> float:
    value = header[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ProtocolError(f"header field {key!r} must be a finite number, got {value!r}")
    return float(value)


def _array_specs(specs: Any, limits: Limits) -> list[tuple[str, np.dtype, tuple[int, ...], int]]:
    if not isinstance(specs, list):
        raise ProtocolError("header field 'arrays' must be a list")
    if len(specs) > limits.max_arrays:
        raise ProtocolError(f"message has {len(specs)} arrays, limit is {limits.max_arrays}")
    out = []
    seen: set[str] = set()
    total = 0
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or set(spec) != {"name", "dtype", "shape"}:
            raise ProtocolError(f"arrays[{i}] must be a map with exactly name, dtype, shape")
        name, dtype, shape = spec["name"], spec["dtype"], spec["shape"]
        if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME or not name.isidentifier():
            raise ProtocolError(f"arrays[{i}] has an invalid name {name!r}")
        if name in seen:
            raise ProtocolError(f"array {name!r} appears twice")
        seen.add(name)
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ProtocolError(f"array {name!r} has dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > limits.max_rank
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= _MAX_INT for s in shape)):
            raise ProtocolError(f"array {name!r} has an invalid shape {shape!r} (non-negative ints, "
                                f"rank <= {limits.max_rank})")
        elements = math.prod(shape)
        # each dimension on its own too: a zero beside a huge one has no elements but cannot be built
        if elements > limits.max_elements or any(s > limits.max_elements for s in shape):
            raise ProtocolError(f"array {name!r} has {elements} elements, limit is {limits.max_elements}")
        nbytes = elements * DTYPES[dtype].itemsize
        total += nbytes
        if total > limits.max_bytes:
            raise ProtocolError(f"message arrays exceed {limits.max_bytes} bytes")
        out.append((name, DTYPES[dtype], tuple(shape), nbytes))
    return out


def decode(frames: Sequence[bytes | bytearray | memoryview], limits: Limits = Limits()) -> Message:
    """Frames -> Message, checking header, counts, dtypes, shapes, lengths and the type's schema.

    Arrays are read-only views over the frames (no copy). Raises ProtocolError on anything wrong.
    """
    if not isinstance(frames, (list, tuple)) or not frames:
        raise ProtocolError("a message needs at least a header frame")
    for i, frame in enumerate(frames):
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise ProtocolError(f"frame {i} is {type(frame).__name__}, not bytes")
    header = _unpack_header(bytes(frames[0]), limits)
    if header.get("v") != WIRE_VERSION or isinstance(header.get("v"), bool):
        raise ProtocolError(f"unsupported wire version {header.get('v')!r} (this decoder reads v{WIRE_VERSION})")
    if set(header) != HEADER_KEYS:
        missing = sorted(HEADER_KEYS - set(header))
        extra = sorted(str(k) for k in set(header) - HEADER_KEYS)
        raise ProtocolError(f"header keys wrong: missing {missing}, unexpected {extra}")
    kind = header["type"]
    if kind not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {kind!r} (expected one of {MESSAGE_TYPES})")
    session = header["session"]
    if not isinstance(session, str) or not 0 < len(session) <= limits.max_session_chars or not session.isprintable():
        raise ProtocolError(f"session must be 1..{limits.max_session_chars} printable characters, got {session!r}")
    stats = header["stats"]
    if not isinstance(stats, dict) or not all(isinstance(k, str) for k in stats):
        raise ProtocolError("header field 'stats' must be a map with string keys")
    specs = _array_specs(header["arrays"], limits)
    if len(frames) != len(specs) + 1:
        raise ProtocolError(f"header names {len(specs)} arrays but {len(frames) - 1} buffer frames arrived")
    arrays: dict[str, np.ndarray] = {}
    for (name, dtype, shape, nbytes), frame in zip(specs, frames[1:]):
        size = memoryview(frame).nbytes
        if size != nbytes:
            raise ProtocolError(f"array {name!r} {list(shape)} {dtype.name} needs {nbytes} bytes, frame has {size}")
        try:
            arrays[name] = np.frombuffer(frame, dtype=dtype).reshape(shape)
        except ValueError as exc:  # numpy's own bounds (e.g. its maximum dimension size)
            raise ProtocolError(f"array {name!r} {list(shape)} cannot be built: {exc}") from None
    msg = Message(type=kind, session=session, version=_int(header, "version", 0),
                  base_version=_int(header, "base_version", -1), seq=_int(header, "seq", 0),
                  t_capture=_float(header, "t_capture"), t_publish=_float(header, "t_publish"),
                  arrays=arrays, stats=stats)
    check_schema(msg)
    return msg


def _check_fields(arrays: Mapping[str, np.ndarray], n: int, kind: str) -> None:
    ids = arrays.get("ids")
    if ids is None or ids.ndim != 1 or _dtype_name(ids.dtype) not in ID_DTYPES:
        raise ProtocolError(f"{kind} needs 'ids' of shape (N,) and dtype uint32 or int64")
    if ids.shape[0] != n:
        raise ProtocolError(f"{kind}: 'ids' has {ids.shape[0]} entries, expected {n}")
    for name, trailing in CORE_FIELDS.items():
        a = arrays.get(name)
        if a is None:
            raise ProtocolError(f"{kind} is missing array {name!r}")
        if a.dtype != DTYPES["float32"] or a.shape != (n, *trailing):
            raise ProtocolError(f"{kind}: {name!r} must be float32 {(n, *trailing)}, got {a.dtype.name} {a.shape}")
    for name, a in arrays.items():
        if name in CORE_FIELDS or name in STRUCTURE_ARRAYS:
            continue
        if a.ndim < 1 or a.shape[0] != n:
            raise ProtocolError(f"{kind}: extra field {name!r} must have leading dimension {n}, got {a.shape}")


#: the rig's arrays: name -> (leading axis, trailing shape with "E"/"J" for the expression/joint counts, dtypes)
RIG_FIELDS: dict[str, tuple[str, tuple, tuple[str, ...]]] = {
    "ids": ("M", (), ID_DTYPES),
    "anchor": ("M", (), ("uint32",)),
    "offset": ("M", (3,), ("float32",)),
    "rotation": ("M", (4,), ("float32",)),
    "scales": ("M", (3,), ("float32",)),
    "opacities": ("M", (), ("float32",)),
    "colors": ("M", (3,), ("float32",)),
    "anchor_point": ("A", (), ("uint32",)),
    "anchor_rest": ("A", (3,), ("float32",)),
    "anchor_expression": ("A", (3, "E"), ("float16", "float32")),
    "anchor_weights": ("A", ("J",), ("float32",)),
    "joint_rest": ("J", (3,), ("float32",)),
    "joint_expression": ("J", (3, "E"), ("float32",)),
    "parents": ("J", (), ("int32",)),
}
#: FLAME's joints: global, neck, jaw, left eye, right eye (the motion message carries one rotation each)
RIG_JOINTS = 5
MAX_EXPRESSION = 400


def _check_rig(msg: Message) -> None:
    arrays = msg.arrays
    if msg.base_version != -1:
        raise ProtocolError("a rig has base_version -1")
    if set(arrays) != set(RIG_FIELDS):
        raise ProtocolError(f"rig arrays wrong: missing {sorted(set(RIG_FIELDS) - set(arrays))}, "
                            f"unexpected {sorted(set(arrays) - set(RIG_FIELDS))}")
    shape_version = msg.stats.get("shape_version")
    if not isinstance(shape_version, int) or isinstance(shape_version, bool) or shape_version < 0:
        raise ProtocolError(f"rig stats.shape_version must be an integer >= 0, got {shape_version!r}")
    expr = arrays["anchor_expression"]
    sizes = {"M": arrays["ids"].shape[0] if arrays["ids"].ndim else -1,
             "A": arrays["anchor_rest"].shape[0] if arrays["anchor_rest"].ndim else -1,
             "J": RIG_JOINTS, "E": expr.shape[-1] if expr.ndim == 3 else -1}
    if not 0 <= sizes["E"] <= MAX_EXPRESSION:
        raise ProtocolError(f"rig anchor_expression must be (A,3,E) with E <= {MAX_EXPRESSION}, got {expr.shape}")
    for name, (lead, trailing, dtypes) in RIG_FIELDS.items():
        a = arrays[name]
        want = (sizes[lead], *(sizes[d] if isinstance(d, str) else d for d in trailing))
        if _dtype_name(a.dtype) not in dtypes or a.shape != want:
            raise ProtocolError(f"rig: {name!r} must be {'/'.join(dtypes)} {want}, got {a.dtype.name} {a.shape}")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise ProtocolError(f"rig: {name!r} holds non-finite values")
    if sizes["M"] and int(arrays["anchor"].max()) >= sizes["A"]:
        raise ProtocolError(f"rig: an 'anchor' index is >= the {sizes['A']} anchors")
    parents = arrays["parents"].astype(np.int64)
    if parents[0] != -1 or np.any(parents[1:] < 0) or np.any(parents[1:] >= np.arange(1, RIG_JOINTS)):
        raise ProtocolError(f"rig: parents must be -1 then earlier joints, got {parents.tolist()}")


def check_schema(msg: Message) -> None:
    """Type-specific structure: snapshot fields share N; delta ranges are sorted, disjoint and sized; rig arrays
    agree on M, A, J and E and index within range."""
    arrays = msg.arrays
    if msg.type == "rig":
        _check_rig(msg)
        return
    if msg.type == "snapshot":
        if msg.base_version != -1:
            raise ProtocolError("a snapshot has base_version -1")
        for name in ("ranges", "retired"):
            if name in arrays:
                raise ProtocolError(f"a snapshot must not carry {name!r}")
        ids = arrays.get("ids")
        _check_fields(arrays, ids.shape[0] if ids is not None and ids.ndim == 1 else -1, "snapshot")
        return
    if not 0 <= msg.base_version < msg.version:
        raise ProtocolError(f"delta base_version {msg.base_version} must be >= 0 and below version {msg.version}")
    ranges, retired = arrays.get("ranges"), arrays.get("retired")
    if ranges is None or ranges.dtype != DTYPES["uint32"] or ranges.ndim != 2 or ranges.shape[1] != 2:
        raise ProtocolError("delta needs 'ranges' of shape (R,2) uint32")
    if retired is None or retired.dtype != DTYPES["uint32"] or retired.ndim != 1:
        raise ProtocolError("delta needs 'retired' of shape (Q,) uint32")
    starts, stops = ranges[:, 0].astype(np.int64), ranges[:, 1].astype(np.int64)
    if np.any(starts >= stops):
        raise ProtocolError("delta ranges must be non-empty [start, stop)")
    if np.any(starts[1:] < stops[:-1]):
        raise ProtocolError("delta ranges must be sorted and disjoint")
    if np.any(np.diff(retired.astype(np.int64)) <= 0):
        raise ProtocolError("delta 'retired' slots must be sorted and unique")
    if len(ranges) and len(retired):
        pos = np.searchsorted(stops, retired.astype(np.int64), side="right")
        inside = (pos < len(starts)) & (starts[np.minimum(pos, len(starts) - 1)] <= retired)
        if np.any(inside):
            raise ProtocolError("a retired slot is also written by a range")
    _check_fields(arrays, int((stops - starts).sum()), "delta")


def range_slots(ranges: np.ndarray) -> np.ndarray:
    """(R,2) [start, stop) ranges -> (K,) int64 slot indices, concatenated in order."""
    if len(ranges) == 0:
        return np.zeros(0, np.int64)
    starts, stops = ranges[:, 0].astype(np.int64), ranges[:, 1].astype(np.int64)
    lengths = stops - starts
    offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return np.arange(int(lengths.sum()), dtype=np.int64) + offsets


def slots_to_ranges(slots: Iterable[int] | np.ndarray, merge_gap: int = 0) -> np.ndarray:
    """Sorted unique slot indices -> (R,2) uint32 [start, stop) ranges.

    Runs separated by at most `merge_gap` untouched slots are merged (rewriting unchanged slots is
    harmless and fewer ranges mean fewer `set()` calls in a viewer).
    """
    slots = np.asarray(slots, dtype=np.int64)
    if slots.size == 0:
        return np.zeros((0, 2), np.uint32)
    breaks = np.flatnonzero(np.diff(slots) > merge_gap + 1)
    starts = slots[np.concatenate(([0], breaks + 1))]
    stops = slots[np.concatenate((breaks, [slots.size - 1]))] + 1
    return np.stack([starts, stops], axis=1).astype(np.uint32)
