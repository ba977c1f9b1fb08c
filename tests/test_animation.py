"""Live animation messages: a subscriber poses the avatar from a `rig` and per-frame `motion` with numpy alone,
exactly as the engine does, and every malformed message is refused."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from engine.gaussians import GaussianSet
from engine.rig import rig_arrays
from engine.types import FlameParams
from protocols.animation import (MAX_MOTION_BYTES, MAX_MOTION_EXPRESSION, Motion, Rig, decode_motion, encode_motion,
                                 pose)
from protocols.errors import ProtocolError
from protocols.wire import decode, encode


@pytest.fixture(scope="module")
def model():
    from engine.avatar_model import AvatarModel

    torch.set_num_threads(1)
    return AvatarModel.load(None)


@pytest.fixture(scope="module")
def avatar(model) -> GaussianSet:
    gen = torch.Generator().manual_seed(0)
    m, p = 2000, len(model.prompts)
    gaussians = GaussianSet.from_activated(
        anchor=torch.randint(0, p, (m,), generator=gen), offset=torch.randn(m, 3, generator=gen) * 0.003,
        rotation=torch.randn(m, 4, generator=gen), scale=torch.rand(m, 3, generator=gen) * 0.01,
        opacity=torch.rand(m, generator=gen), color=torch.rand(m, 3, generator=gen), importance=torch.ones(m),
        frame=0, seen=torch.rand(m, generator=gen))
    gaussians.uid = torch.arange(100, 100 + m)
    return gaussians


@pytest.fixture(scope="module")
def shape(model) -> torch.Tensor:
    return torch.randn(model.prompts.shapedirs.shape[-1], generator=torch.Generator().manual_seed(1)) * 0.8


def random_params(model, shape: torch.Tensor, seed: int) -> FlameParams:
    gen = torch.Generator().manual_seed(seed)
    n = lambda *s, scale: torch.randn(*s, generator=gen) * scale  # noqa: E731
    params = FlameParams.zeros(1, shape.numel(), model.prompts.exprdirs.shape[-1])
    params.shape[0] = shape
    params.expression = n(*params.expression.shape, scale=1.5)
    params.rotation, params.neck, params.jaw = n(1, 3, scale=0.3), n(1, 3, scale=0.2), n(1, 3, scale=0.2)
    params.eyes, params.translation = n(1, 6, scale=0.2), n(1, 3, scale=0.1)
    return params


def motion_of(params: FlameParams, frame: int = 0, session: str = "s1") -> Motion:
    row = lambda t: t[0].numpy().astype(np.float32)  # noqa: E731
    return Motion(session, frame, 1000.0 + frame, 1, row(params.expression), row(params.rotation), row(params.neck),
                  row(params.jaw), row(params.eyes), row(params.translation))


def wire_rig(model, avatar, shape, dtype=np.float32) -> Rig:
    rig = Rig("s1", 7, 1, rig_arrays(avatar, model.prompts, model.head, shape, expression_dtype=dtype))
    return Rig.from_message(decode(encode(rig.message())))


def test_posing_rig_and_motion_from_the_wire_equals_the_engines_to_world(model, avatar, shape):
    rig = wire_rig(model, avatar, shape)
    assert rig.version == 7 and rig.shape_version == 1 and rig.n_gaussians == len(avatar)
    assert np.array_equal(rig.arrays["ids"], np.arange(100, 100 + len(avatar)))
    for seed in range(8):
        params = random_params(model, shape, seed)
        motion = decode_motion(encode_motion(motion_of(params, seed)))
        expected = avatar.to_world(model.prompts, model.head, params)
        posed = pose(rig, motion)
        assert set(posed) == {"means", "quats", "scales", "opacities", "colors"}
        for key, value in posed.items():
            assert value.dtype == np.float32
            np.testing.assert_allclose(value, expected[key][0].numpy(), rtol=0, atol=1e-5, err_msg=key)


def test_neutral_motion_gives_the_published_neutral_avatar(model, avatar, shape):
    rig = wire_rig(model, avatar, shape)
    neutral = avatar.to_arrays(model.prompts, model.head, shape=shape)
    posed = pose(rig, Motion.neutral("s1", rig.n_expression))
    np.testing.assert_allclose(posed["means"], neutral["means"], atol=1e-5)
    np.testing.assert_allclose(posed["quats"], neutral["quats"], atol=1e-5)


def test_the_rig_holds_only_anchors_in_use_and_float16_expressions_stay_within_tens_of_microns(model, avatar, shape):
    exact = wire_rig(model, avatar, shape)
    half = wire_rig(model, avatar, shape, np.float16)
    used = np.unique(avatar.anchor.numpy())
    assert np.array_equal(exact.arrays["anchor_point"], used)
    assert half.arrays["anchor_expression"].dtype == np.float16
    assert half.arrays["anchor_expression"].nbytes * 2 == exact.arrays["anchor_expression"].nbytes
    params = random_params(model, shape, 3)
    a, b = pose(exact, motion_of(params)), pose(half, motion_of(params))
    assert 0 < np.abs(a["means"] - b["means"]).max() < 5e-5


def test_a_motion_fits_512_bytes_even_with_100_expressions_and_a_64_character_session():
    values = np.linspace(-2, 2, MAX_MOTION_EXPRESSION).astype(np.float32)
    small = Motion("s1", 12, 1.5, 3, values[:22], *(np.full(n, 0.1, np.float32) for n in (3, 3, 3, 6, 3)))
    data = encode_motion(small)
    back = decode_motion(data)
    assert len(data) <= MAX_MOTION_BYTES and np.array_equal(back.expression, values[:22])
    assert (back.frame, back.t_capture, back.shape_version) == (12, 1.5, 3)
    big = Motion("x" * 64, 2**40, 1e9, 2**31, values, *(np.full(n, 0.1, np.float32) for n in (3, 3, 3, 6, 3)))
    data = encode_motion(big)
    back = decode_motion(data)
    assert len(data) <= MAX_MOTION_BYTES
    np.testing.assert_allclose(back.expression, values, atol=2e-3)  # float16: the size limit wins
    np.testing.assert_array_equal(back.translation, np.full(3, 0.1, np.float32))


def _motion_body() -> dict:
    return msgpack.unpackb(encode_motion(Motion.neutral("s1", 4)), raw=False)


@pytest.mark.parametrize("change, reason", [
    (lambda b: b.pop("pose"), "keys"),
    (lambda b: b.update(extra=1), "keys"),
    (lambda b: b.update(v=2), "v=2"),
    (lambda b: b.update(type="rig"), "motion"),
    (lambda b: b.update(pose=b"\0" * 8), "pose"),
    (lambda b: b.update(expression=b"\0" * 3), "expression"),
    (lambda b: b.update(expression_dtype="float64"), "expression_dtype"),
    (lambda b: b.update(expression=np.full(4, np.nan, "<f4").tobytes()), "non-finite"),
    (lambda b: b.update(frame=-1), "frame"),
    (lambda b: b.update(t_capture=float("inf")), "t_capture"),
    (lambda b: b.update(session=""), "session"),
    (lambda b: b.update(shape_version=True), "shape_version"),
])
def test_malformed_motions_are_refused_with_the_reason(change, reason):
    body = _motion_body()
    change(body)
    with pytest.raises(ProtocolError, match=reason):
        decode_motion(msgpack.packb(body, use_bin_type=True))


def test_garbage_and_oversized_motions_are_refused():
    for data in (b"", b"\xc1", b"\x93\x01\x02\x03", b"\0" * (MAX_MOTION_BYTES + 1), "text"):
        with pytest.raises(ProtocolError):
            decode_motion(data)
    with pytest.raises(ProtocolError, match="expression coefficients"):
        encode_motion(Motion.neutral("s1", MAX_MOTION_EXPRESSION + 1))


@pytest.mark.parametrize("name, bad, reason", [
    ("anchor", lambda a: np.full_like(a, 10**6), "anchor"),
    ("parents", lambda a: np.array([-1, 0, 1, 5, 1], np.int32), "parents"),
    ("parents", lambda a: np.array([0, 0, 1, 1, 1], np.int32), "parents"),
    ("joint_expression", lambda a: a[..., :-1].copy(), "joint_expression"),
    ("anchor_weights", lambda a: a[:, :4].copy(), "anchor_weights"),
    ("offset", lambda a: a.astype(np.float64), "offset"),
    ("colors", lambda a: np.where(np.arange(a.shape[0])[:, None] == 0, np.nan, a).astype(np.float32), "non-finite"),
    ("scales", lambda a: a[:-1].copy(), "scales"),
])
def test_malformed_rigs_are_refused_with_the_reason(model, avatar, shape, name, bad, reason):
    rig = wire_rig(model, avatar, shape)
    frames = encode(rig.message())
    msg = decode(frames)
    arrays = dict(msg.arrays)
    arrays[name] = bad(np.array(arrays[name]))
    header = msgpack.unpackb(frames[0], raw=False)
    header["arrays"] = [{"name": k, "dtype": v.dtype.name, "shape": list(v.shape)} for k, v in arrays.items()]
    forged = [msgpack.packb(header, use_bin_type=True), *(np.ascontiguousarray(v).tobytes() for v in arrays.values())]
    with pytest.raises(ProtocolError, match=reason):
        decode(forged)


def test_a_rig_without_shape_version_or_with_a_missing_array_is_refused(model, avatar, shape):
    msg = wire_rig(model, avatar, shape).message()
    msg.stats = {}
    with pytest.raises(ProtocolError, match="shape_version"):
        encode(msg)
    msg = wire_rig(model, avatar, shape).message()
    msg.arrays.pop("parents")
    with pytest.raises(ProtocolError, match="missing"):
        encode(msg)


def test_the_daemon_sends_at_most_one_rig_per_interval_and_always_the_newest_last():
    import asyncio

    from engine.fusion import AvatarState
    from fastavatar_stream.animation import Animator

    sent: list[tuple[int, float]] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        animator = Animator(None, loop, rig_interval_s=0.3)
        animator.subscribe("s1", lambda rig: sent.append((rig.version, loop.time())), lambda motion: None)
        shape = torch.zeros(3)
        for version in range(1, 11):  # ten versions in 0.5 s, one identity
            animator.install("s1", AvatarState(version, None, shape, []), {}, 0.0)
            await asyncio.sleep(0.05)
        animator.install("s1", AvatarState(11, None, shape + 1, []), {}, 0.0)  # a new identity leaves at once
        await asyncio.sleep(0.5)

    asyncio.run(scenario())
    versions = [v for v, _ in sent]
    assert versions[0] == 1 and versions[-1] == 11 and versions == sorted(set(versions))
    gaps = [b - a for (va, a), (vb, b) in zip(sent, sent[1:]) if vb != 11]
    assert all(g >= 0.29 for g in gaps), gaps
    assert len(sent) <= 5
