"""Property-based fuzzing of everything a peer can send: avatar wire messages, data-channel chunks, control
requests (including what `start` may ask for) and WebRTC signaling bodies. Whatever arrives, the answer is a
decoded value or a ProtocolError (a clear refusal) -- never another exception. The malformed inputs found
by probing the daemon (tests/data/malformed_corpus.json) are replayed as fixed cases."""
from __future__ import annotations

import json
import math
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastavatar_stream.authority import SourcePolicy, SourceRefused, check_start
from protocols.avatar_buffer import AvatarBuffer
from protocols.chunking import Reassembler, chunk_message
from protocols.errors import ProtocolError
from protocols.webrtc import validate_offer
from protocols.wire import Limits, decode, encode
from protocols.zmq_transport import COMMANDS, parse_request

CORPUS = json.loads((Path(__file__).parent / "data" / "malformed_corpus.json").read_text())
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL_LIMITS = Limits(max_header_bytes=4096, max_arrays=8, max_elements=4096, max_bytes=64 * 1024)


def _unmark(value):
    """The corpus writes non-finite numbers as strings (JSON has none)."""
    if value == "__nan__":
        return math.nan
    if value == "__inf__":
        return math.inf
    if isinstance(value, dict):
        return {k: _unmark(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unmark(v) for v in value]
    return value


def _valid_frames() -> list[bytes]:
    buffer = AvatarBuffer("s1")
    rng = np.random.default_rng(0)
    n = 6
    quats = np.zeros((n, 4), np.float32)
    quats[:, 0] = 1
    buffer.assign(np.arange(n), {"means": rng.normal(size=(n, 3)).astype(np.float32), "quats": quats,
                                 "scales": np.full((n, 3), 0.01, np.float32),
                                 "opacities": np.full(n, 0.5, np.float32),
                                 "colors": np.full((n, 3), 0.5, np.float32)}, version=1)
    return encode(buffer.snapshot())


VALID = _valid_frames()
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20)


def _packable(value) -> bytes | None:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return None


# ----- the avatar wire format --------------------------------------------------------------------------------
@FUZZ
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=6))
def test_arbitrary_frames_decode_or_raise_protocol_error(frames):
    try:
        decode(frames, SMALL_LIMITS)
    except ProtocolError:
        pass


@FUZZ
@given(st.dictionaries(st.sampled_from(["v", "type", "session", "version", "base_version", "seq", "t_capture",
                                        "t_publish", "arrays", "stats", "x"]), msgpack_values),
       st.lists(st.binary(max_size=64), max_size=4))
def test_fuzzed_headers_decode_or_raise_protocol_error(header, buffers):
    head = _packable(header)
    if head is not None:
        try:
            decode([head, *buffers], SMALL_LIMITS)
        except ProtocolError:
            pass


@FUZZ
@given(st.lists(st.integers(-2, 2**63), min_size=1, max_size=4), st.sampled_from(["uint32", "float32", "int64"]))
def test_any_declared_shape_is_built_or_refused(shape, dtype):
    header = msgpack.unpackb(VALID[0], raw=False)
    header["arrays"][0] = {"name": "ids", "dtype": dtype, "shape": shape}
    try:
        decode([msgpack.packb(header, use_bin_type=True), b"", *VALID[2:]], SMALL_LIMITS)
    except ProtocolError:
        pass


@FUZZ
@given(st.integers(0, len(VALID) - 1), st.integers(0, 10_000), st.integers(1, 255))
def test_flipped_bytes_of_a_valid_message_decode_or_raise_protocol_error(frame, position, xor):
    frames = [bytearray(f) for f in VALID]
    if frames[frame]:
        frames[frame][position % len(frames[frame])] ^= xor
    try:
        decode([bytes(f) for f in frames])
    except ProtocolError:
        pass


@pytest.mark.parametrize("case", CORPUS["wire_headers"], ids=lambda c: c["probe"])
def test_corpus_wire_headers_are_protocol_errors(case):
    header = msgpack.packb(_unmark(case["header"]), use_bin_type=True)
    with pytest.raises(ProtocolError):
        decode([header] + [b""] * case["buffers"])


# ----- data-channel chunks -----------------------------------------------------------------------------------
@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_arbitrary_chunks_reassemble_or_raise_protocol_error(chunks):
    r = Reassembler(SMALL_LIMITS, max_chunk_bytes=256)
    for chunk in chunks:
        try:
            r.feed(chunk)
        except ProtocolError:
            pass
    assert r.pending <= r.max_pending


@FUZZ
@given(st.permutations(list(range(len(chunk_message(VALID, 7, chunk_bytes=64))))),
       st.integers(0, 63), st.integers(0, 255), st.booleans())
def test_valid_chunks_in_any_order_rebuild_the_message_and_damaged_ones_are_refused(order, position, value, damage):
    chunks = [bytearray(c) for c in chunk_message(VALID, 7, chunk_bytes=64)]
    if damage:
        target = chunks[order[0]]
        target[position % len(target)] = value
    r = Reassembler(max_chunk_bytes=64)
    got = None
    try:
        for i in order:
            out = r.feed(bytes(chunks[i]))
            got = out if out is not None else got
        if got is not None:
            decode(got)
    except ProtocolError:
        assert damage
        return
    if not damage:
        assert [bytes(f) for f in got] == VALID


@pytest.mark.parametrize("chunk", CORPUS["chunks_not_bytes"])
def test_corpus_chunks_that_are_not_bytes_are_refused(chunk):
    with pytest.raises(ProtocolError, match="bytes"):
        Reassembler().feed(chunk)


# ----- control requests ----------------------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=400))
def test_arbitrary_request_frames_parse_or_raise_protocol_error(frame):
    try:
        request = parse_request(frame)
    except ProtocolError:
        return
    assert request.command in COMMANDS


@FUZZ
@given(st.sampled_from(sorted(COMMANDS)), st.dictionaries(st.text(max_size=10), msgpack_values, max_size=4))
def test_fuzzed_request_maps_parse_or_raise_protocol_error(command, args):
    frame = _packable({"command": command, **args})
    if frame is None:
        return
    try:
        request = parse_request(frame)
    except ProtocolError:
        return
    assert set(request.args) <= set(COMMANDS[command])


@FUZZ
@given(msgpack_values, msgpack_values)
def test_start_with_anything_but_an_allowed_source_is_refused(source, options):
    with pytest.raises(SourceRefused):
        check_start(source, options, SourcePolicy())


@FUZZ
@given(st.text(min_size=1, max_size=60), st.dictionaries(st.text(max_size=12), msgpack_values, max_size=3))
def test_start_under_a_root_refuses_or_returns_only_documented_options(tmp_path_factory, name, options):
    root = tmp_path_factory.getbasetemp() / "fuzz-root"
    root.mkdir(exist_ok=True)
    policy = SourcePolicy.from_folders([root])
    try:
        plan = check_start(str(root / name), options, policy)
    except SourceRefused as exc:
        assert "\n" not in str(exc)
        return
    assert set(plan.source_options) <= {"realtime", "fps"}
    assert Path(plan.spec).resolve().is_relative_to(root.resolve())


@pytest.mark.parametrize("case", CORPUS["control_start"], ids=lambda c: c["probe"])
def test_corpus_start_requests_are_refused(case, tmp_path):
    for policy in (SourcePolicy(), SourcePolicy((tmp_path.resolve(),), allow_device=True)):
        with pytest.raises(SourceRefused):
            check_start(_unmark(case["source"]), _unmark(case["options"]), policy)


# ----- WebRTC signaling bodies ------------------------------------------------------------------------------
@FUZZ
@given(st.one_of(msgpack_values, st.fixed_dictionaries({"type": st.just("offer"), "sdp": st.text(max_size=300)}),
                 st.fixed_dictionaries({"type": st.just("offer"),
                                        "sdp": st.text(max_size=200).map(lambda t: "v=0\r\n" + t)})))
def test_arbitrary_offer_bodies_validate_or_raise_protocol_error(body):
    try:
        validate_offer(body)
    except ProtocolError:
        pass


@pytest.mark.parametrize("body", CORPUS["offer_bodies"])
def test_corpus_offer_bodies_are_refused(body):
    with pytest.raises(ProtocolError):
        validate_offer(body)
