"""Every GPU path of clusiam, run and measured in one go on one GPU (issue #16).

    python benchmarks/gpu_check.py --out /tmp/gpu_check [--wheels .whl]     # one H200: about 8 minutes
    python benchmarks/gpu_check.py --out /tmp/gpu_check --tiny --device cpu  # the CPU test's setting

Steps, each a command run in its own process (stopping at the first that fails, naming it):

1. ``data``: real H&E patches cut from the CC0 slide (``benchmarks/throughput.py --make_patches``);
2. ``smoke_<method>``: ``pretrain.py`` on them for clusiam, clubyol, simsiam, byol
   (ResNet-18) and CluSiam with the MiT-B1 backbone: finite losses in every epoch's row,
   then one more epoch resumed from the checkpoint (``--resume auto``);
3. ``throughput_<method>``: ``benchmarks/throughput.py`` for CluSiam and CluBYOL: model-only
   step, end to end, the paper's pipeline; the ratio to model-only and peak memory;
4. ``pipeline_loss``: ``benchmarks/pipeline_loss.py``, batched views against PIL views;
5. ``features``: the feature extraction rate of :func:`clusiam.features.encode` (bf16 on GPU);
6. ``knn``: ``benchmarks/knn.py`` (torch on the GPU, faiss-gpu where installed);
7. ``probe``: ``benchmarks/probe_time.py``, a probe (``pretrain.py --probe``) beside its epoch;
8. ``torchrun``: ``pretrain.py`` under torchrun with one process (NCCL, SyncBatchNorm), and resumed.

Writes ``OUT/gpu_check.json`` (per step: command, seconds, exit status, figures, last
output lines) and prints one readable line per step. ``--wheels DIR`` first installs the
wheels in DIR (what a bare GPU image with torch lacks: lightly, faiss, tiffslide,
universal_pathlib, ...) into ``OUT/site``, for this process and every step.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("clusiam", "clubyol", "simsiam", "byol")


@dataclass(frozen=True)
class Setting:
    """The sizes of one check: the full one for a GPU, a tiny one for the CPU test."""

    patches: int
    patch_size: int
    image_size: int
    batch_size: int
    mit_batch_size: int
    smoke: tuple[str, ...]  # the networks of the smoke runs
    smoke_epochs: int  # then one more, resumed, for the networks in ``resumed``
    resumed: tuple[str, ...]
    throughput: tuple[str, ...]  # the methods of benchmarks/throughput.py
    workers: int
    throughput_steps: int
    knn_size: int
    loss_seeds: tuple[int, ...]
    loss_epochs: int


FULL = Setting(patches=25_600, patch_size=224, image_size=224, batch_size=512, mit_batch_size=256,
               smoke=(*METHODS, "mit_b1"), smoke_epochs=3,
               resumed=(*METHODS, "mit_b1"), throughput=("clusiam", "clubyol"), workers=16, throughput_steps=40,
               knn_size=100_000, loss_seeds=(0, 1), loss_epochs=2)
# The CPU test runs every command the check runs once: one network per backbone family (the methods are one
# command with another --model_type, and each method's CLI run is tested in tests/test_train.py), one resumed
# (resuming restores the model's and the optimizer's state dicts, the same code for every method and backbone) and
# one throughput run; the full check runs each.
TINY = Setting(patches=48, patch_size=64, image_size=32, batch_size=8, mit_batch_size=8,
               smoke=("clusiam", "mit_b1"), smoke_epochs=1,
               resumed=("clusiam",), throughput=("clusiam",), workers=0, throughput_steps=2, knn_size=500,
               loss_seeds=(0,), loss_epochs=1)


@dataclass
class Step:
    name: str
    command: list[str]
    figures: dict = field(default_factory=dict)
    seconds: float = 0.0
    returncode: int | None = None
    tail: str = ""


def run_step(step: Step, env: dict[str, str]) -> str:
    """Run one step's command; return its output (stdout and stderr together)."""
    started = time.perf_counter()
    done = subprocess.run(step.command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    step.seconds = round(time.perf_counter() - started, 1)
    step.returncode = done.returncode
    step.tail = "\n".join(done.stdout.strip().splitlines()[-15:])
    return done.stdout


def epoch_losses(run: Path) -> list[float]:
    """The loss of each epoch's row in a run's ``logs/epochs.csv``."""
    with open(run / "logs" / "epochs.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def training_options(setting: Setting, device: str) -> list[str]:
    return ["--device", device, "--image_size", str(setting.image_size), "--batch_size", str(setting.batch_size),
            "--num_worker", str(setting.workers)]


def pretrain_command(setting: Setting, data: Path, run: Path, device: str, epochs: int, *extra: str,
                     launcher: tuple[str, ...] = ()) -> list[str]:
    return [*(launcher or (sys.executable,)), str(ROOT / "pretrain.py"), str(data), "--save_path", str(run),
            *training_options(setting, device), "--epochs", str(epochs), *extra]


def smoke_steps(setting: Setting, data: Path, out: Path, device: str) -> list[tuple[Step, Path]]:
    """(training, run folder) per network, each followed by its resumed training where the setting says."""
    networks = {**{m: ("--model_type", m) for m in METHODS}, "mit_b1": (
        "--model_type", "clusiam", "--backbone", "mit_b1", "--batch_size", str(setting.mit_batch_size))}
    steps = []
    for name in setting.smoke:
        options = networks[name]
        run = out / "runs" / name
        first = pretrain_command(setting, data, run, device, setting.smoke_epochs, *options)
        resumed = pretrain_command(setting, data, run, device, setting.smoke_epochs + 1, *options, "--resume", "auto")
        steps.append((Step(f"smoke_{name}", first), run))
        if name in setting.resumed:
            steps.append((Step(f"resume_{name}", resumed), run))
    return steps


RATE_LINE = re.compile(r"^(model only|end to end|paper pipeline).*?\s([\d.]+) images/s\s+([\d.]+) of model-only"
                       r"\s+peak\s+([\d.]+|nan) GiB", re.MULTILINE)


def throughput_figures(output: str) -> dict:
    """images/s, share of the model-only rate and peak GiB of each pipeline benchmarks/throughput.py printed."""
    return {kind: {"images_per_s": float(rate), "of_model_only": float(ratio),
                   "peak_gib": None if peak == "nan" else float(peak)}  # nan: no GPU memory to count
            for kind, rate, ratio, peak in RATE_LINE.findall(output)}


def pipeline_loss_figures(output: str) -> dict:
    """Per loss term: the gap between batched and PIL views in pooled standard deviations."""
    return {name: float(gap) for name, gap in re.findall(r"^(\w+)\s+batched .*?= ([-+\d.na]+) x pooled std",
                                                         output, re.MULTILINE)}


def knn_figures(output: str) -> dict:
    return {backend: float(seconds) for backend, seconds in re.findall(r"^([\w-]+)\s+([\d.]+)\s", output, re.MULTILINE)
            if backend != "backend"}


def feature_command(setting: Setting, data: Path, checkpoint: Path, device: str) -> list[str]:
    """Time :func:`clusiam.features.encode` of every patch with a smoke checkpoint's backbone."""
    code = (
        "import json, sys, time, torch\n"
        "from clusiam.checkpoint import load_pretrained\n"
        "from clusiam.features import encode, feature_extractor, precision\n"
        "from clusiam.images import find_images\n"
        f"files = find_images({str(data)!r}, 'data')\n"
        f"model, state = load_pretrained({str(checkpoint)!r})\n"
        f"device = torch.device({device!r})\n"
        "norm = state['normalization']\n"
        "run = lambda: encode(feature_extractor(model), files, norm['mean'], norm['std'], device, "
        f"batch_size={max(setting.batch_size, 8) * 2}, num_workers={setting.workers})\n"
        "run()  # warm-up: workers, cuDNN's algorithm choice\n"
        "started = time.perf_counter(); features = run(); seconds = time.perf_counter() - started\n"
        "print(json.dumps({'patches_per_s': round(len(files) / seconds, 1), 'precision': precision(device), "
        "'finite': bool(torch.from_numpy(features).isfinite().all())}))\n"
    )
    return [sys.executable, "-c", code]


def plan(setting: Setting, out: Path, device: str) -> list[tuple[Step, callable]]:
    """Every step with the function that reads its figures from its output (or checks them)."""
    data = out / "patches"
    cut = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); from throughput import make_patches; "
           f"make_patches(__import__('pathlib').Path({str(data)!r}), {setting.patches}, {setting.patch_size})")
    steps: list[tuple[Step, callable]] = [(Step("data", [sys.executable, "-c", cut]), lambda output: {})]
    for step, run in smoke_steps(setting, data, out, device):
        steps.append((step, lambda output, run=run: {"losses": epoch_losses(run)}))
    for method in setting.throughput:
        steps.append((Step(f"throughput_{method}", [
            sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--patches", str(data), "--model_type", method,
            "--batch_size", str(setting.batch_size), "--image_size", str(setting.image_size), "--num_workers",
            str(setting.workers), "--steps", str(setting.throughput_steps), "--warmup",
            str(max(1, setting.throughput_steps // 4)), "--device", device]), throughput_figures))
    steps.append((Step("pipeline_loss", [
        sys.executable, str(ROOT / "benchmarks" / "pipeline_loss.py"), "--seeds", *map(str, setting.loss_seeds), "--",
        str(data), "--device", device, "--image_size", str(setting.image_size), "--batch_size",
        str(setting.batch_size), "--num_worker", str(setting.workers), "--epochs", str(setting.loss_epochs)]),
        pipeline_loss_figures))
    steps.append((Step("features", feature_command(setting, data, out / "runs" / "clusiam" / "last.pth", device)),
                  lambda output: json.loads(output.strip().splitlines()[-1])))
    steps.append((Step("knn", [sys.executable, str(ROOT / "benchmarks" / "knn.py"), "--n_train",
                               str(setting.knn_size), "--n_test", str(setting.knn_size), "--skip_sklearn"]),
                  knn_figures))
    steps.append((Step("probe", [
        sys.executable, str(ROOT / "benchmarks" / "probe_time.py"), "--out", str(out / "probe_time"), "--data",
        str(data), "--probe_patches", str(min(10_000, setting.patches)), "--", *training_options(setting, device)]),
        lambda output: json.loads(output.strip().splitlines()[-1])))
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1")
    run = out / "runs" / "torchrun"
    for name, epochs, extra in (("torchrun", 1, ()), ("torchrun_resume", 2, ("--resume", "auto"))):
        steps.append((Step(name, pretrain_command(setting, data, run, device, epochs, *extra, launcher=launcher)),
                      lambda output: {"losses": epoch_losses(run)}))
    return steps


def install_wheels(wheels: Path, out: Path, env: dict[str, str]) -> None:
    """Install the carried wheels into OUT/site and put it on the path of this process and every step."""
    site = out / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(site), *map(str, sorted(wheels.glob("*.whl")))], check=True)
    sys.path.insert(0, str(site))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))


def finite_losses(figures: dict) -> bool:
    return all(math.isfinite(value) for value in figures.get("losses", []))


def check(args: argparse.Namespace) -> int:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    if args.wheels:
        install_wheels(args.wheels, out, env)
    done, failed = [], None
    for step, read_figures in plan(TINY if args.tiny else FULL, out, args.device):
        output = run_step(step, env)
        if step.returncode == 0:
            step.figures = read_figures(output)
        done.append(step)
        ok = step.returncode == 0 and finite_losses(step.figures)
        print(f"{'ok ' if ok else 'FAILED'} {step.name:<20} {step.seconds:7.1f} s  {json.dumps(step.figures)}",
              flush=True)
        if not ok:
            failed = step
            break
    report = {"device": args.device, "tiny": args.tiny, "date": time.strftime("%Y-%m-%d"),
              "steps": [vars(step) for step in done], "failed": failed.name if failed else None}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    if failed:
        print(f"stopped at {failed.name}: {' '.join(failed.command)}\n{failed.tail}")
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the data, the runs and gpu_check.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the CPU test's sizes: every step in seconds")
    parser.add_argument("--wheels", type=Path, default=None, help="install these wheels first (a bare GPU image)")
    return check(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
