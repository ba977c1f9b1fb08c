"""Live animation on the wire: the `rig` an avatar is posed with, the per-frame `motion`, and numpy posing.

A subscriber holds the newest `Rig` of a session (a `protocols.wire` message of type ``rig``, sent with every
avatar version; its layout is documented there) and applies each `Motion` to it with `pose`, which reproduces
the engine's `GaussianSet.to_world` (expression offsets on the anchors, then FLAME's linear blend skinning over
5 joints, rotations turned by the blended joint rotation) with numpy alone.

``motion`` message: one msgpack map in one frame, at most MAX_MOTION_BYTES (512) bytes:

    {v: 1, type: "motion", session: str (<= 64 characters), frame: int >= 0, t_capture: float, t_publish: float,
     shape_version: int >= 0, expression_dtype: "float32" | "float16", expression: bin, pose: bin}

    expression  E little-endian floats (E <= MAX_MOTION_EXPRESSION): FLAME expression coefficients ψ;
                float32, or float16 when float32 would not fit the size limit
    pose        18 little-endian float32: global rotation (3), neck (3), jaw (3), left eye (3), right eye (3)
                as axis-angle radians, then translation (3) metres (added after skinning)
    frame       the tracked frame's index in the stream; t_capture: wall-clock seconds the frame was read;
    shape_version  the rig `stats.shape_version` the daemon held when it sent this motion (the identity shape
                is baked into the rig; a newer value tells a subscriber its rig is out of date)

Decoders check the byte size, every key, type, length and that every number is finite.

Drivable avatar file (``avatar.npz``, written by `replay` and `serve --snapshot-dir`; `save_avatar`/`load_avatar`):
an uncompressed numpy ``.npz`` without pickles holding every rig array under its wire name (see
`protocols.wire`: ids, anchor, offset, rotation, scales, opacities, colors, anchor_point, anchor_rest,
anchor_expression, anchor_weights, joint_rest, joint_expression, parents) plus the scalars ``format``
("fastavatar-avatar"), ``format_version`` (1), ``session``, ``version`` and ``shape_version``. Loading checks
it exactly like a received rig message.
"""
from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from protocols.errors import ProtocolError
from protocols.wire import RIG_FIELDS, Message, decode, encode

MAX_MOTION_BYTES = 512
MAX_MOTION_EXPRESSION = 100
MOTION_VERSION = 1
MOTION_KEYS = frozenset(("v", "type", "session", "frame", "t_capture", "t_publish", "shape_version",
                         "expression_dtype", "expression", "pose"))
POSE_FLOATS = 18
AVATAR_FORMAT = "fastavatar-avatar"
AVATAR_FORMAT_VERSION = 1
MAX_MOTION_SESSION = 64
_MAX_INT = 2**63 - 1


# ----- motion ------------------------------------------------------------------------------------------
@dataclass
class Motion:
    """FLAME parameters of one tracked frame (numpy float32; radians, metres).

    expression (E,), rotation (3,) global, neck (3,), jaw (3,), eyes (6,) left then right, translation (3,).
    """

    session: str
    frame: int
    t_capture: float
    shape_version: int
    expression: np.ndarray
    rotation: np.ndarray
    neck: np.ndarray
    jaw: np.ndarray
    eyes: np.ndarray
    translation: np.ndarray
    t_publish: float = 0.0

    def joint_rotations(self) -> np.ndarray:
        """(5,3) axis-angle per FLAME joint: global, neck, jaw, left eye, right eye."""
        return np.concatenate([self.rotation, self.neck, self.jaw, self.eyes]).astype(np.float32).reshape(5, 3)

    @classmethod
    def neutral(cls, session: str = "neutral", n_expression: int = 0) -> "Motion":
        z = lambda n: np.zeros(n, np.float32)  # noqa: E731
        return cls(session, 0, 0.0, 0, z(n_expression), z(3), z(3), z(3), z(6), z(3))


def encode_motion(motion: Motion) -> bytes:
    """Motion -> one frame of at most MAX_MOTION_BYTES (expression in float16 only when float32 does not fit)."""
    expression = np.asarray(motion.expression, np.float32).reshape(-1)
    if expression.size > MAX_MOTION_EXPRESSION:
        raise ProtocolError(f"motion has {expression.size} expression coefficients, limit is {MAX_MOTION_EXPRESSION}")
    pose = np.concatenate([motion.rotation, motion.neck, motion.jaw, motion.eyes, motion.translation]).astype("<f4")
    if pose.size != POSE_FLOATS:
        raise ProtocolError(f"motion pose has {pose.size} numbers, expected {POSE_FLOATS}")
    for dtype in ("float32", "float16"):
        body = {"v": MOTION_VERSION, "type": "motion", "session": motion.session, "frame": int(motion.frame),
                "t_capture": float(motion.t_capture), "t_publish": float(motion.t_publish),
                "shape_version": int(motion.shape_version), "expression_dtype": dtype,
                "expression": expression.astype(np.dtype(dtype).newbyteorder("<")).tobytes(),
                "pose": pose.tobytes()}
        try:
            data = msgpack.packb(body, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"motion cannot be encoded: {exc}") from None
        if len(data) <= MAX_MOTION_BYTES:
            decode_motion(data)  # never send what a receiver must reject
            return data
    raise ProtocolError(f"motion is {len(data)} bytes even with float16 expressions, limit is {MAX_MOTION_BYTES}")


def _int_field(body: dict, key: str) -> int:
    value = body[key]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_INT:
        raise ProtocolError(f"motion field {key!r} must be an integer >= 0, got {value!r}")
    return value


def _float_field(body: dict, key: str) -> float:
    value = body[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ProtocolError(f"motion field {key!r} must be a finite number, got {value!r}")
    return float(value)


def decode_motion(data: bytes | bytearray | memoryview) -> Motion:
    """One motion frame -> Motion; ProtocolError says what is wrong with it."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"a motion is bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_MOTION_BYTES:
        raise ProtocolError(f"motion is {len(data)} bytes, limit is {MAX_MOTION_BYTES}")
    n = MAX_MOTION_BYTES
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=n, max_bin_len=n,
                               max_array_len=n, max_map_len=n, max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types for corrupt input
        raise ProtocolError(f"motion is not valid msgpack: {exc.__class__.__name__}") from None
    if not isinstance(body, dict) or set(body) != MOTION_KEYS:
        keys = sorted(map(str, body)) if isinstance(body, dict) else type(body).__name__
        raise ProtocolError(f"motion must be a map with keys {sorted(MOTION_KEYS)}, got {keys}")
    if body["v"] != MOTION_VERSION or isinstance(body["v"], bool) or body["type"] != "motion":
        raise ProtocolError(f"not a v{MOTION_VERSION} motion: v={body['v']!r}, type={body['type']!r}")
    session = body["session"]
    if not isinstance(session, str) or not 0 < len(session) <= MAX_MOTION_SESSION or not session.isprintable():
        raise ProtocolError(f"motion session must be 1..{MAX_MOTION_SESSION} printable characters, got {session!r}")
    dtype = body["expression_dtype"]
    if dtype not in ("float32", "float16"):
        raise ProtocolError(f"motion expression_dtype must be float32 or float16, got {dtype!r}")
    expression, pose = body["expression"], body["pose"]
    itemsize = np.dtype(dtype).itemsize
    if not isinstance(expression, bytes) or len(expression) % itemsize \
            or len(expression) // itemsize > MAX_MOTION_EXPRESSION:
        raise ProtocolError(f"motion expression must be up to {MAX_MOTION_EXPRESSION} {dtype} values")
    if not isinstance(pose, bytes) or len(pose) != 4 * POSE_FLOATS:
        raise ProtocolError(f"motion pose must be {POSE_FLOATS} float32 values ({4 * POSE_FLOATS} bytes)")
    expr = np.frombuffer(expression, np.dtype(dtype).newbyteorder("<")).astype(np.float32)
    values = np.frombuffer(pose, "<f4").astype(np.float32)
    if not (np.all(np.isfinite(expr)) and np.all(np.isfinite(values))):
        raise ProtocolError("motion holds non-finite numbers")
    return Motion(session=session, frame=_int_field(body, "frame"), t_capture=_float_field(body, "t_capture"),
                  shape_version=_int_field(body, "shape_version"), expression=expr, rotation=values[0:3],
                  neck=values[3:6], jaw=values[6:9], eyes=values[9:15], translation=values[15:18],
                  t_publish=_float_field(body, "t_publish"))


# ----- rig ---------------------------------------------------------------------------------------------
@dataclass
class Rig:
    """A decoded `rig` message: avatar `version` of `session`, identity `shape_version`, arrays by RIG_FIELDS."""

    session: str
    version: int
    shape_version: int
    arrays: dict[str, np.ndarray]
    t_capture: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def n_gaussians(self) -> int:
        return int(self.arrays["ids"].shape[0])

    @property
    def n_expression(self) -> int:
        return int(self.arrays["anchor_expression"].shape[-1])

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays.values())

    def message(self, seq: int = 0, t_publish: float = 0.0) -> Message:
        """The wire message (arrays in RIG_FIELDS order)."""
        return Message(type="rig", session=self.session, version=self.version, seq=seq, t_capture=self.t_capture,
                       t_publish=t_publish, arrays={name: self.arrays[name] for name in RIG_FIELDS},
                       stats={**self.stats, "shape_version": int(self.shape_version)})

    @classmethod
    def from_message(cls, msg: Message) -> "Rig":
        """A decoded wire message of type rig (its schema was checked by `protocols.wire.decode`)."""
        if msg.type != "rig":
            raise ProtocolError(f"expected a rig message, got {msg.type!r}")
        stats = {k: v for k, v in msg.stats.items() if k != "shape_version"}
        return cls(msg.session, msg.version, int(msg.stats["shape_version"]), dict(msg.arrays), msg.t_capture, stats)


# ----- posing (numpy) ----------------------------------------------------------------------------------
def rodrigues(axis_angle: np.ndarray) -> np.ndarray:
    """(...,3) axis-angle -> (...,3,3) rotation matrices (smplx's formula, so results match the engine's)."""
    v = np.asarray(axis_angle, np.float32)
    angle = np.linalg.norm(v + 1e-8, axis=-1, keepdims=True)
    axis = v / angle
    cos, sin = np.cos(angle)[..., None], np.sin(angle)[..., None]
    x, y, z = axis[..., 0], axis[..., 1], axis[..., 2]
    zero = np.zeros_like(x)
    k = np.stack([zero, -z, y, z, zero, -x, -y, x, zero], axis=-1).reshape(*v.shape[:-1], 3, 3)
    eye = np.eye(3, dtype=np.float32)
    return (eye + sin * k + (1 - cos) * (k @ k)).astype(np.float32)


def joint_transforms(joints: np.ndarray, rotations: np.ndarray, parents: np.ndarray) -> np.ndarray:
    """(J,4,4) relative LBS transforms (world transform of joint j times the inverse of its rest transform) from
    rest joints (J,3), local rotation matrices (J,3,3) and parents (J,)."""
    n = joints.shape[0]
    relative = joints.copy()
    relative[1:] -= joints[parents[1:]]
    local = np.zeros((n, 4, 4), np.float32)
    local[:, :3, :3], local[:, :3, 3], local[:, 3, 3] = rotations, relative, 1.0
    world = [local[0]]
    for j in range(1, n):
        world.append(world[int(parents[j])] @ local[j])
    out = np.stack(world)
    out[:, :3, 3] -= np.einsum("jik,jk->ji", out[:, :3, :3], joints)
    return out


def matrix_to_quaternion(m: np.ndarray) -> np.ndarray:
    """(...,3,3) rotation matrices -> (...,4) unit quaternions wxyz with w >= 0 (largest-component method)."""
    m = np.asarray(m, np.float64)
    terms = np.stack([1 + m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2], 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2],
                      1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], 1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]],
                     axis=-1)
    best = terms.argmax(axis=-1)
    r = 0.5 * np.sqrt(np.maximum(terms, 1e-12))
    d21, d02, d10 = m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]
    s01, s02, s12 = m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1]
    w, x, y, z = r[..., 0], r[..., 1], r[..., 2], r[..., 3]
    candidates = np.stack([
        np.stack([w, d21 / (4 * w), d02 / (4 * w), d10 / (4 * w)], -1),
        np.stack([d21 / (4 * x), x, s01 / (4 * x), s02 / (4 * x)], -1),
        np.stack([d02 / (4 * y), s01 / (4 * y), y, s12 / (4 * y)], -1),
        np.stack([d10 / (4 * z), s02 / (4 * z), s12 / (4 * z), z], -1),
    ], axis=-2)
    q = np.take_along_axis(candidates, best[..., None, None], axis=-2)[..., 0, :]
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    return np.where(q[..., :1] < 0, -q, q).astype(np.float32)


def quaternion_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of wxyz quaternions, broadcasting over leading axes."""
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                     aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], axis=-1)


def _expression(rig: Rig, motion: Motion) -> np.ndarray:
    """The motion's expression fitted to the rig's E coefficients (missing ones are zero, extra ones dropped)."""
    out = np.zeros(rig.n_expression, np.float32)
    values = np.asarray(motion.expression, np.float32).reshape(-1)[: rig.n_expression]
    out[: values.size] = values
    return out


def pose(rig: Rig, motion: Motion, rotate: bool = True) -> dict[str, np.ndarray]:
    """World-space Gaussians of `rig` posed by `motion` (numpy only), as `GaussianSet.to_world` gives them:
    means (M,3), quats (M,4) wxyz, scales (M,3), opacities (M,), colors (M,3), all float32.

    `rotate=False` leaves the rotations canonical (the official release's behaviour)."""
    a = rig.arrays
    expr = _expression(rig, motion)
    displaced = a["anchor_rest"] + np.einsum("ade,e->ad", a["anchor_expression"].astype(np.float32), expr)
    local = displaced[a["anchor"]] + a["offset"]
    joints = a["joint_rest"] + np.einsum("jde,e->jd", a["joint_expression"], expr)
    transforms = joint_transforms(joints, rodrigues(motion.joint_rotations()), a["parents"])
    weights = a["anchor_weights"][a["anchor"]]                                    # (M,J)
    blended = np.einsum("mj,jik->mik", weights, transforms[:, :3, :])            # (M,3,4)
    means = np.einsum("mik,mk->mi", blended[:, :, :3], local) + blended[:, :, 3] + motion.translation
    quats = a["rotation"]
    if rotate:
        joint_q = matrix_to_quaternion(transforms[:, :3, :3])
        joint_q = np.where((joint_q @ joint_q[0])[:, None] < 0, -joint_q, joint_q)
        mixed = weights @ joint_q
        mixed /= np.maximum(np.linalg.norm(mixed, axis=-1, keepdims=True), 1e-12)
        quats = quaternion_multiply(mixed, quats)
    return {"means": means.astype(np.float32), "quats": np.asarray(quats, np.float32),
            "scales": a["scales"].copy(), "opacities": a["opacities"].copy(), "colors": a["colors"].copy()}


# ----- drivable avatar files ---------------------------------------------------------------------------
def save_avatar(path: str | os.PathLike, rig: Rig) -> None:
    """Write `rig` as a drivable avatar file (layout in the module docstring)."""
    meta = {"format": np.array(AVATAR_FORMAT), "format_version": np.array(AVATAR_FORMAT_VERSION),
            "session": np.array(rig.session), "version": np.array(rig.version),
            "shape_version": np.array(rig.shape_version)}
    with open(path, "wb") as fh:
        np.savez(fh, **{name: rig.arrays[name] for name in RIG_FIELDS}, **meta)


def load_avatar(path: str | os.PathLike) -> Rig:
    """Read a drivable avatar file; ProtocolError (one line, naming the file) for anything that is not one."""
    try:
        with np.load(path, allow_pickle=False) as data:
            contents = {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ProtocolError(f"{path} is not a readable avatar .npz: {exc.__class__.__name__}: {exc}") from None
    if str(contents.get("format", "")) != AVATAR_FORMAT:
        raise ProtocolError(f"{path} is not a fastavatar avatar file (no format={AVATAR_FORMAT!r})")
    if int(contents.get("format_version", -1)) != AVATAR_FORMAT_VERSION:
        raise ProtocolError(f"{path}: avatar format version {contents.get('format_version')} is not "
                            f"{AVATAR_FORMAT_VERSION}")
    missing = sorted(set(RIG_FIELDS) - set(contents))
    if missing:
        raise ProtocolError(f"{path}: avatar file lacks {', '.join(missing)}")
    try:
        meta = {k: int(contents[k]) for k in ("version", "shape_version")}
        session = str(contents["session"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"{path}: avatar file metadata is malformed ({exc})") from None
    rig = Rig(session, meta["version"], meta["shape_version"], {name: contents[name] for name in RIG_FIELDS})
    try:
        return Rig.from_message(decode(encode(rig.message())))
    except ProtocolError as exc:
        raise ProtocolError(f"{path}: {exc}") from None
