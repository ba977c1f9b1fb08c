"""Sizes of the LGRT network (`ModelConfig`) and the named configurations.

`official` is the released FastAvatar v2 network (loads the official checkpoint unchanged), `paper` is the
same network plus the paper's guidance token (eq. 2), and the small configs keep the architecture while
shrinking every width so that the model runs on a CPU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Every size the LGRT modules need. Field names are ours; SPEC.md section in brackets.

    Encoder [§3]: `image_size` is the square side the images are resized to (a multiple of `patch_size`);
    the DINOv2 position table is stored for `enc_pos_grid`² patches and interpolated to the grid in use;
    `enc_layers` are the 0-based blocks whose (final-normed) outputs the fusion head fuses.
    Transformer [§6]: `dim`, `heads`, `layers` global+frame pairs, MLP `mlp_ratio`; `qk_norm` applies the
    frame blocks' q/k RMSNorm (diffusers >= 0.31 behaviour; off only for weights trained without it);
    `global_attention=False` builds no global blocks (the paper's "w/o global attention" ablation).
    FramePack [§4]: `framepack_level` is the conv kernel and stride.
    Points [§5]: `n_points` canonical query points per slot (informational: the network accepts any count).
    Gaussian head [§7]: `gs_hidden` MLP width, offsets in ±`offset_step`/2, scales clamped to `scale_clip`.
    Guidance (paper eq. 2, off in `official`): one token per base frame from an MLP over the camera pose
    (`guidance_camera_dim` numbers: world-to-camera rotation rows + translation), FLAME expression
    (`guidance_expr_dim`) and head pose (`guidance_pose_dim`: global, neck, jaw, eyes axis-angles).
    Point guidance (ours, off in `official`/`paper`): every point token of base slot n also gets an embedding of
    what frame n shows of that point (colour under its projection, position, facing; see
    `engine.model.point_guidance`).
    """

    name: str = "custom"
    # encoder (DINOv2 ViT with registers + fusion head)
    image_size: int = 504
    patch_size: int = 14
    enc_dim: int = 1024
    enc_depth: int = 24
    enc_heads: int = 16
    enc_mlp_ratio: float = 4.0
    enc_registers: int = 4
    enc_pos_grid: int = 37
    enc_layers: tuple[int, ...] = (4, 11, 17, 23)
    enc_frozen: bool = True
    # transformer
    dim: int = 1024
    heads: int = 16
    layers: int = 10
    mlp_ratio: float = 4.0
    rope_base: float = 100.0
    qk_norm: bool = True
    global_attention: bool = True     # False: no global blocks (ablation: each slot sees only its own frame)
    max_base_frames: int = 16
    max_frame_index: int = 1000
    # FramePack
    framepack_level: int = 8
    # points and Gaussian head
    n_points: int = 21675
    gs_hidden: int = 512
    offset_step: float = 0.2
    scale_clip: float = 0.01
    # guidance (paper eq. 2)
    guidance: bool = False
    guidance_camera_dim: int = 12
    guidance_expr_dim: int = 100
    guidance_pose_dim: int = 15
    # projected point-prompt guidance (engine.model.point_guidance; ours, off in official/paper)
    point_guidance: bool = False
    # inference knobs (no effect on the weights)
    encode_chunk: int = 16

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.dim % self.heads or self.enc_dim % self.enc_heads:
            raise ValueError("dim/enc_dim must be divisible by heads/enc_heads")
        if (self.dim // self.heads) % 4:
            raise ValueError("head dim must be divisible by 4 (2-D RoPE splits it in y/x halves, each rotated by halves)")
        if max(self.enc_layers) >= self.enc_depth:
            raise ValueError(f"enc_layers {self.enc_layers} exceed enc_depth {self.enc_depth}")

    @property
    def grid(self) -> int:
        """Patch-grid side of the encoder output."""
        return self.image_size // self.patch_size

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["enc_layers"] = list(self.enc_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        d = dict(d)
        if "enc_layers" in d:
            d["enc_layers"] = tuple(d["enc_layers"])
        return cls(**d)


#: The released FastAvatar v2 network (SPEC.md §3-§7): DINOv2 ViT-L/14-reg4 at 504², 10 pairs at 1024.
OFFICIAL = ModelConfig(name="official")

#: The paper's model: official sizes plus the eq. 2 guidance token per frame (100 FLAME expressions).
PAPER = OFFICIAL.replace(name="paper", guidance=True)

#: CPU-sized member of the family: a 16-frame window (+ compressed slot) in well under a second on 2 cores
#: (timings in benchmarks/RESULTS.md). Why these sizes:
#: * cost is dominated by the frame blocks' joint attention over points + image tokens (quadratic in
#:   n_points + grid^2, repeated for 17 slots and every layer pair) and by the per-token linears, so the
#:   point count, the width and the grid are the levers (n_points is a run-time knob);
#: * 1,024 query points (a subset of the head's vertices) still cover the face; 168 px input gives a 12x12
#:   grid (144 tokens per frame);
#: * encoder: ViT width 128, 4 blocks, 2 heads (head dim 64), fusing all 4 blocks; trained from scratch (no
#:   pretrained DINOv2 exists at this size), so it is not frozen;
#: * transformer: dim 128, 2 heads (head dim 64 as official, so the RoPE frequencies are the official
#:   ones), 2 global+frame pairs, MLP ratio 4;
#: * FramePack level 4: 12x12 grid -> 3x3 = 9 tokens per pooled frame (level 8 would leave only 2x2);
#: * Gaussian-head MLP 64 wide (the official head is 1024 -> 512; here 128 -> 64);
#: * projected point-prompt guidance on: without it a model this small, trained on a CPU, never learned where its
#:   query points land in a frame, so its avatars did not improve with more frames (benchmarks/RESULTS.md).
TINY = ModelConfig(
    name="tiny", image_size=168, enc_dim=128, enc_depth=4, enc_heads=2, enc_pos_grid=12,
    enc_layers=(0, 1, 2, 3), enc_frozen=False, dim=128, heads=2, layers=2, framepack_level=4,
    n_points=1024, gs_hidden=64, guidance_expr_dim=50, point_guidance=True,
)

#: Even smaller, for unit tests of plumbing (not for quality); point guidance on like `tiny`.
MICRO = ModelConfig(
    name="micro", image_size=56, enc_dim=64, enc_depth=2, enc_heads=1, enc_pos_grid=4,
    enc_layers=(0, 1, 1, 1), enc_frozen=False, dim=64, heads=1, layers=1, framepack_level=2,
    n_points=64, gs_hidden=32, guidance_expr_dim=10, point_guidance=True,
)

CONFIGS: dict[str, ModelConfig] = {c.name: c for c in (OFFICIAL, PAPER, TINY, MICRO)}


def get_config(name: str) -> ModelConfig:
    """The named config (`official`, `paper`, `tiny`, `micro`); ValueError for an unknown name."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; choose one of {sorted(CONFIGS)}") from None
