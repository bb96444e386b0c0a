"""The leakage ledger: checkpoints record the slides they were pretrained on, and the KNN and
MIL reports count the test slides an encoder saw in pretraining (the tiny demo's test slides
are normal_001 and tumor_001)."""
import json
import shutil

import h5py
import pytest

from clusiam.checkpoint import load_checkpoint, save_checkpoint
from clusiam.config import parse_config
from clusiam.images import find_images
from clusiam.knn_eval import main as knn_main
from clusiam.knn_eval import row_name
from clusiam.ledger import pretraining_slides
from clusiam.slide_source import SlideSource, job_pairs
from clusiam.sources import FolderSource
from clusiam.tables import write_csv
from clusiam.train import train
from conftest import tiny_run_args
from mil.compute_feats import main as compute_main
from mil.train import main as mil_main
from test_features import SLIDES, slide_setup

TEST_SLIDES = ["normal_001", "tumor_001"]
BEFORE_LEDGER = "unknown (checkpoint made before the ledger)"


@pytest.fixture(scope="module")
def subset_checkpoint(tiny_demo, tmp_path_factory):
    """Pretrained on the demo's training slides only (normal_000, tumor_000)."""
    subset = tmp_path_factory.mktemp("subset")
    for slide in ("normal/normal_000", "tumor/tumor_000"):
        shutil.copytree(tiny_demo / slide, subset / slide)
    return train(parse_config(tiny_run_args(subset, tmp_path_factory.mktemp("subset_run"), "--epochs", "1")))


@pytest.fixture(scope="module")
def old_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint as versions before the ledger wrote it."""
    state = load_checkpoint(tiny_checkpoint)
    del state["pretraining_slides"]
    path = tmp_path_factory.mktemp("old") / "old.pth"
    save_checkpoint(state, path)
    return path


def test_a_checkpoint_records_the_slides_it_was_pretrained_on(tiny_demo, tiny_checkpoint, subset_checkpoint):
    ledger = load_checkpoint(tiny_checkpoint)["pretraining_slides"]  # read with weights_only=True
    assert ledger["names"] == sorted({path.parent.name for path in tiny_demo.rglob("*.png")}) == [
        "normal_000", "normal_001", "tumor_000", "tumor_001"]
    assert ledger["digest"] == FolderSource(find_images(tiny_demo, "DATA_DIR")).identity
    assert pretraining_slides(load_checkpoint(subset_checkpoint)) == ["normal_000", "tumor_000"]
    assert pretraining_slides({}) is None  # a checkpoint from before the ledger: unknown, not empty


def test_a_checkpoint_pretrained_on_slides_records_their_names(tmp_path, capsys):
    setup = slide_setup(tmp_path)  # four slides; the job's test.csv names normal_b and tumor_b
    checkpoint = train(parse_config(tiny_run_args(setup.job, tmp_path / "run", "--epochs", "1")))
    ledger = load_checkpoint(checkpoint)["pretraining_slides"]
    assert ledger["names"] == sorted(SLIDES)
    assert ledger["digest"] == SlideSource.checked(job_pairs(setup.job))[0].identity
    assert knn_main(["--checkpoint", str(checkpoint), "--train", str(setup.job / "train.csv"), "--test",
                     str(setup.job / "test.csv"), "--out", str(tmp_path / "report"), "--device", "cpu",
                     "--num_workers", "0", "--no_baselines", "--no_embedding"]) == 0
    assert f"{row_name(str(checkpoint))}: test slides seen in pretraining: 2 of 2" in capsys.readouterr().out


def knn(tiny_demo, checkpoint, out, *extra):
    return knn_main(["--checkpoint", str(checkpoint), "--train", str(tiny_demo / "knn_train.csv"),
                     "--test", str(tiny_demo / "knn_test.csv"), "--out", str(out), "--device", "cpu",
                     "--num_workers", "0", "--batch_size", "32", "--no_embedding", *extra])


@pytest.mark.parametrize("which, text, refusal", [
    ("tiny_checkpoint", "2 of 2", "2 of the 2 test slides were seen in pretraining by {}, e.g. normal_001"),
    ("subset_checkpoint", "0 of 2", None),
    ("old_checkpoint", BEFORE_LEDGER, "whether {} saw the test slides in pretraining is unknown"),
], ids=["all_seen", "none_seen", "before_the_ledger"])
def test_the_knn_report_counts_the_test_slides_each_checkpoint_saw(which, text, refusal, request, tiny_demo,
                                                                    tmp_path, capsys):
    checkpoint = request.getfixturevalue(which)
    name = row_name(str(checkpoint))
    assert knn(tiny_demo, checkpoint, tmp_path / "report") == 0
    console = capsys.readouterr().out
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["rows"]
    seen = {row["encoder"]: row["test_slides_seen_in_pretraining"] for row in rows}
    assert seen[name]["text"] == text and seen[name]["of"] == 2
    assert seen[name]["slides"] == ({"2 of 2": TEST_SLIDES, "0 of 2": []}.get(text))
    assert seen["random_resnet18"]["text"] == seen["raw_pixels"]["text"] == "-"
    markdown = (tmp_path / "report" / "report.md").read_text()
    for line in (f"{name}: test slides seen in pretraining: {text}", "raw_pixels: test slides seen in pretraining: -"):
        assert line in console and f"- {line}\n" in markdown

    code = knn(tiny_demo, checkpoint, tmp_path / "refused", "--refuse_seen")
    printed = capsys.readouterr().out
    if refusal is None:
        assert code == 0
    else:
        assert code == 2 and f"error: --refuse_seen: {refusal.format(checkpoint)}" in printed
        assert not (tmp_path / "refused").exists()  # stopped before any encoding


def mil_setup(tiny_demo, checkpoint, tmp_path):
    """Bags of the demo's four slides encoded by ``checkpoint``, two of them copied as validation
    slides, and a split that tests on normal_001 and tumor_001: mil.train's options."""
    feats = tmp_path / "feats"
    assert compute_main(["--checkpoint", str(checkpoint), "--patches", str(tiny_demo), "--out", str(feats),
                         "--device", "cpu", "--num_workers", "0", "--batch_size", "32"]) == 0
    split = {"normal_000": "train", "tumor_000": "train", "normal_val": "val", "tumor_val": "val",
             **dict.fromkeys(TEST_SLIDES, "test")}
    for label in ("normal", "tumor"):
        shutil.copy(feats / f"{label}_000.h5", feats / f"{label}_val.h5")
    write_csv(tmp_path / "slides.csv", ("slide", "label"), [(slide, slide.split("_")[0]) for slide in split])
    write_csv(tmp_path / "split.csv", ("slide", "split"), list(split.items()))
    return ["--feats", str(feats), "--labels", str(tmp_path / "slides.csv"), "--split", str(tmp_path / "split.csv"),
            "--epochs", "1", "--device", "cpu"]


@pytest.mark.parametrize("which, change, text", [
    ("tiny_checkpoint", None, "2 of 2"),
    ("subset_checkpoint", None, "0 of 2"),
    ("old_checkpoint", None, BEFORE_LEDGER),
    ("tiny_checkpoint", "removed", "unknown (the bags' checkpoint {} is not found)"),
    ("tiny_checkpoint", "replaced", "unknown ({} has changed since it encoded the bags)"),
    ("tiny_checkpoint", "unnamed", "unknown (the bags name no checkpoint: not made by mil.compute_feats)"),
], ids=["all_seen", "none_seen", "before_the_ledger", "checkpoint_removed", "checkpoint_replaced", "no_checkpoint"])
def test_mil_reads_the_ledger_of_the_checkpoint_the_bags_name(which, change, text, request, tiny_demo,
                                                              old_checkpoint, tmp_path, capsys):
    checkpoint = tmp_path / "encoder.pth"  # the bags name this copy, which the test can take away
    shutil.copy(request.getfixturevalue(which), checkpoint)
    args = mil_setup(tiny_demo, checkpoint, tmp_path)
    if change == "removed":
        checkpoint.unlink()
    elif change == "replaced":
        shutil.copy(old_checkpoint, checkpoint)
    elif change == "unnamed":  # as bags from other tools come
        for bag in (tmp_path / "feats").glob("*.h5"):
            with h5py.File(bag, "a") as handle:
                del handle.attrs["checkpoint"]
    text = text.format(checkpoint)
    capsys.readouterr()
    assert mil_main([*args, "--out", str(tmp_path / "report")]) == 0
    assert f"test slides seen in pretraining: {text}\n" in capsys.readouterr().out
    seen = json.loads((tmp_path / "report" / "report.json").read_text())["test_slides_seen_in_pretraining"]
    assert (seen["text"], seen["of"], seen["checkpoint"]) == (text, 2, None if change == "unnamed" else str(checkpoint))
    assert f"- test slides seen in pretraining: {text}\n" in (tmp_path / "report" / "report.md").read_text()

    code = mil_main([*args, "--out", str(tmp_path / "refused"), "--refuse_seen"])
    printed = capsys.readouterr().out
    if text == "0 of 2":
        assert code == 0
    else:
        expected = (f"2 of the 2 test slides were seen in pretraining by {checkpoint}, e.g. normal_001"
                    if text == "2 of 2" else f"saw the test slides in pretraining is {text}")
        assert code == 2 and expected in printed and not (tmp_path / "refused").exists()


def test_a_run_resumed_on_other_slides_records_both_sets_and_an_unknown_past_stays_unknown(tiny_demo, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(tiny_demo / "normal", first / "normal")
    shutil.copytree(tiny_demo / "tumor", second / "tumor")
    run = tmp_path / "run"
    train(parse_config(tiny_run_args(first, run, "--epochs", "1")))
    train(parse_config(tiny_run_args(second, run, "--epochs", "2", "--resume", "auto")))
    assert pretraining_slides(load_checkpoint(run / "last.pth")) == sorted(
        p.name for p in [*(first / "normal").iterdir(), *(second / "tumor").iterdir()])

    state = load_checkpoint(run / "last.pth")
    del state["pretraining_slides"]  # as a checkpoint made before the ledger
    save_checkpoint(state, run / "last.pth")
    train(parse_config(tiny_run_args(first, run, "--epochs", "3", "--resume", "auto")))
    assert pretraining_slides(load_checkpoint(run / "last.pth")) is None
