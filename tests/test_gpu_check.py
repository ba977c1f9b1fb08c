"""`benchmarks/gpu_check.py`: one line and exit 2 without CUDA; the whole check where a GPU is present."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_exits_2_with_one_line(tmp_path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "gpu")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]
    assert not (tmp_path / "gpu" / "gpu.json").exists()


def test_the_dry_run_on_the_cpu_goes_through_every_step(tmp_path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--dry-run-cpu", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["device"].startswith("cpu (dry run")
    assert result["render_agreement"]["psnr_db"] > 60  # the two CPU renderers agree to float precision
    assert [(r["frames"], r["pool"]) for r in result["windows"]] == [(1, 0), (4, 0), (8, 0), (16, 0), (16, 64)]
    assert [r["sessions"] for r in result["batched"]] == [1, 2, 4]
    assert all(r["max_abs_xyz_diff_vs_unbatched"] < 1e-5 for r in result["batched"])


@pytest.mark.gpu
def test_on_a_gpu_gsplat_agrees_with_the_cpu_renderer_and_batching_changes_nothing(tmp_path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--repeats", "2"],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["render_agreement"]["psnr_db"] >= 40
    assert all(g["cosine"] > 0.99 for g in result["render_agreement"]["gradients"].values())
    assert all(row["max_abs_xyz_diff_vs_unbatched"] < 1e-2 for row in result["batched"])
