"""Test fixtures in the official FastAvatar release format, made from our own data (nothing of FLAME's ships).

`make_official_release(directory)` writes what a user's copy of the authors' release holds, at a small width:
`model.safetensors` (random weights under the official key names, without DINOv2 and without the FLAME geometry
buffers, so both are taken from the other files as with a real download), `dinov2_vitl14_reg4_pretrain.pth`
(Meta's key layout, `mask_token` included), `flame2023.pkl` (FLAME 2023's pickle layout: 5,023 vertices, 300 shape +
100 expression columns, a sparse joint regressor), `oral_jawopen0p5.obj` (321 vertices, 608 triangles) and
`landmark_embedding_with_eyes.npy` (68 iBUG points + 2 eyes, the layout VHAP/GaussianAvatars ship), plus
`fastavatar_config.json` naming the small network's sizes (a real release has none: it is the `official` config).

The head is our embedded default head (engine/data/default_head, 5,055 vertices) with the last 32 vertices of its
right eyeball removed, which gives FLAME's vertex count; the teeth are then built from FLAME's lip-ring indices on
this head, so they sit wherever those indices land: fine for plumbing, meaningless as anatomy.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import torch

from engine.official_geometry import FLAME_VERTICES, LIP_RING_LOWER, LIP_RING_UPPER, ORAL_FACES, ORAL_VERTICES
from engine.official_release import CONFIG_FILE as RELEASE_CONFIG_FILE
#: where each file goes in the release's own folder tree (SPEC.md §8/§9); the flat layout puts all in one folder
TREE_LAYOUT = {
    "model.safetensors": "model_zoo/fastavatar",
    RELEASE_CONFIG_FILE: "model_zoo/fastavatar",
    "dinov2_vitl14_reg4_pretrain.pth": "model_zoo/dinov2",
    "flame2023.pkl": "model_zoo/human_parametric_models/flame_assets/flame",
    "oral_jawopen0p5.obj": "model_zoo/human_parametric_models/flame_assets/flame",
    "landmark_embedding_with_eyes.npy": "model_zoo/human_parametric_models/flame_assets/flame",
}


def make_official_release(directory: str | Path, config: str = "micro", *, layout: str = "tree",
                          seed: int = 0) -> Path:
    """Write an official-format release folder at the widths of our `config` (point guidance off, as in the
    official network); returns `directory`, the path `--weights official:PATH` takes.

    layout "tree": the release's own folders (model_zoo/fastavatar/..., model_zoo/human_parametric_models/...);
    "flat": every file directly in `directory`.
    """
    from engine.checkpoints import ours_to_official
    from engine.model import build_model, get_config

    if layout not in ("tree", "flat"):
        raise ValueError(f"layout must be 'tree' or 'flat', got {layout!r}")
    root = Path(directory)
    cfg = get_config(config).replace(point_guidance=False, guidance=False)
    with torch.random.fork_rng():  # the caller's random state is left as it was
        torch.manual_seed(seed)
        state = build_model(cfg).state_dict()
    network = {ours_to_official(k): v.contiguous() for k, v in state.items()
               if not k.startswith("encoder.backbone.")}
    dinov2 = {k[len("encoder.backbone."):]: v.clone() for k, v in state.items() if k.startswith("encoder.backbone.")}
    dinov2["mask_token"] = torch.zeros(1, cfg.enc_dim)
    flame, landmarks = flame2023_from_default_head()

    def place(name: str) -> Path:
        folder = root / TREE_LAYOUT[name] if layout == "tree" else root
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name

    from safetensors.torch import save_file

    save_file(network, str(place("model.safetensors")))
    place(RELEASE_CONFIG_FILE).write_text(json.dumps(
        {"config": cfg.to_dict(), "made_by": "engine.testing.make_official_release (random weights)"}, indent=1))
    torch.save(dinov2, place("dinov2_vitl14_reg4_pretrain.pth"))
    with open(place("flame2023.pkl"), "wb") as fh:
        pickle.dump(flame, fh, protocol=2)
    np.save(place("landmark_embedding_with_eyes.npy"), np.array(landmarks, dtype=object), allow_pickle=True)
    write_oral_cavity(place("oral_jawopen0p5.obj"), flame["v_template"])
    return root


def flame2023_from_default_head() -> tuple[dict, dict]:
    """(FLAME 2023 pickle dict, 70-point landmark embedding dict) made from our embedded default head."""
    import scipy.sparse

    from engine.head import DEFAULT_HEAD_DIR, DEFAULT_LANDMARK_FILE, DEFAULT_MODEL_FILE

    with np.load(DEFAULT_HEAD_DIR / DEFAULT_MODEL_FILE) as data:
        head = {k: data[k] for k in data.files}
    with np.load(DEFAULT_HEAD_DIR / DEFAULT_LANDMARK_FILE) as data:
        lmk_faces, lmk_bary = data["lmk_face_idx"], data["lmk_b_coords"]
    keep = FLAME_VERTICES
    faces = head["f"].astype(np.int64)
    kept_faces = np.all(faces < keep, axis=1)
    new_face_index = np.cumsum(kept_faces) - 1
    if not kept_faces[lmk_faces].all():
        raise AssertionError("a landmark lies on a removed face of the default head")
    regressor = head["J_regressor"][:, :keep]
    regressor = regressor / regressor.sum(axis=1, keepdims=True)
    flame = {
        "v_template": head["v_template"][:keep], "f": faces[kept_faces].astype(np.uint32),
        "shapedirs": head["shapedirs"][:keep], "posedirs": head["posedirs"][:keep],
        "J_regressor": scipy.sparse.csc_matrix(regressor), "weights": head["weights"][:keep],
        "kintree_table": head["kintree_table"], "J": head["J"], "bs_style": "lbs", "bs_type": "lrotmin",
    }
    eyes = _eye_faces(flame["f"].astype(np.int64), head["part"][:keep])
    faces_70 = np.concatenate([new_face_index[lmk_faces], eyes])
    bary_70 = np.concatenate([lmk_bary, np.full((2, 3), 1.0 / 3)])
    landmarks = {"full_lmk_faces_idx": faces_70[None].astype(np.int64), "full_lmk_bary_coords": bary_70[None]}
    return flame, landmarks


def _eye_faces(faces: np.ndarray, part: np.ndarray) -> np.ndarray:
    """(2,) one face on each eyeball (the 'with eyes' embedding's two extra points)."""
    picks = []
    for eye in (1, 2):
        on_eye = np.flatnonzero(np.all(part[faces] == eye, axis=1))
        picks.append(on_eye[0])
    return np.asarray(picks, dtype=np.int64)


def write_oral_cavity(path: Path, v_template: np.ndarray) -> None:
    """A mouth pocket with the official oral mesh's counts (321 vertices, 608 triangles): a tube of 10 rings of 32
    behind the lips, closed at the back by one apex ((2*10 - 1) * 32 = 608 faces)."""
    rings, columns = 10, 32
    lips = np.concatenate([v_template[list(LIP_RING_UPPER)], v_template[list(LIP_RING_LOWER)]])
    centre = lips.mean(axis=0)
    width = max(float(np.ptp(lips[:, 0])) / 2, 0.01)
    angle = np.linspace(0, 2 * np.pi, columns, endpoint=False)
    depth = np.linspace(0.0, 0.03, rings)
    vertices = [centre + np.stack([width * np.cos(a) * np.ones(rings), 0.4 * width * np.sin(a) * np.ones(rings),
                                   -depth], axis=1) for a in angle]
    grid = np.stack(vertices, axis=1).reshape(-1, 3)        # ring-major: index = ring * columns + column
    apex = centre + np.array([0.0, 0.0, -0.035])
    points = np.concatenate([grid, apex[None]])
    faces = []
    for r in range(rings - 1):
        for c in range(columns):
            a, b = r * columns + c, r * columns + (c + 1) % columns
            faces += [(a, b, a + columns), (b, b + columns, a + columns)]
    last = (rings - 1) * columns
    faces += [(last + c, len(grid), last + (c + 1) % columns) for c in range(columns)]
    assert len(points) == ORAL_VERTICES and len(faces) == ORAL_FACES
    lines = ["# oral cavity pocket written by engine.testing (fixture, not the LAM asset)"]
    lines += [f"v {x:.7f} {y:.7f} {z:.7f}" for x, y, z in points]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces]
    path.write_text("\n".join(lines) + "\n")
