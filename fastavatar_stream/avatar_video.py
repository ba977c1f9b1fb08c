"""Pictures of a posed avatar: render `protocols.animation.pose` output from a camera into an RGB image.

Shared by `reenact` (the avatar seen by each driving frame's tracked camera) and `subscribe --animate` (a fixed
camera in front of the avatar); both write the images with `tracking.preview.PreviewWriter` (PyAV).
"""
from __future__ import annotations

import numpy as np
import torch

from protocols.animation import Motion, Rig, pose

#: the camera `subscribe --animate` looks from: in front of the face (+z), like the replay preview's first view
FRONT_RADIUS = 0.65
FRONT_FOV_DEGREES = 28.0


def render_arrays(arrays: dict[str, np.ndarray], viewmat: np.ndarray, K: np.ndarray, width: int, height: int,
                  background: float = 1.0) -> np.ndarray:
    """(height, width, 3) uint8 render of world-space Gaussians (the `pose` dict) from one pinhole camera
    (viewmat (4,4) world-to-camera, OpenCV axes; K (3,3) pixels)."""
    from engine.render import render

    t = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in arrays.items()}
    with torch.no_grad():
        out = render(t["means"], t["quats"], t["scales"], t["opacities"], t["colors"],
                     torch.as_tensor(np.asarray(viewmat, np.float32))[None],
                     torch.as_tensor(np.asarray(K, np.float32))[None], width, height,
                     background=torch.full((3,), float(background)))
    return (out["rgb"][0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def front_camera(rig: Rig, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(viewmat, K) of a square `size` camera in front of the avatar's neutral pose, aimed at its centre."""
    from engine.types import orbit_cameras

    centre = np.median(pose(rig, Motion.neutral(rig.session, rig.n_expression))["means"], axis=0) \
        if rig.n_gaussians else np.zeros(3)
    cams = orbit_cameras(1, radius=FRONT_RADIUS, target=tuple(float(c) for c in centre),
                         fov_x_degrees=FRONT_FOV_DEGREES, width=size, height_px=size)
    return cams.viewmats[0].numpy(), cams.Ks[0].numpy()
