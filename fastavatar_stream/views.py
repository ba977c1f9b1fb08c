"""Tracked frames as the engine takes them: model-size crops with their cameras and FLAME rows
(`engine.reconstruct.Views`), and the refiner's targets (`engine.refine.RefineFrames`)."""
from __future__ import annotations

import numpy as np
import torch

from engine.avatar_model import AvatarModel
from engine.gaussians import GaussianSet
from engine.reconstruct import Views
from engine.refine import RefineFrames
from engine.render import render
from engine.types import Cameras, FlameParams
from fastavatar_stream.frames import FlameFit, TrackedFrame
from fastavatar_stream.prepare import PreparedFrame
from fastavatar_stream.session import RefineSample


#: how far the refiner's matte reaches beyond the projected head (fraction of the crop side): hair, ears
HEAD_REACH = 0.06

def flame_params(fits: list[FlameFit], n_shape: int, n_expression: int) -> FlameParams:
    """Stack tracked FLAME fits into FlameParams, zero-padding/truncating shape and expression."""
    def padded(values: list[np.ndarray], width: int) -> torch.Tensor:
        out = torch.zeros(len(values), width)
        for i, v in enumerate(values):
            v = torch.as_tensor(np.asarray(v, np.float32)).reshape(-1)[:width]
            out[i, : v.numel()] = v
        return out

    def stacked(name: str) -> torch.Tensor:
        return torch.as_tensor(np.stack([getattr(f, name) for f in fits]).astype(np.float32))

    return FlameParams(shape=padded([f.shape for f in fits], n_shape),
                       expression=padded([f.expression for f in fits], n_expression),
                       rotation=stacked("rotation"), neck=stacked("neck"), jaw=stacked("jaw"), eyes=stacked("eyes"),
                       translation=stacked("translation"))


def tracked_views(frames: list[TrackedFrame], prepared: list[PreparedFrame], model: AvatarModel) -> Views:
    """The model-size crops (`prepared`) of tracked `frames` as network views: images (N,3,S,S) in [0,1], crop
    cameras (intrinsics in pixels of the crop) and FLAME rows padded to the model's prompt directions."""
    images = torch.stack([torch.from_numpy(p.image) for p in prepared])
    size = images.shape[-1]
    cams = Cameras(torch.stack([torch.from_numpy(np.asarray(f.viewmat, np.float32)) for f in frames]),
                   torch.stack([torch.from_numpy(np.asarray(p.K, np.float32)) for p in prepared]), size, size)
    prompts = model.prompts
    params = flame_params([f.flame for f in frames], prompts.shapedirs.shape[-1], prompts.exprdirs.shape[-1])
    return Views(images, cams, params)


def refine_frames(samples: list[RefineSample], model: AvatarModel) -> RefineFrames:
    """The refiner's targets: model-size crops of kept frames (N,S,S,3) with their cameras, FLAME rows and
    head-region masks. When every sample has a matte, the crops are the matted heads composited on white like
    the renders, the mattes go along, and the masks cover the matte too (a render that misses part of the head
    or paints beyond it is scored for it). The tracker's matte is head and shoulders; it is cut to the head
    region (`head_reach`): the avatar is a FLAME head and neck, and shoulders in the target would make the
    refiner paint a torso it has no Gaussians for."""
    views = tracked_views([s.frame for s in samples], [s.prepared for s in samples], model)
    background = torch.ones(3)
    images = views.images.permute(0, 2, 3, 1).contiguous()
    frames = RefineFrames(images, views.cameras, views.params, background=background)
    frames.masks = head_masks(model, frames)
    if samples and all(s.matte is not None for s in samples):
        mattes = torch.stack([torch.from_numpy(np.asarray(s.matte, np.float32)) for s in samples])[..., None]
        mattes = mattes * head_reach(frames.masks)
        frames.images = images * mattes + background * (1 - mattes)
        frames.mattes = mattes
        frames.masks = torch.maximum(frames.masks, (mattes > 0.5).float())
    return frames


def head_reach(masks: torch.Tensor, fraction: float = HEAD_REACH) -> torch.Tensor:
    """(N,H,W,1) head masks grown by `fraction` of the image side: where hair and ears beyond the FLAME surface
    may be."""
    radius = max(1, round(fraction * masks.shape[2]))
    pool = torch.nn.functional.max_pool2d
    # a square dilation is a row dilation then a column one: two thin windows cost far less than one square
    rows = pool(masks.permute(0, 3, 1, 2), (1, 2 * radius + 1), stride=1, padding=(0, radius))
    return pool(rows, (2 * radius + 1, 1), stride=1, padding=(radius, 0)).permute(0, 2, 3, 1)


@torch.no_grad()
def head_masks(model: AvatarModel, frames: RefineFrames, radius: float = 0.008) -> torch.Tensor:
    """(N,H,W,1) soft head-region masks: the posed point prompts splatted as opaque discs."""
    p = model.prompts.v_template.shape[0]
    discs = GaussianSet.from_activated(
        anchor=torch.arange(p), offset=torch.zeros(p, 3), rotation=torch.tensor([[1.0, 0, 0, 0]]).expand(p, 4),
        scale=torch.full((p, 3), radius), opacity=torch.full((p,), 0.99), color=torch.ones(p, 3),
        importance=torch.ones(p), frame=0)
    world = discs.to_world(model.prompts, model.head, frames.params)
    out = render(world["means"], world["quats"], world["scales"], world["opacities"], world["colors"],
                 frames.cameras.viewmats, frames.cameras.Ks, frames.cameras.width, frames.cameras.height)
    return (out["alpha"] > 0.5).float()


#: iBUG index of the chin tip
CHIN_LANDMARK = 8


class HeadBox:
    """The tracked head's box in the frame: the vertices of the FLAME fit above the chin (the neck left out),
    posed with the frame's fit and projected with its camera. What the official pipeline's head detector boxes;
    `prepare.FramePreparer(head_box=...)` frames the official model's crops on it.

    head: an `engine.head.HeadModel` (the head the tracker fits).
    """

    def __init__(self, head) -> None:
        self.head = head
        template = head.template.detach()
        with torch.no_grad():
            chin_y = float(head.landmark_vertices(template[None])[0, CHIN_LANDMARK, 1])
        self.vertices = torch.nonzero(template[:, 1] >= chin_y).squeeze(1)

    def __call__(self, frame: TrackedFrame) -> np.ndarray:
        """(4,) x0, y0, x1, y1 in frame pixels (the tracker's landmark box when the frame has no fit)."""
        if frame.flame is None:
            return frame.box
        params = flame_params([frame.flame], self.head.n_shape, self.head.n_expression)
        with torch.no_grad():
            world = self.head(params).vertices[0, self.vertices].double().numpy()
        view = np.asarray(frame.viewmat, np.float64)
        K = np.asarray(frame.K, np.float64)
        cam = world @ view[:3, :3].T + view[:3, 3]
        uv = (cam[:, :2] / np.maximum(cam[:, 2:3], 1e-6)) @ K[:2, :2].T + K[:2, 2]
        return np.array([*uv.min(axis=0), *uv.max(axis=0)], np.float32)
