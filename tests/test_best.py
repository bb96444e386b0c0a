"""Keeping the best probed epoch (--keep_best): best.pth is the checkpoint of the best probed
epoch, recorded in every checkpoint and row of epochs.csv; a run interrupted (between last.pth
and best.pth, too) and resumed ends with an uninterrupted run's best.pth; a best.pth that a
resume does not account for is never written over; options that cannot work are refused
before a run folder exists."""
import contextlib
import io
import math

import pytest
import torch

from clusiam.best import Best
from clusiam.checkpoint import load_checkpoint, load_pretrained, save_checkpoint
from clusiam.config import parse_config
from clusiam.train import main, train
from conftest import epochs_csv, tiny_run_args

METRIC = "knn_f1_k20"


def keep_best_args(tiny_demo, save_path, *extra, metric=METRIC):
    return tiny_run_args(tiny_demo, save_path, "--probe", str(tiny_demo / "patch_labels.csv"), "--keep_best", metric,
                         *extra)


def train_printing(argv) -> str:
    """Train as ``argv`` asks; what the run printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train(parse_config(argv))
    return printed.getvalue()


def same(a, b) -> bool:
    """Checkpoint values equal all the way down, tensors exactly."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def best_column_by_hand(rows) -> list[str]:
    """Which epoch best.pth should hold after each row: the first of the highest scores so far."""
    best, value, column = "", -math.inf, []
    for row in rows:
        score = float(row[f"probe_{METRIC}"] or "nan")
        if score > value:
            best, value = row["epoch"], score
        column.append(best)
    return column


@pytest.fixture(scope="module")
def whole(tiny_demo, tmp_path_factory):
    """Three epochs in one run, each probed and also saved as checkpoint_NNNN.pth; and what it printed."""
    save_path = tmp_path_factory.mktemp("whole")
    return save_path, train_printing(keep_best_args(tiny_demo, save_path, "--epochs", "3", "--save_freq", "1"))


def test_the_best_changes_only_on_a_strictly_higher_defined_score():
    best = Best(METRIC)
    assert best.update(None, 1) is None and best.record() == {"metric": METRIC, "value": None, "epoch": None}
    assert best.update({METRIC: None}, 2) is None and best.update({METRIC: math.nan}, 2) is None
    assert best.update({METRIC: 0.5}, 3) == f"best (epoch 3): {METRIC} 0.5000, the first score; kept in best.pth"
    assert best.update({METRIC: 0.5}, 4) is None  # a tie keeps the earlier epoch
    assert best.update({METRIC: 0.75, "linear_f1": 0.1}, 5) == (f"best (epoch 5): {METRIC} 0.7500, beats 0.5000 of "
                                                                "epoch 3; kept in best.pth")
    assert best.record() == {"metric": METRIC, "value": 0.75, "epoch": 5} and best.row() == {"best_epoch": 5}


def test_best_pth_is_the_checkpoint_of_the_best_probed_epoch_as_every_checkpoint_and_row_records(whole):
    save_path, printed = whole
    rows = epochs_csv(save_path)
    column = best_column_by_hand(rows)
    assert [row["best_epoch"] for row in rows] == column and column[0] == "1"
    epoch = int(column[-1])
    best = load_checkpoint(save_path / "best.pth")  # weights_only=True
    assert same(best, load_checkpoint(save_path / f"checkpoint_{epoch:04d}.pth"))  # that epoch's last.pth, whole
    assert best["best"] == {"metric": METRIC, "value": float(rows[epoch - 1][f"probe_{METRIC}"]), "epoch": epoch}
    assert load_checkpoint(save_path / "last.pth")["best"] == best["best"]
    for index in (1, 2):
        assert load_checkpoint(save_path / f"checkpoint_{index:04d}.pth")["best"]["epoch"] == int(column[index - 1])
    changed = [row["epoch"] for row, before in zip(rows, ["", *column]) if row["best_epoch"] != before]
    assert [line.split(")")[0] for line in printed.splitlines() if line.startswith("best (")] == [
        f"best (epoch {epoch}" for epoch in changed]
    model, _ = load_pretrained(save_path / "best.pth")  # what every evaluation command reads it with
    assert not model.training


def kill_before_best(save_path):
    """Leave the run folder as a kill after last.pth of its first epoch, before its best.pth and its row, leaves it."""
    (save_path / "best.pth").unlink()
    csv_path = save_path / "logs" / "epochs.csv"
    csv_path.write_text(csv_path.read_text().splitlines()[0] + "\n")


def test_a_run_killed_before_best_pth_and_resumed_ends_with_the_uninterrupted_runs_best(whole, tiny_demo, tmp_path):
    split = tmp_path / "split"
    train_printing(keep_best_args(tiny_demo, split, "--epochs", "1"))
    kill_before_best(split)
    train_printing(keep_best_args(tiny_demo, split, "--epochs", "1", "--resume", "auto"))  # nothing to train
    assert same(load_checkpoint(split / "best.pth"), load_checkpoint(split / "last.pth"))  # what the kill lost
    assert [row["best_epoch"] for row in epochs_csv(split)] == ["1"]
    kill_before_best(split)
    train_printing(keep_best_args(tiny_demo, split, "--epochs", "3", "--resume", "auto"))
    expected, resumed = (load_checkpoint(folder / "best.pth") for folder in (whole[0], split))
    assert resumed["best"] == expected["best"] and resumed["epoch"] == expected["epoch"]
    assert same(resumed["state_dict"], expected["state_dict"]) and same(resumed["optimizer"], expected["optimizer"])
    assert [row["best_epoch"] for row in epochs_csv(split)] == [row["best_epoch"] for row in epochs_csv(whole[0])]


def test_a_resume_with_another_metric_is_refused_until_best_pth_is_moved_then_starts_over(tiny_demo, tmp_path,
                                                                                           capsys):
    run = tmp_path / "run"
    train(parse_config(keep_best_args(tiny_demo, run, "--epochs", "1")))
    kept = load_checkpoint(run / "best.pth")["best"]
    other = keep_best_args(tiny_demo, run, "--epochs", "2", "--resume", "auto", metric="linear_f1")
    assert main(other) == 2
    assert (f"error: --keep_best linear_f1: {run / 'best.pth'} holds the best by {METRIC}, epoch 1 ({METRIC} "
            f"{kept['value']:.4f}): pass --keep_best {METRIC} to go on keeping it, or move it out of {run} to keep "
            "the best by linear_f1 from epoch 2 on") in capsys.readouterr().out
    assert load_checkpoint(run / "last.pth")["epoch"] == 1 and load_checkpoint(run / "best.pth")["best"] == kept
    (run / "best.pth").rename(tmp_path / "first_best.pth")
    assert main(other) == 0
    assert (f"note: --keep_best linear_f1 keeps the best of epochs 2 on: {run} holds no best.pth of the resumed "
            f"checkpoint's best, epoch 1 ({METRIC} {kept['value']:.4f})") in capsys.readouterr().out
    best = load_checkpoint(run / "best.pth")
    assert best["best"]["metric"] == "linear_f1" and best["best"]["epoch"] == 2
    assert same(best, load_checkpoint(run / "last.pth"))
    assert [row["best_epoch"] for row in epochs_csv(run)] == ["1", "2"]


def test_a_best_pth_of_later_epochs_is_not_written_over_by_a_resume_from_an_earlier_checkpoint(whole, tiny_demo,
                                                                                               tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    later = load_checkpoint(whole[0] / "best.pth")
    later["best"] = {"metric": METRIC, "value": 2.0, "epoch": 3}  # no checkpoint of epoch 1 records that
    save_checkpoint(later, run / "best.pth")
    first = whole[0] / "checkpoint_0001.pth"
    assert main(keep_best_args(tiny_demo, run, "--epochs", "3", "--resume", str(first))) == 2
    recorded = Best.of(load_checkpoint(first)["best"]).describe()
    assert (f"error: --keep_best {METRIC}: {run / 'best.pth'} holds epoch 3 ({METRIC} 2.0000), which the resumed "
            f"checkpoint {first} does not record as its best ({recorded}): move it out of {run} to keep a new best "
            "there") in capsys.readouterr().out
    assert sorted(path.name for path in run.iterdir()) == ["best.pth"]


@pytest.mark.parametrize("extra, message", [
    (["--keep_best", METRIC], f"--keep_best {METRIC} keeps the best probed epoch, and no --probe is given: pass "
                              "--probe TABLE, or drop --keep_best"),
    (["--probe", "TABLE", "--keep_best", "auroc"], "argument --keep_best: invalid choice: 'auroc' (choose from "
                                                   "'knn_f1_k1', 'knn_f1_k20', 'linear_f1', 'cluster_nmi', "
                                                   "'cluster_purity_top5')"),
    (["--probe", "TABLE", "--model_type", "simsiam", "--keep_best", "cluster_nmi"],
     "--keep_best cluster_nmi: simsiam has no cluster head, so its probes score no clusters: pass one of knn_f1_k1, "
     "knn_f1_k20, linear_f1"),
])
def test_keep_best_that_cannot_work_is_refused_before_the_run_folder_exists(tiny_demo, tmp_path, capsys, extra,
                                                                             message):
    save_path = tmp_path / "run"
    assert main(tiny_run_args(tiny_demo, save_path, "--epochs", "1", *extra)) == 2
    assert f"error: {message}\n" in capsys.readouterr().out
    assert not save_path.exists()
