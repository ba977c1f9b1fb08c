"""The training sample shared by the synthetic generator and the real-capture loader."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.reconstruct import Views
from engine.types import Cameras, FlameParams


@dataclass
class HeadSample:
    """V views of one person (frames of one video, or one instant seen by several cameras).

    images:    (V, 3, H, W) float32 in [0, 1], the frames as a camera sees them (network input)
    targets:   (V, 3, H, W) float32 in [0, 1], the same frames on the plain colour `bg_colors` (supervision);
               equal to `images` unless the inputs have textured backgrounds
    masks:     (V, 1, H, W) float32 foreground alpha in [0, 1]
    bg_colors: (V, 3) float32 plain background colour of `targets`
    cameras:   V cameras (world-to-camera OpenCV, intrinsics in pixels of this H, W)
    flame:     FLAME parameters per view (V rows; `shape` is the same identity in every row)
    landmarks: (V, 68, 3) float32 iBUG-68 landmarks: x, y in pixels and a confidence in [0, 1]
    identity:  a name that is unique per person within a dataset split
    sampler:   "video", "multiview" or the name of a real capture layout
    """

    images: torch.Tensor
    targets: torch.Tensor
    masks: torch.Tensor
    bg_colors: torch.Tensor
    cameras: Cameras
    flame: FlameParams
    landmarks: torch.Tensor
    identity: str
    sampler: str

    @property
    def n_views(self) -> int:
        return int(self.images.shape[0])

    @property
    def resolution(self) -> tuple[int, int]:
        """(H, W)."""
        return int(self.images.shape[-2]), int(self.images.shape[-1])

    def select(self, index: list[int] | torch.Tensor) -> "HeadSample":
        """The views `index` (keeps their order)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return HeadSample(images=self.images[idx], targets=self.targets[idx], masks=self.masks[idx],
                          bg_colors=self.bg_colors[idx],
                          cameras=Cameras(self.cameras.viewmats[idx], self.cameras.Ks[idx], self.cameras.width,
                                          self.cameras.height),
                          flame=self.flame.index(idx), landmarks=self.landmarks[idx], identity=self.identity,
                          sampler=self.sampler)

    def views(self, index: list[int]) -> Views:
        """Views `index` as the network takes them (engine.reconstruct.Views): input images, cameras, FLAME rows."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.images.device)
        return Views(self.images[idx], self.cameras.index(idx), self.flame.index(idx))

    def to(self, device: torch.device | str) -> "HeadSample":
        return HeadSample(images=self.images.to(device), targets=self.targets.to(device),
                          masks=self.masks.to(device), bg_colors=self.bg_colors.to(device),
                          cameras=self.cameras.to(device), flame=self.flame.to(device),
                          landmarks=self.landmarks.to(device), identity=self.identity, sampler=self.sampler)


def collate_samples(batch: list[HeadSample]) -> list[HeadSample]:
    """DataLoader `collate_fn`: samples may differ in view count, so a batch stays a list."""
    return list(batch)
