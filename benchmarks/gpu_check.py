"""GPU check of the official model path: gsplat against our CPU renderer, the official network's speed, batching.

    python benchmarks/gpu_check.py --out DIR        # on a CUDA machine; writes DIR/gpu.json

1. Rendering: the same random head-sized scene through gsplat (CUDA) and our compiled CPU renderer: image PSNR
   (target >= 40 dB), gradient agreement (cosine similarity and relative error of d loss / d means, quats,
   scales, opacities, colours), and gsplat frames per second at 100k Gaussians, 512x512 (target >= 300).
2. The official config (random weights, bf16 autocast, all 21,675 points) at 1 / 4 / 8 / 16 frames and 16 + a
   FramePack pool of 64: median wall time per window against the compute floor (FLOPs counted by torch's
   FlopCounterMode / the card's dense bf16 peak, `--peak-tflops`). Targets: 16 frames <= 1.0 s, 1 frame <= 0.15 s.
3. Batched throughput: 1, 2 and 4 sessions' 16-frame windows in one forward (windows per second), and the
   largest difference between a batched session's Gaussians and its own unbatched run.
4. Whether every attention call of the network runs on the flash kernel alone (bf16, head dim 64).

On a machine without CUDA it exits 2 with one line. `--dry-run-cpu` runs every step at toy sizes on the CPU
(the PyTorch reference renderer in gsplat's place, the `micro` network) so the script itself can be tested
anywhere; its figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# run as a script, this folder comes first on sys.path and benchmarks/engine.py would hide the engine package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402

WINDOW_CASES = ((1, 0), (4, 0), (8, 0), (16, 0), (16, 64))
SESSION_COUNTS = (1, 2, 4)
TARGETS = {"psnr_db_min": 40.0, "render_fps_min": 300.0, "window16_s_max": 1.0, "window1_s_max": 0.15}


def _timed(fn, repeats: int, sync) -> list[float]:
    fn()  # warm-up (kernel selection, allocator)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


# ------------------------------------------------------------------------------------------------------ rendering
def render_agreement(device: str, backend: str, n: int, size: int) -> dict:
    """PSNR between `backend` on `device` and the CPU renderer, and how their gradients agree."""
    from benchmarks.render import head_scene
    from engine.render import render

    scene = head_scene(n, size, seed=1)
    # opacities below both renderers' alpha clamps (0.99 CPU, 0.999 gsplat), so the two must agree exactly
    scene.opacities = scene.opacities.clamp(max=0.9)
    target = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(2))
    results = {}
    for name, dev, back in (("reference", "cpu", "cpu"), ("candidate", device, backend)):
        inputs = [t.to(dev).requires_grad_(True) for t in scene.inputs(False)]
        out = render(*inputs, scene.viewmats.to(dev), scene.Ks.to(dev), size, size, backend=back,
                     background=torch.ones(3, device=dev))
        loss = ((out["rgb"] - target.to(dev)) ** 2).mean()
        loss.backward()
        results[name] = (out["rgb"].detach().cpu(), [t.grad.detach().cpu() for t in inputs])
    ref_img, ref_grads = results["reference"]
    img, grads = results["candidate"]
    mse = float(((img - ref_img) ** 2).mean())
    names = ("means", "quats", "scales", "opacities", "colors")
    gradient = {}
    for name, a, b in zip(names, grads, ref_grads):
        a, b = a.flatten().double(), b.flatten().double()
        gradient[name] = {"cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
                          "relative_error": float((a - b).norm() / b.norm().clamp_min(1e-30))}
    return {"gaussians": n, "size": size, "psnr_db": -10 * math.log10(max(mse, 1e-20)), "gradients": gradient}


def render_speed(device: str, backend: str, n: int, size: int, repeats: int, sync) -> dict:
    from benchmarks.render import head_scene
    from engine.render import render

    scene = head_scene(n, size, seed=3)
    inputs = [t.to(device) for t in scene.inputs(False)]
    view, K = scene.viewmats.to(device), scene.Ks.to(device)
    with torch.no_grad():
        times = _timed(lambda: render(*inputs, view, K, size, size, backend=backend), repeats, sync)
    median = statistics.median(times)
    return {"gaussians": n, "size": size, "ms_median": median * 1e3, "fps": 1.0 / median}


# -------------------------------------------------------------------------------------------------------- network
def window_flops(config, frames: int, pool: int) -> float:
    """TFLOP of one window, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from engine.model import build_model

    model = build_model(config, device="meta").eval()
    images = torch.empty(1, frames, 3, config.image_size, config.image_size, device="meta")
    pool_images = torch.empty(1, pool, 3, config.image_size, config.image_size, device="meta") if pool else None
    points = torch.empty(1, config.n_points, 3, device="meta")
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(images, points, pool_images=pool_images)
    return counter.get_total_flops() / 1e12


def window_times(model, device: str, repeats: int, sync, peak_tflops: float) -> list[dict]:
    cfg = model.cfg
    rows = []
    for frames, pool in WINDOW_CASES:
        images = torch.rand(1, frames, 3, cfg.image_size, cfg.image_size, device=device)
        pool_images = torch.rand(1, pool, 3, cfg.image_size, cfg.image_size, device=device) if pool else None
        points = torch.randn(cfg.n_points, 3, device=device) * 0.08
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            times = _timed(lambda: model(images, points, pool_images=pool_images), repeats, sync)
        tflop = window_flops(cfg, frames, pool)
        median = statistics.median(times)
        row = {"frames": frames, "pool": pool, "points": cfg.n_points, "s_median": median, "s_min": min(times),
               "tflop": tflop, "floor_s": tflop / peak_tflops, "tflops_achieved": tflop / median}
        if device.startswith("cuda"):
            row["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"window {frames:2d} frames + pool {pool:2d}: {median * 1e3:8.1f} ms "
              f"(floor {row['floor_s'] * 1e3:.0f} ms, {row['tflops_achieved']:.0f} TFLOP/s)", flush=True)
        rows.append(row)
    return rows


def flash_eligible(model, device: str) -> dict:
    """Whether every attention call of a 1-frame window runs with the flash kernel alone (it raises otherwise)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = model.cfg
    images = torch.rand(1, 1, 3, cfg.image_size, cfg.image_size, device=device)
    points = torch.randn(cfg.n_points, 3, device=device) * 0.08
    try:
        with torch.inference_mode(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            model(images, points)
    except RuntimeError as exc:
        return {"flash_only": False, "error": str(exc).splitlines()[0]}
    return {"flash_only": True}


def batched_throughput(model, device: str, repeats: int, sync) -> list[dict]:
    """B sessions' 16-frame windows (each with its own points) in one forward; windows per second, and the
    largest difference of one batch item's output from its own unbatched forward."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(5)
    max_sessions = max(SESSION_COUNTS)
    images = torch.rand(max_sessions, 16, 3, cfg.image_size, cfg.image_size, generator=g).to(device)
    points = (torch.randn(max_sessions, cfg.n_points, 3, generator=g) * 0.08).to(device)
    rows = []
    with torch.inference_mode():
        alone = model(images[:1], points[:1])
        for b in SESSION_COUNTS:
            times = _timed(lambda: model(images[:b], points[:b]), repeats, sync)
            together = model(images[:b], points[:b])
            diff = float((together.xyz[:1] - alone.xyz).abs().max())
            median = statistics.median(times)
            rows.append({"sessions": b, "s_median": median, "windows_per_s": b / median,
                         "max_abs_xyz_diff_vs_unbatched": diff})
            print(f"batched {b} session(s): {median * 1e3:8.1f} ms per forward, {b / median:.2f} windows/s, "
                  f"max |xyz - unbatched| {diff:.2e}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu.json")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the card's dense bf16 peak for the compute floor (default: H100 SXM, 989)")
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="toy sizes on the CPU (torch reference renderer, micro network): tests the script")
    args = parser.parse_args()
    if not args.dry_run_cpu and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device on this machine (torch.cuda.is_available() is False); run it on a "
              "GPU machine", file=sys.stderr)
        return 2
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"gpu_check: error: cannot create --out {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2

    from engine.model import build_model, get_config

    if args.dry_run_cpu:
        device, backend, config, scene = "cpu", "torch", get_config("micro").replace(point_guidance=False), (300, 64)
        speed = (300, 64)
        sync = lambda: None  # noqa: E731
    else:
        device, backend, config, scene, speed = "cuda", "gsplat", get_config("official"), (20_000, 256), (100_000, 512)
        sync = torch.cuda.synchronize
        torch.backends.cuda.matmul.allow_tf32 = True
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run: figures mean nothing)",
              "torch": torch.__version__, "python": platform.python_version(), "targets": TARGETS,
              "peak_tflops_assumed": args.peak_tflops, "weights": "random (speed only)", "config": config.name}
    result["render_agreement"] = render_agreement(device, backend, *scene)
    print(f"render: {backend} vs cpu PSNR {result['render_agreement']['psnr_db']:.1f} dB", flush=True)
    result["render_speed"] = render_speed(device, backend, *speed, args.repeats, sync)
    print(f"render: {speed[0]} Gaussians at {speed[1]}^2: {result['render_speed']['fps']:.0f} FPS", flush=True)
    torch.manual_seed(0)
    model = build_model(config, device=device).eval()
    if device == "cuda":
        result["attention"] = flash_eligible(model, device)
        print(f"attention runs flash-only: {result['attention']['flash_only']}", flush=True)
    result["windows"] = window_times(model, device, args.repeats, sync, args.peak_tflops)
    result["batched"] = batched_throughput(model, device, args.repeats, sync)
    by_case = {(r["frames"], r["pool"]): r["s_median"] for r in result["windows"]}
    result["targets_met"] = {
        "psnr": result["render_agreement"]["psnr_db"] >= TARGETS["psnr_db_min"],
        "render_fps": result["render_speed"]["fps"] >= TARGETS["render_fps_min"],
        "window16": by_case[(16, 0)] <= TARGETS["window16_s_max"],
        "window1": by_case[(1, 0)] <= TARGETS["window1_s_max"],
    }
    path = args.out / "gpu.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
