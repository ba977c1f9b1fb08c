"""Per-frame tracking time at 512x512: detection amortized over the re-detect interval, landmarks, and the
FLAME fit alone. Prints a table and writes JSON.

    .venv/bin/python benchmarks/tracking.py [--clip PATH] [--frames 150] [--model head|synthetic] [--out JSON]

Runs on one core (torch and BLAS threads set to 1). Target: whole tracker >= 25 fps, fit < 5 ms.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# run as a script, this folder comes first on sys.path and benchmarks/engine.py would hide the engine package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default=str(ROOT.parent / "shared" / "data" / "real" / "obama_address_512.mp4"))
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--model", choices=["head", "synthetic"], default="head")
    parser.add_argument("--redetect-every", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tracking.json"))
    args = parser.parse_args()

    import av
    import torch

    torch.set_num_threads(1)
    from fastavatar_stream.tracking import (BoxTracker, DlibDetector, FaceTracker, LandmarkFitter,
                                            LandmarkModel, TrackerConfig, View)

    if args.model == "head":
        import engine

        model = LandmarkModel.from_head(engine.load_head())
    else:
        model = LandmarkModel.synthetic(50, 50)
    with av.open(args.clip) as c:
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(args.frames), c.decode(video=0))]
    h, w = frames[0].shape[:2]
    detector = DlibDetector()

    t_detect = []
    for image in frames[:20]:
        t0 = time.perf_counter()
        detector.detect(image)
        t_detect.append(time.perf_counter() - t0)
    box = detector.detect(frames[0])[0].box
    t_lm = []
    for image in frames[:50]:
        t0 = time.perf_counter()
        detector.landmarks(image, box)
        t_lm.append(time.perf_counter() - t0)

    tracker = FaceTracker(model, TrackerConfig(redetect_every=args.redetect_every), detector=detector)
    t_track = []
    for i, image in enumerate(frames):
        t0 = time.perf_counter()
        tracker.track(image, i / 25.0, i)
        t_track.append(time.perf_counter() - t0)
    steady = t_track[tracker.config.identity_frames + 1:]       # after the identity is held

    # the fit alone, warm-started, on the landmarks the tracker saw
    boxes = BoxTracker(detector, args.redetect_every)
    observed = [boxes.update(im).face.landmarks for im in frames]
    fitter: LandmarkFitter = tracker.fitter
    camera = tracker.camera_for(w, h)
    prev, t_fit = None, []
    for pts in observed:
        t0 = time.perf_counter()
        prev = fitter.fit_frame([View(camera, pts)], tracker.shape, previous=prev).pose
        t_fit.append(time.perf_counter() - t0)
    t_fit = t_fit[1:]                                           # the first is a cold start

    ms = lambda xs: 1e3 * float(np.median(xs))  # noqa: E731
    result = {
        "clip": Path(args.clip).name, "size": [w, h], "frames": len(frames), "model": args.model,
        "n_shape_fit": fitter.n_shape, "n_expression_fit": fitter.n_expression,
        "redetect_every": args.redetect_every,
        "detect_ms": ms(t_detect), "detect_amortized_ms": ms(t_detect) / args.redetect_every,
        "landmarks_ms": ms(t_lm), "fit_ms_median": ms(t_fit), "fit_ms_p95": 1e3 * float(np.percentile(t_fit, 95)),
        "cold_start_fit_ms": 1e3 * float(t_track[0]),
        "tracker_ms_median": ms(steady), "tracker_ms_mean": 1e3 * float(np.mean(steady)),
        "tracker_fps_mean": 1.0 / float(np.mean(steady)), "counts": dict(tracker.counts),
    }
    for k, v in result.items():
        print(f"{k:>22}: {v:.2f}" if isinstance(v, float) else f"{k:>22}: {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
