"""Training the LGRT with the paper's method (§3.3, appendix C): sliced fusion, landmark tracking, pruning.

One step, per sample: draw 1..16 input views and `n_targets` disjoint target views (plus up to `max_pool`
FramePack extras from the remaining views), run the network, then
- sliced fusion: one random single-slot Gaussian set g_i and one fused set g_sliced of N_sliced < N random base
  slots plus the FramePack slot (`sliced_fusion=False`, an ablation: one set of all slots fused instead); both
  are animated with every input and target view's FLAME parameters and rendered with its camera, soft
  stochastic pruning on (SPEC §8, training mode); with `fusion="visibility"` (default) the fused set is
  weighted the way the daemon fuses (engine.fusion: each anchor's copies share its coverage by how squarely their
  frames saw it); the network's inputs (guidance, projected point features, view weights) come from the sample's
  views through the same `engine.reconstruct.network_inputs` the daemon uses (`forward_views`);
- photometric terms (L1, 1-SSIM, LPIPS if its files are present) of both renders against the plain-background
  targets; landmark tracking loss (engine.losses); offset and pruning regularizers over all slots.
AdamW (betas 0.9/0.95, weight decay 1e-3 as the official config) with a cosine schedule; bf16 autocast and
gradient checkpointing on CUDA; DDP through torchrun (env:// rendezvous, gloo on CPU, nccl on CUDA), each rank
drawing its own shard of the data; resume from `trainer_state.pt` in the output directory.

Output directory = a checkpoint `engine.checkpoints.load_checkpoint` accepts (model.safetensors + model.json)
plus `trainer_state.pt` (optimizer, schedule, step), `train_log.csv` and `validation/*.png` grids.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine import losses as L
from engine.errors import InputError
from engine.gaussians import GaussianSet
from engine.reconstruct import forward, network_inputs, slot_sets
from engine.train.samples import HeadSample

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
VALIDATION_FRAMES = (1, 4, 8, 16)


@dataclass
class TrainConfig:
    """Everything that decides a training run (saved in the checkpoint metadata)."""

    model: str = "tiny"
    data: str = "synthetic"            # "synthetic" or the root of an official-layout capture tree
    steps: int = 1000
    batch: int = 1                     # samples per step per rank
    lr: float = 3e-4                   # paper: 4e-5 fine-tuning a pretrained 1B model; tiny trains from scratch
    weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 20
    resolution: int = 64               # render/target size in px (inputs are rendered at it too)
    seed: int = 0
    n_identities: int = 500            # training people (synthetic)
    groups_per_identity: int = 1000
    sampler: str = "mixed"             # "video", "multiview" or "mixed"
    background: str = "mixed"          # synthetic input backgrounds: "plain", "textured", "mixed"
    n_views: int = 20                  # views per sample (multiview keeps at most 12)
    n_targets: int = 4
    max_inputs: int = 16
    max_pool: int = 4                  # FramePack extras drawn from views that are neither inputs nor targets
    n_sliced_max: int = 15             # paper: N_sliced < N (N <= 16)
    sliced_fusion: bool = True         # False (ablation): one render of all slots fused instead of single + sliced
    loss_weights: dict = field(default_factory=dict)   # overrides of engine.losses.LossWeights
    val_every: int = 200
    val_identities: int = 2
    checkpoint_every: int = 0          # 0: at every validation and at the end
    grad_checkpointing: bool | None = None   # None: on for CUDA
    render_backend: str = "auto"
    num_workers: int = 0
    prompt_levels: int = 1
    cache_samples: int = 0             # >0: train on this many distinct samples, rendered once and kept in memory
    init_from: str = ""                # checkpoint folder to start from (modules it lacks keep their fresh init)
    fusion: str = "visibility"         # "visibility": fused renders weight copies by how well their frame saw
                                       # the anchor (engine.fusion.view_weights); "concat": plain concatenation

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


# -- point prompts for a model -------------------------------------------------------------------------------------
def model_prompts(head, n_points: int, levels: int = 1):
    """The point prompts a model with `n_points` queries uses, and their indices into the full prompt set:
    the same farthest-point subset `engine.avatar_model.AvatarModel` rebuilds at inference (stored in the
    checkpoint metadata as `point_index`)."""
    from engine.avatar_model import farthest_point_indices
    from engine.prompts import build_point_prompts

    full = build_point_prompts(head, levels=levels)
    idx = farthest_point_indices(full.v_template, n_points)
    return full.subset(idx), idx


def forward_views(net, cfg, sample: HeadSample, inputs: list[int], prompts, head, fusion: str,
                  pool_images: torch.Tensor | None = None):
    """Run `net` (config `cfg`) on views `inputs` of `sample` through the runtime's one path
    (engine.reconstruct.network_inputs -> forward); returns the GaussianHeadOutput (batch of one) and the (S,P)
    `seen` of its slots when `fusion` is "visibility" (else None), ready for `slot_set`.
    pool_images: (F,3,H,W) FramePack extras or None."""
    views = sample.views(inputs)
    net_inputs = network_inputs(cfg, prompts, head, views, fusion)
    out = forward(net, views.images, prompts.canonical(sample.flame.shape[:1])[0], net_inputs, pool_images)
    return out, net_inputs.seen


def slot_set(out, slots: list[int], seen: torch.Tensor | None = None) -> GaussianSet:
    """The chosen slots of a GaussianHeadOutput (batch item 0) as one canonical set, each Gaussian tagged with its
    slot index; `seen` as in engine.reconstruct.slot_sets."""
    return GaussianSet.fuse(slot_sets(out, slots, slots, seen))


# -- gradient checkpointing ----------------------------------------------------------------------------------------
def enable_gradient_checkpointing(model: torch.nn.Module) -> int:
    """Recompute the activations of every transformer block in the backward pass; returns how many blocks.

    Wraps the `forward` of the attention blocks (global, joint and encoder blocks) on this instance only.
    """
    from torch.utils.checkpoint import checkpoint

    from engine.model.attention import GlobalBlock, JointBlock

    kinds: tuple[type, ...] = (GlobalBlock, JointBlock)
    try:
        from engine.model.dinov2 import Block as EncoderBlock  # type: ignore[attr-defined]

        kinds = kinds + (EncoderBlock,)
    except ImportError:
        pass
    count = 0
    for module in model.modules():
        if isinstance(module, kinds) and not getattr(module, "_fa_checkpointed", False):
            original = module.forward

            def wrapped(*args, _orig=original, **kwargs):
                if torch.is_grad_enabled():
                    return checkpoint(_orig, *args, use_reentrant=False, **kwargs)
                return _orig(*args, **kwargs)

            module.forward = wrapped
            module._fa_checkpointed = True
            count += 1
    return count


# -- rendering -----------------------------------------------------------------------------------------------------
def render_set(gs: GaussianSet, prompts, head, sample: HeadSample, *, soft_prune: bool,
               generator: torch.Generator | None, backend: str, background: torch.Tensor | None = None,
               hard_prune: bool = False) -> torch.Tensor:
    """Animate `gs` with every view of `sample` and render it: (V,H,W,3) on the views' plain backgrounds."""
    from engine.render import render

    if hard_prune:
        gs = gs.prune(0.0)
    world = gs.to_world(prompts, head, sample.flame)
    opac = world["opacities"]
    if soft_prune:
        opac = L.soft_prune_opacity(opac, gs.importance.unsqueeze(0).expand_as(opac), generator)
    cams = sample.cameras
    bg = sample.bg_colors if background is None else background.expand(cams.viewmats.shape[0], 3)
    return render(world["means"], world["quats"], world["scales"], opac, world["colors"], cams.viewmats, cams.Ks,
                  cams.width, cams.height, backend=backend, background=bg)["rgb"]


class SampleCache(torch.utils.data.Dataset):
    """`n` samples spread evenly over `base`, each rendered on first use and then kept in memory.

    On a CPU the synthetic renders cost about as much as a training step; a fixed pool of samples, each seen
    many times with fresh random input/target splits, halves the step time.
    """

    def __init__(self, base, n: int) -> None:
        self.base = base
        self.indices = [i * len(base) // n for i in range(min(n, len(base)))]
        self._cache: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        if i not in self._cache:
            self._cache[i] = self.base[self.indices[i]]
        return self._cache[i]


# -- the trainer ---------------------------------------------------------------------------------------------------
class Trainer:
    """Trains one model on one dataset; `fit()` runs to `cfg.steps`. See the module docstring."""

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, *, command: str = "", resume: bool = False,
                 model_config=None, head=None, prompts=None, progress: bool = True):
        from engine.model import build_model, get_config

        from engine.fusion import check_fusion

        try:
            check_fusion(cfg.fusion)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        self.cfg, self.out_dir, self.command, self.progress = cfg, Path(out_dir), command, progress
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if head is None:
            from engine.head import load_head

            head = load_head()
        self.head = head
        self.head = self.head.to(self.device) if hasattr(self.head, "to") else self.head
        mcfg = model_config if model_config is not None else get_config(cfg.model)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = build_model(mcfg).to(self.device)
        self.model_config = mcfg
        if cfg.init_from:
            # a model built without global blocks (the ablation) deliberately leaves those tensors unused
            unused = () if mcfg.global_attention else ("transformer.global_attn_layers.",)
            self.initialised_from = init_weights_from(self.model, cfg.init_from, allow_unused=unused)
        if prompts is None:
            self.prompts, self.prompt_indices = model_prompts(self.head, mcfg.n_points, cfg.prompt_levels)
        else:
            self.prompts, self.prompt_indices = prompts, None
        self.prompts = self.prompts.to(self.device) if hasattr(self.prompts, "to") else self.prompts
        self.anchors = self._landmark_anchors()
        use_ckpt = cfg.grad_checkpointing if cfg.grad_checkpointing is not None else self.device.type == "cuda"
        if use_ckpt:
            enable_gradient_checkpointing(self.model)
        self.weights = L.LossWeights.from_overrides(cfg.loss_weights)
        self.lpips = L.LPIPS.from_local() if self.weights.lpips > 0 else None
        if self.lpips is not None:
            self.lpips = self.lpips.to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.ddp_model = (torch.nn.parallel.DistributedDataParallel(self.model, find_unused_parameters=True)
                          if self.distributed else self.model)
        self.step = 0
        self.wall_s = 0.0
        self.validation: dict = {}
        self.train_set, self.val_sets = self._datasets()
        if resume:
            self._load_state()

    # -- setup --
    def _lr_factor(self, step: int) -> float:
        warm = self.cfg.warmup_steps
        if warm and step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, self.cfg.steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def _landmark_anchors(self) -> torch.Tensor:
        from engine.types import FlameParams

        params = FlameParams.zeros(1, int(self.head.n_shape), int(self.head.n_expression), device=self.device)
        with torch.no_grad():
            lmk = self.head.landmark_vertices(self.head.forward(params))[0]
            canonical = self.prompts.canonical(params.shape)[0]
        return L.landmark_anchors(canonical, lmk)

    def _datasets(self):
        cfg = self.cfg
        if cfg.data == "synthetic":
            from engine.train.synthetic import SyntheticConfig, make_dataset

            train = make_dataset(cfg.seed, "train", cfg.n_identities, cfg.sampler, cfg.resolution,
                                 groups_per_identity=cfg.groups_per_identity, head=self.head,
                                 config=SyntheticConfig(n_views=cfg.n_views, background=cfg.background),
                                 render_backend=cfg.render_backend)
            if cfg.cache_samples > 0:
                train = SampleCache(train, cfg.cache_samples)
            # validation: 16 inputs + targets need more than 12 cameras, so the multiview set may use 20
            val_cfg = SyntheticConfig(n_views=max(VALIDATION_FRAMES) + cfg.n_targets, background="plain",
                                      max_cameras=max(VALIDATION_FRAMES) + cfg.n_targets)
            vals = {s: make_dataset(cfg.seed, "validation", cfg.val_identities, s, cfg.resolution, head=self.head,
                                    config=val_cfg, render_backend=cfg.render_backend)
                    for s in ("video", "multiview")}
            return train, vals
        from engine.train.real_data import RealCaptureDataset, find_sequences

        persons = sorted({s.person for s in find_sequences(cfg.data)})
        n_val = max(1, len(persons) // 10) if len(persons) > 1 else 0
        kw = dict(n_shape=int(self.head.n_shape), n_expression=int(self.head.n_expression),
                  resolution=cfg.resolution, seed=cfg.seed)
        sampler = "video" if cfg.sampler == "mixed" else cfg.sampler
        train = RealCaptureDataset(cfg.data, sampler=sampler, n_views=cfg.n_views, persons=persons[n_val:] or persons,
                                   **kw)
        vals = {"video": RealCaptureDataset(cfg.data, sampler="video", n_views=max(VALIDATION_FRAMES) + cfg.n_targets,
                                            persons=persons[:n_val] or persons, **kw)}
        return train, vals

    # -- one step --
    def _split_views(self, n_views: int, gen: torch.Generator) -> tuple[list[int], list[int], list[int]]:
        cfg = self.cfg
        n_targets = min(cfg.n_targets, max(1, n_views - 1))
        order = torch.randperm(n_views, generator=gen).tolist()
        max_in = max(1, min(cfg.max_inputs, n_views - n_targets))
        n_in = int(torch.randint(1, max_in + 1, (1,), generator=gen))
        inputs, targets = order[:n_in], order[n_in:n_in + n_targets]
        rest = order[n_in + n_targets:]
        n_pool = int(torch.randint(0, min(cfg.max_pool, len(rest)) + 1, (1,), generator=gen)) if rest else 0
        return inputs, targets, rest[:n_pool]

    def sample_loss(self, sample: HeadSample, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """All loss terms of one sample (the total under "loss")."""
        sample = sample.to(self.device)
        inputs, targets, pool = self._split_views(sample.n_views, gen)
        pool_images = sample.images[pool] if pool else None
        out, seen = forward_views(self.ddp_model, self.model_config, sample, inputs, self.prompts, self.head,
                                  self.cfg.fusion, pool_images)
        n_base = out.xyz.shape[1] - 1
        if self.cfg.sliced_fusion:
            single, sliced = L.sliced_selection(n_base, self.cfg.n_sliced_max, gen)
            renders = (("single", [single]), ("sliced", sliced + [n_base]))
        else:  # ablation: supervise only the full fusion, so no slot has to stand on its own
            renders = (("fused", list(range(n_base + 1))),)
        views = sample.select(inputs + targets)
        w = self.weights
        terms: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=self.device)
        for name, slots in renders:
            pred = render_set(slot_set(out, slots, seen), self.prompts, self.head, views, soft_prune=True,
                              generator=gen, backend=self.cfg.render_backend)
            tgt = views.targets.permute(0, 2, 3, 1)
            img = L.image_losses(pred, tgt, w, self.lpips)
            for k, v in img.items():
                terms[f"{k}_{name}"] = v.detach()
                total = total + getattr(w, k) * v
            if name != "single":
                terms["_pred"], terms["_target"] = pred.detach(), tgt
        # landmark tracking: each base slot's landmark-anchor Gaussians posed and projected into every input view
        if w.track > 0:
            gs = slot_set(out, list(range(n_base)))
            anchor_idx = (torch.arange(n_base, device=self.device)[:, None] * out.xyz.shape[2]
                          + self.anchors[None]).reshape(-1)
            lmk_set = gs.select(anchor_idx)
            inp = sample.select(inputs)
            means = lmk_set.to_world(self.prompts, self.head, inp.flame)["means"]    # (N, n_base*68, 3)
            uv = L.project_points(means, inp.cameras.viewmats, inp.cameras.Ks)
            obs = inp.landmarks[:, None].expand(-1, n_base, -1, -1).reshape(len(inputs), -1, 3)
            track = L.landmark_tracking_loss(uv, obs, inp.cameras.width)
            terms["track"] = track.detach()
            total = total + w.track * track
        off = L.offset_regularizer(out.offset[0])
        prune = L.pruning_regularizer(out.importance[0])
        terms["offset"], terms["mask"] = off.detach(), prune.detach()
        total = total + w.offset * off + w.mask * prune
        terms["loss"] = total
        terms["n_inputs"] = torch.tensor(float(len(inputs)))
        return terms

    def train_step(self, batch: list[HeadSample]) -> dict[str, float]:
        self.model.train()
        gen = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + self.rank) * 10_000_019 + self.step)
        self.optimizer.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        for sample in batch:
            terms = self.sample_loss(sample, gen)
            (terms["loss"] / len(batch)).backward()
            for k, v in terms.items():
                if not k.startswith("_"):
                    logs[k] = logs.get(k, 0.0) + float(v.detach()) / len(batch)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return logs

    # -- data order --
    def _indices(self):
        """Endless per-rank index stream: epoch-seeded permutation, rank r takes every world-th item."""
        n = len(self.train_set)
        per_step = self.cfg.batch * self.world
        start = self.step * per_step
        epoch = start // n
        while True:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch)).tolist()
            offset = start - epoch * n
            for i in range(offset, n):
                if i % self.world == self.rank:
                    yield perm[i]
            epoch += 1
            start = epoch * n

    def _batches(self):
        it = self._indices()
        while True:
            yield [self.train_set[next(it)] for _ in range(self.cfg.batch)]

    # -- validation --
    @torch.no_grad()
    def validate(self, save_png: bool = True) -> dict:
        """PSNR of the fully fused, hard-pruned avatar on held-out views, per number of input frames."""
        self.model.eval()
        result: dict = {}
        grids = []
        for name, ds in self.val_sets.items():
            per_n: dict[str, list[float]] = {str(n): [] for n in VALIDATION_FRAMES}
            for i in range(len(ds)):
                sample = ds[i].to(self.device)
                order = torch.randperm(sample.n_views, generator=torch.Generator().manual_seed(1000 + i)).tolist()
                n_t = min(self.cfg.n_targets, sample.n_views - 1)
                targets, pool = order[:n_t], order[n_t:]
                tgt_views = sample.select(targets)
                for n in VALIDATION_FRAMES:
                    if n > len(pool):
                        continue
                    inputs = pool[:n]
                    out, seen = forward_views(self.model, self.model_config, sample, inputs, self.prompts,
                                              self.head, self.cfg.fusion)
                    gs = slot_set(out, list(range(out.xyz.shape[1])), seen)
                    pred = render_set(gs, self.prompts, self.head, tgt_views, soft_prune=False, generator=None,
                                      backend=self.cfg.render_backend, hard_prune=True).clamp(0, 1)
                    tgt = tgt_views.targets.permute(0, 2, 3, 1)
                    per_n[str(n)].append(float(L.psnr(pred, tgt).mean()))
                    if i == 0 and save_png:
                        grids.append((f"{name} n={n}", sample.images[inputs[:4]].permute(0, 2, 3, 1), pred, tgt))
            result[name] = {k: float(np.mean(v)) for k, v in per_n.items() if v}
        keys = sorted({k for r in result.values() for k in r}, key=int)
        result["psnr"] = {k: float(np.mean([r[k] for r in result.values() if k in r])) for k in keys}
        if save_png and self.rank == 0 and grids:
            self._save_grid(grids)
        self.model.train()
        return result

    def _save_grid(self, grids) -> None:
        from PIL import Image

        rows = []
        for _, inputs, pred, tgt in grids:
            h, w = pred.shape[1:3]
            cells = [F.interpolate(x.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=False)
                     .permute(0, 2, 3, 1) for x in (inputs,)]
            row = torch.cat([torch.cat(list(cells[0]), dim=1), torch.cat(list(pred), dim=1),
                             torch.cat(list(tgt), dim=1)], dim=1)
            rows.append(row)
        width = max(r.shape[1] for r in rows)
        rows = [F.pad(r, (0, 0, 0, width - r.shape[1])) for r in rows]
        img = (torch.cat(rows, dim=0).clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
        folder = self.out_dir / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"step_{self.step:07d}.png")

    # -- persistence --
    def metadata(self) -> dict:
        stage = {"command": self.command, "steps": self.step, "wall_s": round(self.wall_s, 1),
                 "init_from": self.cfg.init_from or None, "validation": self.validation}
        history = lineage(self.cfg.init_from) + [stage]
        return {"command": self.command, "steps": self.step, "wall_s": round(self.wall_s, 1),
                "validation": self.validation, "data_seed": self.cfg.seed, "train_config": self.cfg.to_dict(),
                "loss_weights": self.weights.to_dict(), "world_size": self.world,
                "prompt_levels": self.cfg.prompt_levels,
                "point_index": None if self.prompt_indices is None else self.prompt_indices.tolist(),
                "config": self.model_config.to_dict(), "history": history,
                "steps_total": sum(int(h.get("steps") or 0) for h in history if isinstance(h, dict)),
                "wall_s_total": round(sum(float(h.get("wall_s") or 0.0) for h in history if isinstance(h, dict)), 1)}

    def save(self) -> None:
        if self.rank != 0:
            return
        from engine.checkpoints import save_checkpoint

        save_checkpoint(self.out_dir, self.model, self.model_config, self.metadata())
        torch.save({"step": self.step, "wall_s": self.wall_s, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "validation": self.validation,
                    "model": self.model.state_dict(), "train_config": self.cfg.to_dict()},
                   self.out_dir / STATE_FILE)

    def _load_state(self) -> None:
        path = self.out_dir / STATE_FILE
        if not path.is_file():
            raise InputError(f"cannot resume: {path} does not exist (train without --resume first)")
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.wall_s, self.validation = int(state["step"]), float(state["wall_s"]), state["validation"]

    # -- loop --
    def fit(self) -> dict:
        """Train to `cfg.steps`, validating every `val_every` steps; returns the last logs and validation."""
        from tqdm import tqdm

        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.out_dir / "train_log.csv"
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress or self.rank != 0,
                   dynamic_ncols=True, desc="train")
        batches = self._batches()
        logs: dict[str, float] = {}
        ema = None
        history = []
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            logs = self.train_step(next(batches))
            dt = time.perf_counter() - t0
            self.wall_s += dt
            ema = logs["loss"] if ema is None else 0.9 * ema + 0.1 * logs["loss"]
            history.append(logs["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.4f}", samples_s=f"{cfg.batch * self.world / dt:.2f}")
            if self.rank == 0:
                new = not log_path.exists()
                with open(log_path, "a", newline="") as fh:
                    writer = csv.writer(fh)
                    keys = sorted(logs)
                    if new:
                        writer.writerow(["step", "wall_s", "lr"] + keys)
                    writer.writerow([self.step, f"{self.wall_s:.2f}", f"{self.scheduler.get_last_lr()[0]:.3g}"]
                                    + [f"{logs[k]:.5f}" for k in keys])
            last = self.step >= cfg.steps
            if cfg.val_every and (self.step % cfg.val_every == 0 or last):
                if self.rank == 0:
                    self.validation = self.validate()
                    log.info("step %d validation PSNR %s", self.step, self.validation.get("psnr"))
                self.save()
            elif cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save()
            elif last:
                self.save()
        bar.close()
        if self.distributed:
            dist.barrier()
        return {"logs": logs, "validation": self.validation, "loss_history": history, "steps": self.step}


def lineage(init_from: str | Path | None) -> list:
    """The training stages that made the checkpoint in `init_from` (its model.json `history`, or one stage read
    from its metadata when it has none); [] for a run from scratch. A fine-tuned checkpoint's history is this
    plus its own stage, so the whole recipe is recorded by the trainer, stage by stage."""
    import json

    if not init_from:
        return []
    meta_path = Path(init_from) / "model.json"
    if not meta_path.is_file():
        return [{"init_from": str(init_from), "note": "no model.json: stages before this one are unknown"}]
    meta = json.loads(meta_path.read_text())
    if isinstance(meta.get("history"), list):
        return list(meta["history"])
    return [{"command": meta.get("command"), "steps": meta.get("steps"), "wall_s": meta.get("wall_s"),
             "init_from": (meta.get("train_config") or {}).get("init_from") or None,
             "validation": meta.get("validation")}]


def init_weights_from(model: torch.nn.Module, directory: str | Path, allow_unused: tuple[str, ...] = ()) -> list[str]:
    """Copy the weights of the checkpoint in `directory` into `model` (fine-tuning start).

    Every tensor of the checkpoint must exist in `model` with the same shape, except those whose names start
    with one of `allow_unused` (dropped); the model may have modules the checkpoint lacks (e.g. point guidance
    added to a model trained without it), which keep their fresh initialisation. Returns the names of those
    fresh tensors.
    """
    from engine.checkpoints import load_checkpoint

    source, _ = load_checkpoint(directory)
    theirs = {k: v for k, v in source.state_dict().items() if not k.startswith(allow_unused)}
    ours = model.state_dict()
    wrong = [k for k, v in theirs.items() if k not in ours or ours[k].shape != v.shape]
    if wrong:
        raise InputError(f"cannot start from {directory}: {len(wrong)} of its tensors do not fit this model "
                         f"(e.g. {wrong[0]})")
    model.load_state_dict(theirs, strict=False)
    fresh = [k for k in ours if k not in theirs]
    log.info("started from %s; %d tensors keep their fresh init: %s", directory, len(fresh), fresh[:4])
    return fresh


def init_distributed() -> bool:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1); returns whether it did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return dist.is_available() and dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    return True

