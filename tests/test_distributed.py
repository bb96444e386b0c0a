"""Multi-process runs on CPU with the gloo backend and 2 processes, as torchrun starts them.

SyncBatchNorm only runs on GPUs, so on CPU each process normalises its own rows. The
equivalence tests therefore put the network in eval mode (BatchNorm from running
statistics, a per-image function) to compare 2 processes x B/2 with 1 process x B on
everything else: the gathered cluster loss, the invariance loss, DDP's gradients, the
optimizer step and the momentum target.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from clusiam.checkpoint import load_checkpoint
from clusiam.config import parse_config
from clusiam.knn_eval import main as evaluate_knn
from clusiam.models import PretrainModel
from clusiam.train import train
from conftest import epochs_csv, tiny_run_args
from distributed_workers import WORLD, collectives_worker, one_step, one_step_worker, spawn
from mil.compute_feats import main as compute_feats
from test_slide_source import write_job

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("model_type, alpha", [("clusiam", 0.0), ("clusiam", 0.5), ("clubyol", 0.9)])
def test_two_processes_with_half_batches_equal_one_process_with_the_whole_batch(tmp_path, model_type, alpha):
    """alpha 0 is the deterministic part; with alpha > 0 the Gumbel noise comes from a
    generator seeded alike, so the whole loss must match too."""
    spawn(one_step_worker, tmp_path, model_type, alpha, str(tmp_path / "out.pt"))
    ranks = torch.load(tmp_path / "out.pt", weights_only=True)
    single = one_step(model_type, alpha, processes=1)
    for result in ranks:
        for name in ("invariance", "loss", *(["cluster"] if "cluster" in single else [])):
            assert result[name] == pytest.approx(single[name], abs=1e-5), name
        assert result["grads"].keys() == single["grads"].keys()
        for name, grad in single["grads"].items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
        for name, weight in single["weights"].items():  # target included: updated in step on every rank
            torch.testing.assert_close(result["weights"][name], weight, rtol=1e-4, atol=1e-6, msg=name)
    assert bool(single["grads"]["cluster_assigner.weight"].abs().sum() > 0) == (alpha > 0)
    if alpha > 0:
        assert ranks[0]["cluster_this_rank"] == ranks[1]["cluster_this_rank"]  # every rank: the global loss
        # Without the gather each rank would see a different cluster loss: the test can tell.
        assert abs(ranks[0]["cluster_local_only"] - single["cluster"]) > 1e-3
    if model_type == "clubyol":
        torch.manual_seed(0)
        initial = PretrainModel(model_type, "resnet18", feat_size=32, num_clusters=6).state_dict()
        moved = [name for name, value in single["weights"].items()
                 if name.startswith("target_") and value.is_floating_point() and not torch.equal(value, initial[name])]
        assert len(moved) > 10  # the momentum update did change the target


def test_collectives_agree_on_every_rank(tmp_path):
    spawn(collectives_worker, tmp_path, str(tmp_path / "out.pt"))
    reports = torch.load(tmp_path / "out.pt", weights_only=True)
    for report in reports:
        assert report["main_value"] == "computed by rank 0"
        assert report["gathered"] == [10.0, 11.0, 20.0, 21.0]  # view 1 of ranks 0, 1, then view 2
        assert report["earliest"] == 5 and report["earliest_none"] == -1
        assert "replicas diverged" in report["diverged"]  # every rank raises, not only the odd one out
        assert "--batch_size 15 is the global batch and must split evenly over the 2 processes" in report["odd_batch"]
    assert "rank 1 differs in bias" in reports[1]["diverged"]
    assert [report["slides"] for report in reports] == [["a", "b"], ["c", "d"]]  # 11 and 10 patches
    pixels = np.arange(48, dtype=np.float32).reshape(4, 4, 3) / 255
    expected = ((pixels.reshape(2, 2, 2, 2, 3).mean((1, 3)) - 0.5) / 0.25).transpose(2, 0, 1).reshape(1, 12)
    for report in reports:
        np.testing.assert_allclose(report["one_file_features"], expected, rtol=1e-5, atol=1e-6)


def torchrun(*args: str, max_restarts: int = 0) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
               "--max_restarts", str(max_restarts), *args]
    # As the README says for restarts: without a fresh store per round the restarted
    # processes can read the dead ones' addresses (pytorch/pytorch#135712).
    environment = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=environment)


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def pretrain_args(data_dir: Path, save_path: Path, *extra: str) -> list[str]:
    return [str(REPO / "pretrain.py"), *tiny_run_args(data_dir, save_path, "--model_type", "clubyol", *extra)]


def test_torchrun_trains_writes_once_and_resumes_on_any_number_of_processes(tiny_demo, tiny_checkpoint, tmp_path):
    # 2 processes, 1 epoch: one checkpoint, one log, one CSV row per epoch, and a probe each process encodes half of.
    output = finish(torchrun(*pretrain_args(tiny_demo, tmp_path / "a", "--epochs", "1", "--save_freq", "1",
                                            "--probe", str(tiny_demo / "patch_labels.csv"))))
    assert output.count("steps/epoch") == 1 and output.count("done:") == 1 and output.count("probe (epoch 1)") == 1
    assert "2 processes (cpu), 8 images each" in output
    a = load_checkpoint(tmp_path / "a" / "last.pth")
    assert (a["epoch"], a["step"], a["config"]["world_size"]) == (1, 4, 2)  # 64 images / global batch 16
    assert sorted(p.name for p in (tmp_path / "a").glob("*.pth")) == ["checkpoint_0001.pth", "last.pth"]
    (row,) = epochs_csv(tmp_path / "a")
    probe = tmp_path / "a" / "probe"
    assert evaluate_knn(["--checkpoint", str(tmp_path / "a" / "last.pth"), "--train", str(probe / "train.csv"),
                         "--test", str(probe / "test.csv"), "--k", "1", "20", "--out", str(tmp_path / "probe_report"),
                         "--device", "cpu", "--num_workers", "0", "--no_baselines", "--no_embedding"]) == 0
    one_process = json.loads((tmp_path / "probe_report" / "report.json").read_text())["rows"]
    assert [float(row[f"probe_{name}"]) for name in ("knn_f1_k1", "knn_f1_k20", "linear_f1")] == pytest.approx(
        [r["f1"] for r in one_process], abs=1e-12)

    # Resumed with 2 processes, it ends exactly where an uninterrupted 2-process run does.
    resumed = finish(torchrun(*pretrain_args(tiny_demo, tmp_path / "a", "--epochs", "2",
                                             "--resume", str(tmp_path / "a" / "last.pth"))))
    assert "resumed" in resumed and "at epoch 1, step 4" in resumed
    finish(torchrun(*pretrain_args(tiny_demo, tmp_path / "b", "--epochs", "2")))
    after_resume = load_checkpoint(tmp_path / "a" / "last.pth")["state_dict"]
    uninterrupted = load_checkpoint(tmp_path / "b" / "last.pth")["state_dict"]
    for name, value in uninterrupted.items():
        torch.testing.assert_close(after_resume[name], value, rtol=0, atol=1e-6, msg=name)
    assert [row["epoch"] for row in epochs_csv(tmp_path / "a")] == ["1", "2"]

    # The 2-process checkpoint resumes on 1 process, and a 1-process checkpoint on 2.
    one = train(parse_config(tiny_run_args(tiny_demo, tmp_path / "c", "--model_type", "clubyol", "--epochs", "3",
                                           "--resume", str(tmp_path / "b" / "last.pth"))))
    assert (load_checkpoint(one)["epoch"], load_checkpoint(one)["step"]) == (3, 12)
    two = finish(torchrun(*pretrain_args(tiny_demo, tmp_path / "d", "--epochs", "2", "--model_type", "clusiam",
                                         "--resume", str(tiny_checkpoint))))
    assert "at epoch 1, step 4" in two
    d = load_checkpoint(tmp_path / "d" / "last.pth")
    assert (d["epoch"], d["step"], d["config"]["world_size"]) == (2, 8, 2)


def test_torchrun_trains_on_slides_with_the_check_and_its_listing_done_once(tmp_path):
    job = write_job(tmp_path / "job", names=("a", "b", "gone"))
    gone = tmp_path / "job_slides" / "gone.tif"
    gone.unlink()
    output = finish(torchrun(*pretrain_args(job, tmp_path / "run", "--epochs", "1", "--skip_bad_files")))
    assert output.count("skipped 1 of 3 files that cannot be used") == 1
    assert "2 processes (cpu), 8 images each" in output and output.count("done:") == 1
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pth")
    assert (checkpoint["epoch"], checkpoint["step"], checkpoint["config"]["world_size"]) == (1, 2, 2)
    listing = (tmp_path / "run" / "skipped_files.txt").read_text().splitlines()
    assert len(listing) == 1 and listing[0].startswith(f"{gone}\t")


def worker_pid(launcher: subprocess.Popen, worker_rank: int) -> int | None:
    """The pid of the torchrun worker with RANK ``worker_rank`` (a child of the launcher)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environment = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher.pid and f"RANK={worker_rank}".encode() in environment:
            return int(entry.name)
    return None


def kill_rank_after_first_checkpoint(launcher: subprocess.Popen, save_path: Path) -> None:
    deadline = time.time() + 240
    while not (save_path / "last.pth").is_file():
        assert time.time() < deadline and launcher.poll() is None, "no checkpoint appeared"
        time.sleep(0.05)
    pid = worker_pid(launcher, 1)
    assert pid is not None, "rank 1 had already finished: give the run more epochs"
    os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_a_killed_rank_ends_the_job_and_an_elastic_restart_resumes_from_the_last_checkpoint(tiny_demo, tmp_path):
    # Without restarts: the job ends, non-zero, naming the failure, instead of hanging.
    launcher = torchrun(*pretrain_args(tiny_demo, tmp_path / "down", "--epochs", "20"))
    kill_rank_after_first_checkpoint(launcher, tmp_path / "down")
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert "SIGKILL" in output and "rank" in output

    # With --max_restarts 1: the restarted processes continue from last.pth to the end.
    launcher = torchrun(*pretrain_args(tiny_demo, tmp_path / "up", "--epochs", "6"), max_restarts=1)
    kill_rank_after_first_checkpoint(launcher, tmp_path / "up")
    output = finish(launcher)
    assert "resumed " + str(tmp_path / "up" / "last.pth") + " at epoch" in output
    final = load_checkpoint(tmp_path / "up" / "last.pth")
    assert (final["epoch"], final["step"]) == (6, 24)
    epochs = [int(row["epoch"]) for row in epochs_csv(tmp_path / "up")]
    assert epochs[-1] == 6 and sorted(set(epochs)) == list(range(1, 7))  # nothing skipped, no epoch restarted twice


def test_feature_extraction_under_torchrun_equals_one_process(tiny_demo, tiny_checkpoint, tmp_path):
    arguments = ["--checkpoint", str(tiny_checkpoint), "--patches", str(tiny_demo), "--batch_size", "5",
                 "--num_workers", "0", "--device", "cpu"]
    finish(torchrun("-m", "mil.compute_feats", *arguments, "--out", str(tmp_path / "two")))
    assert compute_feats([*arguments, "--out", str(tmp_path / "one")]) == 0
    bags = sorted(p.name for p in (tmp_path / "one").glob("*.h5"))
    assert bags and bags == sorted(p.name for p in (tmp_path / "two").glob("*.h5"))
    for bag in bags:
        with h5py.File(tmp_path / "one" / bag) as one, h5py.File(tmp_path / "two" / bag) as two:
            np.testing.assert_allclose(two["features"][:], one["features"][:], rtol=1e-5, atol=1e-6)
            assert list(two["paths"][:]) == list(one["paths"][:])

    knn = ["--checkpoint", str(tiny_checkpoint), "--train", str(tiny_demo / "knn_train.csv"),
           "--test", str(tiny_demo / "knn_test.csv"), "--batch_size", "5", "--num_workers", "0",
           "--device", "cpu", "--no_baselines", "--no_embedding"]
    finish(torchrun(str(REPO / "evaluate_knn.py"), *knn, "--out", str(tmp_path / "knn_two")))
    assert evaluate_knn([*knn, "--out", str(tmp_path / "knn_one")]) == 0
    cache_two = list((tmp_path / "knn_two" / "cache").glob("*.npy"))
    assert len(cache_two) == 2  # train and test features, the per-process parts merged and removed
    for path in cache_two:
        np.testing.assert_allclose(np.load(path), np.load(tmp_path / "knn_one" / "cache" / path.name),
                                   rtol=1e-5, atol=1e-6)
    one, two = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("knn_one", "knn_two"))
    assert [row["f1"] for row in two["rows"]] == [row["f1"] for row in one["rows"]]
