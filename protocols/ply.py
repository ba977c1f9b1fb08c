"""Standard 3D Gaussian Splatting PLY files (binary little-endian), readable by any splat viewer.

Vertex properties, all float32, in this order:
    x y z  nx ny nz  f_dc_0 f_dc_1 f_dc_2  opacity  scale_0 scale_1 scale_2  rot_0 rot_1 rot_2 rot_3
stored *raw* as the 3DGS training code keeps them: colour as the SH DC coefficient
(c - 0.5) / C0, opacity as a logit, scales as logs, rotation as a wxyz quaternion; normals are 0.

`save_ply`/`load_ply` speak *activated* arrays (what `engine.render` and the wire protocol use):
    means (N,3)  quats (N,4) wxyz  scales (N,3) linear > 0  opacities (N,) in (0,1)  colors (N,3) RGB
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from protocols.errors import ProtocolError

SH_C0 = 0.28209479177387814
PROPERTIES = ("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
              "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")
_VERTEX = np.dtype([(name, "<f4") for name in PROPERTIES])
_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}
_OPACITY_EPS = 1e-7
_MAX_HEADER_LINES = 10_000


class PlyError(ProtocolError):
    """A PLY file that is not a readable 3DGS PLY (the message says what and where)."""


def _checked(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    try:
        means = np.asarray(arrays["means"], np.float64)
        quats = np.asarray(arrays["quats"], np.float64)
        scales = np.asarray(arrays["scales"], np.float64)
        opacities = np.asarray(arrays["opacities"], np.float64)
        colors = np.asarray(arrays["colors"], np.float64)
    except KeyError as exc:
        raise ValueError(f"save_ply needs arrays means, quats, scales, opacities, colors; missing {exc}") from None
    n = means.shape[0] if means.ndim == 2 else -1
    if opacities.shape == (n, 1):
        opacities = opacities[:, 0]
    expected = {"means": (means, (n, 3)), "quats": (quats, (n, 4)), "scales": (scales, (n, 3)),
                "opacities": (opacities, (n,)), "colors": (colors, (n, 3))}
    for name, (a, shape) in expected.items():
        if a.shape != shape:
            raise ValueError(f"save_ply: {name} must have shape {shape}, got {a.shape}")
    return means, quats, scales, opacities, colors


def save_ply(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write activated Gaussians as a binary little-endian 3DGS PLY; returns the path.

    Opacities are clipped to [1e-7, 1 - 1e-7] before the logit and scales to >= 1e-30 before the log,
    so degenerate values stay finite.
    """
    means, quats, scales, opacities, colors = _checked(arrays)
    n = means.shape[0]
    vertex = np.zeros(n, _VERTEX)
    for i, axis in enumerate("xyz"):
        vertex[axis] = means[:, i]
    for i in range(3):
        vertex[f"f_dc_{i}"] = (colors[:, i] - 0.5) / SH_C0
        vertex[f"scale_{i}"] = np.log(np.maximum(scales[:, i], 1e-30))
    p = np.clip(opacities, _OPACITY_EPS, 1.0 - _OPACITY_EPS)
    vertex["opacity"] = np.log(p) - np.log1p(-p)
    for i in range(4):
        vertex[f"rot_{i}"] = quats[:, i]
    header = "ply\nformat binary_little_endian 1.0\ncomment fastavatar-stream 3DGS avatar (activated: see protocols.ply)\n"
    header += f"element vertex {n}\n" + "".join(f"property float {name}\n" for name in PROPERTIES) + "end_header\n"
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(vertex.tobytes())
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def _parse_header(f, path: Path) -> tuple[str, list[tuple[str, int, np.dtype]]]:
    if f.readline().rstrip(b"\r\n") != b"ply":
        raise PlyError(f"{path}: not a PLY file (no 'ply' magic line)")
    fmt = None
    elements: list[tuple[str, int, list[tuple[str, str]]]] = []
    for _ in range(_MAX_HEADER_LINES):
        line = f.readline()
        if not line:
            raise PlyError(f"{path}: header ends before 'end_header'")
        words = line.decode("ascii", "replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            break
        if words[0] == "format" and len(words) == 3:
            fmt = words[1]
        elif words[0] == "element" and len(words) == 3 and words[2].isdigit():
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements:
            if words[1] == "list":
                elements[-1][2].append((words[-1], "list"))
            elif len(words) == 3 and words[1] in _PLY_TYPES:
                elements[-1][2].append((words[2], _PLY_TYPES[words[1]]))
            else:
                raise PlyError(f"{path}: unsupported property line {line.strip()!r}")
        else:
            raise PlyError(f"{path}: unexpected header line {line.strip()!r}")
    else:
        raise PlyError(f"{path}: header longer than {_MAX_HEADER_LINES} lines")
    if fmt not in ("binary_little_endian", "binary_big_endian"):
        raise PlyError(f"{path}: format {fmt!r} not supported (binary PLY only; re-export as binary)")
    order = "<" if fmt == "binary_little_endian" else ">"
    out = []
    for name, count, props in elements:
        if any(kind == "list" for _, kind in props):
            out.append((name, count, None))
        else:
            out.append((name, count, np.dtype([(p, order + kind) for p, kind in props])))
    return fmt, out


def load_ply(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a 3DGS PLY -> activated float32 arrays means, quats (wxyz, as stored), scales, opacities, colors.

    Extra properties (normals, f_rest_*) are ignored. Raises PlyError for anything unreadable.
    """
    path = Path(path)
    with open(path, "rb") as f:
        _, elements = _parse_header(f, path)
        vertex = None
        for name, count, dtype in elements:
            if dtype is None:
                if name == "vertex":
                    raise PlyError(f"{path}: vertex element has list properties")
                break  # a list element after the vertices cannot be skipped, nor does it need to be
            nbytes = count * dtype.itemsize
            data = f.read(nbytes)
            if len(data) != nbytes:
                raise PlyError(f"{path}: file truncated in element {name!r} ({len(data)} of {nbytes} bytes)")
            if name == "vertex":
                vertex = np.frombuffer(data, dtype)
                break
    if vertex is None:
        raise PlyError(f"{path}: no vertex element")
    required = [p for p in PROPERTIES if p not in ("nx", "ny", "nz")]
    missing = [p for p in required if p not in vertex.dtype.names]
    if missing:
        raise PlyError(f"{path}: not a 3DGS PLY, missing properties {missing}")

    def cols(*names: str) -> np.ndarray:
        return np.stack([vertex[n].astype(np.float64) for n in names], axis=1)

    with np.errstate(over="ignore"):
        return {
            "means": cols("x", "y", "z").astype(np.float32),
            "quats": cols("rot_0", "rot_1", "rot_2", "rot_3").astype(np.float32),
            "scales": np.exp(cols("scale_0", "scale_1", "scale_2")).astype(np.float32),
            "opacities": (1.0 / (1.0 + np.exp(-vertex["opacity"].astype(np.float64)))).astype(np.float32),
            "colors": (cols("f_dc_0", "f_dc_1", "f_dc_2") * SH_C0 + 0.5).astype(np.float32),
        }
