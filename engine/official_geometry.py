"""The official FastAvatar v2 point-query geometry, rebuilt from the user's FLAME 2023 and LAM oral-cavity mesh.

SPEC.md §5: FLAME 2023 (5,023 vertices, 300 shape + 100 expression directions) + 120 teeth vertices built from two
15-vertex outer-lip rings of the template + the oral cavity `oral_jawopen0p5.obj` (321 vertices, 608 faces) =
5,464 vertices and 10,752 faces; one midpoint subdivision gives the 21,675 query points (43,008 faces). The
released checkpoint may carry these buffers as `renderer.flame_model.*`; when it does not, `build_official_geometry`
recomputes them with the official arithmetic (float32, same operation order) so a user with the two asset files
gets the same points.

Known limits (documented, checked where possible):
- FLAME 2020 (`generic_model.pkl`) has the same layout as FLAME 2023 and cannot be told apart from the file; the
  official network was trained on FLAME 2023 geometry, so pass `flame2023.pkl`.
- The official code takes the 9,976 FLAME faces from `head_template_mesh.obj`; we take FLAME's own `f`, which the
  official code notes (a commented-out assert) is the same triangle list.
- The oral mesh is read by `read_obj` (vertices in file order, no merging). trimesh's default processing, which the
  official code uses, would drop unreferenced vertices, merge coincident ones and re-index vertices when `vt`/`vn`
  indices differ from `v` indices; for the official asset none of that changes anything (SPEC.md §5: 321 vertices
  after loading, nothing merged), and we refuse an oral mesh that does not have exactly 321 vertices and 608
  triangles, so a different file cannot silently give different points.
- Bit-exactness with the official buffers cannot be tested here (no FLAME 2023 on this machine); the construction
  follows the official operation order in float32, and the file's own buffers win whenever it has them.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.errors import InputError
from engine.types import FlameParams

#: FLAME geometry buffers used when an official weights file has them (SPEC.md §9)
GEOMETRY_KEYS = ("v_template", "shapedirs", "J_regressor", "parents", "lbs_weights", "faces_up", "v_template_up",
                 "lbs_weights_up", "shapedirs_up")

FLAME_VERTICES = 5023
N_SHAPE = 300
N_EXPRESSION = 100
N_JOINTS = 5
NECK, JAW = 1, 2
TEETH_VERTICES = 120
ORAL_VERTICES, ORAL_FACES = 321, 608

FLAME_HELP = ("FLAME 2023 (flame2023.pkl) comes from https://flame.is.tue.mpg.de (free registration, "
              "'FLAME 2023' download)")
ORAL_HELP = ("oral_jawopen0p5.obj comes with the FastAvatar / LAM assets (Hugging Face TyrionWuY/FastAvatar-assets "
             "or LAM's assets, under human_parametric_models/flame_assets/flame/)")

#: The buffers `build_official_geometry` returns; all but `faces` are `renderer.flame_model.*` checkpoint entries.
GEOMETRY_NAMES = ("v_template", "shapedirs", "J_regressor", "parents", "lbs_weights", "faces", "faces_up",
                  "v_template_up", "lbs_weights_up", "shapedirs_up")

# Teeth (constants.json "teeth"): outer-lip rings of the FLAME template, upper_i faces lower_i.
LIP_RING_UPPER = (1713, 1715, 1716, 1735, 1696, 1694, 1657, 3543, 2774, 2811, 2813, 2850, 2833, 2832, 2830)
LIP_RING_LOWER = (1576, 1577, 1773, 1774, 1795, 1802, 1865, 3503, 2948, 2905, 2898, 2881, 2880, 2713, 2712)
#: the eight 15-vertex blocks in vertex order; `upper*` blocks skin to the neck, `lower*` ones to the jaw
TEETH_BLOCKS = ("upper_root", "lower_root", "upper_edge", "lower_edge", "upper_root_back", "upper_edge_back",
                "lower_root_back", "lower_edge_back")
# Teeth triangles over the 120 teeth vertices (local indices); the combined mesh lists the upper set, then the lower.
TEETH_FACES_UPPER = (
    (0, 31, 30), (0, 1, 31), (1, 32, 31), (1, 2, 32), (2, 33, 32), (2, 3, 33), (3, 34, 33), (3, 4, 34), (4, 35, 34),
    (4, 5, 35), (5, 36, 35), (5, 6, 36), (6, 37, 36), (6, 7, 37), (7, 8, 37), (8, 38, 37), (8, 9, 38), (9, 39, 38),
    (9, 10, 39), (10, 40, 39), (10, 11, 40), (11, 41, 40), (11, 12, 41), (12, 42, 41), (12, 13, 42), (13, 43, 42),
    (13, 14, 43), (14, 44, 43), (60, 75, 76), (60, 76, 61), (61, 76, 77), (61, 77, 62), (62, 77, 78), (62, 78, 63),
    (63, 78, 79), (63, 79, 64), (64, 79, 80), (64, 80, 65), (65, 80, 81), (65, 81, 66), (66, 81, 82), (66, 82, 67),
    (67, 82, 68), (68, 82, 83), (68, 83, 69), (69, 83, 84), (69, 84, 70), (70, 84, 85), (70, 85, 71), (71, 85, 86),
    (71, 86, 72), (72, 86, 87), (72, 87, 73), (73, 87, 88), (73, 88, 74), (74, 88, 89), (75, 30, 76), (76, 30, 31),
    (76, 31, 77), (77, 31, 32), (77, 32, 78), (78, 32, 33), (78, 33, 79), (79, 33, 34), (79, 34, 80), (80, 34, 35),
    (80, 35, 81), (81, 35, 36), (81, 36, 82), (82, 36, 37), (82, 37, 38), (82, 38, 83), (83, 38, 39), (83, 39, 84),
    (84, 39, 40), (84, 40, 85), (85, 40, 41), (85, 41, 86), (86, 41, 42), (86, 42, 87), (87, 42, 43), (87, 43, 88),
    (88, 43, 44), (88, 44, 89),
)
TEETH_FACES_LOWER = (
    (45, 46, 15), (46, 16, 15), (46, 47, 16), (47, 17, 16), (47, 48, 17), (48, 18, 17), (48, 49, 18), (49, 19, 18),
    (49, 50, 19), (50, 20, 19), (50, 51, 20), (51, 21, 20), (51, 52, 21), (52, 22, 21), (52, 23, 22), (52, 53, 23),
    (53, 24, 23), (53, 54, 24), (54, 25, 24), (54, 55, 25), (55, 26, 25), (55, 56, 26), (56, 27, 26), (56, 57, 27),
    (57, 28, 27), (57, 58, 28), (58, 29, 28), (58, 59, 29), (90, 106, 105), (90, 91, 106), (91, 107, 106),
    (91, 92, 107), (92, 108, 107), (92, 93, 108), (93, 109, 108), (93, 94, 109), (94, 110, 109), (94, 95, 110),
    (95, 111, 110), (95, 96, 111), (96, 112, 111), (96, 97, 112), (97, 98, 112), (98, 113, 112), (98, 99, 113),
    (99, 114, 113), (99, 100, 114), (100, 115, 114), (100, 101, 115), (101, 116, 114), (101, 102, 116),
    (102, 117, 116), (102, 103, 117), (103, 118, 117), (103, 104, 118), (104, 119, 118), (105, 106, 45),
    (106, 46, 45), (106, 107, 46), (107, 47, 46), (107, 108, 47), (108, 48, 47), (108, 109, 48), (109, 49, 48),
    (109, 110, 49), (110, 50, 49), (110, 111, 50), (111, 51, 50), (111, 112, 51), (112, 52, 51), (112, 53, 52),
    (112, 113, 53), (113, 54, 53), (113, 114, 54), (114, 55, 54), (114, 115, 55), (115, 56, 55), (115, 116, 56),
    (116, 57, 56), (116, 117, 57), (117, 58, 57), (117, 118, 58), (118, 59, 58), (118, 119, 59),
)


# ------------------------------------------------------------------------------------------------------ reading
def read_obj(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (V,3) float64 and triangles (F,3) int64 of a Wavefront OBJ, in file order.

    Understood: `v x y z [w | r g b]`, `f` with `a`, `a/b`, `a//c`, `a/b/c` references (only the vertex index is
    used) and negative (relative) indices; `#` comments, `vt`/`vn`/`o`/`g`/`s`/`usemtl`/`mtllib` lines are skipped.
    Faces with more than three vertices are refused (InputError): triangulating them would have to pick an order
    trimesh and other readers disagree on, and the official asset is all triangles.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InputError(f"cannot read OBJ file {path}: {exc}") from None
    vertices: list[list[float]] = []
    faces: list[list[int]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] == "v":
            try:
                vertices.append([float(w) for w in words[1:4]])
            except ValueError:
                raise InputError(f"{path}:{number}: bad vertex line {raw.strip()!r}") from None
            if len(vertices[-1]) != 3:
                raise InputError(f"{path}:{number}: a vertex needs three coordinates: {raw.strip()!r}")
        elif words[0] == "f":
            refs = words[1:]
            if len(refs) != 3:
                raise InputError(f"{path}:{number}: face with {len(refs)} vertices; only triangles are read "
                                 "(triangulate the mesh first)")
            face = []
            for ref in refs:
                try:
                    index = int(ref.split("/", 1)[0])
                except ValueError:
                    raise InputError(f"{path}:{number}: bad face reference {ref!r}") from None
                resolved = index - 1 if index > 0 else len(vertices) + index
                if index == 0 or not 0 <= resolved < len(vertices):
                    raise InputError(f"{path}:{number}: face refers to vertex {index}, but only {len(vertices)} "
                                     "vertices are defined before it")
                face.append(resolved)
            faces.append(face)
    return (np.asarray(vertices, dtype=np.float64).reshape(-1, 3), np.asarray(faces, dtype=np.int64).reshape(-1, 3))


def _dense(value) -> np.ndarray:
    """numpy array from a FLAME pickle entry (numpy, chumpy or scipy.sparse)."""
    if "scipy.sparse" in type(value).__module__:  # FLAME's J_regressor; never import scipy just to ask
        value = value.toarray()
    return np.asarray(value)


@dataclass
class FlameAsset:
    """The FLAME arrays the official geometry uses (float32 / int64 torch tensors).

    v_template (5023,3); shapedirs (5023,3,400): 300 shape then 100 expression directions; J_regressor (5,5023);
    lbs_weights (5023,5); parents (5,) with parents[0] = -1; faces (F,3).
    """

    v_template: torch.Tensor
    shapedirs: torch.Tensor
    J_regressor: torch.Tensor
    lbs_weights: torch.Tensor
    parents: torch.Tensor
    faces: torch.Tensor


def read_flame(path: str | os.PathLike) -> FlameAsset:
    """A FLAME 2023 model file: the official chumpy pickle (`flame2023.pkl`) or an .npz with the same keys
    (v_template, shapedirs, J_regressor, weights, kintree_table, f)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"FLAME model file not found: {path}; {FLAME_HELP}")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                raw = {k: data[k] for k in data.files}
        else:
            with open(path, "rb") as fh:
                raw = pickle.load(fh, encoding="latin1")
    except ModuleNotFoundError as exc:
        raise InputError(f"reading {path} needs the '{exc.name}' package (FLAME pickles hold chumpy arrays): "
                         "pip install chumpy") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise InputError(f"cannot read FLAME model {path}: {type(exc).__name__}: {exc}; {FLAME_HELP}") from None
    keys = ("v_template", "shapedirs", "J_regressor", "weights", "kintree_table", "f")
    if not isinstance(raw, dict) or any(k not in raw for k in keys):
        have = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise InputError(f"{path} is not a FLAME model (needs {', '.join(keys)}; has {have}); {FLAME_HELP}")
    v = _dense(raw["v_template"]).astype(np.float32)
    shapedirs = _dense(raw["shapedirs"]).astype(np.float32)
    regressor = _dense(raw["J_regressor"]).astype(np.float32)
    weights = _dense(raw["weights"]).astype(np.float32)
    kintree = _dense(raw["kintree_table"]).astype(np.int64)
    faces = _dense(raw["f"]).astype(np.int64)
    expected = {"v_template": (v.shape, (FLAME_VERTICES, 3)),
                "J_regressor": (regressor.shape, (N_JOINTS, FLAME_VERTICES)),
                "weights": (weights.shape, (FLAME_VERTICES, N_JOINTS))}
    wrong = [f"{k} {got} (FLAME: {want})" for k, (got, want) in expected.items() if tuple(got) != want]
    if shapedirs.ndim != 3 or shapedirs.shape[:2] != (FLAME_VERTICES, 3) or shapedirs.shape[2] < N_SHAPE + N_EXPRESSION:
        wrong.append(f"shapedirs {shapedirs.shape} (FLAME 2023: ({FLAME_VERTICES}, 3, 400))")
    if faces.ndim != 2 or faces.shape[1] != 3 or (faces.size and (faces.min() < 0 or faces.max() >= len(v))):
        wrong.append(f"f {faces.shape} does not index the vertices")
    if kintree.shape != (2, N_JOINTS):
        wrong.append(f"kintree_table {kintree.shape} (FLAME: (2, {N_JOINTS}))")
    if wrong:
        raise InputError(f"{path} is not a FLAME 2023 model: {'; '.join(wrong)}; {FLAME_HELP}")
    parents = torch.as_tensor(kintree[0].copy())
    parents[0] = -1
    # 300 shape + 100 expression directions, as the official model slices them (a file may hold more).
    dirs = np.concatenate([shapedirs[:, :, :N_SHAPE], shapedirs[:, :, 300:300 + N_EXPRESSION]], axis=2)
    return FlameAsset(torch.from_numpy(v), torch.from_numpy(np.ascontiguousarray(dirs)), torch.from_numpy(regressor),
                      torch.from_numpy(weights), parents, torch.from_numpy(faces))


def read_oral_mesh(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """The LAM oral cavity: vertices (321,3) float32, faces (608,3) int64 (local indices)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"oral-cavity mesh not found: {path}; {ORAL_HELP}")
    v, f = read_obj(path)
    if v.shape[0] != ORAL_VERTICES or f.shape[0] != ORAL_FACES:
        raise InputError(f"{path} has {v.shape[0]} vertices and {f.shape[0]} triangles; the official "
                         f"oral_jawopen0p5.obj has {ORAL_VERTICES} and {ORAL_FACES} ({ORAL_HELP})")
    return torch.from_numpy(v).float(), torch.from_numpy(f)


# ----------------------------------------------------------------------------------------------------- building
def build_teeth(v_template: torch.Tensor) -> torch.Tensor:
    """(120,3) teeth vertices from the FLAME template's lip rings, blocks in `TEETH_BLOCKS` order.

    Official construction (float32, same operation order): d = mean |upper_i - lower_i|; middle_i = the rings'
    midpoint with y set to the mean y of all middles and z moved back 1.5 d; edges 0.1 d above/below the middle
    (the lower edge also 0.4 d further back); roots 2 d beyond the edges; back copies 1 d behind.
    """
    up, lo = v_template[list(LIP_RING_UPPER)], v_template[list(LIP_RING_LOWER)]
    d = (up - lo).norm(dim=-1, keepdim=True).mean()
    middle = (up + lo) / 2
    middle[:, 1:2] = middle[:, 1:2].mean(dim=0, keepdim=True)  # the official reduction shape (same rounding)
    middle[:, 2] -= d * 1.5
    zero = torch.zeros((), dtype=v_template.dtype)

    def along(axis: int, amount: torch.Tensor) -> torch.Tensor:
        vec = [zero, zero, zero]
        vec[axis] = amount
        return torch.stack(vec)[None]

    upper_edge = middle + along(1, d) * 0.1
    upper_root = upper_edge + along(1, d) * 2
    lower_edge = middle - along(1, d) * 0.1
    lower_edge = lower_edge - along(2, d) * 0.4
    lower_root = lower_edge - along(1, d) * 2
    thickness = d * 1.0

    def back(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, 2] -= thickness
        return x

    blocks = {"upper_root": upper_root, "lower_root": lower_root, "upper_edge": upper_edge,
              "lower_edge": lower_edge, "upper_root_back": back(upper_root), "upper_edge_back": back(upper_edge),
              "lower_root_back": back(lower_root), "lower_edge_back": back(lower_edge)}
    return torch.cat([blocks[name] for name in TEETH_BLOCKS])


def teeth_block_rows(name: str) -> torch.Tensor:
    """(15,) local indices (0..119) of one teeth block."""
    start = 15 * TEETH_BLOCKS.index(name)
    return torch.arange(start, start + 15)


def build_official_geometry(flame_path: str | os.PathLike,
                            oral_mesh_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The official FLAME geometry buffers (SPEC.md §5) from the user's FLAME 2023 file and LAM oral mesh.

    Returns (float32 unless noted), names as the checkpoint's `renderer.flame_model.*`:
      v_template (5464,3), shapedirs (5464,3,400) [300 shape | 100 expression], J_regressor (5,5464),
      parents (5,) int64, lbs_weights (5464,5), faces (10752,3) int64 [FLAME, upper teeth, lower teeth, oral],
      faces_up (43008,3) int64, v_template_up (21675,3), lbs_weights_up (21675,5), shapedirs_up (21675,3,400).
    Vertex order: FLAME 0..5022, teeth 5023..5142, oral 5143..5463; then one midpoint vertex per unique edge.
    (Counts are for FLAME 2023's 9,976 faces.) Missing or malformed files raise InputError.
    """
    from engine.prompts import subdivide_midpoint

    flame = read_flame(flame_path)
    oral_v, oral_f = read_oral_mesh(oral_mesh_path)
    n_flame, n_oral = flame.v_template.shape[0], oral_v.shape[0]
    n_dirs = N_SHAPE + N_EXPRESSION

    teeth_v = build_teeth(flame.v_template)
    # Teeth follow the lips' identity shape (mean of the ring pair at the same ring position, every block);
    # no expression directions.
    sd = flame.shapedirs
    lip_mean = (sd[list(LIP_RING_UPPER), :, :N_SHAPE] + sd[list(LIP_RING_LOWER), :, :N_SHAPE]) / 2
    teeth_dirs = torch.zeros(TEETH_VERTICES, 3, n_dirs)
    teeth_dirs[:, :, :N_SHAPE] = lip_mean.repeat(len(TEETH_BLOCKS), 1, 1)
    teeth_w = torch.zeros(TEETH_VERTICES, N_JOINTS)
    for name in TEETH_BLOCKS:
        teeth_w[teeth_block_rows(name), NECK if name.startswith("upper") else JAW] = 1.0
    oral_w = torch.zeros(n_oral, N_JOINTS)
    oral_w[:, NECK] = 1.0

    v_template = torch.cat([flame.v_template, teeth_v, oral_v])
    shapedirs = torch.cat([flame.shapedirs, teeth_dirs, torch.zeros(n_oral, 3, n_dirs)])
    lbs_weights = torch.cat([flame.lbs_weights, teeth_w, oral_w])
    regressor = torch.cat([flame.J_regressor, torch.zeros(N_JOINTS, TEETH_VERTICES + n_oral)], dim=1)
    teeth_f = torch.tensor(TEETH_FACES_UPPER + TEETH_FACES_LOWER, dtype=torch.long) + n_flame
    faces = torch.cat([flame.faces, teeth_f, oral_f + n_flame + TEETH_VERTICES])

    v_up, faces_up, attrs = subdivide_midpoint(v_template, faces, {"shapedirs": shapedirs, "lbs_weights": lbs_weights})
    return {"v_template": v_template, "shapedirs": shapedirs, "J_regressor": regressor, "parents": flame.parents,
            "lbs_weights": lbs_weights, "faces": faces, "faces_up": faces_up.long(), "v_template_up": v_up,
            "lbs_weights_up": attrs["lbs_weights"], "shapedirs_up": attrs["shapedirs"]}


def resolve_official_geometry(file_geometry: dict[str, torch.Tensor], flame_path=None, oral_mesh_path=None, *,
                              source: str = "the weights file") -> tuple[dict[str, torch.Tensor], str]:
    """The geometry to use with official weights, and where it came from ("file", "rebuilt", "rebuilt+file").

    The file's buffers win (as in the official runner, which loads them over the asset-built ones); with all of
    them present the assets are not needed. Otherwise the buffers are rebuilt from `flame_path` + `oral_mesh_path`
    and any the file does hold replace the rebuilt ones. Neither -> InputError naming what is missing.
    """
    missing = [k for k in GEOMETRY_KEYS if k not in file_geometry]
    if not missing:
        return dict(file_geometry), "file"
    helps = {"flame_path": FLAME_HELP, "oral_mesh_path": ORAL_HELP}
    needed = [name for name, p in (("flame_path", flame_path), ("oral_mesh_path", oral_mesh_path)) if p is None]
    if needed:
        raise InputError(f"{source} lacks the FLAME geometry buffers renderer.flame_model.{{{','.join(missing)}}}; "
                         f"to rebuild them pass {' and '.join(needed)} ("
                         + "; ".join(helps[n] for n in needed) + ")")
    geometry = build_official_geometry(flame_path, oral_mesh_path)
    geometry.update(file_geometry)
    return geometry, ("rebuilt+file" if file_geometry else "rebuilt")


# ---------------------------------------------------------------------------------------------------- animation
class OfficialRig:
    """Joint transforms for animating official-geometry Gaussians (SPEC.md §8 step 1), from the non-subdivided
    5,464-vertex buffers: v_shaped = v_template + shapedirs·[shape, expression], J = J_regressor·v_shaped (teeth
    and oral columns are 0), Rodrigues of [rotation, neck, jaw, eyes], the FLAME rigid chain. No pose correctives.

    Duck-types the part of `engine.head.HeadModel` that `GaussianSet.to_world` uses (`joint_transforms`,
    `n_shape`, `n_expression`); landmark fitting needs a real HeadModel (`engine.load_head(flame2023.pkl)`).
    """

    def __init__(self, v_template: torch.Tensor, shapedirs: torch.Tensor, J_regressor: torch.Tensor,
                 parents: torch.Tensor, n_shape: int = N_SHAPE):
        self.v_template = v_template.float()
        self.shapedirs = shapedirs.float()
        self.J_regressor = J_regressor.float()
        self.parents = parents.long()
        self.n_shape = int(n_shape)
        self.n_expression = int(shapedirs.shape[-1]) - self.n_shape

    @classmethod
    def from_geometry(cls, geometry: dict[str, torch.Tensor], n_shape: int = N_SHAPE) -> "OfficialRig":
        return cls(geometry["v_template"], geometry["shapedirs"], geometry["J_regressor"], geometry["parents"],
                   n_shape)

    def joint_basis(self, shape: torch.Tensor, n_expression: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rest joints for identity `shape` (S',) at zero expression (J,3), rest-joint offsets per expression
        coefficient (J,3,n_expression) (zero past the geometry's own) and the parents (J,): see HeadModel."""
        beta = torch.zeros(self.n_shape)
        width = min(shape.numel(), self.n_shape)
        beta[:width] = shape.reshape(-1)[:width].float()
        v_shaped = self.v_template + torch.einsum("l,vdl->vd", beta, self.shapedirs[..., : self.n_shape])
        joint_expression = torch.zeros(self.J_regressor.shape[0], 3, n_expression)
        used = min(n_expression, self.n_expression)
        joint_expression[..., :used] = torch.einsum("jv,vdl->jdl", self.J_regressor,
                                                    self.shapedirs[..., self.n_shape:self.n_shape + used])
        return self.J_regressor @ v_shaped, joint_expression, self.parents.clone()

    def joint_transforms(self, params: FlameParams) -> torch.Tensor:
        """(B,5,4,4) relative transforms: posed point = sum_j w[p,j] A[j] (rest point) (+ translation, by caller)."""
        from smplx.lbs import batch_rigid_transform, batch_rodrigues

        b = params.batch_size
        coeffs = []
        for name, t, n in (("shape", params.shape, self.n_shape), ("expression", params.expression,
                                                                    self.n_expression)):
            if t.shape[-1] > n:
                raise ValueError(f"{name} has {t.shape[-1]} coefficients, the official geometry has {n}")
            coeffs.append(torch.nn.functional.pad(t, (0, n - t.shape[-1])).expand(b, -1))
        device = params.rotation.device
        dirs, template = self.shapedirs.to(device), self.v_template.to(device)
        v_shaped = template + torch.einsum("bl,vdl->bvd", torch.cat(coeffs, -1).to(dirs), dirs)
        joints = torch.einsum("jv,bvd->bjd", self.J_regressor.to(device), v_shaped)
        pose = torch.cat([params.rotation, params.neck, params.jaw, params.eyes], -1).to(dirs)
        rot = batch_rodrigues(pose.reshape(-1, 3)).view(b, -1, 3, 3)
        _, transforms = batch_rigid_transform(rot, joints, self.parents.to(device), dtype=v_shaped.dtype)
        return transforms
