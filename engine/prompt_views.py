"""How each input frame sees each point prompt: the inputs of the projected point-prompt guidance.

`engine.model.point_guidance` embeds the features; this module poses the prompts with a frame's FLAME parameters
(the same linear blend skinning that animates the Gaussians) and projects them with the frame's camera.
"""
from __future__ import annotations

import torch

from engine.gaussians import GaussianSet, quaternion_to_matrix
from engine.model.point_guidance import projected_point_features
from engine.types import Cameras, FlameParams


def posed_prompts(prompts, head, params: FlameParams) -> tuple[torch.Tensor, torch.Tensor]:
    """World positions (B,P,3) and unit normals (B,P,3) of the point prompts for B sets of FLAME parameters.

    Normals are the rest-mesh normals turned by each point's blended joint rotation (expression offsets move the
    points but are too small to matter for a facing term).
    """
    if prompts.normals is None:
        raise ValueError("these point prompts carry no normals (build them with engine.prompts.build_point_prompts)")
    p = len(prompts)
    device = prompts.v_template.device
    anchors = GaussianSet(anchor=torch.arange(p, device=device), offset=torch.zeros(p, 3, device=device),
                          rotation=torch.tensor([[1.0, 0.0, 0.0, 0.0]], device=device).expand(p, 4),
                          log_scale=torch.zeros(p, 3, device=device), opacity_logit=torch.zeros(p, device=device),
                          color=torch.zeros(p, 3, device=device), importance=torch.zeros(p, device=device),
                          frame=torch.zeros(p, dtype=torch.long, device=device))
    with torch.no_grad():
        world = anchors.to_world(prompts, head, params, rotate=True)
    rot = quaternion_to_matrix(world["quats"])                                  # (B,P,3,3)
    normals = torch.einsum("bpij,pj->bpi", rot, prompts.normals.to(rot.dtype))
    return world["means"], torch.nn.functional.normalize(normals, dim=-1)


def point_features(prompts, head, params: FlameParams, cameras: Cameras, images: torch.Tensor) -> torch.Tensor:
    """(N,P,F) projected point-prompt features of N frames: images (N,3,H,W) in [0,1], their cameras (intrinsics in
    pixels of H, W) and FLAME parameters (N rows)."""
    if images.shape[0] != params.batch_size or images.shape[0] != cameras.viewmats.shape[0]:
        raise ValueError(f"{images.shape[0]} images, {params.batch_size} FLAME rows and "
                         f"{cameras.viewmats.shape[0]} cameras: one of each per frame")
    means, normals = posed_prompts(prompts, head, params)
    sx = images.shape[-1] / float(cameras.width)
    sy = images.shape[-2] / float(cameras.height)
    Ks = cameras.Ks.clone().float()
    Ks[:, 0] *= sx
    Ks[:, 1] *= sy
    return projected_point_features(images, means, normals, cameras.viewmats, Ks)
