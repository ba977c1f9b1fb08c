"""LGRT engine benchmark: tiny on CPU (time, peak memory), official FLOPs per window, official on GPU (bf16).

    python benchmarks/engine.py                 # everything that this machine can run
    python benchmarks/engine.py --skip-cpu      # FLOPs (+ GPU) only

Each CPU case runs in its own subprocess so that its peak resident memory is its own. Results are printed
and written to benchmarks/results/engine.json. Timings on a shared machine are disturbed by other load;
the JSON records the load average seen at the start.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its own name would shadow the `engine`
# package; drop that entry so `import engine` finds the package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

RESULTS = _HERE / "results" / "engine.json"
CPU_CASES = [(1, 0), (4, 0), (8, 0), (16, 0), (16, 64)]
FLOP_CASES = [(1, 0), (4, 0), (8, 0), (16, 0), (16, 64)]
GPU_CASES = [(1, 0), (4, 0), (8, 0), (16, 0), (16, 64)]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_cpu_case(frames: int, pool: int, threads: int, repeats: int) -> dict:
    """One tiny forward case in this process: median wall time and peak RSS above the pre-forward RSS."""
    import torch

    from engine.model import TINY, build_model
    from engine.model.point_guidance import N_POINT_FEATURES

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    images = torch.rand(1, frames, 3, TINY.image_size, TINY.image_size)
    pool_images = torch.rand(1, pool, 3, TINY.image_size, TINY.image_size) if pool else None
    points = torch.randn(TINY.n_points, 3) * 0.08
    n_base = min(frames, TINY.max_base_frames)
    feats = torch.rand(1, n_base, TINY.n_points, N_POINT_FEATURES) if TINY.point_guidance else None
    base_rss = _rss_mb()
    times, cpu = [], []
    with torch.inference_mode():
        model(images, points, pool_images=pool_images, point_features=feats)  # warm-up
        for _ in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            model(images, points, pool_images=pool_images, point_features=feats)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"frames": frames, "pool": pool, "threads": threads, "points": TINY.n_points,
            "forward_s_median": statistics.median(times), "forward_s_min": min(times),
            "cpu_s_min": min(cpu), "peak_rss_above_model_mb": round(peak - base_rss, 1)}


def cpu_cases(threads: int, repeats: int) -> list[dict]:
    rows = []
    for frames, pool in CPU_CASES:
        cmd = [sys.executable, __file__, "--case", str(frames), str(pool), "--threads", str(threads),
               "--repeats", str(repeats)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"tiny cpu {threads} thr frames {frames:2d} pool {pool:2d}: {row['forward_s_median'] * 1e3:7.1f} ms median "
              f"({row['forward_s_min'] * 1e3:.1f} min, cpu {row['cpu_s_min'] * 1e3:.0f} ms), peak +{row['peak_rss_above_model_mb']:.0f} MB", flush=True)
        rows.append(row)
    return rows


def official_flops() -> list[dict]:
    """FLOPs of the official config per window, counted by torch's FlopCounterMode on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from engine.model import OFFICIAL, build_model

    model = build_model("official", device="meta").eval()
    rows = []
    for frames, pool in FLOP_CASES:
        images = torch.empty(1, frames, 3, OFFICIAL.image_size, OFFICIAL.image_size, device="meta")
        pool_images = torch.empty(1, pool, 3, OFFICIAL.image_size, OFFICIAL.image_size, device="meta") if pool else None
        points = torch.empty(1, OFFICIAL.n_points, 3, device="meta")
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(images, points, pool_images=pool_images)
        by_module = {k.removeprefix("LGRT."): v for k, v in counter.get_flop_counts().items() if k.count(".") == 1}
        row = {"frames": frames, "pool": pool, "points": OFFICIAL.n_points,
               "tflop": counter.get_total_flops() / 1e12,
               "tflop_by_module": {k: round(sum(v.values()) / 1e12, 3) for k, v in by_module.items()}}
        print(f"official flops frames {frames:2d} pool {pool:2d}: {row['tflop']:8.1f} TFLOP "
              f"(transformer {row['tflop_by_module'].get('transformer', 0):.1f}, "
              f"encoder {row['tflop_by_module'].get('encoder', 0):.1f})", flush=True)
        rows.append(row)
    return rows


def official_gpu(flops: list[dict], repeats: int) -> list[dict]:
    """Official config, random weights, bf16 autocast on CUDA: wall time per window and achieved TFLOP/s."""
    import torch

    from engine.model import OFFICIAL, build_model

    torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model("official", device="cuda").eval()
    tflop = {(r["frames"], r["pool"]): r["tflop"] for r in flops}
    rows = []
    for frames, pool in GPU_CASES:
        images = torch.rand(1, frames, 3, OFFICIAL.image_size, OFFICIAL.image_size, device="cuda")
        pool_images = (torch.rand(1, pool, 3, OFFICIAL.image_size, OFFICIAL.image_size, device="cuda")
                       if pool else None)
        points = torch.randn(OFFICIAL.n_points, 3, device="cuda") * 0.08
        torch.cuda.reset_peak_memory_stats()
        times = []
        with torch.inference_mode():
            model(images, points, pool_images=pool_images)
            for _ in range(repeats):
                torch.cuda.synchronize()
                start = time.perf_counter()
                model(images, points, pool_images=pool_images)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        t = statistics.median(times)
        work = tflop.get((frames, pool), float("nan"))
        row = {"frames": frames, "pool": pool, "forward_s_median": t, "tflop": work, "tflops_achieved": work / t,
               "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
               "device": torch.cuda.get_device_name()}
        print(f"official gpu frames {frames:2d} pool {pool:2d}: {t * 1e3:8.1f} ms, {work / t:6.1f} TFLOP/s, "
              f"peak {row['peak_gpu_mem_gb']:.1f} GB", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts to time")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-cpu", action="store_true",
                        help="FLOPs (and GPU) only; the CPU rows already in --out are kept")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON to write (default {RESULTS})")
    parser.add_argument("--case", nargs=2, type=int, metavar=("FRAMES", "POOL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_cpu_case(args.case[0], args.case[1], args.threads[0], args.repeats)))
        return

    import torch

    result = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg(),
              "note": "CPU timings are wall-clock on a shared machine; see load_average_at_start"}
    if not args.skip_cpu:
        result["tiny_cpu"] = [row for t in args.threads for row in cpu_cases(t, args.repeats)]
    elif args.out.is_file():  # a GPU-only run must not erase the CPU measurements made before
        result["tiny_cpu"] = json.loads(args.out.read_text()).get("tiny_cpu", [])
    result["official_flops"] = official_flops()
    if torch.cuda.is_available():
        result["official_gpu_bf16"] = official_gpu(result["official_flops"], repeats=3)
    else:
        result["official_gpu_bf16"] = "not run: no CUDA device on this machine"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
