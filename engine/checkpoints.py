"""Loading the official FastAvatar v2 weights, and saving/loading our own checkpoints.

Official file (SPEC.md §9): a safetensors dump of `ModelFastAvatar.state_dict()`. We strip a leading
`module.` / `_orig_mod.`, map every key through `OFFICIAL_PREFIX_MAP` onto our module names, take DINOv2 from
the file or from Meta's `dinov2_vitl14_reg4_pretrain.pth`, take the FLAME geometry buffers from the file or
rebuild them from the user's FLAME 2023 + oral mesh (`engine.official_geometry`),
skip only the entries SPEC.md says are unused (`UNUSED_OFFICIAL_KEYS`), and refuse anything else that does
not fit (missing, unexpected or mis-shaped keys) with one `InputError` that lists them.

Our own checkpoints: a directory with one `*.safetensors` (state dict) and one `*.json` (config + metadata).
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.errors import InputError
from engine.model.config import ModelConfig, get_config
from engine.model.lgrt import LGRT
from engine.official_geometry import GEOMETRY_KEYS, resolve_official_geometry

#: official key prefix -> our module prefix (inner names are identical on both sides)
OFFICIAL_PREFIX_MAP: tuple[tuple[str, str], ...] = (
    ("encoder.model.", "encoder.backbone."),
    ("encoder.fusion_head.", "encoder.fusion."),
    ("framepack_compressor.", "framepack."),
    ("pcl_embed.", "point_embed."),
    ("transformer.frame_attn.", "transformer.frame_attn."),
    ("transformer.compressed_frame_attn.", "transformer.compressed_frame_attn."),
    ("transformer.global_attn_layers.", "transformer.global_attn_layers."),
    ("renderer.mlp_net.", "gs_head.mlp_net."),
    ("renderer.gs_net.", "gs_head.gs_net."),
)

#: FLAME geometry buffers we use when the file has them (SPEC.md §9), returned by `load_official`
GEOMETRY_PREFIX = "renderer.flame_model."

#: entries SPEC.md §9 lists as unused at inference (region masks, landmark embedding, pose correctives),
#: plus Meta's DINOv2 `mask_token` (masked-training only)
UNUSED_OFFICIAL_KEYS: tuple[str, ...] = (
    r"renderer\.flame_model\.mask\..*",
    r"renderer\.flame_model\.full_lmk_faces_idx",
    r"renderer\.flame_model\.full_lmk_bary_coords",
    r"renderer\.flame_model\.neck_kin_chain",
    r"renderer\.flame_model\.posedirs",
    r"encoder\.model\.mask_token",
)
_UNUSED_RE = re.compile("|".join(f"(?:{p})" for p in UNUSED_OFFICIAL_KEYS))
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrappers(key: str) -> str:
    """Remove leading DDP / torch.compile wrapper prefixes (`module.`, `_orig_mod.`, in any nesting)."""
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def official_to_ours(key: str) -> str | None:
    """Our parameter name for an official key, or None when the key is not a network weight."""
    for theirs, ours in OFFICIAL_PREFIX_MAP:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return None


def ours_to_official(key: str) -> str | None:
    """The official key for one of our parameter names (inverse of `official_to_ours`), or None."""
    for theirs, ours in OFFICIAL_PREFIX_MAP:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return None


@dataclass
class MappedState:
    """An official state dict split by destination."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)   # our names
    geometry: dict[str, torch.Tensor] = field(default_factory=dict)  # GEOMETRY_KEYS found
    ignored: list[str] = field(default_factory=list)                 # official names skipped as unused
    unexpected: list[str] = field(default_factory=list)              # official names we cannot place


def map_official_state_dict(state: Mapping[str, torch.Tensor]) -> MappedState:
    """Route every official entry: network weight (renamed), geometry buffer, known-unused, or unexpected."""
    out = MappedState()
    for raw_key, value in state.items():
        key = strip_wrappers(raw_key)
        ours = official_to_ours(key)
        if ours is not None:
            out.weights[ours] = value
        elif key.startswith(GEOMETRY_PREFIX) and key[len(GEOMETRY_PREFIX):] in GEOMETRY_KEYS:
            out.geometry[key[len(GEOMETRY_PREFIX):]] = value
        elif _UNUSED_RE.fullmatch(key):
            out.ignored.append(key)
        else:
            out.unexpected.append(raw_key)
    return out


def _listing(keys: list[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_and_load(model: LGRT, weights: Mapping[str, torch.Tensor], *, source: str,
                   allow_missing: tuple[str, ...] = (), assign: bool = False) -> None:
    """Load `weights` (our names) into `model`; InputError naming every missing/unexpected/mis-shaped key.

    `allow_missing`: prefixes of our names that may be absent (they keep their current values).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights and not k.startswith(allow_missing)]
    unexpected = [k for k in weights if k not in expected]
    shapes = [f"{k} {tuple(weights[k].shape)} != {tuple(expected[k].shape)}" for k in weights
              if k in expected and tuple(weights[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_listing(unexpected)}")
    if shapes:
        problems.append(f"wrong shape {len(shapes)}: {_listing(shapes)}")
    if problems:
        raise InputError(f"{source} does not fit the '{model.cfg.name}' LGRT: " + "; ".join(problems))
    result = model.load_state_dict(dict(weights), strict=False, assign=assign)
    assert not result.unexpected_keys, result.unexpected_keys  # checked above


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(f"weights file {path} does not exist; pass the path of the downloaded file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad user file
        raise InputError(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise InputError(f"{path} does not hold a state dict")
    return dict(obj)


def dinov2_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Meta's DINOv2 state dict (`dinov2_vitl14_reg4_pretrain.pth`) under our names, `mask_token` dropped."""
    state = _load_tensors(Path(path))
    return {"encoder.backbone." + strip_wrappers(k): v for k, v in state.items()
            if strip_wrappers(k) != "mask_token"}


@dataclass
class OfficialWeights:
    """Result of `load_official`; unpacks as `model, geometry = load_official(...)`.

    model:    LGRT in eval mode with the official weights (float32 unless asked otherwise)
    geometry: the FLAME geometry buffers (`GEOMETRY_KEYS`): the file's, or rebuilt from the user's FLAME 2023 +
              oral-mesh assets (SPEC.md §5, `engine.official_geometry`; rebuilt ones also hold `faces`)
    ignored:  official keys skipped as unused (SPEC.md §9)
    geometry_source: "file", "rebuilt" or "rebuilt+file" (file buffers over a rebuild, as the official runner does)
    """

    model: LGRT
    geometry: dict[str, torch.Tensor]
    ignored: list[str]
    geometry_source: str = "file"

    def __iter__(self):
        return iter((self.model, self.geometry))


def load_official(path: str | Path, *, dinov2_path: str | Path | None = None, config: str | ModelConfig = "official",
                  dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  flame_path: str | Path | None = None, oral_mesh_path: str | Path | None = None) -> OfficialWeights:
    """Load the released `model.safetensors` into our LGRT.

    DINOv2 comes from the file when it holds `encoder.model.*`, else from `dinov2_path` (Meta's .pth).
    FLAME geometry comes from the file's `renderer.flame_model.*` buffers when it has all of them, else it is
    rebuilt from `flame_path` (flame2023.pkl) + `oral_mesh_path` (oral_jawopen0p5.obj); InputError names what
    is missing when neither is possible.
    If every qk-RMSNorm gain is exactly 1 the weights were trained without qk-norm (diffusers < 0.31), so the
    model is built with `qk_norm=False` (SPEC.md §6).
    """
    path = Path(path)
    mapped = map_official_state_dict(_load_tensors(path))
    if mapped.unexpected:
        raise InputError(f"{path} has {len(mapped.unexpected)} keys that are not part of the FastAvatar v2 "
                         f"network: {_listing(mapped.unexpected)}")
    geometry, geometry_source = resolve_official_geometry(mapped.geometry, flame_path, oral_mesh_path,
                                                          source=str(path))
    weights = mapped.weights
    if not any(k.startswith("encoder.backbone.") for k in weights):
        if dinov2_path is None:
            raise InputError(f"{path} has no DINOv2 weights (encoder.model.*); pass the path of Meta's "
                             "dinov2_vitl14_reg4_pretrain.pth as dinov2_path")
        weights.update(dinov2_weights(dinov2_path))
    cfg = get_config(config) if isinstance(config, str) else config
    norm_gains = [v for k, v in weights.items() if re.search(r"attn\.norm_(added_)?[qk]\.weight$", k)]
    if norm_gains and all(bool((g == 1).all()) for g in norm_gains):
        cfg = cfg.replace(qk_norm=False)
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    model = materialize(LGRT, cfg, weights, source=str(path), dtype=dtype)
    return OfficialWeights(model.to(device).eval(), geometry, mapped.ignored, geometry_source)


def materialize(cls, cfg: ModelConfig, weights: Mapping[str, torch.Tensor], *, source: str,
                dtype: torch.dtype = torch.float32) -> LGRT:
    """Build `cls(cfg)` on the meta device and assign `weights` (no random init of a 1B-parameter model)."""
    with torch.device("meta"):
        model = cls(cfg)
    check_and_load(model, weights, source=source, assign=True)
    model.transformer.rebuild_buffers(dtype=torch.float32)
    return model


# ------------------------------------------------------------------------------------------ our own format
CHECKPOINT_FORMAT = "fastavatar-stream/lgrt-1"


def save_checkpoint(directory: str | Path, model: LGRT, config: ModelConfig | None = None,
                    metadata: dict | None = None) -> Path:
    """Write `model.safetensors` + `model.json` into `directory`; returns it.

    The JSON is flat: `format`, `config` (the ModelConfig) and every metadata entry at the top level (training
    writes `command`, `steps`, `wall_s`, `validation`, `point_index`, ...).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = config or model.cfg
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    meta = {k: v for k, v in (metadata or {}).items() if k not in ("format", "config")}
    meta.update(format=CHECKPOINT_FORMAT, config=cfg.to_dict())
    (directory / "model.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return directory


def load_checkpoint(directory: str | Path, *, device: str | torch.device = "cpu") -> tuple[LGRT, dict]:
    """Load one of our checkpoints: exactly one `*.safetensors` and one `*.json` in `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"checkpoint directory {directory} does not exist")
    tensors, metas = sorted(directory.glob("*.safetensors")), sorted(directory.glob("*.json"))
    if len(tensors) != 1 or len(metas) != 1:
        raise InputError(f"checkpoint directory {directory} must hold exactly one .safetensors and one .json "
                         f"file (found {len(tensors)} and {len(metas)})")
    try:
        meta = json.loads(metas[0].read_text())
        cfg = ModelConfig.from_dict(meta["config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{metas[0]} is not an LGRT checkpoint description: {exc}") from exc
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{metas[0]} has format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    # weights may be stored in half precision (the shipped default is); the model computes in float32
    weights = {k: v.float() if v.is_floating_point() else v for k, v in _load_tensors(tensors[0]).items()}
    model = materialize(LGRT, cfg, weights, source=str(tensors[0]))
    metadata = {k: v for k, v in meta.items() if k != "format"}
    metadata.update(meta.get("metadata", {}))  # checkpoints written before the flat layout
    return model.to(device).eval(), metadata


def default_checkpoint_dir() -> Path:
    """Where the shipped `tiny` checkpoint lives (engine/data/default_checkpoint; filled by the training script)."""
    return Path(__file__).resolve().parent / "data" / "default_checkpoint"
