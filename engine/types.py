"""Small dataclasses of tensors that travel between engine parts."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class FlameParams:
    """FLAME parameters for a batch of B poses (radians, metres; FLAME canonical axes: y up, face along +z).

    shape:       (B, S)  identity coefficients β (shared per session, broadcast per frame)
    expression:  (B, E)  expression coefficients ψ
    rotation:    (B, 3)  global head rotation, axis-angle (FLAME's global_orient)
    neck:        (B, 3)  neck joint, axis-angle
    jaw:         (B, 3)  jaw joint, axis-angle (x opens the mouth)
    eyes:        (B, 6)  left eye then right eye, axis-angle
    translation: (B, 3)  added after skinning
    """

    shape: torch.Tensor
    expression: torch.Tensor
    rotation: torch.Tensor
    neck: torch.Tensor
    jaw: torch.Tensor
    eyes: torch.Tensor
    translation: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.rotation.shape[0])

    @classmethod
    def zeros(cls, batch: int, n_shape: int, n_expression: int, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> "FlameParams":
        z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        return cls(shape=z(batch, n_shape), expression=z(batch, n_expression), rotation=z(batch, 3),
                   neck=z(batch, 3), jaw=z(batch, 3), eyes=z(batch, 6), translation=z(batch, 3))

    def to(self, *args, **kwargs) -> "FlameParams":
        return FlameParams(**{f.name: getattr(self, f.name).to(*args, **kwargs) for f in fields(self)})

    def index(self, idx) -> "FlameParams":
        """Select poses along the batch axis (int, slice, list or tensor); keeps the batch axis."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return FlameParams(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def with_(self, **changes: torch.Tensor) -> "FlameParams":
        return replace(self, **changes)

    @classmethod
    def cat(cls, items: "list[FlameParams]") -> "FlameParams":
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in items]) for f in fields(cls)})


@dataclass
class Cameras:
    """C pinhole cameras, OpenCV axes (x right, y down, z forward).

    viewmats: (C, 4, 4) world-to-camera
    Ks:       (C, 3, 3) intrinsics in pixels
    width, height: image size in pixels (shared by all C cameras)
    """

    viewmats: torch.Tensor
    Ks: torch.Tensor
    width: int
    height: int

    def __len__(self) -> int:
        return int(self.viewmats.shape[0])

    def index(self, idx) -> "Cameras":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return Cameras(self.viewmats[idx], self.Ks[idx], self.width, self.height)

    def to(self, *args, **kwargs) -> "Cameras":
        return Cameras(self.viewmats.to(*args, **kwargs), self.Ks.to(*args, **kwargs), self.width, self.height)


def look_at(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """World-to-camera (4,4) OpenCV matrix of a camera at `eye` looking at `target` (y up in the world)."""
    up = torch.tensor([0.0, 1.0, 0.0], dtype=eye.dtype) if up is None else up
    forward = target - eye
    forward = forward / forward.norm()
    right = torch.linalg.cross(forward, up)
    right = right / right.norm().clamp_min(1e-12)
    down = torch.linalg.cross(forward, right)
    rot = torch.stack([right, down, forward])  # rows: camera axes in world coordinates
    view = torch.eye(4, dtype=eye.dtype)
    view[:3, :3] = rot
    view[:3, 3] = -rot @ eye
    return view


def intrinsics_from_fov(fov_x_degrees: float, width: int, height: int) -> torch.Tensor:
    """(3,3) intrinsics with square pixels and the principal point at the image centre."""
    import math

    focal = 0.5 * width / math.tan(math.radians(fov_x_degrees) / 2)
    return torch.tensor([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])


def orbit_cameras(n: int, *, radius: float = 0.6, height: float = 0.0, target=(0.0, 0.0, 0.0),
                  fov_x_degrees: float = 20.0, width: int = 256, height_px: int = 256,
                  yaw_range_degrees: float = 360.0, start_yaw_degrees: float = 0.0) -> Cameras:
    """n cameras on a horizontal circle around `target`, yaw 0 in front of the face (+z)."""
    import math

    views, Ks = [], []
    tgt = torch.tensor(target, dtype=torch.float32)
    step = yaw_range_degrees / n if yaw_range_degrees >= 360 else yaw_range_degrees / max(n - 1, 1)
    for i in range(n):
        yaw = math.radians(start_yaw_degrees + i * step)
        eye = tgt + torch.tensor([radius * math.sin(yaw), height, radius * math.cos(yaw)])
        views.append(look_at(eye, tgt))
        Ks.append(intrinsics_from_fov(fov_x_degrees, width, height_px))
    return Cameras(torch.stack(views), torch.stack(Ks), width, height_px)
