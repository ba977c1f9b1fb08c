"""Renderer benchmark: the compiled CPU backend against the PyTorch reference, forward and forward+backward.

    python -m benchmarks.render [--out benchmarks/results/render.json] [--threads 1 2] [--repeats 5]

Scenes are random head-sized Gaussian clouds (a ~0.25 m ellipsoidal shell, Gaussians of 1-5 mm) seen by a
portrait camera 0.6 m away. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# run as a script, this folder comes first on sys.path and benchmarks/engine.py would hide the engine package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from engine.render import render  # noqa: E402
from engine.types import intrinsics_from_fov, look_at  # noqa: E402

CASES = ((20_000, 256), (80_000, 512))


@dataclass
class Scene:
    """Gaussians (N,...) and one camera (viewmats (1,4,4), Ks (1,3,3))."""

    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    colors: torch.Tensor
    viewmats: torch.Tensor
    Ks: torch.Tensor
    size: int

    def inputs(self, requires_grad: bool) -> list[torch.Tensor]:
        return [t.clone().requires_grad_(requires_grad)
                for t in (self.means, self.quats, self.scales, self.opacities, self.colors)]


def head_scene(n: int, size: int, seed: int = 0) -> Scene:
    """n Gaussians on a head-sized ellipsoidal shell (semi-axes 8 x 11 x 10 cm, 1 cm thick), scales 1-5 mm."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(n, 3, generator=g)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    radius = 1.0 - 0.1 * torch.rand(n, 1, generator=g)
    means = direction * radius * torch.tensor([0.08, 0.11, 0.10])
    quats = torch.randn(n, 4, generator=g)
    scales = torch.exp(torch.empty(n, 3).uniform_(math.log(0.001), math.log(0.005), generator=g))
    opacities = torch.empty(n).uniform_(0.2, 1.0, generator=g)
    colors = torch.rand(n, 3, generator=g)
    view = look_at(torch.tensor([0.0, 0.0, 0.6]), torch.zeros(3))[None]
    K = intrinsics_from_fov(28.0, size, size)[None]
    return Scene(means, quats, scales, opacities, colors, view, K, size)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (JIT, caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(scene: Scene, backend: str, repeats: int) -> dict[str, float]:
    def forward() -> None:
        with torch.no_grad():
            render(*scene.inputs(False), scene.viewmats, scene.Ks, scene.size, scene.size, backend=backend)

    weights = torch.rand(1, scene.size, scene.size, 3, generator=torch.Generator().manual_seed(1))

    def forward_backward() -> None:
        inputs = scene.inputs(True)
        out = render(*inputs, scene.viewmats, scene.Ks, scene.size, scene.size, backend=backend)
        ((out["rgb"] * weights).sum() + out["alpha"].sum()).backward()

    return {"forward_ms": _time(forward, repeats), "forward_backward_ms": _time(forward_backward, repeats)}


@dataclass
class Row:
    gaussians: int
    size: int
    threads: int
    cpu_forward_ms: float
    cpu_forward_backward_ms: float
    torch_forward_ms: float
    torch_forward_backward_ms: float

    @property
    def forward_speedup(self) -> float:
        return self.torch_forward_ms / self.cpu_forward_ms

    @property
    def fb_speedup(self) -> float:
        return self.torch_forward_backward_ms / self.cpu_forward_backward_ms

    @property
    def fb_over_forward(self) -> float:
        return self.cpu_forward_backward_ms / self.cpu_forward_ms


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/render.json"))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--reference-repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="only the 20k / 256x256 case")
    args = parser.parse_args(argv)

    rows = []
    cases = CASES[:1] if args.quick else CASES
    previous = torch.get_num_threads()
    for n, size in cases:
        scene = head_scene(n, size)
        for threads in args.threads:
            torch.set_num_threads(threads)
            fast = measure(scene, "cpu", args.repeats)
            ref = measure(scene, "torch", args.reference_repeats)
            rows.append(Row(n, size, threads, fast["forward_ms"], fast["forward_backward_ms"], ref["forward_ms"],
                            ref["forward_backward_ms"]))
            r = rows[-1]
            print(f"{n:>7} {size:>4}² {threads} thr | cpu fwd {r.cpu_forward_ms:8.2f} ms  fwd+bwd "
                  f"{r.cpu_forward_backward_ms:8.2f} ms | torch fwd {r.torch_forward_ms:8.1f} ms  fwd+bwd "
                  f"{r.torch_forward_backward_ms:8.1f} ms | fwd x{r.forward_speedup:5.1f}  fwd+bwd "
                  f"x{r.fb_speedup:5.1f}  (fwd+bwd)/fwd {r.fb_over_forward:4.2f}", flush=True)
    torch.set_num_threads(previous)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "render",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__},
        "scene": "head-sized shell 0.16x0.22x0.20 m, 1-5 mm Gaussians, camera at 0.6 m, fov 28 deg",
        "rows": [{**asdict(r), "forward_speedup": r.forward_speedup, "forward_backward_speedup": r.fb_speedup,
                  "cpu_fwd_bwd_over_fwd": r.fb_over_forward} for r in rows],
    }
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
