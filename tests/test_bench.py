"""The train-step benchmark: runs a config's step and accounts FLOPs as MFU conventions ask."""

import json
import subprocess
import sys

import pytest

from conftest import REPO


def test_train_step_bench_counts_model_flops_without_recomputation(tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(REPO / "bench" / "train_step.py"), f"--config={REPO / 'configs' / 'test_tiny.py'}",
           "--config.remat=full", "--iters=2", "--peak_tflops=1.0", f"--json={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["remat"] == "full" and r["inputs"] == "pixels" and r["shape"].startswith("B=2 F=4 ")
    # Full remat recomputes the forward pass inside the backward one: hardware FLOPs exceed model FLOPs,
    # by less than one extra forward (a forward is about a third of forward + backward).
    assert r["model_gflops_per_step"] < r["hw_gflops_per_step"] < 1.5 * r["model_gflops_per_step"]
    assert r["mfu"] == pytest.approx(r["model_gflops_per_step"] / 1e3 / r["median_step_s"], rel=0.02)
    assert r["examples_per_s"] == pytest.approx(2 / r["median_step_s"], rel=0.02)
