"""Wire schema v1: round trips, and every kind of malformed input ends as ProtocolError (never a crash)."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest

from protocols.avatar_buffer import AvatarBuffer, diff
from protocols.chunking import Chunker, Reassembler, chunk_message, pack_frames, unpack_frames
from protocols.errors import ProtocolError
from protocols.wire import Limits, Message, decode, encode, range_slots, slots_to_ranges


def gaussians(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {
        "means": rng.normal(size=(n, 3)).astype(np.float32),
        "quats": rng.normal(size=(n, 4)).astype(np.float32),
        "scales": rng.uniform(0.001, 0.05, size=(n, 3)).astype(np.float32),
        "opacities": rng.uniform(0, 1, size=n).astype(np.float32),
        "colors": rng.uniform(0, 1, size=(n, 3)).astype(np.float32),
    }


def make_pair(seed: int = 0) -> tuple[AvatarBuffer, AvatarBuffer]:
    rng = np.random.default_rng(seed)
    old = AvatarBuffer("sess")
    old.assign(np.arange(50), gaussians(rng, 50), version=1)
    new = old.copy()
    ids = np.concatenate([np.arange(10, 50), np.arange(100, 130)])
    new.assign(ids, gaussians(rng, ids.size), version=2)
    return old, new


def header_of(frames: list[bytes]) -> dict:
    return msgpack.unpackb(frames[0], raw=False)


def with_header(frames: list[bytes], **changes) -> list[bytes]:
    header = header_of(frames)
    header.update(changes)
    return [msgpack.packb(header, use_bin_type=True), *frames[1:]]


def test_snapshot_round_trip_is_bit_exact():
    old, _ = make_pair()
    msg = old.snapshot(seq=7, t_capture=12.5, stats={"frames": 3})
    out = decode(encode(msg))
    assert (out.type, out.session, out.version, out.base_version, out.seq) == ("snapshot", "sess", 1, -1, 7)
    assert out.t_capture == 12.5 and out.stats == {"frames": 3}
    assert list(out.arrays) == ["ids", "means", "quats", "scales", "opacities", "colors"]
    for name, a in msg.arrays.items():
        assert out.arrays[name].dtype == a.dtype and np.array_equal(out.arrays[name], a)


def test_delta_round_trip_and_header_layout():
    old, new = make_pair()
    frames = encode(diff(old, new, seq=3))
    header = header_of(frames)
    assert set(header) == {"v", "type", "session", "version", "base_version", "seq", "t_capture",
                           "t_publish", "arrays", "stats"}
    assert header["v"] == 1 and header["type"] == "delta" and header["base_version"] == 1
    assert [a["name"] for a in header["arrays"]][:3] == ["ranges", "retired", "ids"]
    assert len(frames) == 1 + len(header["arrays"])
    out = decode(frames)
    assert out.arrays["means"].shape[0] == range_slots(out.arrays["ranges"]).size


def test_big_endian_input_is_sent_little_endian():
    old, _ = make_pair()
    msg = old.snapshot()
    msg.arrays["means"] = msg.arrays["means"].astype(">f4")
    out = decode(encode(msg))
    assert out.arrays["means"].dtype.str == "<f4"
    assert np.array_equal(out.arrays["means"], old.fields["means"])


def test_extra_fields_travel_with_the_avatar():
    rng = np.random.default_rng(1)
    from protocols.avatar_buffer import FieldSpec

    buf = AvatarBuffer("s", extra_fields=(FieldSpec("anchor", np.dtype("<i4"), ()),), id_dtype="int64")
    arrays = gaussians(rng, 5) | {"anchor": np.arange(5, dtype=np.int32)}
    buf.assign(np.arange(5), arrays, 1)
    out = decode(encode(buf.snapshot()))
    assert out.arrays["anchor"].tolist() == [0, 1, 2, 3, 4] and out.arrays["ids"].dtype == np.int64


def test_ranges_helpers():
    slots = np.array([0, 1, 2, 5, 6, 20])
    assert slots_to_ranges(slots).tolist() == [[0, 3], [5, 7], [20, 21]]
    assert slots_to_ranges(slots, merge_gap=2).tolist() == [[0, 7], [20, 21]]
    assert range_slots(slots_to_ranges(slots)).tolist() == slots.tolist()


# ----- malformed input classes -------------------------------------------------------------------------
@pytest.fixture()
def delta_frames() -> list[bytes]:
    old, new = make_pair()
    return encode(diff(old, new))


def test_truncated_buffer_rejected(delta_frames):
    frames = list(delta_frames)
    frames[4] = frames[4][:-1]
    with pytest.raises(ProtocolError, match="needs .* bytes"):
        decode(frames)


def test_missing_and_extra_frames_rejected(delta_frames):
    with pytest.raises(ProtocolError, match="buffer frames"):
        decode(delta_frames[:-1])
    with pytest.raises(ProtocolError, match="buffer frames"):
        decode([*delta_frames, b"xx"])
    with pytest.raises(ProtocolError):
        decode([])


def test_non_msgpack_and_non_map_headers_rejected(delta_frames):
    for bad in (b"\xc1garbage", b"", b"\x93\x01\x02\x03", msgpack.packb([1, 2]) + b"extra"):
        with pytest.raises(ProtocolError):
            decode([bad, *delta_frames[1:]])


def test_wrong_version_and_type_rejected(delta_frames):
    with pytest.raises(ProtocolError, match="wire version"):
        decode(with_header(delta_frames, v=2))
    with pytest.raises(ProtocolError, match="wire version"):
        decode(with_header(delta_frames, v=True))
    with pytest.raises(ProtocolError, match="message type"):
        decode(with_header(delta_frames, type="pickle"))


def test_bad_dtype_rejected(delta_frames):
    header = header_of(delta_frames)
    header["arrays"][3]["dtype"] = "object"
    with pytest.raises(ProtocolError, match="dtype"):
        decode([msgpack.packb(header), *delta_frames[1:]])
    header["arrays"][3]["dtype"] = "float64"  # allowed dtype, wrong byte length and wrong schema
    with pytest.raises(ProtocolError):
        decode([msgpack.packb(header), *delta_frames[1:]])


def test_huge_shape_rejected_before_allocation(delta_frames):
    header = header_of(delta_frames)
    header["arrays"][3]["shape"] = [2**40, 3]
    with pytest.raises(ProtocolError, match="elements"):
        decode([msgpack.packb(header), *delta_frames[1:]])
    header["arrays"][3]["shape"] = [-1, 3]
    with pytest.raises(ProtocolError, match="shape"):
        decode([msgpack.packb(header), *delta_frames[1:]])


def test_limits_enforced(delta_frames):
    with pytest.raises(ProtocolError, match="arrays"):
        decode(delta_frames, Limits(max_arrays=3))
    with pytest.raises(ProtocolError, match="bytes"):
        decode(delta_frames, Limits(max_bytes=100))
    with pytest.raises(ProtocolError, match="header"):
        decode(delta_frames, Limits(max_header_bytes=50))


def test_schema_violations_rejected(delta_frames):
    header = header_of(delta_frames)
    del header["stats"]
    with pytest.raises(ProtocolError, match="header keys"):
        decode([msgpack.packb(header), *delta_frames[1:]])
    with pytest.raises(ProtocolError, match="session"):
        decode(with_header(delta_frames, session=""))
    with pytest.raises(ProtocolError, match="base_version"):
        decode(with_header(delta_frames, base_version=5))  # base after version
    with pytest.raises(ProtocolError, match="finite"):
        decode(with_header(delta_frames, t_capture=float("nan")))
    # ranges out of order
    rng = np.random.default_rng(0)
    arrays = {"ranges": np.array([[4, 6], [0, 2]], np.uint32), "retired": np.zeros(0, np.uint32),
              "ids": np.arange(4, dtype=np.uint32), **gaussians(rng, 4)}
    with pytest.raises(ProtocolError, match="sorted"):
        encode(Message("delta", "sess", 2, 1, arrays=arrays))
    arrays["ranges"] = np.array([[0, 2], [4, 6]], np.uint32)
    encode(Message("delta", "sess", 2, 1, arrays=arrays))  # the same arrays in order are fine
    arrays["retired"] = np.array([5], np.uint32)
    with pytest.raises(ProtocolError, match="retired"):
        encode(Message("delta", "sess", 2, 1, arrays=arrays))
    arrays["retired"] = np.zeros(0, np.uint32)
    arrays["ids"] = arrays["ids"][:3]
    with pytest.raises(ProtocolError, match="ids"):
        encode(Message("delta", "sess", 2, 1, arrays=arrays))
    # a snapshot missing a core field
    old, _ = make_pair()
    snap = old.snapshot()
    del snap.arrays["colors"]
    with pytest.raises(ProtocolError, match="colors"):
        encode(snap)


def test_fuzzed_mutations_only_raise_protocol_error(delta_frames):
    rng = np.random.default_rng(1234)
    accepted = 0
    for trial in range(400):
        frames = [bytearray(f) for f in delta_frames]
        kind = trial % 5
        i = int(rng.integers(len(frames)))
        if kind == 0 and frames[i]:  # flip bytes
            for _ in range(int(rng.integers(1, 4))):
                frames[i][int(rng.integers(len(frames[i])))] ^= int(rng.integers(1, 256))
        elif kind == 1:  # truncate
            frames[i] = frames[i][: int(rng.integers(len(frames[i]) + 1))]
        elif kind == 2:  # drop or duplicate a frame
            if rng.random() < 0.5:
                del frames[i]
            else:
                frames.insert(i, frames[i])
        elif kind == 3:  # random header bytes
            frames[0] = bytearray(rng.bytes(int(rng.integers(0, 200))))
        else:  # append junk
            frames[i] += rng.bytes(int(rng.integers(1, 16)))
        try:
            decode([bytes(f) for f in frames])
            accepted += 1  # e.g. a flipped value byte inside a float buffer is still a valid message
        except ProtocolError:
            pass
    assert accepted < 400


# ----- chunking for the WebRTC data channel --------------------------------------------------------
def test_chunks_are_small_and_reassemble_in_any_order(delta_frames):
    rng = np.random.default_rng(0)
    big_frames = encode(Message("snapshot", "s", 1, arrays={
        "ids": np.arange(3000, dtype=np.uint32), **gaussians(rng, 3000)}))
    chunks = chunk_message(big_frames, msg_id=9)
    assert len(chunks) > 3 and all(len(c) <= 16 * 1024 for c in chunks)
    r = Reassembler()
    order = rng.permutation(len(chunks))
    results = [r.feed(chunks[i]) for i in order]
    assert all(x is None for x in results[:-1])
    assert [bytes(f) for f in results[-1]] == big_frames
    assert decode(results[-1]).arrays["ids"].size == 3000
    # interleaving two messages on one channel
    chunker = Chunker()
    a, b = chunker.chunks(delta_frames), chunker.chunks(big_frames)
    interleaved = [c for pair in zip(a, b) for c in pair] + b[len(a):]
    got = [out for out in map(r.feed, interleaved) if out is not None]
    assert [[bytes(f) for f in frames] for frames in got] == [delta_frames, big_frames]


def test_malformed_chunks_rejected():
    frames = encode(make_pair()[0].snapshot())
    chunks = chunk_message(frames, msg_id=1, chunk_bytes=512)
    r = Reassembler()
    for bad in (b"", b"FA", b"XX" + chunks[0][2:], chunks[0][:2] + b"\x09" + chunks[0][3:], b"A" * 20000):
        with pytest.raises(ProtocolError):
            r.feed(bad)
    r.feed(chunks[0])
    with pytest.raises(ProtocolError, match="duplicate"):
        r.feed(chunks[0])
    tampered = bytearray(chunks[1])
    tampered[12:16] = (10**9).to_bytes(4, "little")  # chunk count beyond the size limit
    with pytest.raises(ProtocolError):
        Reassembler(Limits(max_bytes=1000, max_header_bytes=1000)).feed(bytes(tampered))
    with pytest.raises(ProtocolError):
        unpack_frames(pack_frames([b"abc", b"de"])[:-1])
    with pytest.raises(ProtocolError):
        unpack_frames((10**6).to_bytes(4, "little") + b"\0" * 8)


def test_reassembler_bounds_pending_messages():
    frames = encode(make_pair()[0].snapshot())
    r = Reassembler(max_pending=2)
    for msg_id in range(5):
        assert r.feed(chunk_message(frames, msg_id, chunk_bytes=256)[0]) is None
    assert r.pending == 2 and r.evicted == 3
