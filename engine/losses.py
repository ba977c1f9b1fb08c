"""Training losses of FastAvatar (paper §3.3 and official v2 config, SPEC §10).

Images are channel-last, as `engine.render` returns them: (..., H, W, 3) in [0, 1].

Weights (`LossWeights`) default to the paper's eq. 10 for the terms the paper defines (rgb 0.8, ssim 0.1,
lpips 0.1, track 0.1, mask 0.0005) and to the official v2 config for the offset regularizer (0.1), which the paper
does not list. The pruning ("mask") regularizer uses the official form (mean sigmoid(importance))²; the paper writes
an L1 mean of the mask, which for non-negative masks differs only by the square.

Landmark tracking loss (paper eq. 9), as defined here: every one of the 68 landmarks has an *anchor*, the point
prompt nearest to the landmark on the canonical neutral head (`landmark_anchors`). Each slot s of the network
predicts exactly one Gaussian per prompt, so slot s has one Gaussian per landmark. That Gaussian is posed with
input frame j's FLAME parameters, projected with frame j's camera, and compared with frame j's 2D landmark; all
pairs (s, j) of base slots and input frames count, so a slot is also pulled into register with the frames it did
not come from. Distances are Euclidean in image coordinates divided by the image width (so the loss does not
depend on resolution), weighted by the landmark confidence, and averaged.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.reconstruct import logistic_noise

log = logging.getLogger(__name__)

OFFSET_MARGIN = 0.05625  # metres; official v2 offset regularizer threshold
SSIM_C1 = 0.01 ** 2
SSIM_C2 = 0.03 ** 2


@dataclass
class LossWeights:
    """Weights of the training objective (paper eq. 10 plus the official offset term)."""

    rgb: float = 0.8
    ssim: float = 0.1
    lpips: float = 0.1
    track: float = 0.1
    mask: float = 0.0005
    offset: float = 0.1

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_overrides(cls, overrides: dict[str, float] | None = None) -> "LossWeights":
        """Defaults with some terms replaced; unknown names raise ValueError."""
        weights = cls()
        for name, value in (overrides or {}).items():
            if not hasattr(weights, name):
                raise ValueError(f"unknown loss weight {name!r}; known: {sorted(asdict(weights))}")
            setattr(weights, name, float(value))
        return weights


# -- photometric ---------------------------------------------------------------------------------------------------
def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over all pixels and channels (no mask), a scalar."""
    return (pred - target).abs().mean()


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image, (...,) for (..., H, W, 3) inputs in [0, 1].

    Gaussian window (11x11, sigma 1.5), constants C1 = 0.01², C2 = 0.03² (data range 1), statistics over the
    "valid" window positions only (no padding), averaged over positions and channels. Images smaller than the
    window use a window shrunk to the image.
    """
    lead = pred.shape[:-3]
    h, w, c = pred.shape[-3:]
    x = pred.reshape(-1, h, w, c).permute(0, 3, 1, 2).float()
    y = target.reshape(-1, h, w, c).permute(0, 3, 1, 2).float()
    size = min(window_size, h, w)
    g = _gaussian_window(size, sigma, x.dtype, x.device)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, size, size).contiguous()
    blur = lambda t: F.conv2d(t, kernel, groups=c)  # noqa: E731
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_x ** 2 + mu_y ** 2 + SSIM_C1) * (var_x + var_y + SSIM_C2)
    return (num / den).mean(dim=(1, 2, 3)).reshape(lead)


def ssim_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - SSIM averaged over images, a scalar."""
    return 1.0 - ssim(pred, target).mean()


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, (...,) for (..., H, W, 3) inputs in [0, 1]."""
    mse = ((pred.float() - target.float()) ** 2).mean(dim=(-3, -2, -1)).clamp_min(1e-10)
    return -10.0 * torch.log10(mse)


# -- LPIPS (VGG16), only from local files -----------------------------------------------------------------------
_VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_VGG_TAPS = (3, 8, 15, 22, 29)  # indices (in torchvision's vgg16.features) of the ReLUs LPIPS reads
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(torch.nn.Module):
    """Learned perceptual distance with a VGG16 backbone, built from two local files.

    backbone: a torchvision-format VGG16 state dict (keys `features.N.weight/bias`), e.g.
              `$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth`.
    linear:   the LPIPS linear-layer weights for VGG (keys `lin{k}.model.1.weight`, shape (1, C_k, 1, 1)), e.g.
              `vgg.pth` from the `lpips` package.
    Inputs: (..., H, W, 3) in [0, 1]; output: distance per image (...,). Frozen (no trainable parameters).
    """

    def __init__(self, backbone_state: dict[str, torch.Tensor], linear_state: dict[str, torch.Tensor]):
        super().__init__()
        layers: list[torch.nn.Module] = []
        in_ch = 3
        for item in _VGG_CFG:
            if item == "M":
                layers.append(torch.nn.MaxPool2d(2, 2))
            else:
                layers += [torch.nn.Conv2d(in_ch, int(item), 3, padding=1), torch.nn.ReLU(inplace=False)]
                in_ch = int(item)
        self.features = torch.nn.Sequential(*layers)
        own = {k: v for k, v in backbone_state.items() if k.startswith("features.")}
        self.load_state_dict(own, strict=False)
        missing = [k for k in self.state_dict() if k.startswith("features.") and k not in own]
        if missing:
            raise ValueError(f"VGG16 backbone file lacks {len(missing)} tensors (e.g. {missing[0]})")
        self.lins = torch.nn.ParameterList([
            torch.nn.Parameter(linear_state[f"lin{k}.model.1.weight"].reshape(1, ch, 1, 1).float(),
                               requires_grad=False) for k, ch in enumerate(_LPIPS_CHANNELS)])
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _VGG_TAPS:
                out.append(x)
            if i >= _VGG_TAPS[-1]:
                break
        return out

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        lead = pred.shape[:-3]
        h, w, c = pred.shape[-3:]
        prep = lambda t: ((t.reshape(-1, h, w, c).permute(0, 3, 1, 2).float() * 2 - 1) - self.shift) / self.scale  # noqa: E731
        total = 0.0
        for fa, fb, lin in zip(self._taps(prep(pred)), self._taps(prep(target)), self.lins):
            na = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
            nb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
            total = total + ((na - nb) ** 2 * lin).sum(dim=1).mean(dim=(1, 2))
        return total.reshape(lead)

    @classmethod
    def from_local(cls, backbone: str | Path | None = None, linear: str | Path | None = None) -> "LPIPS | None":
        """Build from local files, or return None (and log one warning) when either is absent. Never downloads.

        Defaults: `$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth` and `$FASTAVATAR_LPIPS_VGG`
        (or `$TORCH_HOME/lpips/vgg.pth`).
        """
        torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
        backbone = Path(backbone) if backbone else torch_home / "hub" / "checkpoints" / "vgg16-397923af.pth"
        linear = Path(linear) if linear else Path(os.environ.get("FASTAVATAR_LPIPS_VGG",
                                                                 torch_home / "lpips" / "vgg.pth"))
        absent = [str(p) for p in (backbone, linear) if not p.is_file()]
        if absent:
            log.warning("LPIPS term skipped: weight file(s) not found locally: %s", ", ".join(absent))
            return None
        return cls(torch.load(backbone, map_location="cpu", weights_only=True),
                   torch.load(linear, map_location="cpu", weights_only=True))


# -- regularizers --------------------------------------------------------------------------------------------------
def offset_regularizer(offset: torch.Tensor, margin: float = OFFSET_MARGIN) -> torch.Tensor:
    """mean(max(‖offset‖, margin) − margin) over all Gaussians; offset (..., 3) in metres. Official v2 form."""
    return (offset.norm(dim=-1).clamp_min(margin) - margin).mean()


def pruning_regularizer(importance: torch.Tensor) -> torch.Tensor:
    """(mean sigmoid(importance))² over all Gaussians; importance logits (...,). Official v2 form."""
    return torch.sigmoid(importance).mean() ** 2


def soft_prune_opacity(opacity: torch.Tensor, importance: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Training-mode pruning (SPEC §8): opacity · sigmoid(importance + L), L ~ Logistic(0, 1) per Gaussian.

    The logistic sample is the difference of two Gumbel samples, i.e. the binary Gumbel-softmax relaxation the paper
    cites. Shapes: opacity and importance (...,), same shape.
    """
    noise = logistic_noise(importance.shape, generator).to(importance.device)
    return opacity * torch.sigmoid(importance + noise.to(importance.dtype))


# -- landmark tracking ---------------------------------------------------------------------------------------------
def landmark_anchors(canonical_points: torch.Tensor, canonical_landmarks: torch.Tensor) -> torch.Tensor:
    """Index of the nearest point prompt for every landmark: (P,3), (L,3) -> (L,) long."""
    return torch.cdist(canonical_landmarks.float(), canonical_points.float()).argmin(dim=1)


def project_points(points: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor) -> torch.Tensor:
    """Pinhole projection to pixels (OpenCV axes): points (C,L,3) world, viewmats (C,4,4), Ks (C,3,3) -> (C,L,2).

    Depth is clamped to 1 mm so points behind a camera cannot produce infinities.
    """
    cam = torch.einsum("cij,clj->cli", viewmats[:, :3, :3].to(points.dtype), points) + \
        viewmats[:, None, :3, 3].to(points.dtype)
    z = cam[..., 2:3].clamp_min(1e-3)
    uv1 = torch.einsum("cij,clj->cli", Ks.to(points.dtype), cam / z)
    return uv1[..., :2]


def landmark_tracking_loss(predicted_px: torch.Tensor, landmarks: torch.Tensor, width: int) -> torch.Tensor:
    """Confidence-weighted mean Euclidean distance / width between predicted and observed 2D landmarks.

    predicted_px: (..., L, 2) pixels; landmarks: (..., L, 2) or (..., L, 3) with a confidence column.
    Returns a scalar; 0 when every prediction equals its landmark.
    """
    conf = landmarks[..., 2] if landmarks.shape[-1] > 2 else torch.ones_like(landmarks[..., 0])
    conf = conf.to(predicted_px.dtype).expand(predicted_px.shape[:-1])
    dist = (predicted_px - landmarks[..., :2].to(predicted_px.dtype)).norm(dim=-1) / float(width)
    return (dist * conf).sum() / conf.sum().clamp_min(1e-6)


def sliced_selection(n_base: int, n_sliced_max: int, generator: torch.Generator) -> tuple[int, list[int]]:
    """Pick the slots for sliced fusion (paper §3.3): one random single slot and N_sliced < N random slots.

    N_sliced is drawn from the upper half of [1, min(n_sliced_max, N - 1)]: the single-slot render already
    covers small sets, and the fused avatar the daemon serves holds up to 16 slots, so large sets must be seen
    in training (an early run with N_sliced uniform in 1..8 got worse with more input frames).
    With one base slot, the sliced set is that slot (nothing smaller than N exists). Returns (single, sliced list).
    """
    single = int(torch.randint(n_base, (1,), generator=generator))
    if n_base <= 1:
        return single, [0]
    upper = max(1, min(n_sliced_max, n_base - 1))
    n_sliced = int(torch.randint(max(1, (upper + 1) // 2), upper + 1, (1,), generator=generator))
    sliced = torch.randperm(n_base, generator=generator)[:n_sliced].sort().values.tolist()
    return single, sliced


def image_losses(pred: torch.Tensor, target: torch.Tensor, weights: LossWeights,
                 lpips: LPIPS | None = None) -> dict[str, torch.Tensor]:
    """Weighted-ready photometric terms for (V,H,W,3) renders against targets: l1, ssim (1-SSIM), lpips."""
    out = {"rgb": l1_loss(pred, target), "ssim": ssim_loss(pred, target)}
    if lpips is not None and weights.lpips > 0:
        out["lpips"] = lpips(pred, target).mean()
    return out

