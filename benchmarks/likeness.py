"""Likeness benchmark: is the avatar the person, on frames it never saw, live, from another video and off-axis
(issue 16)?

    .venv/bin/python benchmarks/likeness.py                      # both real clips, tail 0.25, 20 s refinement
    .venv/bin/python benchmarks/likeness.py --clips a.mp4 b.mp4 --max-frames 96 --refine 5 --linger 10
    .venv/bin/python benchmarks/likeness.py --no-surface --json benchmarks/results/likeness_no_surface.json

Per clip, three whole replays in this process (`fastavatar_stream.replay.replay`), all with the tail hold-out
(`replay CLIP --holdout-tail 0.25`: the avatar is built from the first 75% of the clip and scored on its last
25%, which no window, FramePack pool or refinement ever saw):
  - feedforward: `--no-refine`;
  - refine_20s: `--refine 20` (a replay spends the budget after its last window);
  - live: `--realtime --refine <large> --linger 20`, paced like a camera; scored when the stream ended (live_end)
    and after 10 s and 20 s of lingering (live_linger_10s, live_linger_20s).
Then, from the refine_20s avatars:
  - cross_video.refine_20s: the avatar built from one clip, posed with the other clip's tracking (expression,
    pose, camera, shape) and scored on that clip's held-out tail frames (same person, another video);
  - novel_views: the avatar at the expression and pose of its most frontal input frame, the camera turned about
    the head by yaw +-20/+-40 and pitch +-15 degrees: `detected`, the fraction of renders at that angle (one per
    reference frame) in which dlib finds a face, and their identity distance to the input frames.
Scores: PSNR and SSIM in the head region, and dlib's 128-d face-descriptor distance (same person below 0.6;
two frames of one clip 0.25-0.29, two videos of this person 0.34, another person 0.95).

Writes benchmarks/results/likeness.json (--json), a markdown table next to it, and under --out-dir the replays'
folders (<clip>/tail_feedforward, tail_refine_20s, tail_live) and per clip `comparison.png` (rows: held-out tail frames; columns: real | feed-forward | live at the
stream's end | live after lingering | refined 20 s | the other clip's refined avatar posed with this clip's
tracking), `cross_video.png` (this clip's avatar on the other clip's frames) and `novel_views.png` (rows: the
most frontal input frames; columns: the frame, the avatar at 0 degrees, then each angle).
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REAL = REPO.parent / "shared" / "data" / "real"
DEFAULT_CLIPS = [REAL / "obama_address_512.mp4", REAL / "obama_talk_834x884.mp4"]
RESULTS = REPO / "benchmarks" / "results"
SAME_PERSON = 0.6
NOVEL_ANGLES = {"yaw-40": (-40.0, 0.0), "yaw-20": (-20.0, 0.0), "yaw+20": (20.0, 0.0), "yaw+40": (40.0, 0.0),
                "pitch-15": (0.0, -15.0), "pitch+15": (0.0, 15.0)}
TARGETS = {"feedforward": 0.6, "live_end": 0.45, "refine_20s": 0.35, "cross_video": 0.45, "novel_detected_20": 0.9}
SCORE_KEYS = ("psnr", "ssim", "identity_distance", "identity_pairs", "version")


def replay(clip: Path, name: str, args: argparse.Namespace, **options):
    """One replay of `clip` with the tail hold-out; returns the ReplayResult and its wall time."""
    from fastavatar_stream.replay import ReplayOptions, replay as run

    opts = ReplayOptions(source=str(clip), out=args.out_dir / clip.stem / f"tail_{name}", weights=args.weights,
                         holdout_tail=args.tail, budget=args.gaussians, max_frames=args.max_frames,
                         detector=args.detector, surface=args.surface, progress=False, **options)
    print(f"likeness: {clip.name}: {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    result = asyncio.run(run(opts))
    return result, round(time.perf_counter() - t0, 1)


def scores(holdout: dict | None) -> dict:
    holdout = holdout or {}
    return {k: holdout.get(k) for k in SCORE_KEYS}


def run_clip(clip: Path, args: argparse.Namespace) -> dict:
    """The three replays of one clip; returns their scores plus what later steps need (not JSON)."""
    ff, ff_wall = replay(clip, "feedforward", args, refine_seconds=0.0)
    refined, refined_wall = replay(clip, "refine_20s", args, refine_seconds=args.refine)
    live, live_wall = replay(clip, "live", args, realtime=True, refine_seconds=args.live_refine_cap,
                             linger_s=args.linger)
    timeline = {round(t["after_end_s"]): t for t in live.report.get("holdout_timeline", [])}
    tail = {
        "feedforward": {**scores(ff.report.get("holdout")), "wall_s": ff_wall},
        "live_end": {**scores(timeline.get(0)), "after_end_s": 0.0},
        "refine_20s": {**scores(refined.report.get("holdout")), "wall_s": refined_wall,
                       "refine_spent_s": refined.report["extra"]["session"]["refine_s"]},
    }
    for after, entry in sorted(timeline.items()):
        if 0 < after < args.linger:
            tail[f"live_linger_{after}s"] = {**scores(entry), "after_end_s": entry["after_end_s"]}
    if args.linger > 0:
        tail[f"live_linger_{args.linger:g}s"] = {**scores(live.report.get("holdout")), "after_end_s": args.linger}
    live_session = live.report["extra"]["session"]
    return {
        "clip": str(clip), "frames_read": refined.report["frames_read"],
        "tail_from_frame": (refined.report.get("holdout") or {}).get("tail_from_frame"),
        "held_out_frames": (refined.report.get("holdout") or {}).get("frames_held_out"),
        "tail": tail,
        "live": {"wall_s": live_wall, "refine_s": live_session["refine_s"], "windows": live.report["windows"],
                 "versions": live.report["versions"], "strides": live.report.get("strides"),
                 "engine_split": live.report["extra"].get("engine_split"),
                 "linger_s": args.linger, "refine_cap_s": args.live_refine_cap},
        "_results": {"feedforward": ff, "refine_20s": refined, "live": live},
    }


def cross_video(avatar_result, driver_result, out: Path) -> dict:
    """The avatar of one clip posed with another clip's tracking, scored on that clip's held-out frames."""
    from fastavatar_stream.replay import evaluate_holdout, holdout_samples

    samples = holdout_samples(driver_result.session, 48)
    scored = evaluate_holdout(avatar_result.model, samples, avatar_result.session.latest, out)
    return {**{k: scored.get(k) for k in SCORE_KEYS if k != "version"},
            "version": avatar_result.session.latest.version, "driven_by": Path(driver_result.session.name).stem}


def turned_viewmat(viewmat: torch.Tensor, centre: torch.Tensor, yaw_deg: float, pitch_deg: float) -> torch.Tensor:
    """(4,4) world-to-camera of a camera turned about the head centre (world (3,)) by yaw (about the camera's
    y axis) and pitch (about its x axis): the head is seen from that much further to the side / above."""
    y, p = math.radians(yaw_deg), math.radians(pitch_deg)
    rot_y = torch.tensor([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rot_x = torch.tensor([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    rot = rot_y @ rot_x
    c = viewmat[:3, :3] @ centre + viewmat[:3, 3]
    turn = torch.eye(4)
    turn[:3, :3] = rot
    turn[:3, 3] = c - rot @ c
    return turn @ viewmat


def frontal_samples(samples: list, n: int) -> list:
    """The n kept frames whose head faces its camera most squarely."""
    from fastavatar_stream.windowing import pose_features

    return sorted(samples, key=lambda s: float(np.linalg.norm(pose_features(s.frame)[:2])))[:n]


def novel_views(result, out: Path, n_reference: int = 3) -> dict:
    """Renders of the avatar from turned cameras around its most frontal input frames: dlib detection rate and
    identity distance to the input frames, per angle; a strip of them in `out`."""
    from engine.render import render
    from fastavatar_stream.identity import FaceIdentity
    from fastavatar_stream.views import refine_frames

    model, session = result.model, result.session
    gaussians = session.latest.gaussians
    ident = FaceIdentity()
    pool = list(session.refine_pool)
    real = refine_frames(pool, model)
    real_u8 = [(im.numpy() * 255).round().astype(np.uint8) for im in real.images]
    real_desc = [d for d in (ident.descriptor(im) for im in real_u8[:: max(1, len(real_u8) // 8)]) if d is not None]
    refs = frontal_samples(pool, n_reference)
    frames = refine_frames(refs, model)
    angles = {"0": (0.0, 0.0), **NOVEL_ANGLES}
    per_angle: dict[str, dict] = {name: {"renders": 0, "detected": 0, "distances": []} for name in angles}
    strips = []
    with torch.no_grad():
        for i in range(len(refs)):
            world = gaussians.to_world(model.prompts, model.head, frames.params.index(i))
            centre = world["means"][0].median(dim=0).values
            viewmat, K = frames.cameras.viewmats[i], frames.cameras.Ks[i]
            row = [(frames.images[i].numpy() * 255).round().astype(np.uint8)]
            for name, (yaw, pitch) in angles.items():
                vm = turned_viewmat(viewmat, centre, yaw, pitch)
                rgb = render(world["means"], world["quats"], world["scales"], world["opacities"], world["colors"],
                             vm[None], K[None], frames.cameras.width, frames.cameras.height,
                             background=torch.ones(3))["rgb"][0]
                image = (rgb.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
                row.append(image)
                desc = ident.descriptor(image)
                entry = per_angle[name]
                entry["renders"] += 1
                if desc is not None:
                    entry["detected"] += 1
                    if real_desc:
                        entry["distances"].append(float(np.mean([np.linalg.norm(desc - d) for d in real_desc])))
            strips.append(np.concatenate(row, axis=1))
    Image.fromarray(np.concatenate(strips, axis=0)).save(out)
    return {name: {"detected": e["detected"] / e["renders"], "renders": e["renders"],
                   "identity_distance": float(np.mean(e["distances"])) if e["distances"] else None}
            for name, e in per_angle.items()}


def comparison(clip: dict, other: dict | None, path: Path, rows: int = 6, min_tile: int = 160) -> Path:
    """Rows: held-out tail frames of this clip; columns: real | feed-forward | live at the stream's end | live
    after lingering | refined | the other clip's refined avatar posed with this clip's tracking."""
    from fastavatar_stream.replay import holdout_renders, holdout_samples, to_u8

    results = clip["_results"]
    samples = holdout_samples(results["refine_20s"].session, rows)
    live = results["live"]
    live_end = next((v for t, v in live.timeline if t == 0.0 and v is not None), live.session.latest)
    versions = [(results["feedforward"].model, results["feedforward"].session.latest),
                (live.model, live_end), (live.model, live.session.latest),
                (results["refine_20s"].model, results["refine_20s"].session.latest)]
    if other is not None:
        versions.append((other["_results"]["refine_20s"].model, other["_results"]["refine_20s"].session.latest))
    real, _, _ = holdout_renders(versions[0][0], samples, versions[0][1])
    columns = [np.concatenate(to_u8(real), axis=0)]
    for model, version in versions:
        columns.append(np.concatenate(to_u8(holdout_renders(model, samples, version)[1]), axis=0))
    gap = np.full((columns[0].shape[0], 4, 3), 255, np.uint8)
    grid = Image.fromarray(np.concatenate([c for col in columns for c in (col, gap)][:-1], axis=1))
    tile = columns[0].shape[1]
    factor = math.ceil(min_tile / tile) if tile < min_tile else 1
    if factor > 1:  # small model crops: enlarged to look at
        grid = grid.resize((grid.width * factor, grid.height * factor), Image.Resampling.NEAREST)
    grid.save(path)
    return path


def verdicts(clip: dict) -> dict:
    """Each target of issue 16 for one clip: the figure and whether it is met (None: not measured)."""
    def below(value, limit):
        return None if value is None else bool(value <= limit)

    tail, cross, novel = clip["tail"], clip.get("cross_video", {}).get("refine_20s", {}), clip.get("novel_views", {})
    det20 = [novel[a]["detected"] for a in ("yaw-20", "yaw+20") if a in novel]
    return {
        "feedforward_tail_below_0.6": below(tail["feedforward"]["identity_distance"], TARGETS["feedforward"] - 1e-9),
        "live_end_at_most_0.45": below(tail["live_end"]["identity_distance"], TARGETS["live_end"]),
        "refine_20s_tail_at_most_0.35": below(tail["refine_20s"]["identity_distance"], TARGETS["refine_20s"]),
        "cross_video_at_most_0.45": below(cross.get("identity_distance"), TARGETS["cross_video"]),
        "novel_20deg_detected_at_least_0.9": (None if not det20 else bool(min(det20) >= TARGETS["novel_detected_20"])),
    }


def _shown(path: Path) -> str:
    """A path as the JSON keeps it: relative to the checkout when inside it."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def markdown(results: dict) -> str:
    lines = ["| clip | score | PSNR dB | SSIM | identity distance (pairs) | version |", "|---" * 6 + "|"]
    for name, clip in results["clips"].items():
        rows = list(clip["tail"].items()) + [("cross_video refine_20s", clip.get("cross_video", {}).get("refine_20s"))]
        for label, s in rows:
            if not s:
                continue
            label = label if label.startswith("cross") else f"tail {label}"
            lines.append(f"| {name} | {label} | {_fmt(s.get('psnr'), '.2f')} | {_fmt(s.get('ssim'))} | "
                         f"{_fmt(s.get('identity_distance'))} ({s.get('identity_pairs')}) | {s.get('version')} |")
    lines += ["", "| clip | view | face detected | identity distance |", "|---" * 4 + "|"]
    for name, clip in results["clips"].items():
        for angle, v in clip.get("novel_views", {}).items():
            lines.append(f"| {name} | {angle} | {_fmt(v['detected'], '.2f')} | {_fmt(v['identity_distance'])} |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", nargs="+", type=Path, default=DEFAULT_CLIPS,
                    help="clips of one person (default: both real clips); cross-video pairs each with the next")
    ap.add_argument("--weights", help="checkpoint folder or official:DIR (default: the embedded default checkpoint)")
    ap.add_argument("--tail", type=float, default=0.25, help="tail hold-out fraction (default 0.25)")
    ap.add_argument("--refine", type=float, default=20.0, help="refinement budget of the refined replay (s)")
    ap.add_argument("--linger", type=float, default=20.0, help="seconds the live replay lingers after its stream")
    ap.add_argument("--live-refine-cap", type=float, default=600.0,
                    help="refinement budget of the live replay (large: the stream and the linger bound it)")
    ap.add_argument("--max-frames", type=int, help="replay at most this many frames of each clip")
    ap.add_argument("--gaussians", type=int, default=60_000, help="Gaussian budget per avatar")
    ap.add_argument("--landmarks", "--detector", dest="detector", default="auto",
                    choices=["auto", "mediapipe", "dlib", "face-alignment"], help="tracker landmark backend")
    ap.add_argument("--surface", action=argparse.BooleanOptionalAction, default=None,
                    help="paint a surface layer (default: the model's default, on for ours)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS / "likeness", help="folder for PNGs and replays")
    ap.add_argument("--json", type=Path, default=RESULTS / "likeness.json", help="JSON summary")
    args = ap.parse_args(argv)
    if not 0 < args.tail < 1:
        ap.error("--tail must be in (0, 1)")
    for clip in args.clips:
        if not clip.is_file():
            ap.error(f"clip not found: {clip}")
    return args


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    clips = {clip.stem: run_clip(clip, args) for clip in args.clips}
    names = list(clips)
    for i, name in enumerate(names):
        clip = clips[name]
        folder = args.out_dir / name
        if len(names) > 1:
            driver = clips[names[(i + 1) % len(names)]]
            clip["cross_video"] = {"refine_20s": cross_video(clip["_results"]["refine_20s"],
                                                             driver["_results"]["refine_20s"],
                                                             folder / "cross_video.png")}
        clip["novel_views"] = novel_views(clip["_results"]["refine_20s"], folder / "novel_views.png")
        other = clips[names[(i + 1) % len(names)]] if len(names) > 1 else None
        clip["comparison_png"] = _shown(comparison(clip, other, folder / "comparison.png"))
        clip["novel_views_png"] = _shown(folder / "novel_views.png")
        clip["targets_met"] = verdicts(clip)
    for clip in clips.values():
        del clip["_results"]
    results = {"weights": args.weights or "default", "surface": args.surface, "tail": args.tail, "refine_s": args.refine,
               "linger_s": args.linger, "max_frames": args.max_frames, "same_person_threshold": SAME_PERSON,
               "targets": TARGETS, "clips": clips, "wall_s": round(time.perf_counter() - t0, 1),
               "command": "python benchmarks/likeness.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "torch_threads": torch.get_num_threads(),
                           "loadavg_start": [round(x, 2) for x in load_start],
                           "loadavg_end": [round(x, 2) for x in os.getloadavg()]}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    args.json.with_suffix(".md").write_text("# Likeness (benchmarks/likeness.py)\n\n" + table + "\n")
    print(table)
    for name, clip in clips.items():
        print(f"{name}: {clip['targets_met']}")
    print(f"JSON: {args.json}  (load average {load_start[0]:.2f} -> {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
