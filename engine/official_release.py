"""A user's copy of the official FastAvatar release: which files it holds, where, and whether they are complete.

Files (SPEC.md §8-§9), found by name anywhere under the folder (the release's own `model_zoo/...` tree, a Hugging
Face hub folder or one flat folder):

| role      | file                                  | needed                                                  |
|-----------|---------------------------------------|---------------------------------------------------------|
| network   | model.safetensors                     | always                                                  |
| dinov2    | dinov2_vitl14_reg4_pretrain.pth       | when model.safetensors lacks `encoder.model.*`          |
| flame     | flame2023.pkl                         | always (the tracker fits it; geometry is rebuilt from it) |
| oral      | oral_jawopen0p5.obj                   | when model.safetensors lacks the geometry buffers       |
| landmarks | landmark_embedding_with_eyes.npy      | always: the tracker's 68 points on FLAME (or DECA's      |
|           |                                       | landmark_embedding.npy)                                 |
| mediapipe | mediapipe_landmark_embedding.npz      | optional: FLAME's MediaPipe landmark embedding (FLAME    |
|           |                                       | website), for a dense-mesh tracker on the user's FLAME  |
| config    | fastavatar_config.json                | never: only our small test releases have one; a real    |
|           |                                       | release is the `official` config                        |

`check_release` reads headers only (safetensors metadata, a memory-mapped .pth, the FLAME pickle, the OBJ), so it
is quick even for the 4 GB network file, and names every missing file, unreadable file and mis-shaped tensor.
Expected tensor shapes come from our `official` network built on the meta device; tests/test_official_release.py
checks them against ../shared/reference/manifest.json.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.errors import InputError
from engine.model.config import ModelConfig, get_config

NETWORK_FILE = "model.safetensors"
DINOV2_FILE = "dinov2_vitl14_reg4_pretrain.pth"
FLAME_FILE = "flame2023.pkl"
ORAL_FILE = "oral_jawopen0p5.obj"
LANDMARK_FILES = ("landmark_embedding_with_eyes.npy", "landmark_embedding.npy")
MEDIAPIPE_FILE = "mediapipe_landmark_embedding.npz"
CONFIG_FILE = "fastavatar_config.json"
#: the official key prefixes only the official network file uses (ours are point_embed., gs_head., ...)
OFFICIAL_ONLY_PREFIXES = ("pcl_embed.", "renderer.", "framepack_compressor.", "encoder.model.", "encoder.fusion_head.")
WHERE_TO_GET = {
    "network": "Hugging Face TyrionWuY/FastAvatar (model_zoo/fastavatar/model.safetensors)",
    "dinov2": "Meta's DINOv2 release (dinov2_vitl14_reg4_pretrain.pth, ViT-L/14 with registers)",
    "flame": "https://flame.is.tue.mpg.de (free registration, 'FLAME 2023'; non-commercial licence)",
    "oral": "Hugging Face TyrionWuY/FastAvatar-assets (human_parametric_models/flame_assets/flame/)",
    "landmarks": "Hugging Face TyrionWuY/FastAvatar-assets (flame_assets/flame/landmark_embedding_with_eyes.npy)",
    "mediapipe": "https://flame.is.tue.mpg.de (FLAME's MediaPipe landmark embedding; optional)",
}
_MAX_DEPTH = 8


@dataclass
class OfficialRelease:
    """Paths of the release's files under `root` (None where not found)."""

    root: Path
    network: Path | None = None
    dinov2: Path | None = None
    flame: Path | None = None
    oral_mesh: Path | None = None
    landmarks: Path | None = None
    mediapipe_landmarks: Path | None = None
    config_file: Path | None = None

    def config(self) -> ModelConfig:
        """The network's sizes: `official`, or what a small test release's fastavatar_config.json says."""
        if self.config_file is None:
            return get_config("official")
        try:
            return ModelConfig.from_dict(json.loads(self.config_file.read_text())["config"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{self.config_file} is not a network description: {exc}") from None


@dataclass
class CheckRow:
    """One file of a release check. status: found | missing | unreadable | wrong | not needed | optional (an
    optional file that is not there)."""

    role: str
    file: str
    status: str
    detail: str = ""
    problems: list[str] = field(default_factory=list)


@dataclass
class ReleaseCheck:
    release: OfficialRelease
    rows: list[CheckRow]

    @property
    def complete(self) -> bool:
        return all(r.status in ("found", "not needed", "optional") for r in self.rows)

    def problems(self) -> list[str]:
        """One phrase per problem, naming the file or tensor."""
        out = []
        for r in self.rows:
            if r.status == "missing":
                out.append(f"missing {r.file}")
            elif r.status in ("unreadable", "wrong"):
                out.extend(r.problems or [f"{r.file}: {r.detail}"])
        return out


# ------------------------------------------------------------------------------------------------------ finding
def _walk(root: Path) -> dict[str, list[Path]]:
    """File name -> paths under root (depth-limited, hidden folders skipped), sorted."""
    found: dict[str, list[Path]] = {}
    base_depth = len(root.parts)
    for folder, dirs, files in os.walk(root, followlinks=True):
        depth = len(Path(folder).parts) - base_depth
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < _MAX_DEPTH else []
        for name in files:
            found.setdefault(name, []).append(Path(folder) / name)
    return {k: sorted(v) for k, v in found.items()}


def _one(found: dict[str, list[Path]], names: tuple[str, ...], root: Path) -> Path | None:
    for name in names:
        paths = found.get(name, [])
        if len(paths) > 1:
            listing = ", ".join(str(p.relative_to(root)) for p in paths)
            raise InputError(f"{root} holds {len(paths)} copies of {name} ({listing}); keep one")
        if paths:
            return paths[0]
    return None


def find_release(root: str | Path) -> OfficialRelease:
    """Locate the release's files under `root` (a folder); InputError when it is not a folder."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"official release folder {root} does not exist or is not a folder")
    found = _walk(root)
    network = _one(found, (NETWORK_FILE,), root)
    config = (network.parent / CONFIG_FILE) if network is not None and (network.parent / CONFIG_FILE).is_file() \
        else _one(found, (CONFIG_FILE,), root)
    return OfficialRelease(root=root, network=network, dinov2=_one(found, (DINOV2_FILE,), root),
                           flame=_one(found, (FLAME_FILE,), root), oral_mesh=_one(found, (ORAL_FILE,), root),
                           landmarks=_one(found, LANDMARK_FILES, root),
                           mediapipe_landmarks=_one(found, (MEDIAPIPE_FILE,), root), config_file=config)


def network_keys(path: Path) -> list[str]:
    """Tensor names in a safetensors file (header only); InputError naming the file when it cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            return list(fh.keys())
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file is the user's to fix
        raise InputError(f"cannot read {path}: {exc}") from None


def is_official_release(root: str | Path) -> bool:
    """True when `root` is a folder whose model.safetensors carries the official key names (not our checkpoint)."""
    root = Path(root)
    if not root.is_dir() or _is_our_checkpoint(root):
        return False
    try:
        network = find_release(root).network
    except InputError:
        return True  # several copies: it is a release, and loading will say what is wrong
    if network is None:
        return False
    try:
        keys = network_keys(network)
    except InputError:
        return True  # unreadable: loading it as a release names the file
    from engine.checkpoints import strip_wrappers

    return any(strip_wrappers(k).startswith(OFFICIAL_ONLY_PREFIXES) for k in keys)


def _is_our_checkpoint(root: Path) -> bool:
    from engine.checkpoints import CHECKPOINT_FORMAT

    for meta in root.glob("*.json"):
        try:
            if json.loads(meta.read_text()).get("format") == CHECKPOINT_FORMAT:
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


# ----------------------------------------------------------------------------------------------------- checking
def expected_network_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Official key -> shape of every network tensor (DINOv2 included) of a network with these sizes."""
    from engine.checkpoints import ours_to_official
    from engine.model.lgrt import build_model

    state = build_model(config, device="meta").state_dict()
    return {ours_to_official(k): tuple(v.shape) for k, v in state.items()}


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of a safetensors (header only) or .pth (memory-mapped) file; InputError when unreadable."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as fh:
                return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"cannot read {path}: {exc}") from None
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise InputError(f"{path} does not hold a state dict")
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def shape_summary(want: dict[str, tuple[int, ...]], show: int = 3) -> str:
    """"N tensors, e.g. name [shape], ..." (the biggest ones; `check-weights --list-tensors` prints them all)."""
    biggest = sorted(want.items(), key=lambda kv: -torch.Size(kv[1]).numel())[:show]
    return f"{len(want)} tensors, e.g. " + ", ".join(f"{k} {list(v)}" for k, v in biggest)


def _compare(file: str, have: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]]) -> list[str]:
    problems = [f"{file}: missing tensor {k} {list(s)}" for k, s in want.items() if k not in have]
    problems += [f"{file}: tensor {k} has shape {list(have[k])}, expected {list(s)}" for k, s in want.items()
                 if k in have and have[k] != s]
    return problems


def check_release(root: str | Path) -> ReleaseCheck:
    """Every file of the release: found, missing, unreadable or holding wrong tensors (see the module table)."""
    from engine.checkpoints import GEOMETRY_PREFIX, strip_wrappers
    from engine.official_geometry import GEOMETRY_KEYS

    release = find_release(root)
    rel = lambda p: str(p.relative_to(release.root))  # noqa: E731
    config = release.config()
    expected = expected_network_tensors(config)
    dino_want = {k[len("encoder.model."):]: s for k, s in expected.items() if k.startswith("encoder.model.")}
    rows: list[CheckRow] = []
    has_dino, has_geometry = False, False

    if release.network is None:
        network_want = {k: v for k, v in expected.items() if not k.startswith("encoder.model.")}
        rows.append(CheckRow("network", NETWORK_FILE, "missing", f"{shape_summary(network_want)}; get it from "
                                                                  f"{WHERE_TO_GET['network']}"))
    else:
        try:
            have = {strip_wrappers(k): s for k, s in _tensor_shapes(release.network).items()}
            has_dino = any(k.startswith("encoder.model.") for k in have)
            has_geometry = all(GEOMETRY_PREFIX + k in have for k in GEOMETRY_KEYS)
            want = {k: s for k, s in expected.items() if has_dino or not k.startswith("encoder.model.")}
            problems = _compare(rel(release.network), have, want)
            if not any(k.startswith(OFFICIAL_ONLY_PREFIXES) for k in have):
                problems = [f"{rel(release.network)} holds no official FastAvatar tensors (pcl_embed.*, renderer.*, "
                            "...): it is not the release's model file"]
            rows.append(CheckRow("network", rel(release.network), "wrong" if problems else "found",
                                 f"{config.name} sizes: {shape_summary(want)}", problems))
        except InputError as exc:
            rows.append(CheckRow("network", rel(release.network), "unreadable", str(exc), [str(exc)]))

    if has_dino:
        rows.append(CheckRow("dinov2", DINOV2_FILE, "not needed", "model.safetensors holds encoder.model.*"))
    elif release.dinov2 is None:
        rows.append(CheckRow("dinov2", DINOV2_FILE, "missing", f"{shape_summary(dino_want)}; get it from "
                                                               f"{WHERE_TO_GET['dinov2']}"))
    else:
        try:
            have = {strip_wrappers(k): s for k, s in _tensor_shapes(release.dinov2).items() if k != "mask_token"}
            problems = _compare(rel(release.dinov2), have, dino_want)
            rows.append(CheckRow("dinov2", rel(release.dinov2), "wrong" if problems else "found",
                                 shape_summary(dino_want), problems))
        except InputError as exc:
            rows.append(CheckRow("dinov2", rel(release.dinov2), "unreadable", str(exc), [str(exc)]))

    rows.append(_asset_row("flame", FLAME_FILE, release.flame, release, _check_flame,
                           "FLAME 2023: 5023 vertices, shapedirs [5023,3,400], 5 joints"))
    if has_geometry:
        rows.append(CheckRow("oral", ORAL_FILE, "not needed", "model.safetensors holds the geometry buffers"))
    else:
        rows.append(_asset_row("oral", ORAL_FILE, release.oral_mesh, release, _check_oral,
                               "321 vertices, 608 triangles"))
    rows.append(_asset_row("landmarks", LANDMARK_FILES[0], release.landmarks, release, _check_landmarks,
                           "68 iBUG points on FLAME's faces (+2 eye points)"))
    if release.mediapipe_landmarks is None:
        rows.append(CheckRow("mediapipe", MEDIAPIPE_FILE, "optional", f"not there; {WHERE_TO_GET['mediapipe']}"))
    else:
        rows.append(_asset_row("mediapipe", MEDIAPIPE_FILE, release.mediapipe_landmarks, release, _check_mediapipe,
                               "lmk_face_idx, lmk_b_coords, landmark_indices"))
    return ReleaseCheck(release, rows)


def _asset_row(role: str, name: str, path: Path | None, release: OfficialRelease, check, what: str) -> CheckRow:
    if path is None:
        return CheckRow(role, name, "missing", f"{what}; get it from {WHERE_TO_GET[role]}")
    try:
        check(path)
    except InputError as exc:
        return CheckRow(role, str(path.relative_to(release.root)), "unreadable", str(exc), [str(exc)])
    return CheckRow(role, str(path.relative_to(release.root)), "found", what)


def _check_flame(path: Path) -> None:
    from engine.official_geometry import read_flame

    read_flame(path)


def _check_oral(path: Path) -> None:
    from engine.official_geometry import read_oral_mesh

    read_oral_mesh(path)


def _check_landmarks(path: Path) -> None:
    from engine.head import read_landmarks

    faces, bary = read_landmarks(path)
    if faces.shape != (68,) or bary.shape != (68, 3):
        raise InputError(f"{path} holds {faces.shape[0]} landmarks; the tracker needs FLAME's 68 iBUG points")


def _check_mediapipe(path: Path) -> None:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            lengths = {len(data[k]) for k in ("lmk_face_idx", "lmk_b_coords", "landmark_indices") if k in keys}
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read {path}: {exc}") from None
    missing = {"lmk_face_idx", "lmk_b_coords", "landmark_indices"} - keys
    if missing or len(lengths) != 1:
        raise InputError(f"{path} is not FLAME's MediaPipe embedding (needs lmk_face_idx, lmk_b_coords and "
                         f"landmark_indices of one length; missing {sorted(missing)})")


def require_complete(root: str | Path) -> OfficialRelease:
    """The release when every needed file is there and fits; else one InputError naming the problems."""
    check = check_release(root)
    if not check.complete:
        problems = check.problems()
        more = (f" (+{len(problems) - 4} more; run `fastavatar-stream check-weights {root}`)"
                if len(problems) > 4 else "")
        raise InputError(f"official release {root} is incomplete: " + "; ".join(problems[:4]) + more)
    return check.release
