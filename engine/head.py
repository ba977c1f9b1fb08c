"""The head model: one `HeadModel` over smplx's real FLAME layer.

`load_head()` gives the embedded default head (a FLAME-format model made by `engine.train.head_builder`,
shipped in engine/data/default_head). `load_head(path, landmark_path)` loads a user's FLAME 2020 or
FLAME 2023 model (`generic_model.pkl`, `flame2023.pkl`: chumpy pickles) and a landmark embedding;
those files are never shipped nor downloaded.

Landmark files understood (68 points in iBUG order, barycentric on the model's faces):
- `landmark_embedding.npy` (DECA/EMOCA layout, a pickled dict): `full_lmk_faces_idx` /
  `full_lmk_bary_coords` when present (also `landmark_embedding_with_eyes.npy`, as VHAP and the FastAvatar
  assets ship it: 68 iBUG points then 2 eye points, which are dropped); otherwise `static_lmk_faces_idx`/`static_lmk_bary_coords`
  (51 inner points, iBUG 17-67) plus the frontal (yaw 0, row 39 of 79) row of
  `dynamic_lmk_faces_idx`/`dynamic_lmk_bary_coords` (17 contour points, iBUG 0-16).
- FLAME's `flame_static_embedding.pkl` (51 points) with `flame_dynamic_embedding.npy` next to it
  (its yaw-0 row gives the contour).
- our `landmarks_68.npz` (`lmk_face_idx` (68,), `lmk_b_coords` (68,3)), or any .npz/.pkl/.npy dict
  with those two keys holding 68 points.

MediaPipe face-mesh embedding (what the tracker fits when its landmarks come from MediaPipe's 478-point mesh):
`mediapipe_landmark_embedding.npz` with `lmk_face_idx` (N,), `lmk_b_coords` (N,3) and `landmark_indices` (N,),
the mesh vertex each row stands for -- the file FLAME 2020/2023 users get with FLAME (105 points), found next to
their model, and the one the default head ships (built by the head builder).
"""
from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.errors import InputError
from engine.types import FlameParams

DEFAULT_HEAD_DIR = Path(__file__).resolve().parent / "data" / "default_head"
DEFAULT_MODEL_FILE = "FLAME_NEUTRAL.npz"
DEFAULT_LANDMARK_FILE = "landmarks_68.npz"
MEDIAPIPE_EMBEDDING_FILE = "mediapipe_landmark_embedding.npz"
MEDIAPIPE_MESH_POINTS = 478
USER_MODEL_NAMES = ("generic_model.pkl", "flame2023.pkl", "FLAME_NEUTRAL.pkl", "flame2020.pkl")
USER_LANDMARK_NAMES = ("landmark_embedding.npy", "landmark_embedding_with_eyes.npy", "landmarks_68.npz",
                       "flame_static_embedding.pkl")
FRONTAL_CONTOUR_ROW = 39  # the dynamic contour tables hold 79 rows for yaw -39..39 degrees
FLAME_HELP = "get FLAME from https://flame.is.tue.mpg.de (free registration) and pass its path"


@dataclass
class MeshEmbedding:
    """MediaPipe face-mesh vertices on the model: face_idx (N,) long, bary (N,3), mesh_indices (N,) int64."""

    face_idx: np.ndarray
    bary: np.ndarray
    mesh_indices: np.ndarray


@dataclass
class LandmarkBasis:
    """Everything a tracker needs to place its N landmarks (68 iBUG points, or the MediaPipe embedding's) for given
    shape/expression/pose without autograd.

    Rest landmarks (template + dirs) are exact; skinning them with `lbs_weights` (interpolated at
    the landmark) differs from skinning the mesh's corners by well under a millimetre for normal poses.

    template:        (N,3)    landmarks of the template (zero shape, expression and pose)
    shapedirs:       (N,3,S)  landmark offsets per shape coefficient
    exprdirs:        (N,3,E)  landmark offsets per expression coefficient
    lbs_weights:     (N,5)    skinning weights interpolated at the landmarks
    joint_template:  (5,3)    rest joints of the template
    joint_shapedirs: (5,3,S)  rest-joint offsets per shape coefficient (J_regressor @ shapedirs)
    joint_exprdirs:  (5,3,E)  rest-joint offsets per expression coefficient (smplx regresses joints after both)
    parents:         (5,)     kinematic tree, parents[0] = -1
    """

    template: torch.Tensor
    shapedirs: torch.Tensor
    exprdirs: torch.Tensor
    lbs_weights: torch.Tensor
    joint_template: torch.Tensor
    joint_shapedirs: torch.Tensor
    joint_exprdirs: torch.Tensor
    parents: torch.Tensor


class HeadModel:
    """FLAME through smplx, with a 68-point landmark embedding.

    flame:             the smplx.FLAME module (num_betas = n_shape, expressions = n_expression)
    faces:             (F,3) int64 numpy
    n_shape, n_expression: meaningful coefficient counts (FlameParams.shape/expression widths)
    template:          (V,3) torch rest vertices
    landmark_face_idx: (68,) long;  landmark_bary: (68,3) float
    shape_names, expression_names: one name per coefficient
    part:              (V,) int numpy for the default head (0 skin, 1 left eyeball, 2 right eyeball,
                       3/4 upper/lower mouth pocket), None for a user's FLAME
    mediapipe:         MediaPipe face-mesh embedding, or None when the model has none
    """

    def __init__(self, flame, landmark_face_idx: np.ndarray, landmark_bary: np.ndarray, *,
                 shape_names: list[str], expression_names: list[str], part: np.ndarray | None, source: str,
                 mediapipe: MeshEmbedding | None = None):
        self.flame = flame
        self.faces = np.asarray(flame.faces, dtype=np.int64)
        self.n_shape = int(flame.num_betas)
        self.n_expression = int(flame.num_expression_coeffs)
        dtype = flame.v_template.dtype
        self.landmark_face_idx = torch.as_tensor(np.asarray(landmark_face_idx, dtype=np.int64))
        self.landmark_bary = torch.as_tensor(np.asarray(landmark_bary, dtype=np.float64)).to(dtype)
        self.shape_names = list(shape_names)
        self.expression_names = list(expression_names)
        self.part = part
        self.source = source
        self.mediapipe = mediapipe

    @property
    def template(self) -> torch.Tensor:
        return self.flame.v_template

    @property
    def n_vertices(self) -> int:
        return int(self.flame.v_template.shape[0])

    def _coeffs(self, params: FlameParams) -> tuple[torch.Tensor, torch.Tensor]:
        shape, expr = params.shape, params.expression
        for name, t, n in (("shape", shape, self.n_shape), ("expression", expr, self.n_expression)):
            if t.shape[-1] > n:
                raise ValueError(f"{name} has {t.shape[-1]} coefficients, the head model has {n}")
        batch = params.batch_size
        shape = torch.nn.functional.pad(shape, (0, self.n_shape - shape.shape[-1])).expand(batch, -1)
        expr = torch.nn.functional.pad(expr, (0, self.n_expression - expr.shape[-1])).expand(batch, -1)
        return shape, expr

    def forward(self, params: FlameParams):
        """smplx FLAMEOutput: vertices (B,V,3), joints (B,5+51,3) (5 skeleton joints then smplx's 51 landmarks)."""
        shape, expr = self._coeffs(params)
        return self.flame(betas=shape, expression=expr, global_orient=params.rotation, neck_pose=params.neck,
                          jaw_pose=params.jaw, leye_pose=params.eyes[:, :3], reye_pose=params.eyes[:, 3:],
                          transl=params.translation)

    __call__ = forward

    def landmark_vertices(self, flame_output) -> torch.Tensor:
        """(B,68,3) landmarks, barycentric on the posed faces of `flame_output.vertices` (B,V,3)."""
        verts = flame_output.vertices if hasattr(flame_output, "vertices") else flame_output
        faces = self.flame.faces_tensor.to(verts.device)[self.landmark_face_idx.to(verts.device)]  # (68,3)
        tri = verts[:, faces]  # (B,68,3,3)
        return torch.einsum("blkd,lk->bld", tri, self.landmark_bary.to(verts))

    def joint_transforms(self, params: FlameParams) -> torch.Tensor:
        """(B,5,4,4) relative LBS transforms (world transform of joint j times the inverse of its rest
        transform), exactly smplx's: posed vertex = sum_j w[v,j] A[j] (v_shaped + pose offsets) + translation.
        The default head has no pose correctives, so there v_shaped alone is exact."""
        from smplx.lbs import batch_rigid_transform, batch_rodrigues

        shape, expr = self._coeffs(params)
        f = self.flame
        v_shaped = f.v_template + torch.einsum("bl,vdl->bvd", torch.cat([shape, expr], -1),
                                               torch.cat([f.shapedirs, f.expr_dirs], -1))
        joints = torch.einsum("jv,bvd->bjd", f.J_regressor, v_shaped)
        pose = torch.cat([params.rotation, params.neck, params.jaw, params.eyes], -1)
        rot = batch_rodrigues(pose.reshape(-1, 3)).view(params.batch_size, -1, 3, 3)
        _, transforms = batch_rigid_transform(rot, joints, f.parents, dtype=v_shaped.dtype)
        return transforms

    def joint_basis(self, shape: torch.Tensor, n_expression: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What `joint_transforms` needs besides the pose, linear in the expression: rest joints for identity
        `shape` (S',) at zero expression (J,3), rest-joint offsets per expression coefficient (J,3,n_expression)
        (zero past the head's own coefficients) and the parents (J,) (parents[0] = -1)."""
        f = self.flame
        beta = torch.zeros(self.n_shape, dtype=f.v_template.dtype)
        width = min(shape.numel(), self.n_shape)
        beta[:width] = shape.reshape(-1)[:width].to(beta.dtype)
        v_shaped = f.v_template + torch.einsum("l,vdl->vd", beta, f.shapedirs)
        joint_expression = torch.zeros(f.J_regressor.shape[0], 3, n_expression, dtype=v_shaped.dtype)
        width = min(n_expression, self.n_expression)
        joint_expression[..., :width] = torch.einsum("jv,vdl->jdl", f.J_regressor, f.expr_dirs[..., :width])
        return f.J_regressor @ v_shaped, joint_expression, f.parents.clone()

    def _at_landmarks(self, per_vertex: torch.Tensor, face_idx: torch.Tensor, bary: torch.Tensor) -> torch.Tensor:
        tri = per_vertex[self.flame.faces_tensor[face_idx]]  # (N,3,...)
        return torch.einsum("lk,lk...->l...", bary.to(per_vertex.dtype), tri)

    def landmark_basis(self, embedding: MeshEmbedding | None = None) -> LandmarkBasis:
        """The basis at the 68 iBUG landmarks, or at the points of `embedding` (e.g. `self.mediapipe`)."""
        f = self.flame
        if embedding is None:
            face_idx, bary = self.landmark_face_idx, self.landmark_bary
        else:
            face_idx, bary = torch.as_tensor(embedding.face_idx, dtype=torch.long), torch.as_tensor(embedding.bary)
        with torch.no_grad():
            return LandmarkBasis(
                template=self._at_landmarks(f.v_template, face_idx, bary),
                shapedirs=self._at_landmarks(f.shapedirs, face_idx, bary),
                exprdirs=self._at_landmarks(f.expr_dirs, face_idx, bary),
                lbs_weights=self._at_landmarks(f.lbs_weights, face_idx, bary),
                joint_template=f.J_regressor @ f.v_template,
                joint_shapedirs=torch.einsum("jv,vdl->jdl", f.J_regressor, f.shapedirs),
                joint_exprdirs=torch.einsum("jv,vdl->jdl", f.J_regressor, f.expr_dirs),
                parents=f.parents.clone())


def load_head(path: str | os.PathLike | None = None, landmark_path: str | os.PathLike | None = None, *,
              n_shape: int | None = None, n_expression: int | None = None,
              dtype: torch.dtype = torch.float32, mediapipe_path: str | os.PathLike | None = None) -> HeadModel:
    """The head model: the embedded default when `path` is None, else a user's FLAME 2020/2023 file
    (or a folder holding generic_model.pkl / flame2023.pkl). `landmark_path` overrides the 68-point
    embedding (default: next to the model); `mediapipe_path` the MediaPipe embedding (default:
    mediapipe_landmark_embedding.npz next to the model, if there). n_shape/n_expression cap the coefficient
    counts (default: all meaningful ones; 300/100 for FLAME). Missing or malformed files raise InputError."""
    if path is None:
        head = _load_default(landmark_path, n_shape, n_expression, dtype)
        folder = DEFAULT_HEAD_DIR
    else:
        head = _load_user(Path(path), landmark_path, n_shape, n_expression, dtype)
        folder = Path(head.source).parent
    if mediapipe_path is not None or (folder / MEDIAPIPE_EMBEDDING_FILE).is_file():
        head.mediapipe = read_mediapipe_embedding(Path(mediapipe_path or folder / MEDIAPIPE_EMBEDDING_FILE),
                                                  len(head.faces))
    return head


def _make_flame(folder: Path, ext: str, n_shape: int, n_expression: int, dtype: torch.dtype):
    import smplx

    return smplx.FLAME(model_path=str(folder), ext=ext, num_betas=n_shape, num_expression_coeffs=n_expression,
                       batch_size=1, dtype=dtype)


def _load_default(landmark_path, n_shape, n_expression, dtype) -> HeadModel:
    model = DEFAULT_HEAD_DIR / DEFAULT_MODEL_FILE
    if not model.is_file():
        raise InputError(f"embedded head model missing: {model}; regenerate it with "
                         f"`python -m engine.train.head_builder --out {DEFAULT_HEAD_DIR}`")
    with np.load(model) as data:
        meaningful_s, meaningful_e = int(data["n_shape"]), int(data["n_expression"])
        shape_names = [str(x) for x in data["shape_names"]]
        expr_names = [str(x) for x in data["expression_names"]]
        part = np.asarray(data["part"], dtype=np.int64)
    n_s = meaningful_s if n_shape is None else min(n_shape, meaningful_s)
    n_e = meaningful_e if n_expression is None else min(n_expression, meaningful_e)
    flame = _make_flame(DEFAULT_HEAD_DIR, "npz", n_s, n_e, dtype)
    lmk_f, lmk_b = read_landmarks(Path(landmark_path) if landmark_path else DEFAULT_HEAD_DIR / DEFAULT_LANDMARK_FILE)
    _check_landmarks(lmk_f, lmk_b, len(flame.faces), landmark_path or DEFAULT_LANDMARK_FILE)
    return HeadModel(flame, lmk_f, lmk_b, shape_names=shape_names[:n_s], expression_names=expr_names[:n_e],
                     part=part, source="embedded default head")


def _find_user_model(path: Path) -> Path:
    if path.is_dir():
        for name in USER_MODEL_NAMES:
            if (path / name).is_file():
                return path / name
        raise InputError(f"no FLAME model file in {path}: put generic_model.pkl (FLAME 2020) or flame2023.pkl "
                         f"there ({FLAME_HELP})")
    if not path.is_file():
        raise InputError(f"FLAME model file not found: {path}; {FLAME_HELP} (generic_model.pkl or flame2023.pkl)")
    return path


def _find_user_landmarks(model: Path, landmark_path) -> Path:
    if landmark_path is not None:
        p = Path(landmark_path)
        if not p.is_file():
            raise InputError(f"landmark embedding file not found: {p}; pass landmark_embedding.npy (DECA/EMOCA "
                             f"layout) or a 68-point landmarks_68.npz")
        return p
    for name in USER_LANDMARK_NAMES:
        if (model.parent / name).is_file():
            return model.parent / name
    raise InputError(f"no landmark embedding next to {model}: put landmark_embedding.npy (DECA/EMOCA layout) "
                     f"in {model.parent} or pass its path as landmark_path")


def _load_user(path: Path, landmark_path, n_shape, n_expression, dtype) -> HeadModel:
    model = _find_user_model(path)
    lmk_file = _find_user_landmarks(model, landmark_path)
    lmk_f, lmk_b = read_landmarks(lmk_file)
    n_s = 300 if n_shape is None else n_shape
    n_e = 100 if n_expression is None else n_expression
    with tempfile.TemporaryDirectory(prefix="flame-") as tmp:
        folder = Path(tmp)
        # smplx reads FLAME_<GENDER>.pkl and flame_static_embedding.pkl from one folder.
        try:
            os.symlink(model.resolve(), folder / "FLAME_NEUTRAL.pkl")
        except OSError:
            (folder / "FLAME_NEUTRAL.pkl").write_bytes(model.read_bytes())
        with open(folder / "flame_static_embedding.pkl", "wb") as fh:
            pickle.dump({"lmk_face_idx": lmk_f[17:], "lmk_b_coords": lmk_b[17:]}, fh)
        try:
            flame = _make_flame(folder, "pkl", n_s, n_e, dtype)
        except (pickle.UnpicklingError, EOFError, KeyError, AttributeError, ValueError, ImportError) as err:
            raise InputError(f"cannot read FLAME model {model}: {type(err).__name__}: {err}; "
                             f"expected FLAME 2020 generic_model.pkl or flame2023.pkl") from None
    _check_landmarks(lmk_f, lmk_b, len(flame.faces), lmk_file)
    return HeadModel(flame, lmk_f, lmk_b, shape_names=[f"shape_{i:03d}" for i in range(flame.num_betas)],
                     expression_names=[f"expression_{i:03d}" for i in range(flame.num_expression_coeffs)],
                     part=None, source=str(model))


def _load_any(path: Path) -> dict:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as d:
                return {k: d[k] for k in d.files}
        if path.suffix == ".npy":
            obj = np.load(path, allow_pickle=True, encoding="latin1")
            return obj[()] if obj.dtype == object else {}
        with open(path, "rb") as fh:
            return pickle.load(fh, encoding="latin1")
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise InputError(f"cannot read landmark embedding {path}: {type(err).__name__}: {err}") from None


def read_landmarks(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """68-point embedding (face ids (68,), barycentrics (68,3)) from any supported landmark file."""
    if not path.is_file():
        raise InputError(f"landmark embedding file not found: {path}")
    d = _load_any(path)
    if not isinstance(d, dict):
        raise InputError(f"landmark embedding {path} is not a dict of arrays")

    def arr(key, dt):
        return np.asarray(d[key], dtype=dt)

    if "full_lmk_faces_idx" in d:
        faces = arr("full_lmk_faces_idx", np.int64).reshape(-1)
        bary = arr("full_lmk_bary_coords", np.float64).reshape(-1, 3)
        if len(faces) == 70:  # "with eyes" layout: the 68 iBUG points, then one per eye (not used by the tracker)
            faces, bary = faces[:68], bary[:68]
        return faces, bary
    if "static_lmk_faces_idx" in d and "dynamic_lmk_faces_idx" in d:
        static_f, static_b = arr("static_lmk_faces_idx", np.int64).reshape(-1), arr("static_lmk_bary_coords",
                                                                                   np.float64).reshape(-1, 3)
        dyn_f = arr("dynamic_lmk_faces_idx", np.int64)[FRONTAL_CONTOUR_ROW]
        dyn_b = arr("dynamic_lmk_bary_coords", np.float64)[FRONTAL_CONTOUR_ROW]
        return np.concatenate([dyn_f, static_f]), np.concatenate([dyn_b, static_b])
    if "lmk_face_idx" in d:
        f, b = arr("lmk_face_idx", np.int64).reshape(-1), arr("lmk_b_coords", np.float64).reshape(-1, 3)
        if len(f) == 51:
            dyn = path.parent / "flame_dynamic_embedding.npy"
            if not dyn.is_file():
                raise InputError(f"{path} holds the 51 inner landmarks only: put flame_dynamic_embedding.npy next "
                                 f"to it for the jawline, or pass a 68-point landmark_embedding.npy")
            dd = _load_any(dyn)
            dyn_f = np.asarray(dd["lmk_face_idx"], dtype=np.int64)[FRONTAL_CONTOUR_ROW]
            dyn_b = np.asarray(dd["lmk_b_coords"], dtype=np.float64)[FRONTAL_CONTOUR_ROW]
            return np.concatenate([dyn_f, f]), np.concatenate([dyn_b, b])
        return f, b
    raise InputError(f"landmark embedding {path} has none of the known keys (full_lmk_faces_idx, "
                     f"static_/dynamic_lmk_faces_idx, lmk_face_idx)")


def read_mediapipe_embedding(path: Path, n_faces: int) -> MeshEmbedding:
    """A MediaPipe face-mesh embedding (lmk_face_idx, lmk_b_coords, landmark_indices) checked against the model."""
    d = _load_any(path) if path.is_file() else None
    if d is None:
        raise InputError(f"MediaPipe landmark embedding not found: {path}")
    missing = [k for k in ("lmk_face_idx", "lmk_b_coords", "landmark_indices") if k not in d]
    if missing:
        raise InputError(f"MediaPipe landmark embedding {path} lacks {', '.join(missing)} "
                         f"(expected FLAME's mediapipe_landmark_embedding.npz layout)")
    face_idx = np.asarray(d["lmk_face_idx"], dtype=np.int64).reshape(-1)
    bary = np.asarray(d["lmk_b_coords"], dtype=np.float64).reshape(-1, 3)
    mesh_indices = np.asarray(d["landmark_indices"], dtype=np.int64).reshape(-1)
    if not len(face_idx) == len(bary) == len(mesh_indices) or len(face_idx) < 6:
        raise InputError(f"MediaPipe landmark embedding {path}: lmk_face_idx, lmk_b_coords and landmark_indices "
                         f"must hold the same number (>= 6) of points")
    if face_idx.min() < 0 or face_idx.max() >= n_faces:
        raise InputError(f"MediaPipe landmark embedding {path} refers to faces outside the model's {n_faces} faces")
    if mesh_indices.min() < 0 or mesh_indices.max() >= MEDIAPIPE_MESH_POINTS:
        raise InputError(f"MediaPipe landmark embedding {path}: landmark_indices outside 0..{MEDIAPIPE_MESH_POINTS - 1}")
    return MeshEmbedding(face_idx, bary, mesh_indices)


def _check_landmarks(face_idx: np.ndarray, bary: np.ndarray, n_faces: int, where) -> None:
    if face_idx.shape != (68,) or bary.shape != (68, 3):
        raise InputError(f"landmark embedding {where} must hold 68 points, got {face_idx.shape[0]}")
    if face_idx.min() < 0 or face_idx.max() >= n_faces:
        raise InputError(f"landmark embedding {where} refers to faces outside the model's {n_faces} faces")
