"""Generator of the embedded default head: a FLAME-format model that smplx loads unchanged.

    python -m engine.train.head_builder --out engine/data/default_head

Writes `FLAME_NEUTRAL.npz` (smplx's FLAME keys: v_template, f, shapedirs with 300 shape + 100
expression columns, posedirs (all zero: no pose correctives), J_regressor, weights, kintree_table,
plus shape_names / expression_names / n_shape / n_expression saying which columns are meaningful),
`flame_static_embedding.pkl` (the 51 inner landmarks smplx's constructor insists on),
`landmarks_68.npz` (our 68-point iBUG embedding), `mediapipe_landmark_embedding.npz` (MediaPipe face-mesh
vertices on our skin, in the layout of FLAME's file of that name) and `metadata.json`. Deterministic: no randomness.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHAPE_COLUMNS = 300
EXPRESSION_COLUMNS = 100
MODEL_FILE = "FLAME_NEUTRAL.npz"
STATIC_EMBEDDING_FILE = "flame_static_embedding.pkl"
LANDMARKS_FILE = "landmarks_68.npz"
MEDIAPIPE_FILE = "mediapipe_landmark_embedding.npz"


@dataclass
class HeadAssets:
    v_template: np.ndarray  # (V,3)
    faces: np.ndarray  # (F,3)
    shapedirs: np.ndarray  # (V,3,S)
    shape_names: list[str]
    exprdirs: np.ndarray  # (V,3,E)
    expression_names: list[str]
    weights: np.ndarray  # (V,5)
    joints: np.ndarray  # (5,3)
    J_regressor: np.ndarray  # (5,V)
    kintree_table: np.ndarray  # (2,5) uint32
    lmk_face_idx: np.ndarray  # (68,)
    lmk_b_coords: np.ndarray  # (68,3)
    part: np.ndarray  # (V,) 0 skin, 1 left eyeball, 2 right eyeball, 3/4 mouth pocket upper/lower
    mediapipe_face_idx: np.ndarray  # (N,)
    mediapipe_b_coords: np.ndarray  # (N,3)
    mediapipe_indices: np.ndarray  # (N,) MediaPipe face-mesh vertex ids


def build_head() -> HeadAssets:
    from .blendshapes import build_blendshapes
    from .face_reference import load_face_reference
    from .geometry import build_geometry
    from .landmarks import embed_landmarks
    from .mediapipe_embedding import embed_mediapipe
    from .rig import joint_positions, joint_regressor, kintree_table, lbs_weights

    face = load_face_reference()
    geo = build_geometry(face)
    shapedirs, shape_names, exprdirs, expr_names = build_blendshapes(face, geo)
    joints = joint_positions(geo)
    lmk_f, lmk_b = embed_landmarks(face, geo)
    mp_f, mp_b, mp_ids = embed_mediapipe(face, geo)
    return HeadAssets(v_template=geo.vertices, faces=geo.faces, shapedirs=shapedirs, shape_names=shape_names,
                      exprdirs=exprdirs, expression_names=expr_names, weights=lbs_weights(geo), joints=joints,
                      J_regressor=joint_regressor(geo, joints), kintree_table=kintree_table(),
                      lmk_face_idx=lmk_f, lmk_b_coords=lmk_b, part=geo.part,
                      mediapipe_face_idx=mp_f, mediapipe_b_coords=mp_b, mediapipe_indices=mp_ids)


def write_head(assets: HeadAssets, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_v = len(assets.v_template)
    s, e = assets.shapedirs.shape[2], assets.exprdirs.shape[2]
    dirs = np.zeros((n_v, 3, SHAPE_COLUMNS + EXPRESSION_COLUMNS), dtype=np.float32)
    dirs[:, :, :s] = assets.shapedirs
    dirs[:, :, SHAPE_COLUMNS:SHAPE_COLUMNS + e] = assets.exprdirs
    model = out_dir / MODEL_FILE
    np.savez_compressed(
        model, v_template=assets.v_template.astype(np.float64), f=assets.faces.astype(np.uint32),
        shapedirs=dirs, posedirs=np.zeros((n_v, 3, 36), dtype=np.float32),
        J_regressor=assets.J_regressor.astype(np.float64), weights=assets.weights.astype(np.float64),
        kintree_table=assets.kintree_table, J=assets.joints.astype(np.float64),
        shape_names=np.array(assets.shape_names), expression_names=np.array(assets.expression_names),
        n_shape=np.array(s), n_expression=np.array(e), part=assets.part.astype(np.int8))
    static = out_dir / STATIC_EMBEDDING_FILE
    with open(static, "wb") as fh:
        pickle.dump({"lmk_face_idx": assets.lmk_face_idx[17:].astype(np.int64),
                     "lmk_b_coords": assets.lmk_b_coords[17:].astype(np.float64)}, fh, protocol=4)
    lmk = out_dir / LANDMARKS_FILE
    np.savez_compressed(lmk, lmk_face_idx=assets.lmk_face_idx.astype(np.int64),
                        lmk_b_coords=assets.lmk_b_coords.astype(np.float64))
    mediapipe = out_dir / MEDIAPIPE_FILE
    np.savez_compressed(mediapipe, lmk_face_idx=assets.mediapipe_face_idx.astype(np.int64),
                        lmk_b_coords=assets.mediapipe_b_coords.astype(np.float64),
                        landmark_indices=assets.mediapipe_indices.astype(np.int64))
    meta = out_dir / "metadata.json"
    meta.write_text(json.dumps({
        "made_by": "python -m engine.train.head_builder --out <dir> (engine/train/head_builder, deterministic)",
        "reference": "MediaPipe canonical face mesh (Apache-2.0) for the face's proportions",
        "format": "smplx FLAME npz layout: 300 shape + 100 expression columns; unused columns are zero",
        "vertices": int(n_v), "faces": int(len(assets.faces)),
        "n_shape": int(s), "n_expression": int(e),
        "shape_names": assets.shape_names, "expression_names": assets.expression_names,
        "joints": ["global", "neck", "jaw", "left_eye", "right_eye"],
        "posedirs": "zero (no pose correctives)",
        "landmarks": "68-point iBUG order; subject's right side (image-left) at -x",
        "mediapipe_landmarks": f"{len(assets.mediapipe_indices)} MediaPipe face-mesh vertices (landmark_indices)",
        "units": "metres; y up; face looking along +z",
    }, indent=1) + "\n")
    return [model, static, lmk, mediapipe, meta]
