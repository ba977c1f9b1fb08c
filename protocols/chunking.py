"""Split one encoded message (its list of frames) into <= 16 KiB chunks and put it back together.

For the WebRTC data channel, whose messages should stay small. The frames are first packed into
one byte string:

    u32 n_frames | u32 length * n_frames | frame bytes, concatenated

which is then cut into chunks, each with a 16-byte little-endian header:

    offset 0  2 bytes  magic b"FA"
    offset 2  u8       chunk format version (1)
    offset 3  u8       flags (0; reserved)
    offset 4  u32      message id (wraps; distinguishes interleaved messages)
    offset 8  u32      chunk index, 0-based
    offset 12 u32      chunk count of this message

A reader (`Reassembler`, or the browser page with a DataView) collects chunks by message id in
any order; when all `count` chunks are there it concatenates their payloads and unpacks the frames.
Everything is bounded by `wire.Limits`: chunk count, total bytes, frame count, pending messages.
"""
from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

from protocols.errors import ProtocolError
from protocols.wire import Limits

MAGIC = b"FA"
CHUNK_VERSION = 1
CHUNK_HEADER = struct.Struct("<2sBBIII")
DEFAULT_CHUNK_BYTES = 16 * 1024


def pack_frames(frames: Sequence[bytes]) -> bytes:
    """Frames -> one byte string (u32 count, u32 lengths, bytes)."""
    if not frames:
        raise ProtocolError("cannot pack a message with no frames")
    sizes = [memoryview(f).nbytes for f in frames]
    if any(s >= 2**32 for s in sizes) or len(frames) >= 2**32:
        raise ProtocolError("frame too large to chunk (>= 4 GiB)")
    return struct.pack(f"<I{len(frames)}I", len(frames), *sizes) + b"".join(bytes(f) for f in frames)


def unpack_frames(data: bytes, limits: Limits = Limits()) -> list[bytes]:
    """Inverse of `pack_frames`, checking the frame table against the data and the limits."""
    if len(data) < 4:
        raise ProtocolError("packed message shorter than its frame count")
    (n,) = struct.unpack_from("<I", data, 0)
    if not 1 <= n <= limits.max_arrays + 1:
        raise ProtocolError(f"packed message declares {n} frames (allowed 1..{limits.max_arrays + 1})")
    table = 4 + 4 * n
    if len(data) < table:
        raise ProtocolError("packed message shorter than its frame table")
    sizes = struct.unpack_from(f"<{n}I", data, 4)
    if table + sum(sizes) != len(data):
        raise ProtocolError(f"frame table says {sum(sizes)} bytes of frames, {len(data) - table} arrived")
    frames, pos = [], table
    for size in sizes:
        frames.append(data[pos: pos + size])
        pos += size
    return frames


def chunk_message(frames: Sequence[bytes], msg_id: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[bytes]:
    """Encoded frames -> chunks of at most `chunk_bytes` bytes each (header included)."""
    payload_size = chunk_bytes - CHUNK_HEADER.size
    if payload_size <= 0:
        raise ValueError(f"chunk_bytes must exceed the {CHUNK_HEADER.size}-byte chunk header")
    data = pack_frames(frames)
    count = -(-len(data) // payload_size)
    if count >= 2**32:
        raise ProtocolError("message too large to chunk")
    msg_id &= 0xFFFFFFFF
    return [CHUNK_HEADER.pack(MAGIC, CHUNK_VERSION, 0, msg_id, i, count) + data[i * payload_size:(i + 1) * payload_size]
            for i in range(count)]


class Chunker:
    """Numbers messages (wrapping u32 ids) and chunks them; one per data channel."""

    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.chunk_bytes = chunk_bytes
        self._next_id = 0

    def chunks(self, frames: Sequence[bytes]) -> list[bytes]:
        msg_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        return chunk_message(frames, msg_id, self.chunk_bytes)


@dataclass
class _Pending:
    count: int
    parts: dict[int, bytes] = field(default_factory=dict)
    size: int = 0


class Reassembler:
    """Collects chunks into messages. `feed(chunk)` returns the frames of a completed message or None.

    Raises ProtocolError for a malformed chunk (the pending message it belonged to is discarded).
    At most `max_pending` incomplete messages are kept; older ones are evicted and counted.
    """

    def __init__(self, limits: Limits = Limits(), max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 max_pending: int = 4) -> None:
        self.limits = limits
        self.max_chunk_bytes = max_chunk_bytes
        self.max_pending = max_pending
        self.evicted = 0
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        # packed size bound: header + buffers + frame table
        self._max_total = limits.max_message_bytes + 4 * (limits.max_arrays + 2)

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[bytes] | None:
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise ProtocolError(f"a chunk is bytes, got {type(chunk).__name__}")
        chunk = bytes(chunk)
        if not CHUNK_HEADER.size < len(chunk) <= self.max_chunk_bytes:
            raise ProtocolError(f"chunk of {len(chunk)} bytes (allowed {CHUNK_HEADER.size + 1}..{self.max_chunk_bytes})")
        magic, version, _flags, msg_id, index, count = CHUNK_HEADER.unpack_from(chunk)
        if magic != MAGIC or version != CHUNK_VERSION:
            raise ProtocolError(f"not a v{CHUNK_VERSION} avatar chunk (magic {magic!r}, version {version})")
        if not 1 <= count <= self._max_total:  # every chunk carries at least one byte
            raise ProtocolError(f"chunk count {count} out of range for a {self._max_total}-byte message limit")
        if index >= count:
            raise ProtocolError(f"chunk index {index} >= count {count}")
        pending = self._pending.get(msg_id)
        if pending is None:
            pending = self._pending[msg_id] = _Pending(count)
            while len(self._pending) > self.max_pending:
                self._pending.popitem(last=False)
                self.evicted += 1
        if pending.count != count or index in pending.parts:
            del self._pending[msg_id]
            raise ProtocolError(f"message {msg_id}: inconsistent count or duplicate chunk {index}")
        payload = chunk[CHUNK_HEADER.size:]
        pending.size += len(payload)
        if pending.size > self._max_total:
            del self._pending[msg_id]
            raise ProtocolError(f"message {msg_id} exceeds {self._max_total} bytes")
        pending.parts[index] = payload
        if len(pending.parts) < count:
            return None
        del self._pending[msg_id]
        data = b"".join(pending.parts[i] for i in range(count))
        return unpack_frames(data, self.limits)

    @property
    def pending(self) -> int:
        return len(self._pending)
