"""benchmarks/gpu_check.py in its tiny CPU setting: every step the GPU check runs, run here, so
that the script a GPU session spends its minutes on cannot rot."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def gpu_check(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out), "--tiny",
                           *extra], capture_output=True, text=True, timeout=900)


def test_every_step_runs_on_cpu_and_reports_its_figures(tmp_path):
    done = gpu_check(tmp_path, "--device", "cpu")
    assert done.returncode == 0, done.stdout[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = {step["name"]: step for step in report["steps"]}
    assert report["failed"] is None and all(step["returncode"] == 0 for step in steps.values())
    assert [name for name in steps if name.startswith("smoke_")] == ["smoke_clusiam", "smoke_mit_b1"]
    for network in ("clusiam", "mit_b1"):  # one network per backbone family in the tiny setting
        assert all(math.isfinite(loss) for loss in steps[f"smoke_{network}"]["figures"]["losses"])
    for network in ("clusiam",):  # the tiny setting resumes one network (the same code for every backbone)
        first, resumed = steps[f"smoke_{network}"]["figures"]["losses"], steps[f"resume_{network}"]["figures"]["losses"]
        assert len(resumed) == len(first) + 1 and resumed[: len(first)] == first  # one more epoch, resumed
        assert all(math.isfinite(loss) for loss in resumed)
    for method in ("clusiam",):  # one method in the tiny setting
        rates = steps[f"throughput_{method}"]["figures"]
        assert set(rates) == {"model only", "end to end", "paper pipeline"}
        assert rates["model only"]["of_model_only"] == 1.0 and all(r["images_per_s"] > 0 for r in rates.values())
    assert set(steps["pipeline_loss"]["figures"]) >= {"loss", "invariance", "cluster"}
    assert steps["features"]["figures"]["finite"] and steps["features"]["figures"]["precision"] == "fp32"
    assert "torch-cpu" in steps["knn"]["figures"]  # seconds, printed to 0.01: 0.00 at this size
    probe = steps["probe"]["figures"]
    assert probe["probe_patches"] == probe["training_patches"] == 48 and 0 < probe["probe_seconds"]
    assert probe["measured_share"] == pytest.approx(probe["probe_seconds"] / probe["epoch_seconds"], abs=1e-4)
    assert len(steps["torchrun_resume"]["figures"]["losses"]) == 2


def test_the_first_failing_step_stops_the_check_and_names_its_command(tmp_path):
    done = gpu_check(tmp_path, "--device", "cuda:7")  # no such device here
    assert done.returncode == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failed"] == "smoke_clusiam" and [s["name"] for s in report["steps"]] == ["data", "smoke_clusiam"]
    assert f"stopped at smoke_clusiam: {sys.executable} {ROOT / 'pretrain.py'}" in done.stdout
