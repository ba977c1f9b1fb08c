"""Quality against the number of input views on held-out synthetic heads (paper Tables 1-3, on our model).

    .venv/bin/python benchmarks/quality_vs_views.py --checkpoint DIR --seeds 0 --identities 4 --out OUTDIR \\
        [--ablations runs/ablations] [--resolution 128] [--baseline-iterations 50,200,1000] [--identity-distance]

Data: `--identities` people of the synthetic split "test" (never seen in training). Per person and sampler
("video": one camera, a moving head; "multiview": one instant, many cameras) one view group of 20 views is
rendered: 4 held-out targets (the same for every row) and 16 candidate inputs in a seeded order (the first n
are used, passed to the network in time/camera order). The FramePack pool is `--pool` views of the same person's
second view group (another clip or instant), so the data do not depend on --pool or --frames. Metrics are on the
targets, rendered on their plain backgrounds.

Rows of `OUTDIR/quality.json` (each {frames: metrics}; metrics = psnr, ssim, lpips when its weights are local,
identity distance with --identity-distance, gaussians, seconds, and the same per sampler under "by_sampler"):
- "full": the checkpoint, all slots fused with visibility weights (engine.fusion.view_weights) and hard-pruned
  (GaussianSet.keep_logit > 0: importance > 0 and no other frame saw the anchor twice as well), at 1/4/8/16 frames;
- "full_concat": the same network and pruning with the paper's plain concatenation (no fusion weights);
- "full_pool<F>": 16 frames + a FramePack pool of F frames;
- "naive_fusion" (the paper's LAM* row): the same network run on every frame alone, outputs concatenated;
- "optimisation_<it>": per-subject optimisation from scratch (one grey Gaussian per point prompt, optimised with
  engine.refine.RefineSession on the same input frames, same renderer and losses) after <it> iterations;
- one row per ablation checkpoint found under --ablations (names in ABLATIONS); "no_pruning" is evaluated
  without the hard prune. Missing ones are listed under meta.missing_ablations. --ablations/full, when present, is
  the full recipe at the ablations' budget (row "full_equal_budget"): the ablation targets compare with it.
Other keys: "pruning" (Gaussian counts and PSNR with/without the hard prune), "render_fps" (the fused 16-frame
avatars, cpu backend), "meta". Also writes quality.md, plot_psnr_vs_views.png, plot_quality_vs_time.png and
preview_<sampler>.png (inputs | prediction | ground truth per row).

With several `--seeds` (e.g. 0,1,2,3: other test people, other input orders, other baseline seeds) each seed's
outputs go to OUTDIR/seed_<s>/, and OUTDIR/quality_seeds.json holds every number of quality.json as
{mean, std (sample, ddof=1), min, max, values (in seed order)} over the seeds, with OUTDIR/quality_seeds.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# run as a script, this folder comes first on sys.path and benchmarks/engine.py would hide the engine package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

log = logging.getLogger("quality_vs_views")

SAMPLERS = ("video", "multiview")
N_TARGETS = 4
MAX_INPUTS = 16
#: ablation checkpoints (sub-folders of --ablations), as trained by benchmarks/train_ablations.py. The default
#: model has no guidance token, so the paper's "w/o guidance" row is read as full vs "with_guidance".
ABLATIONS = ("no_global_attention", "no_sliced_fusion", "no_tracking_loss", "with_guidance", "no_pruning")
UNPRUNED_ROWS = ("no_pruning",)
#: row of `--ablations`/full: the full recipe trained at the ablations' budget, the fair reference for them
CONTROL_ROW = "full_equal_budget"


# -- data ----------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One test view group: the sample, its held-out target views and the ordered candidate inputs."""

    sample: object                    # engine.train.samples.HeadSample
    targets: object                   # HeadSample of the target views
    order: list[int]                  # view indices usable as inputs, in the order they are taken
    sampler: str
    person: int
    pool: torch.Tensor | None = None  # (F,3,H,W) FramePack pool images of the same person, or None


def make_cases(head, seed: int, identities: int, resolution: int, pool: int, backend: str) -> list[Case]:
    from engine.train.synthetic import SyntheticConfig, make_dataset

    n_views = N_TARGETS + MAX_INPUTS
    cfg = SyntheticConfig(n_views=n_views, background="plain", max_cameras=n_views)
    cases = []
    for sampler in SAMPLERS:
        ds = make_dataset(seed, "test", identities, sampler, resolution, head=head, config=cfg,
                          render_backend=backend)
        pool_ds = None
        if pool > 0:  # item identities + k is view group 1 of person k
            pool_ds = make_dataset(seed, "test", identities, sampler, resolution, head=head, groups_per_identity=2,
                                   config=SyntheticConfig(n_views=pool, background="plain", max_cameras=pool),
                                   render_backend=backend)
        for k in range(identities):
            sample = ds[k]
            perm = torch.randperm(sample.n_views, generator=torch.Generator().manual_seed(seed * 7919 + k)).tolist()
            pool_images = pool_ds[identities + k].images if pool_ds is not None else None
            cases.append(Case(sample, sample.select(perm[:N_TARGETS]), perm[N_TARGETS:], sampler, k, pool_images))
    return cases


# -- predictions ---------------------------------------------------------------------------------------------------
@dataclass
class Prediction:
    """A fused avatar for one case: renders (T,H,W,3) of the targets, how many Gaussians, and how long it took."""

    renders: torch.Tensor
    gaussians: int
    seconds: float
    avatar: object = None             # the GaussianSet that was rendered
    extra: dict = field(default_factory=dict)


class Evaluator:
    """Runs one network on the cases: fused windows, naive per-frame fusion, and renders of the targets."""

    def __init__(self, avatar_model, backend: str, fusion: str = "visibility") -> None:
        self.network = avatar_model.network
        self.prompts = avatar_model.prompts
        self.head = avatar_model.head
        self.backend = backend
        self.fusion = fusion

    def _forward(self, case: Case, inputs: list[int], pool: torch.Tensor | None):
        from engine.train.trainer import forward_views, slot_set

        out, seen = forward_views(self.network, self.network.cfg, case.sample, inputs, self.prompts, self.head,
                                  self.fusion, pool)
        return slot_set(out, list(range(out.xyz.shape[1])), seen)

    def render(self, gs, case: Case) -> torch.Tensor:
        from engine.train.trainer import render_set

        return render_set(gs, self.prompts, self.head, case.targets, soft_prune=False, generator=None,
                          backend=self.backend).clamp(0, 1)

    @torch.no_grad()
    def fused(self, case: Case, n: int, pool: bool = False, prune: bool = True) -> Prediction:
        """The first n inputs as one window (+ the case's FramePack pool when `pool`), all slots fused."""
        inputs = sorted(case.order[:n])
        t0 = time.perf_counter()
        full = self._forward(case, inputs, case.pool if pool else None)
        gs = full.prune(0.0) if prune else full
        seconds = time.perf_counter() - t0
        return Prediction(self.render(gs, case), len(gs), seconds, gs, {"unpruned": full})

    @torch.no_grad()
    def naive(self, case: Case, n: int, prune: bool = True) -> Prediction:
        """LAM*: every input frame reconstructed alone (a 1-frame window), the avatars concatenated unregistered."""
        from engine.gaussians import GaussianSet

        t0 = time.perf_counter()
        sets = [self._forward(case, [i], None) for i in sorted(case.order[:n])]
        for one in sets:  # LAM*: plain concatenation, no registration and no fusion weights
            one.seen = None
        gs = GaussianSet.fuse(sets)
        if prune:
            gs = gs.prune(0.0)
        seconds = time.perf_counter() - t0
        return Prediction(self.render(gs, case), len(gs), seconds, gs)


def optimisation_baseline(evaluator: Evaluator, case: Case, n: int, checkpoints: list[int], seed: int
                          ) -> list[Prediction]:
    """Per-subject optimisation from scratch on the n input frames; a Prediction after each iteration count.

    One Gaussian per point prompt, on its anchor, isotropic (half the mean prompt spacing), grey, opacity 0.8;
    optimised with RefineSession (L1 + SSIM, the same renderer). Inputs are re-composited on one grey background
    from their alpha mattes (RefineSession takes one background colour); seconds count optimisation only.
    """
    from engine.gaussians import GaussianSet
    from engine.refine import RefineConfig, RefineFrames, RefineSession

    s = case.sample
    inputs = sorted(case.order[:n])
    views = s.select(inputs)
    grey = torch.full((3,), 0.5)
    fg = views.targets - (1 - views.masks) * views.bg_colors[:, :, None, None]
    images = (fg + (1 - views.masks) * grey[None, :, None, None]).clamp(0, 1).permute(0, 2, 3, 1).contiguous()
    frames = RefineFrames(images=images, cameras=views.cameras, params=views.flame, background=grey)
    canonical = evaluator.prompts.canonical(s.flame.shape[:1])[0]
    p = canonical.shape[0]
    nn_dist = torch.cdist(canonical, canonical).fill_diagonal_(float("inf")).min(dim=1).values.mean()
    init = GaussianSet(anchor=torch.arange(p), offset=torch.zeros(p, 3),
                       rotation=torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(p, 1),
                       log_scale=torch.full((p, 3), float(torch.log(0.5 * nn_dist))),
                       opacity_logit=torch.full((p,), math.log(0.8 / 0.2)), color=torch.full((p, 3), 0.5),
                       importance=torch.ones(p), frame=torch.zeros(p, dtype=torch.long))
    session = RefineSession(init, evaluator.prompts, evaluator.head,
                            RefineConfig(backend=evaluator.backend, seed=seed))
    out, seconds, done = [], 0.0, 0
    for it in sorted(checkpoints):
        stats = session.step(frames, iterations=it - done)
        seconds += stats["seconds"]
        done = it
        gs = session.gaussians()
        with torch.no_grad():
            out.append(Prediction(evaluator.render(gs, case), len(gs), seconds, gs, {"iterations": it}))
    return out


# -- metrics -------------------------------------------------------------------------------------------------------
class Metrics:
    """PSNR/SSIM always; LPIPS when its weights are local; dlib identity distance when asked for."""

    def __init__(self, identity: bool) -> None:
        from engine.losses import LPIPS

        self.lpips = LPIPS.from_local()
        self.identity = None
        if identity:
            from fastavatar_stream.identity import FaceIdentity

            self.identity = FaceIdentity(upsample=2)

    def __call__(self, pred: torch.Tensor, case: Case) -> dict[str, float]:
        from engine.losses import psnr, ssim

        tgt = case.targets.targets.permute(0, 2, 3, 1)
        m = {"psnr": float(psnr(pred, tgt).mean()), "ssim": float(ssim(pred, tgt).mean())}
        if self.lpips is not None:
            with torch.no_grad():
                m["lpips"] = float(self.lpips(pred, tgt).mean())
        if self.identity is not None:
            to8 = lambda t: (t.clamp(0, 1).numpy() * 255).astype(np.uint8)  # noqa: E731
            dists = [self.identity.distance(to8(a), to8(b)) for a, b in zip(pred, tgt)]
            found = [d for d in dists if d is not None]
            m["identity_faces"] = float(len(found))
            if found:
                m["identity"] = float(np.mean(found))
        return m


class Table:
    """Accumulates per-case metrics as row -> frames -> sampler -> list of dicts; `summary()` averages."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, dict[str, list[dict]]]] = {}

    def add(self, row: str, frames: int, sampler: str, values: dict[str, float]) -> None:
        self.data.setdefault(row, {}).setdefault(str(frames), {}).setdefault(sampler, []).append(values)

    @staticmethod
    def _mean(items: list[dict]) -> dict[str, float]:
        keys = sorted({k for d in items for k in d})
        return {k: float(np.mean([d[k] for d in items if k in d])) for k in keys}

    def summary(self) -> dict:
        out: dict = {}
        for row, per_n in self.data.items():
            out[row] = {}
            for n, per_sampler in sorted(per_n.items(), key=lambda kv: int(kv[0])):
                everything = [d for items in per_sampler.values() for d in items]
                entry = self._mean(everything)
                entry["by_sampler"] = {s: self._mean(items) for s, items in per_sampler.items()}
                out[row][n] = entry
        return out


# -- render speed --------------------------------------------------------------------------------------------------
def render_fps(gs, evaluator: Evaluator, case: Case, size: int, repeats: int) -> float:
    """Frames per second of `engine.render` (cpu backend) drawing the posed avatar into one target camera
    scaled to size x size (posing is done once, outside the timing)."""
    from engine.render import render

    cams = case.targets.cameras
    K = cams.Ks[:1].clone()
    K[:, :2] *= size / cams.width
    with torch.no_grad():
        world = gs.to_world(evaluator.prompts, evaluator.head, case.targets.flame.index([0]))
        args = [world[k][0] for k in ("means", "quats", "scales", "opacities", "colors")]
        render(*args, cams.viewmats[:1], K, size, size, backend="cpu")  # warm-up (numba compile, caches)
        t0 = time.perf_counter()
        for _ in range(repeats):
            render(*args, cams.viewmats[:1], K, size, size, backend="cpu")
    return repeats / (time.perf_counter() - t0)


# -- pictures ------------------------------------------------------------------------------------------------------
def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def save_preview(path: Path, rows: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """One line per row: label | up to 4 inputs | predictions of the targets | ground-truth targets.

    rows: (label, inputs (I,H,W,3), predictions (T,H,W,3), targets (T,H,W,3)); images in [0,1].
    """
    from PIL import Image, ImageDraw

    h, w = rows[0][2].shape[1:3]
    label_w, gap = 110, 6
    n_in = 4
    n_t = max(r[2].shape[0] for r in rows)
    width = label_w + n_in * w + gap + 2 * (n_t * w) + gap
    canvas = Image.new("RGB", (width, len(rows) * h + 18), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    heads = (("inputs", label_w), ("prediction (novel views)", label_w + n_in * w + gap),
             ("ground truth", label_w + n_in * w + gap + n_t * w + gap))
    for text, x in heads:
        draw.text((x + 2, 3), text, fill=(0, 0, 0), font=font)
    to_img = lambda t: Image.fromarray((t.clamp(0, 1).numpy() * 255).astype(np.uint8))  # noqa: E731
    for r, (label, inputs, pred, tgt) in enumerate(rows):
        y = 18 + r * h
        draw.text((4, y + h // 2 - 6), label, fill=(0, 0, 0), font=font)
        small = F.interpolate(inputs[:n_in].permute(0, 3, 1, 2), size=(h, w), mode="bilinear",
                              align_corners=False).permute(0, 2, 3, 1)
        for i, img in enumerate(small):
            canvas.paste(to_img(img), (label_w + i * w, y))
        for i, img in enumerate(pred):
            canvas.paste(to_img(img), (label_w + n_in * w + gap + i * w, y))
        for i, img in enumerate(tgt):
            canvas.paste(to_img(img), (label_w + n_in * w + gap + n_t * w + gap + i * w, y))
    canvas.save(path)


PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def line_plot(path: Path, series: dict[str, list[tuple[float, float]]], *, title: str, xlabel: str, ylabel: str,
              log_x: bool = False, size: tuple[int, int] = (760, 460)) -> None:
    """A plain line plot with PIL: one polyline with markers per series, axes with ticks, legend on the right."""
    from PIL import Image, ImageDraw

    pts = [p for s in series.values() for p in s if math.isfinite(p[1])]
    if not pts:
        return
    fx = (lambda x: math.log10(max(x, 1e-9))) if log_x else (lambda x: x)
    xs, ys = [fx(p[0]) for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 - x0 < 1e-9:
        x0, x1 = x0 - 1, x1 + 1
    x0, x1 = x0 - 0.04 * (x1 - x0), x1 + 0.04 * (x1 - x0)
    pad = max(0.5, 0.08 * (y1 - y0))
    y0, y1 = math.floor(y0 - pad), math.ceil(y1 + pad)
    w, h = size
    left, right, top, bottom = 60, 200, 30, 45
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = _font()
    px = lambda x: left + (fx(x) - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    py = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    d.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    step = max(1, math.ceil((y1 - y0) / 8))
    for yt in range(int(y0), int(y1) + 1, step):
        d.line([left - 4, py(yt), left, py(yt)], fill=(0, 0, 0))
        d.line([left + 1, py(yt), w - right - 1, py(yt)], fill=(235, 235, 235))
        d.text((left - 36, py(yt) - 6), f"{yt:g}", fill=(0, 0, 0), font=font)
    xticks = sorted({p[0] for p in pts})
    if log_x and any(x != round(x) for x in xticks):  # measured times: label decades, not the raw values
        xticks = [10.0 ** e for e in range(math.floor(x0), math.ceil(x1) + 1)]
    for xt in xticks:
        if x0 <= fx(xt) <= x1:
            d.line([px(xt), h - bottom, px(xt), h - bottom + 4], fill=(0, 0, 0))
            d.text((px(xt) - 8, h - bottom + 6), f"{xt:.3g}", fill=(0, 0, 0), font=font)
    d.text((left + (w - left - right) // 2 - 40, h - 18), xlabel, fill=(0, 0, 0), font=font)
    d.text((4, 8), f"{title}   (y: {ylabel})", fill=(0, 0, 0), font=font)
    for k, (name, s) in reversed(list(enumerate(series.items()))):  # the first series is drawn on top, bolder
        colour = PALETTE[k % len(PALETTE)]
        line = [(px(x), py(y)) for x, y in s if math.isfinite(y)]
        if len(line) > 1:
            d.line(line, fill=colour, width=3 if k == 0 else 2)
        for x, y in line:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ly = top + 4 + 16 * k
        d.line([w - right + 10, ly + 6, w - right + 30, ly + 6], fill=colour, width=3)
        d.text((w - right + 35, ly), name, fill=(0, 0, 0), font=font)
    img.save(path)


# -- report --------------------------------------------------------------------------------------------------------
def check_targets(result: dict) -> list[str]:
    """The issue's measurable targets, each a line 'PASS/MISS: ... (by how much)'."""
    lines = []
    full = result.get("full", {})
    ps = [full[k]["psnr"] for k in ("1", "4", "8", "16") if k in full]
    if len(ps) == 4:
        mono = all(b > a for a, b in zip(ps, ps[1:]))
        gain = ps[-1] - ps[0]
        ok = mono and gain >= 2.0
        lines.append(f"{'PASS' if ok else 'MISS'}: full model PSNR rises monotonically 1→4→8→16 by ≥ 2 dB "
                     f"(steps {', '.join(f'{b - a:+.2f}' for a, b in zip(ps, ps[1:]))} dB; total {gain:+.2f} dB"
                     + ("" if gain >= 2.0 else f", {2.0 - gain:.2f} dB short") + ")")
    pr = result.get("pruning", {}).get("16")
    if pr:
        ok = pr["kept_fraction"] <= 0.5 and pr["psnr_loss_db"] <= 0.2
        lines.append(f"{'PASS' if ok else 'MISS'}: pruning at 16 frames keeps ≤ 50% of the Gaussians for ≤ 0.2 dB "
                     f"(keeps {100 * pr['kept_fraction']:.1f}%, loses {pr['psnr_loss_db']:+.3f} dB)")
    for other in ("naive_fusion", "no_global_attention"):
        if other not in result:
            lines.append(f"n/a: full vs {other} (row missing)")
            continue
        # an ablation is compared with the full recipe trained at its own budget when that row exists
        ref_name = CONTROL_ROW if other in ABLATIONS and CONTROL_ROW in result else "full"
        ref = result[ref_name]
        for n in ("8", "16"):
            if n in ref and n in result[other]:
                diff = ref[n]["psnr"] - result[other][n]["psnr"]
                lines.append(f"{'PASS' if diff > 0 else 'MISS'}: {ref_name} beats {other} at {n} frames "
                             f"({diff:+.2f} dB)")
    return lines


def _fmt(v, digits: int = 2) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def write_markdown(path: Path, result: dict) -> None:
    meta = result["meta"]
    rows = [k for k in result if k not in ("meta", "pruning", "render_fps")]
    frames = sorted({n for r in rows for n in result[r]}, key=int)
    md = ["# Quality vs number of input views\n",
          f"Checkpoint `{meta['checkpoint']}` ({meta['model']}), {meta['identities']} test identities × "
          f"{len(SAMPLERS)} samplers, {meta['resolution']} px, {N_TARGETS} held-out target views each, seed "
          f"{meta['seed']}. PSNR dB / SSIM on the targets (hard-pruned avatars unless the row says otherwise). "
          f"LPIPS: {'yes' if meta['lpips'] else 'weights not found locally'}.\n",
          "| row | " + " | ".join(f"{n} frames" for n in frames) + " |",
          "|---|" + "---|" * len(frames)]
    for r in rows:
        cells = [f"{_fmt(result[r][n]['psnr'])} / {_fmt(result[r][n]['ssim'], 3)}" if n in result[r] else ""
                 for n in frames]
        md.append(f"| {r} | " + " | ".join(cells) + " |")
    md += ["", "Per sampler (PSNR):", "", "| row | sampler | " + " | ".join(frames) + " |",
           "|---|---|" + "---|" * len(frames)]
    for r in rows:
        for s in SAMPLERS:
            cells = [_fmt(result[r][n]["by_sampler"].get(s, {}).get("psnr")) if n in result[r] else ""
                     for n in frames]
            md.append(f"| {r} | {s} | " + " | ".join(cells) + " |")
    if meta["lpips"] or meta["identity_distance"]:
        md += ["", "| row | frames | LPIPS | identity distance (faces found) |", "|---|---|---|---|"]
        for r in rows:
            for n, e in result[r].items():
                md.append(f"| {r} | {n} | {_fmt(e.get('lpips'), 3)} | {_fmt(e.get('identity'), 3)} "
                          f"({_fmt(e.get('identity_faces'), 1)}) |")
    md += ["", "## Pruning (full model, hard prune: keep logit > 0)", "",
           "| frames | Gaussians unpruned | pruned | kept | PSNR unpruned | PSNR pruned | loss dB |",
           "|---|---|---|---|---|---|---|"]
    for n, p in result["pruning"].items():
        md.append(f"| {n} | {p['gaussians_unpruned']:.0f} | {p['gaussians_pruned']:.0f} | "
                  f"{100 * p['kept_fraction']:.1f}% | {_fmt(p['psnr_unpruned'])} | {_fmt(p['psnr_pruned'])} | "
                  f"{p['psnr_loss_db']:+.3f} |")
    md += ["", "## Render speed of the fused 16-frame avatars (engine.render cpu backend, one camera)", "",
           "| avatar | Gaussians | " + " | ".join(f"{s} px fps" for s in meta["fps_sizes"]) + " |",
           "|---|---|" + "---|" * len(meta["fps_sizes"])]
    for name, e in result["render_fps"].items():
        md.append(f"| {name} | {e['gaussians']:.0f} | " + " | ".join(_fmt(e.get(str(s)), 1)
                                                                     for s in meta["fps_sizes"]) + " |")
    opt = [r for r in rows if r.startswith("optimisation_")]
    if opt:
        md += ["", "## Quality / speed trade-off (paper Table 1; seconds per avatar: network forward + pruning, "
               "or optimisation steps)", "", "| input frames | method | seconds | PSNR | SSIM |",
               "|---|---|---|---|---|"]
        for n in sorted({k for r in opt for k in result[r]}, key=int):
            f = result["full"][n]
            md.append(f"| {n} | feed-forward (full) | {_fmt(f['seconds'], 3)} | {_fmt(f['psnr'])} | "
                      f"{_fmt(f['ssim'], 3)} |")
            for r in opt:
                e = result[r][n]
                md.append(f"| {n} | optimisation, {r.split('_')[1]} iterations | {_fmt(e['seconds'], 2)} | "
                          f"{_fmt(e['psnr'])} | {_fmt(e['ssim'], 3)} |")
    missing = meta["missing_ablations"]
    md += ["", "## Targets", ""] + [f"- {line}" for line in check_targets(result)]
    if missing:
        md.append(f"- ablations not evaluated (no checkpoint under --ablations): {', '.join(missing)}")
    md += ["", f"Timings: {meta['threads']} torch thread(s), {meta['machine']}; wall time {meta['wall_s']:.0f} s; "
           f"1-minute load average {meta['loadavg_start'][0]:.1f} -> {meta['loadavg_end'][0]:.1f}."]
    path.write_text("\n".join(md) + "\n")


# -- main ----------------------------------------------------------------------------------------------------------
def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def evaluate_model(name: str, avatar_model, cases: list[Case], frames: list[int], metrics: Metrics, table: Table,
                   backend: str, *, prune: bool = True, fusion: str = "visibility") -> dict:
    """Fused rows of one network; returns {frames: [(case, Prediction)]} for previews and further checks."""
    ev = Evaluator(avatar_model, backend, fusion)
    ev.fused(cases[0], 1)  # warm-up: the first forward and render pay one-off costs that would skew "seconds"
    kept = {}
    for n in frames:
        kept[n] = []
        for case in cases:
            pred = ev.fused(case, n, prune=prune)
            table.add(name, n, case.sampler, {**metrics(pred.renders, case), "gaussians": float(pred.gaussians),
                                              "seconds": pred.seconds})
            kept[n].append((case, pred))
        log.info("%s %d frames done", name, n)
    return kept


def run(args: argparse.Namespace, seed: int, out: Path) -> dict:
    """One seed's full benchmark; writes quality.json, quality.md, plots and previews into `out`."""
    from engine.avatar_model import AvatarModel
    from engine.checkpoints import default_checkpoint_dir
    from engine.errors import InputError
    from engine.head import load_head
    from engine.losses import psnr

    t_start, load_start = time.perf_counter(), os.getloadavg()
    torch.manual_seed(seed)
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    frames = sorted(set(parse_ints(args.frames)))
    if not frames or frames[0] < 1 or frames[-1] > MAX_INPUTS:
        raise InputError(f"--frames must be counts in 1..{MAX_INPUTS}, got {args.frames}")
    n_max = frames[-1]
    head = load_head()
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint_dir()
    model = AvatarModel.load(checkpoint, head=head)
    if args.identities < 1 or args.pool < 0:
        raise InputError("--identities must be at least 1 and --pool at least 0")
    cases = make_cases(head, seed, args.identities, args.resolution, args.pool, args.backend)
    metrics = Metrics(args.identity_distance)
    table = Table()
    ev = Evaluator(model, args.backend)

    # the full model, pruned (the product) and unpruned (for the pruning figures)
    full = evaluate_model("full", model, cases, frames, metrics, table, args.backend)
    pruning = {}
    for n in frames:
        un, pr, g_un, g_pr = [], [], [], []
        for case, pred in full[n]:
            tgt = case.targets.targets.permute(0, 2, 3, 1)
            with torch.no_grad():
                un.append(float(psnr(ev.render(pred.extra["unpruned"], case), tgt).mean()))
            pr.append(float(psnr(pred.renders, tgt).mean()))
            g_un.append(len(pred.extra["unpruned"]))
            g_pr.append(pred.gaussians)
        pruning[str(n)] = {"gaussians_unpruned": float(np.mean(g_un)), "gaussians_pruned": float(np.mean(g_pr)),
                           "kept_fraction": float(np.sum(g_pr) / max(1, np.sum(g_un))),
                           "psnr_unpruned": float(np.mean(un)), "psnr_pruned": float(np.mean(pr)),
                           "psnr_loss_db": float(np.mean(un) - np.mean(pr))}
    # the same network with the paper's plain concatenation instead of visibility-weighted fusion
    evaluate_model("full_concat", model, cases, frames, metrics, table, args.backend, fusion="concat")
    if args.pool > 0:
        for case in cases:
            pred = ev.fused(case, n_max, pool=True)
            table.add(f"full_pool{args.pool}", n_max, case.sampler,
                      {**metrics(pred.renders, case), "gaussians": float(pred.gaussians), "seconds": pred.seconds})
        log.info("pool row done")

    # naive fusion (LAM*)
    naive = {}
    for n in frames:
        for case in cases:
            pred = ev.naive(case, n)
            table.add("naive_fusion", n, case.sampler, {**metrics(pred.renders, case),
                                                        "gaussians": float(pred.gaussians), "seconds": pred.seconds})
            naive[(n, case.sampler, case.person)] = pred
    log.info("naive fusion done")

    # per-subject optimisation
    iterations = sorted(set(parse_ints(args.baseline_iterations)))
    baseline = {}
    if iterations:  # warm-up: the first optimisation step pays one-off costs (kernel loading) that skew "seconds"
        optimisation_baseline(ev, cases[0], 1, [1], seed)
    for n in sorted(set(parse_ints(args.baseline_frames)) & set(frames)) if iterations else []:
        for case in cases:
            preds = optimisation_baseline(ev, case, n, iterations, seed)
            for it, pred in zip(iterations, preds):
                table.add(f"optimisation_{it}", n, case.sampler, {**metrics(pred.renders, case),
                                                                 "gaussians": float(pred.gaussians),
                                                                 "seconds": pred.seconds})
                baseline[(it, n, case.sampler, case.person)] = pred
        log.info("optimisation baseline at %d frames done", n)

    # ablations
    missing = []
    control = Path(args.ablations) / "full" if args.ablations else None
    if control is not None and any(control.glob("*.safetensors")):  # the full recipe at the ablations' budget
        evaluate_model(CONTROL_ROW, AvatarModel.load(control, head=head), cases, frames, metrics, table,
                       args.backend)
    for name in ABLATIONS:
        folder = Path(args.ablations) / name if args.ablations else None
        if folder is None or not any(folder.glob("*.safetensors")):
            missing.append(name)
            continue
        evaluate_model(name, AvatarModel.load(folder, head=head), cases, frames, metrics, table, args.backend,
                       prune=name not in UNPRUNED_ROWS)

    # render speed of the fused n_max-frame avatars (first case of each sampler)
    fps = {}
    for case, pred in full[n_max]:
        if case.person != 0:
            continue
        for label, gs in ((f"{case.sampler} pruned", pred.avatar),
                          (f"{case.sampler} unpruned", pred.extra["unpruned"])):
            fps[label] = {"gaussians": float(len(gs))}
            for size in args.fps_sizes:
                fps[label][str(size)] = render_fps(gs, ev, case, size, args.fps_repeats)

    # previews: person 0 of each sampler
    for sampler in SAMPLERS:
        rows = []
        for n in frames:
            case, pred = next((c, p) for c, p in full[n] if c.sampler == sampler and c.person == 0)
            inputs = case.sample.images[sorted(case.order[:n])].permute(0, 2, 3, 1)
            tgt = case.targets.targets.permute(0, 2, 3, 1)
            rows.append((f"full, {n} fr", inputs, pred.renders, tgt))
        rows.append((f"LAM*, {n_max} fr", inputs, naive[(n_max, sampler, 0)].renders, tgt))
        if iterations and (iterations[-1], n_max, sampler, 0) in baseline:
            rows.append((f"optim {iterations[-1]}it", inputs, baseline[(iterations[-1], n_max, sampler, 0)].renders,
                         tgt))
        save_preview(out / f"preview_{sampler}.png", rows)

    result = table.summary()
    result["pruning"] = pruning
    result["render_fps"] = fps
    result["meta"] = {
        "checkpoint": str(checkpoint), "model": model.network.cfg.name, "seed": seed,
        "identities": args.identities, "resolution": args.resolution, "frames": frames, "pool": args.pool,
        "targets_per_case": N_TARGETS, "samplers": list(SAMPLERS), "baseline_iterations": iterations,
        "baseline_frames": parse_ints(args.baseline_frames), "fps_sizes": args.fps_sizes,
        "ablations_dir": args.ablations, "missing_ablations": missing, "lpips": metrics.lpips is not None,
        "identity_distance": args.identity_distance, "threads": args.threads, "backend": args.backend,
        "checkpoint_steps": model.metadata.get("steps"), "machine": f"{platform.machine()} {platform.processor()}",
        "wall_s": time.perf_counter() - t_start, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
    }
    result["meta"]["targets"] = check_targets(result)
    (out / "quality.json").write_text(json.dumps(result, indent=1))
    write_markdown(out / "quality.md", result)
    rows_plot = {r: [(int(n), e["psnr"]) for n, e in result[r].items()]
                 for r in result if r not in ("meta", "pruning", "render_fps") and not r.startswith("optimisation_")
                 and len(result[r]) > 1}
    for s in SAMPLERS:
        rows_plot[f"full ({s})"] = [(int(n), e["by_sampler"][s]["psnr"]) for n, e in result["full"].items()]
    line_plot(out / "plot_psnr_vs_views.png", rows_plot, title="novel-view PSNR vs input frames",
              xlabel="input frames (log)", ylabel="PSNR dB", log_x=True)
    if iterations:
        series = {}
        for n in sorted(set(parse_ints(args.baseline_frames)) & set(frames)):
            series[f"optimisation, {n} fr"] = [(result[f"optimisation_{it}"][str(n)]["seconds"],
                                                result[f"optimisation_{it}"][str(n)]["psnr"]) for it in iterations]
            series[f"feed-forward, {n} fr"] = [(result["full"][str(n)]["seconds"], result["full"][str(n)]["psnr"])]
        line_plot(out / "plot_quality_vs_time.png", series, title="quality vs time (Table 1)",
                  xlabel="seconds (log)", ylabel="PSNR dB", log_x=True)
    return result


# -- several seeds -------------------------------------------------------------------------------------------------
def spread_over_seeds(results: list[dict]) -> dict:
    """Every number found at the same place in all `results` -> {mean, std, min, max, values}; std is the sample
    standard deviation (ddof=1; 0 for one seed). Places missing in some result and non-numbers are left out."""
    first = results[0]
    if isinstance(first, dict):
        keys = [k for k in first if all(isinstance(r, dict) and k in r for r in results)]
        nested = {k: spread_over_seeds([r[k] for r in results]) for k in keys}
        return {k: v for k, v in nested.items() if v}
    if all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in results):
        values = [float(r) for r in results]
        return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values), "values": values}
    return {}


def _spread(e: dict, digits: int, scale: float = 1.0) -> str:
    return (f"{_fmt(scale * e['mean'], digits)} ± {_fmt(scale * e['std'], digits)} "
            f"({_fmt(scale * e['min'], digits)}–{_fmt(scale * e['max'], digits)})")


def write_seeds_markdown(path: Path, spread: dict, meta: dict) -> None:
    rows = [k for k in spread if k not in ("meta", "pruning", "render_fps")]
    frames = sorted({n for r in rows for n in spread[r]}, key=int)
    md = ["# Quality vs number of input views, over seeds\n",
          f"Checkpoint `{meta['checkpoint']}`, seeds {', '.join(map(str, meta['seeds']))} (each: "
          f"{meta['identities']} test identities × {len(SAMPLERS)} samplers, {meta['resolution']} px, {N_TARGETS} "
          "held-out target views). Cells: mean ± sample std (min–max) over the seeds.\n",
          "| row | metric | " + " | ".join(f"{n} frames" for n in frames) + " |", "|---|---|" + "---|" * len(frames)]
    for r in rows:
        for metric, digits in (("psnr", 2), ("ssim", 3), ("seconds", 3)):
            cells = [_spread(spread[r][n][metric], digits) if n in spread[r] else "" for n in frames]
            md.append(f"| {r} | {metric} | " + " | ".join(cells) + " |")
    md += ["", "## Pruning (full model)", "", "| frames | kept % | PSNR loss dB |", "|---|---|---|"]
    for n, e in spread["pruning"].items():
        md.append(f"| {n} | {_spread(e['kept_fraction'], 1, 100.0)} | {_spread(e['psnr_loss_db'], 3)} |")
    md += ["", "## Render speed of the fused 16-frame avatars (fps, cpu backend)", "",
           "| avatar | Gaussians | " + " | ".join(f"{s} px" for s in meta["fps_sizes"]) + " |",
           "|---|---|" + "---|" * len(meta["fps_sizes"])]
    for name, e in spread["render_fps"].items():
        md.append(f"| {name} | {_spread(e['gaussians'], 0)} | "
                  + " | ".join(_spread(e[str(s)], 1) for s in meta["fps_sizes"] if str(s) in e) + " |")
    md += ["", "## Targets per seed", ""]
    for seed, lines in zip(meta["seeds"], meta["targets_per_seed"]):
        md += [f"- seed {seed}: {line}" for line in lines]
    loads = ", ".join(f"{start[0]:.1f} -> {end[0]:.1f}" for start, end in meta["loadavg_per_seed"])
    md += ["", f"Timings: {meta['threads']} torch thread(s); wall time {meta['wall_s']:.0f} s for all seeds; "
           f"1-minute load average at start -> end of each seed: {loads}."]
    path.write_text("\n".join(md) + "\n")


def run_seeds(args: argparse.Namespace) -> list[dict]:
    """One run per seed; with several, each in OUTDIR/seed_<s> and their spread in OUTDIR/quality_seeds.*."""
    out = Path(args.out)
    if len(args.seeds) == 1:
        return [run(args, args.seeds[0], out)]
    t_start = time.perf_counter()
    results = [run(args, seed, out / f"seed_{seed}") for seed in args.seeds]
    spread = spread_over_seeds([{k: v for k, v in r.items() if k != "meta"} for r in results])
    per_seed = ("seed", "wall_s", "targets", "loadavg_start", "loadavg_end")
    meta = {k: v for k, v in results[0]["meta"].items() if k not in per_seed}
    meta.update(seeds=args.seeds, targets_per_seed=[r["meta"]["targets"] for r in results],
                loadavg_per_seed=[[r["meta"]["loadavg_start"], r["meta"]["loadavg_end"]] for r in results],
                wall_s=time.perf_counter() - t_start)
    spread["meta"] = meta
    (out / "quality_seeds.json").write_text(json.dumps(spread, indent=1))
    write_seeds_markdown(out / "quality_seeds.md", spread, meta)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the shipped one)")
    ap.add_argument("--seeds", "--seed", type=parse_ints, default=[0],
                    help="comma-separated test seeds (default 0); several give a spread, see above")
    ap.add_argument("--identities", type=int, default=4, help="test identities per sampler (default 4)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--resolution", type=int, default=128, help="render/target size in px (default 128)")
    ap.add_argument("--frames", default="1,4,8,16", help="input-frame counts (default 1,4,8,16)")
    ap.add_argument("--pool", type=int, default=48, help="FramePack pool of the extra row (0: no such row)")
    ap.add_argument("--ablations", default=None, help="folder of ablation checkpoints (" + ", ".join(ABLATIONS) + ")")
    ap.add_argument("--baseline-iterations", default="50,200,1000",
                    help="iteration counts of the optimisation baseline ('' to skip it)")
    ap.add_argument("--baseline-frames", default="16", help="input-frame counts the baseline runs at (default 16)")
    ap.add_argument("--fps-sizes", type=parse_ints, default=[256, 512])
    ap.add_argument("--fps-repeats", type=int, default=5)
    ap.add_argument("--identity-distance", action="store_true", help="dlib identity distance (slow)")
    ap.add_argument("--backend", default="auto", help="render backend for evaluation (default auto)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from engine.errors import InputError

    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        print(f"error: --seeds must be distinct integers, got {args.seeds}", file=sys.stderr)
        return 2
    try:
        results = run_seeds(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for result in results:
        for line in result["meta"]["targets"]:
            print(f"seed {result['meta']['seed']}: {line}")
    print(f"wrote {Path(args.out) / ('quality.json' if len(results) == 1 else 'quality_seeds.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
