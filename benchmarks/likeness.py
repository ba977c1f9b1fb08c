"""Likeness benchmark: self-reenactment on held-out frames, feed-forward only vs refined (issue 9, item 3).

    .venv/bin/python benchmarks/likeness.py                                  # default checkpoint, both real clips
    .venv/bin/python benchmarks/likeness.py --budgets 0 10 30 60 --holdout 8
    .venv/bin/python benchmarks/likeness.py --weights DIR --clips path/a.mp4 --budgets 0 2 --max-frames 48

For every clip and every refinement budget B (seconds; 0 = feed-forward only) the whole replay runs in this
process (`fastavatar_stream.replay.run_replay`, as `fastavatar-stream replay CLIP --holdout K --refine B`):
every K-th frame is kept out of reconstruction and refinement; the final avatar is rendered with each held-out
frame's tracked expression, pose and camera and compared with the real crop: PSNR and SSIM in the head region,
and dlib's 128-d face-descriptor distance (same person below 0.6) where dlib finds a face in both images.

Writes, under --out-dir (default benchmarks/results/likeness/):
  <clip>/refine_<B>s/{holdout.png, report.json, preview.png, avatar.ply}  one replay per budget
  <clip>/comparison.png   rows: held-out frames; columns: real | feed-forward/refined at each budget
and the JSON summary (--json, default benchmarks/results/likeness.json) plus a markdown table (--md).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# run as a script, this folder comes first on sys.path and benchmarks/engine.py would hide the engine package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

REAL = REPO.parent / "shared" / "data" / "real"
DEFAULT_CLIPS = [REAL / "obama_address_512.mp4", REAL / "obama_talk_834x884.mp4"]
RESULTS = REPO / "benchmarks" / "results"
SAME_PERSON = 0.6


def run_budget(clip: Path, budget: float, args: argparse.Namespace) -> dict:
    """One replay of `clip` with refinement budget `budget` seconds; returns its holdout metrics and counts."""
    from fastavatar_stream.replay import ReplayOptions, run_replay

    out = args.out_dir / clip.stem / f"refine_{budget:g}s"
    opts = ReplayOptions(source=str(clip), out=out, weights=args.weights, holdout=args.holdout,
                         refine_seconds=float(budget), budget=args.gaussians, max_frames=args.max_frames,
                         detector=args.detector, progress=False)
    t0 = time.perf_counter()
    report = asyncio.run(run_replay(opts))
    holdout = report.get("holdout") or {}
    session = report.get("extra", {}).get("session", {})
    return {
        "refine_budget_s": budget, "refine_spent_s": session.get("refine_s"),
        "psnr": holdout.get("psnr"), "ssim": holdout.get("ssim"),
        "identity_distance": holdout.get("identity_distance"), "identity_pairs": holdout.get("identity_pairs", 0),
        "psnr_face_pairs": holdout.get("psnr_face_pairs"), "ssim_face_pairs": holdout.get("ssim_face_pairs"),
        "holdout_frames": holdout.get("frames", []), "per_frame": holdout.get("per_frame", []),
        "frames_read": report["frames_read"], "frames_tracked": report["frames_tracked"],
        "windows": report["windows"], "versions": report["versions"],
        "n_gaussians_final": report["n_gaussians_final"], "wall_s": round(time.perf_counter() - t0, 2),
        "out": str(out), "holdout_png": str(out / "holdout.png") if (out / "holdout.png").is_file() else None,
    }


def comparison(runs: list[dict], path: Path, min_tile: int = 160) -> Path | None:
    """Stack the runs' holdout.png pairs: real (left half of the first) | rendered (right half of each)."""
    import numpy as np
    from PIL import Image

    images = [np.asarray(Image.open(r["holdout_png"]).convert("RGB")) for r in runs if r["holdout_png"]]
    if not images or any(im.shape != images[0].shape for im in images):
        return None
    half = images[0].shape[1] // 2
    columns = [images[0][:, :half]] + [im[:, half:] for im in images]
    gap = np.full((images[0].shape[0], 4, 3), 255, np.uint8)
    row = [c for col in columns for c in (col, gap)][:-1]
    grid = Image.fromarray(np.concatenate(row, axis=1))
    factor = math.ceil(min_tile / half) if half < min_tile else 1  # small model crops: enlarge to look at
    if factor > 1:
        grid = grid.resize((grid.width * factor, grid.height * factor), Image.Resampling.NEAREST)
    grid.save(path)
    return path


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def markdown(results: dict) -> str:
    lines = ["| clip | refine budget s | spent s | PSNR dB | SSIM | identity distance (pairs) | same person | "
             "held-out frames | Gaussians | wall s |", "|---" * 10 + "|"]
    for clip, data in results["clips"].items():
        for r in data["runs"]:
            d = r["identity_distance"]
            same = "-" if d is None else ("yes" if d < SAME_PERSON else "no")
            lines.append(f"| {clip} | {r['refine_budget_s']:g} | {_fmt(r['refine_spent_s'], '.1f')} | "
                         f"{_fmt(r['psnr'])} | {_fmt(r['ssim'], '.3f')} | {_fmt(d, '.3f')} ({r['identity_pairs']}) | "
                         f"{same} | {len(r['holdout_frames'])} | {r['n_gaussians_final']} | {_fmt(r['wall_s'], '.1f')} |")
    return "\n".join(lines)


def verdicts(runs: list[dict]) -> dict:
    """Feed-forward vs the best refined run: PSNR gain and whether dlib calls the avatar the same person."""
    ff = next((r for r in runs if r["refine_budget_s"] == 0), None)
    refined = [r for r in runs if r["refine_budget_s"] > 0 and r["psnr"] is not None]
    if ff is None or not refined:
        return {}
    best = max(refined, key=lambda r: r["psnr"])
    d = best["identity_distance"]
    return {"best_budget_s": best["refine_budget_s"],
            "psnr_gain_db": None if ff["psnr"] is None else round(best["psnr"] - ff["psnr"], 3),
            "ssim_gain": None if ff["ssim"] is None else round(best["ssim"] - ff["ssim"], 4),
            "best_identity_distance": d, "same_person": None if d is None else d < SAME_PERSON}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", nargs="+", type=Path, default=DEFAULT_CLIPS, help="clips (default: both real clips)")
    ap.add_argument("--weights", help="checkpoint folder or official:DIR (default: the embedded default checkpoint)")
    ap.add_argument("--budgets", nargs="+", type=float, default=[0, 10, 30, 60],
                    help="refinement budgets in seconds; 0 = feed-forward only (default 0 10 30 60)")
    ap.add_argument("--holdout", type=int, default=8, metavar="K", help="hold out every K-th frame (default 8)")
    ap.add_argument("--max-frames", type=int, help="replay at most this many frames of each clip")
    ap.add_argument("--gaussians", type=int, default=60_000, help="Gaussian budget per avatar")
    ap.add_argument("--detector", default="auto", choices=["auto", "dlib", "face-alignment"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS / "likeness", help="folder for PNGs and replays")
    ap.add_argument("--json", type=Path, default=RESULTS / "likeness.json", help="JSON summary")
    ap.add_argument("--md", type=Path, default=None, help="markdown table (default: next to --json, .md)")
    args = ap.parse_args(argv)
    if args.holdout < 2:
        ap.error("--holdout K needs K >= 2")
    if any(b < 0 for b in args.budgets):
        ap.error("--budgets must be >= 0")
    for clip in args.clips:
        if not clip.is_file():
            ap.error(f"clip not found: {clip}")
    args.md = args.md or args.json.with_suffix(".md")
    return args


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = sorted(set(args.budgets))
    load_start = os.getloadavg()
    results: dict = {"weights": args.weights or "default", "holdout_k": args.holdout, "budgets_s": budgets,
                     "max_frames": args.max_frames, "same_person_threshold": SAME_PERSON, "clips": {}}
    for clip in args.clips:
        runs = []
        for budget in budgets:
            print(f"likeness: {clip.name}, refinement {budget:g} s ...", file=sys.stderr, flush=True)
            runs.append(run_budget(clip, budget, args))
        frames = {tuple(r["holdout_frames"]) for r in runs}
        png = comparison(runs, args.out_dir / clip.stem / "comparison.png")
        results["clips"][clip.stem] = {
            "clip": str(clip), "runs": runs, "verdict": verdicts(runs),
            "same_holdout_frames_in_every_run": len(frames) == 1,
            "comparison_png": str(png) if png else None,
        }
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(),
                          "loadavg_start": [round(x, 2) for x in load_start],
                          "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    args.md.write_text("# Likeness (benchmarks/likeness.py)\n\n" + table + "\n")
    print(table)
    for name, data in results["clips"].items():
        print(f"{name}: {data['verdict']}  comparison: {data['comparison_png']}")
    print(f"JSON: {args.json}  markdown: {args.md}  (load average {load_start[0]:.2f} -> {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
