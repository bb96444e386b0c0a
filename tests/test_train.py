import csv
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clusiam import train as training
from clusiam.checkpoint import load_checkpoint, save_checkpoint
from clusiam.config import parse_config
from clusiam.errors import ConfigError, run_command
from clusiam.models import PretrainModel
from clusiam.step import build_optimizer, set_learning_rate
from clusiam.train import main, train
from conftest import epochs_csv, tiny_run_args
from test_slide_source import write_coords_and_slides, write_job

REPO = Path(__file__).resolve().parents[1]


def test_learning_rate_follows_the_authors_cosine_and_fix_pred_lr_holds_the_predictor():
    model = PretrainModel("clusiam", "resnet18", feat_size=64, num_clusters=4)
    init_lr, epochs = 0.1, 10
    fixed = build_optimizer(model, init_lr, 0.9, 1e-4, fix_pred_lr=True)
    free = build_optimizer(model, init_lr, 0.9, 1e-4, fix_pred_lr=False)
    predictor = {id(p) for p in model.predictor.parameters()}
    for epoch in range(epochs):
        expected = init_lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        set_learning_rate(fixed, init_lr, epoch, epochs)
        set_learning_rate(free, init_lr, epoch, epochs)
        for group in fixed.param_groups:
            in_predictor = {id(p) in predictor for p in group["params"]}
            assert len(in_predictor) == 1  # groups never mix predictor and other parameters
            assert group["lr"] == pytest.approx(init_lr if in_predictor.pop() else expected)
        assert [g["lr"] for g in free.param_groups] == [pytest.approx(expected)]
    assert sum(len(g["params"]) for g in fixed.param_groups) == sum(1 for _ in model.parameters())


def test_a_flag_overrides_the_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model_type: clubyol\nlr: 0.1\nbatch_size: 8\nfix_pred_lr: true\n"
                      "mean: [0.5, 0.5, 0.5]\nstd: [0.2, 0.2, 0.2]\n")
    args = parse_config(["--config", str(config), "--lr", "0.2", "--no-fix_pred_lr"])
    assert (args.model_type, args.lr, args.batch_size, args.fix_pred_lr) == ("clubyol", 0.2, 8, False)
    assert args.mean == [0.5, 0.5, 0.5]
    assert (args.feat_size, args.alpha) == (256, 0.9)  # the method's defaults fill what neither sets


@pytest.mark.parametrize("model_type, fixed",
                         [("clusiam", True), ("simsiam", True), ("clubyol", False), ("byol", False)])
def test_fix_pred_lr_follows_each_methods_recipe_unless_a_flag_says_otherwise(model_type, fixed):
    assert parse_config(["--model_type", model_type]).fix_pred_lr is fixed
    flipped = "--no-fix_pred_lr" if fixed else "--fix_pred_lr"
    assert parse_config(["--model_type", model_type, flipped]).fix_pred_lr is not fixed


@pytest.mark.parametrize("text, message", [
    ("lrr: 0.1\n", r"unknown option\(s\) lrr"),
    ("lr: fast\n", "invalid float value"),
    ("model_type: mocov9\n", "invalid choice"),
    ("dist_timeout: 0\n", r"--dist_timeout: must be positive minutes \(got 0\)"),
])
def test_a_bad_config_file_is_named_in_the_error(tmp_path, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        parse_config(["--config", str(config)])
    assert str(config) in str(error.value)


def test_baselines_refuse_a_cluster_weight():
    with pytest.raises(ConfigError, match="simsiam has no cluster head"):
        parse_config(["--model_type", "simsiam", "--alpha", "0.5"])


def final_weights(path):
    return load_checkpoint(path)["state_dict"]


def assert_resume_equals_an_uninterrupted_run(run_args, tmp_path: Path, *common: str, resume: str | None = None):
    """Two epochs in one run, and one epoch then a resumed second (from its last.pth, or ``resume``), train
    exactly the same weights; ``run_args(save_path, *options)`` gives a run's options."""
    common = (*common, "--save_freq", "1")
    whole = train(parse_config(run_args(tmp_path / "whole", *common, "--epochs", "2")))
    half = train(parse_config(run_args(tmp_path / "split", *common, "--epochs", "1")))
    resumed = train(parse_config(run_args(tmp_path / "split", *common, "--epochs", "2", "--resume",
                                          resume or str(half))))
    a, b = final_weights(whole), final_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    first_epoch = final_weights(tmp_path / "split" / "checkpoint_0001.pth")
    assert any(not torch.equal(a[k], first_epoch[k]) for k in a)  # the second epoch trained
    steps = load_checkpoint(whole)["step"]
    assert (load_checkpoint(resumed)["epoch"], load_checkpoint(resumed)["step"]) == (2, steps)


@pytest.mark.parametrize("model_type, augment", [("clusiam", "batched"), ("clubyol", "batched"), ("clusiam", "pil")])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_demo, tmp_path, model_type, augment):
    assert_resume_equals_an_uninterrupted_run(
        lambda save_path, *extra: tiny_run_args(tiny_demo, save_path, *extra), tmp_path,
        "--model_type", model_type, "--seed", "3", "--augment", augment)
    assert load_checkpoint(tmp_path / "split" / "last.pth")["step"] == 8


def test_resume_auto_starts_fresh_then_continues_from_last_pth(tiny_demo, tmp_path, capsys):
    fresh = train(parse_config(tiny_run_args(tiny_demo, tmp_path, "--epochs", "1", "--resume", "auto")))
    assert "resumed" not in capsys.readouterr().out and load_checkpoint(fresh)["epoch"] == 1
    continued = train(parse_config(tiny_run_args(tiny_demo, tmp_path, "--epochs", "2", "--resume", "auto")))
    assert f"resumed {tmp_path / 'last.pth'} at epoch 1, step 4" in capsys.readouterr().out
    assert (load_checkpoint(continued)["epoch"], load_checkpoint(continued)["step"]) == (2, 8)


def test_a_run_never_overwrites_another_and_a_finished_one_has_nothing_left_to_train(tiny_demo, tmp_path, capsys):
    first = train(parse_config(tiny_run_args(tiny_demo, tmp_path, "--epochs", "1")))
    saved = first.read_bytes()
    with pytest.raises(ConfigError, match="last.pth is from an earlier run: pass --resume auto to continue it"):
        train(parse_config(tiny_run_args(tiny_demo, tmp_path, "--epochs", "1", "--model_type", "simsiam")))
    assert first.read_bytes() == saved and len(epochs_csv(tmp_path)) == 1
    capsys.readouterr()
    again = train(parse_config(tiny_run_args(tiny_demo, tmp_path, "--epochs", "1", "--resume", "auto", "--lr", "0.1")))
    out = capsys.readouterr().out
    assert again == first and first.read_bytes() == saved
    assert "--lr 0.1 (was 0.05)" in out and "already holds 1 epochs (--epochs 1): nothing to train" in out
    with pytest.raises(ConfigError, match="the built-in demo set has 64 px patches, smaller than --image_size 224"):
        train(parse_config(["--save_path", str(tmp_path / "demo"), "--device", "cpu"]))
    assert not (tmp_path / "demo" / "demo_data").exists()


def test_how_often_a_run_logs_never_changes_what_it_trains(tiny_demo, tmp_path):
    often, rarely = (train(parse_config(tiny_run_args(tiny_demo, tmp_path / name, "--epochs", "1",
                                                      "--print_freq", freq)))
                     for name, freq in (("often", "1"), ("rarely", "3")))
    a, b = final_weights(often), final_weights(rarely)
    assert all(torch.equal(a[key], b[key]) for key in a)
    rows = epochs_csv(tmp_path / "rarely")  # logged at step 3 and at the epoch's last step, 4
    assert rows[0]["step"] == "4" and float(rows[0]["clusters_argmax"]) >= 1


def test_resume_refuses_a_different_architecture(tiny_demo, tmp_path):
    first = train(parse_config(tiny_run_args(tiny_demo, tmp_path / "run", "--epochs", "1")))
    with pytest.raises(ConfigError, match="--num_clusters 8, not 9"):
        train(parse_config(tiny_run_args(tiny_demo, tmp_path / "run", "--resume", str(first), "--num_clusters", "9")))
    weights_only = {k: v for k, v in load_checkpoint(first).items() if k != "optimizer"}
    save_checkpoint(weights_only, tmp_path / "shared.pth")
    with pytest.raises(ConfigError, match="holds no optimizer state"):
        train(parse_config(tiny_run_args(tiny_demo, tmp_path / "run", "--resume", str(tmp_path / "shared.pth"))))


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tiny_demo, tmp_path, capsys):
    good = train(parse_config(tiny_run_args(tiny_demo, tmp_path / "run", "--epochs", "1")))
    saved = good.read_bytes()
    # 4 steps per epoch, counted from 1: a NaN learning rate, which the command line refuses, stands for a
    # diverging run: it poisons the weights at step 5, the first of epoch 2, so the loss of step 6 is NaN.
    args = parse_config(tiny_run_args(tiny_demo, tmp_path / "run", "--epochs", "2", "--resume", str(good),
                                      "--save_freq", "1"))
    args.lr = math.nan
    code = run_command(lambda: train(args))
    assert code == 2
    assert "non-finite at step 6 (epoch 2)" in capsys.readouterr().out
    assert good.read_bytes() == saved
    assert not (tmp_path / "run" / "checkpoint_0002.pth").exists()


@pytest.mark.parametrize("model_type", ["clusiam", "clubyol", "simsiam", "byol"])
def test_each_model_type_trains_an_epoch_from_the_cli(tiny_demo, tmp_path, model_type):
    assert main(tiny_run_args(tiny_demo, tmp_path, "--model_type", model_type, "--epochs", "1")) == 0
    checkpoint = load_checkpoint(tmp_path / "last.pth")
    assert checkpoint["epoch"] == 1 and checkpoint["config"]["model_type"] == model_type
    assert set(checkpoint) >= {"state_dict", "optimizer", "normalization", "step"}
    rows = list(csv.DictReader(open(tmp_path / "logs" / "epochs.csv")))
    assert len(rows) == 1 and math.isfinite(float(rows[0]["loss"]))
    if model_type.startswith("clu"):
        assert 1 <= float(rows[0]["clusters_argmax"]) <= 8
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))


def test_pretrain_py_without_data_trains_on_the_demo_set(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "pretrain.py"), "--epochs", "1", "--image_size", "32", "--batch_size", "500",
         "--num_worker", "0", "--num_clusters", "10", "--device", "cpu", "--save_path", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "built-in demo set" in result.stdout
    assert len(list((tmp_path / "demo_data").rglob("*.png"))) > 500
    assert load_checkpoint(tmp_path / "last.pth")["step"] == 2


def test_given_mean_and_std_are_used_instead_of_computed_statistics(tiny_demo, tmp_path, capsys):
    mean, std = ["0.7", "0.5", "0.6"], ["0.2", "0.25", "0.3"]
    last = train(parse_config(tiny_run_args(tiny_demo, tmp_path, "--epochs", "1", "--mean", *mean, "--std", *std)))
    assert load_checkpoint(last)["normalization"] == {"mean": [0.7, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}
    assert "channel statistics" not in capsys.readouterr().out  # none computed


def test_pathology_augmentations_train_from_the_cli_and_need_the_batched_pipeline(tiny_demo, tmp_path, capsys):
    options = ["--epochs", "1", "--vflip", "--rotate90", "--hed_jitter", "0.05"]
    assert main(tiny_run_args(tiny_demo, tmp_path, *options)) == 0
    config = load_checkpoint(tmp_path / "last.pth")["config"]
    assert (config["vflip"], config["rotate90"], config["hed_jitter"]) == (True, True, 0.05)
    assert main(tiny_run_args(tiny_demo, tmp_path / "pil", *options, "--augment", "pil")) == 2
    assert "need --augment batched" in capsys.readouterr().out


def test_pretraining_reads_patches_from_a_tiling_job_or_from_coordinate_files_and_slides(tmp_path, capsys):
    job = write_job(tmp_path / "job", names=("a", "b", "gone"))
    gone = tmp_path / "job_slides" / "gone.tif"
    gone.unlink()
    assert main(tiny_run_args(job, tmp_path / "refused", "--epochs", "1")) == 2
    assert f"error: {gone}: not a readable slide (FileNotFoundError" in capsys.readouterr().out
    assert not (tmp_path / "refused").exists()  # checked before anything is written

    assert main(tiny_run_args(job, tmp_path / "job_run", "--epochs", "1", "--skip_bad_files")) == 0
    assert "skipped 1 of 3 files that cannot be used" in capsys.readouterr().out
    listing = (tmp_path / "job_run" / "skipped_files.txt").read_text().splitlines()
    assert len(listing) == 1 and listing[0].startswith(f"{gone}\t{gone}: not a readable slide")
    checkpoint = load_checkpoint(tmp_path / "job_run" / "last.pth")
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 2)  # 2 slides x 16 patches, batches of 16

    coords, slides = write_coords_and_slides(tmp_path / "folders")  # a TRIDENT-layout and a CLAM-layout file
    assert main(["--coords", *tiny_run_args(coords, tmp_path / "coords_run", "--slides", str(slides),
                                            "--epochs", "1")]) == 0
    assert "32 images, 2 steps/epoch of 16" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "coords_run" / "last.pth")["config"]["coords"] == str(coords)
    assert main(["--coords", *tiny_run_args(coords, tmp_path / "large", "--slides", str(slides),
                                            "--image_size", "64")]) == 2
    assert ("the slides' patches are 32 px, smaller than --image_size 64: pass --patch_size 64"
            in capsys.readouterr().out)


def test_resume_from_slides_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    job = write_job(tmp_path / "job")
    assert_resume_equals_an_uninterrupted_run(lambda save_path, *extra: tiny_run_args(job, save_path, *extra),
                                              tmp_path, "--seed", "3", resume="auto")


def test_a_slide_lost_mid_run_stops_it_naming_slide_and_patch_or_is_skipped_and_listed(tmp_path, capsys, monkeypatch):
    """Lost after the statistics, before the first step; in fresh DataLoader workers, which open their own slides
    (a handle already open may keep reading a deleted file: that is fine)."""
    job = write_job(tmp_path / "job")
    lost = tmp_path / "job_slides" / "b.tif"
    saved = lost.read_bytes()
    announce = training.announce

    def announce_then_lose_the_slide(*args):
        announce(*args)
        lost.unlink()

    monkeypatch.setattr(training, "announce", announce_then_lose_the_slide)
    options = ("--epochs", "1", "--num_worker", "2")
    assert main(tiny_run_args(job, tmp_path / "stopped", *options)) == 2
    error = capsys.readouterr().out.splitlines()[-1]
    assert re.fullmatch(rf"error: {re.escape(str(lost))}: cannot be opened \(.*not a readable slide "
                        r".*\)\. Fix or remove it .*--skip_bad_files.*", error), error

    lost.write_bytes(saved)
    assert main(tiny_run_args(job, tmp_path / "skipped", *options, "--skip_bad_files")) == 0
    assert "more patches or slides could not be read" in capsys.readouterr().out
    # Listed once per process that met it (here: each of the 2 workers), not once per patch of the slide.
    listing = (tmp_path / "skipped" / "skipped_files.txt").read_text().splitlines()
    assert 1 <= len(listing) <= 2 and all(re.match(rf"{re.escape(str(lost))}\tcannot be opened", line)
                                          for line in listing)
    assert load_checkpoint(tmp_path / "skipped" / "last.pth")["step"] == 2  # batches kept their size
