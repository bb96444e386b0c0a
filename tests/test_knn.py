import csv
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier

import clusiam.knn
from clusiam.checkpoint import load_checkpoint, load_pretrained, save_checkpoint
from clusiam.config import parse_config
from clusiam.errors import DataError
from clusiam.features import cached_encode, feature_extractor
from clusiam.knn import l2_normalize, search, vote
from clusiam.knn_eval import Encoder, below_random_init, main
from clusiam.metrics import absent_class_warnings, classification_metrics, write_per_slide_accuracy
from clusiam.sources import FolderSource
from clusiam.splits import LabelledPatches, read_labelled_patches, split_overlap
from clusiam.tables import write_csv
from clusiam.train import train
from conftest import tiny_run_args
from test_features import slide_setup

CLASSES = ["normal", "other", "tumor"]


def random_problem(seed, n_bank=400, n_query=250, dim=24):
    rng = np.random.default_rng(seed)
    bank = rng.standard_normal((n_bank, dim)).astype(np.float32)
    queries = rng.standard_normal((n_query, dim)).astype(np.float32)
    bank_labels = rng.integers(0, 3, n_bank)
    query_labels = rng.integers(0, 3, n_query)
    return bank, queries, bank_labels, query_labels


@pytest.mark.parametrize("backend", ["faiss-cpu", "torch-cpu"])
@pytest.mark.parametrize("seed", [0, 1])
def test_top1_neighbours_labels_and_f1_equal_scikit_learn(backend, seed):
    bank, queries, bank_labels, query_labels = random_problem(seed)
    reference = KNeighborsClassifier(n_neighbors=1, metric="cosine", algorithm="brute").fit(bank, bank_labels)
    _, indices = search(l2_normalize(bank), l2_normalize(queries), 1, backend)
    np.testing.assert_array_equal(indices[:, 0], reference.kneighbors(queries, 1, return_distance=False)[:, 0])
    predicted = vote(*search(l2_normalize(bank), l2_normalize(queries), 1, backend), bank_labels, 1, 3)
    np.testing.assert_array_equal(predicted, reference.predict(queries))

    truth = [CLASSES[i] for i in query_labels]
    names = [CLASSES[i] for i in predicted]
    metrics = classification_metrics(truth, names, CLASSES, "tumor")
    assert metrics["f1"] == pytest.approx(f1_score(truth, names, labels=["tumor"], average=None)[0])  # tumour vs rest
    assert metrics["macro_f1"] == pytest.approx(f1_score(truth, names, average="macro"))
    assert 0.15 < metrics["accuracy"] < 0.55  # random labels: about chance, so the test is not trivially 0 or 1


def test_macro_f1_averages_over_the_classes_that_occur_and_per_slide_needs_no_positive_class(tmp_path):
    truth, predicted = ["a", "b", "a", "b"], ["a", "b", "b", "b"]
    metrics = classification_metrics(truth, predicted, ["a", "b", "c"], None)  # c: a class of the training split only
    assert metrics["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro")) == pytest.approx(11 / 15)
    assert metrics["per_class"]["c"]["support"] == 0 and metrics["f1"] is None
    write_per_slide_accuracy(tmp_path / "per_slide.csv", ["s1", "s1", "s2", "s2"], truth, predicted, None)
    assert list(csv.reader(open(tmp_path / "per_slide.csv"))) == [
        ["slide", "patches", "correct", "accuracy"], ["s1", "2", "2", "1.0"], ["s2", "2", "1", "0.5"]]


def test_torch_search_merges_bank_chunks_exactly(monkeypatch):
    bank, queries, _, _ = random_problem(3, n_bank=101)
    expected_sim, expected_idx = search(l2_normalize(bank), l2_normalize(queries), 5, "faiss-cpu")
    monkeypatch.setattr(clusiam.knn, "BANK_CHUNK", 7)
    monkeypatch.setattr(clusiam.knn, "QUERY_CHUNK", 33)
    sim, idx = search(l2_normalize(bank), l2_normalize(queries), 5, "torch-cpu")
    np.testing.assert_array_equal(idx, expected_idx)
    np.testing.assert_allclose(sim, expected_sim, atol=1e-5)


def test_larger_k_votes_by_similarity():
    labels = np.array([0, 1, 1])
    indices = np.array([[0, 1, 2], [0, 1, 2]])
    similarities = np.array([[0.99, 0.5, 0.5], [0.90, 0.89, 0.89]])
    # one close neighbour outweighs two far ones; two nearly as close outweigh one
    assert vote(similarities, indices, labels, 3, 2).tolist() == [0, 1]
    assert vote(similarities, indices, labels, 1, 2).tolist() == [0, 0]


def test_separable_features_are_classified_perfectly():
    rng = np.random.default_rng(0)
    centres = np.eye(3, 16, dtype=np.float32) * 10
    bank_labels = np.repeat([0, 1, 2], 50)
    query_labels = np.repeat([0, 1, 2], 20)
    bank = centres[bank_labels] + rng.standard_normal((150, 16)).astype(np.float32)
    queries = centres[query_labels] + rng.standard_normal((60, 16)).astype(np.float32)
    predicted = vote(*search(l2_normalize(bank), l2_normalize(queries), 5, "faiss-cpu"), bank_labels, 5, 3)
    truth = [CLASSES[i] for i in query_labels]
    assert classification_metrics(truth, [CLASSES[i] for i in predicted], CLASSES, "tumor")["f1"] == 1.0


def write_patch(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def test_labels_come_from_the_folder_layout_or_a_csv(tmp_path):
    a = write_patch(tmp_path / "tumor" / "slide_a" / "0_0.png", 1)
    b = write_patch(tmp_path / "normal" / "slide_b" / "0_32.png", 2)
    patches = read_labelled_patches(tmp_path)
    assert (patches.source.files, patches.labels, patches.slides) == ([b, a], ["normal", "tumor"],
                                                                      ["slide_b", "slide_a"])
    listing = tmp_path / "labels.csv"
    listing.write_text("path,label,slide\ntumor/slide_a/0_0.png,normal ,s1 \n")
    listed = read_labelled_patches(listing)
    assert (listed.labels, listed.slides) == (["normal"], ["s1"])  # the CSV, not the folder name, decides; stripped
    write_patch(tmp_path / "loose.png", 3)
    with pytest.raises(DataError, match="loose.png is not in a <class>/<slide>/ folder"):
        read_labelled_patches(tmp_path)
    listing.write_text("path,label,slide\nmissing.png,tumor,s1\n")
    with pytest.raises(DataError, match="1 listed files do not exist"):
        read_labelled_patches(listing)


def test_the_leakage_guard_finds_shared_slides_and_identical_files(tmp_path):
    train_files = [write_patch(tmp_path / "tr" / f"{i}.png", i) for i in range(3)]
    test_files = [write_patch(tmp_path / "te" / f"{i}.png", 10 + i) for i in range(2)]
    train = LabelledPatches(FolderSource(train_files), ["a"] * 3, ["s1", "s1", "s2"])
    clean = LabelledPatches(FolderSource(test_files), ["a"] * 2, ["s3", "s4"])
    assert split_overlap(train, clean) == []
    shared = LabelledPatches(clean.source, clean.labels, ["s2", "s4"])
    assert split_overlap(train, shared) == ["1 slide(s) are in both train and test, e.g. s2"]
    copy = tmp_path / "te" / "copy.png"
    copy.write_bytes(train_files[1].read_bytes())
    problems = split_overlap(train, LabelledPatches(FolderSource([*test_files, copy]), ["a"] * 3, ["s3", "s4", "s5"]))
    assert problems == [f"1 test file(s) are identical to training files, e.g. {copy} = {train_files[1]}"]


def test_feature_cache_is_reused_and_invalidated(tiny_demo, tiny_checkpoint, tmp_path):
    model, state = load_pretrained(tiny_checkpoint)
    files = sorted(tiny_demo.rglob("*.png"))[:20]
    mean, std = state["normalization"]["mean"], state["normalization"]["std"]
    encoder = feature_extractor(model)

    def run(identity, paths):
        return cached_encode(tmp_path, identity, encoder, paths, mean, std, torch.device("cpu"),
                             batch_size=8, num_workers=0)

    first, cached = run("ckpt-A backbone", files)
    assert not cached and first.shape == (20, 512) and np.isfinite(first).all()
    again, cached = run("ckpt-A backbone", files)
    assert cached and np.array_equal(first, again)
    assert not run("ckpt-B backbone", files)[1]  # another checkpoint
    fewer, cached = run("ckpt-A backbone", files[:19])  # another file list
    assert not cached and np.allclose(fewer, first[:19], atol=1e-5)


def test_a_full_run_on_the_demo_set_writes_every_report_file(tiny_demo, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["--checkpoint", str(tiny_checkpoint), "--train", str(tiny_demo / "knn_train.csv"),
            "--test", str(tiny_demo / "knn_test.csv"), "--out", str(out), "--k", "1", "5",
            "--device", "cpu", "--num_workers", "0", "--batch_size", "16"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    encoders = (report["rows"][0]["encoder"], "random_resnet18", "raw_pixels")
    assert [(r["encoder"], r["classifier"], r["k"]) for r in report["rows"]] == [
        (name, classifier, k) for name in encoders for classifier, k in (("knn", 1), ("knn", 5), ("linear", None))]
    assert report["positive"] == "tumor" and report["backend"] == "faiss-cpu"
    assert report["train"]["slides"] == 2 and report["test"]["slides"] == 2 and report["test"]["patches"] == 32
    for row in report["rows"]:
        assert 0 <= row["f1"] <= 1 and sum(map(sum, row["confusion_matrix"])) == 32
        assert (row["train_patches"], row["train_slides"], row["test_patches"], row["test_slides"]) == (32, 2, 32, 2)
        folder = out / row["encoder"]
        prefix = "linear_" if row["classifier"] == "linear" else ""
        assert Image.open(folder / f"{prefix}confusion_matrix.png").size[0] > 100
        slides = list(csv.DictReader(open(folder / f"{prefix}per_slide.csv")))
        assert sorted(s["slide"] for s in slides) == ["normal_001", "tumor_001"]
        if row["k"] != 5:  # the tables are the linear probe's, and the KNN's at k = 1
            assert sum(int(s["correct"]) for s in slides) == round(row["accuracy"] * 32)
    pixel_row = next(r for r in report["rows"] if r["encoder"] == "raw_pixels" and r["k"] == 1)
    assert pixel_row["f1"] > 0.5  # synthetic tumour nuclei are large and dark: even pixels see them
    markdown = (out / "report.md").read_text()
    assert "| raw_pixels | pixels 16x16 | knn, k = 1 |" in markdown
    assert "| raw_pixels | pixels 16x16 | linear, C = 1 |" in markdown  # two training slides: no C can be chosen
    # The maps, one panel each: the checkpoint's by label and by cluster, then the random-init encoder's beside them
    # (and beside the raw pixels'); the random-init encoder's alone.
    widths = {name: Image.open(out / name / "embedding.png").size[0] for name in encoders}
    one = widths["random_resnet18"]
    assert widths[encoders[0]] == 3 * one and widths["raw_pixels"] == 2 * one
    random_init = {(r["classifier"], r["k"]): r["f1"] for r in report["rows"] if r["encoder"] == "random_resnet18"}
    below = [r for r in report["rows"] if r["checkpoint"] and r["f1"] < random_init[(r["classifier"], r["k"])]]
    assert len([w for w in report["warnings"] if "is below the random-init encoder's" in w]) == len(below)
    assert main(args) == 0
    assert all(r["features_cached"] for r in json.loads((out / "report.json").read_text())["rows"])


def test_a_checkpoint_below_the_random_init_encoder_is_explained_row_by_row():
    def row(encoder, classifier, k, f1, checkpoint=None):
        return {"encoder": encoder, "classifier": classifier, "k": k, "C": 0.1, "f1": f1, "checkpoint": checkpoint}

    rows = [row("run", "knn", 1, 0.69, "run.pth"), row("run", "knn", 5, 0.80, "run.pth"),
            row("run", "linear", None, None, "run.pth"), row("random_resnet18", "knn", 1, 0.77),
            row("random_resnet18", "knn", 5, 0.75), row("random_resnet18", "linear", None, 0.9),
            row("raw_pixels", "knn", 1, 0.95)]
    encoders = [Encoder("run", "backbone", None, [], [], "", "run.pth", epochs=5),
                Encoder("random_resnet18", "backbone", None, [], [], "", random_init=True)]
    (note,) = below_random_init(encoders, rows)
    assert note.startswith("run, knn, k = 1: F1 0.6900 is below the random-init encoder's 0.7700")
    assert "5 epochs of pretraining" in note


def test_overlapping_splits_are_refused_unless_allowed(tiny_demo, tiny_checkpoint, tmp_path, capsys):
    args = ["--checkpoint", str(tiny_checkpoint), "--train", str(tiny_demo / "knn_train.csv"),
            "--test", str(tiny_demo / "knn_train.csv"), "--out", str(tmp_path), "--device", "cpu",
            "--num_workers", "0", "--no_baselines", "--no_embedding"]
    assert main(args) == 2
    assert "2 slide(s) are in both train and test" in capsys.readouterr().out
    assert main(args + ["--allow_overlap"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["warnings"] and report["rows"][0]["accuracy"] == 1.0  # every test patch finds itself


def test_unusable_k_names_and_weights_are_refused(tiny_demo, tiny_checkpoint, tmp_path, capsys):
    args = ["--train", str(tiny_demo / "knn_train.csv"), "--test", str(tiny_demo / "knn_test.csv"),
            "--out", str(tmp_path / "report"), "--device", "cpu", "--num_workers", "0", "--no_baselines",
            "--no_embedding"]
    assert main([*args, "--checkpoint", str(tiny_checkpoint), "--k", "1", "33"]) == 2
    assert "--k 1 33: each k must lie between 1 and the 32 training patches" in capsys.readouterr().out
    assert main([*args, "--checkpoint", str(tiny_checkpoint), str(tiny_checkpoint)]) == 2
    assert "two encoders would share the report name" in capsys.readouterr().out
    state = load_checkpoint(tiny_checkpoint)
    state["state_dict"]["backbone.conv1.weight"][0, 0, 0, 0] = float("nan")
    save_checkpoint(state, tmp_path / "broken.pth")
    assert main([*args, "--checkpoint", str(tmp_path / "broken.pth")]) == 2
    assert "the encoder gave NaN or infinite features" in capsys.readouterr().out
    assert not list((tmp_path / "report").glob("*.json"))


def test_several_checkpoints_of_any_model_type_and_the_projector_feature(tiny_demo, tiny_checkpoint, tmp_path):
    byol = train(parse_config(tiny_run_args(tiny_demo, tmp_path / "byol", "--model_type", "byol", "--epochs", "1")))
    out = tmp_path / "report"
    assert main(["--checkpoint", str(tiny_checkpoint), str(byol), "--train", str(tiny_demo / "knn_train.csv"),
                 "--test", str(tiny_demo / "knn_test.csv"), "--out", str(out), "--device", "cpu",
                 "--num_workers", "0", "--no_baselines", "--feature", "projector", "--no_embedding"]) == 0
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [(r["checkpoint"], r["feature"], r["classifier"]) for r in rows] == [
        (str(checkpoint), "projector", classifier) for checkpoint in (tiny_checkpoint, byol)
        for classifier in ("knn", "linear")]
    assert len({r["encoder"] for r in rows}) == 2


def test_a_missing_class_leaves_its_scores_undefined_not_zero_and_scikit_learn_stays_quiet(recwarn):
    truth, predicted = ["normal"] * 4, ["normal", "tumor", "normal", "normal"]  # tumor: predicted once, never true
    metrics = classification_metrics(truth, predicted, ["normal", "tumor"], "tumor")
    assert metrics["f1"] is None and metrics["macro_f1"] == pytest.approx(f1_score(truth, predicted, labels=["normal"],
                                                                                    average="macro"))
    assert metrics["per_class"]["tumor"] == {"precision": 0.0, "recall": None, "f1": None, "support": 0}
    assert metrics["balanced_accuracy"] == 0.75 and metrics["warnings"] == []
    missed = classification_metrics(["normal", "tumor"], ["normal", "normal"], ["normal", "tumor"], "tumor")
    assert missed["f1"] == 0.0 and missed["per_class"]["tumor"]["precision"] is None  # a miss is a defined 0
    assert missed["warnings"] == ["tumor is never predicted: precision undefined (- in the per-class table)"]
    assert absent_class_warnings(truth, ["normal", "tumor"], "tumor") == [
        "the test set holds only class normal: F1 of tumor is undefined (null in report.json, - in report.md); "
        "add tumor patches to the test set to score it",
        "tumor does not occur in the test set: recall and F1 undefined (- in the per-class table); macro F1 and "
        "balanced accuracy average over normal only"]
    assert not recwarn.list


def one_class_csv(source, label, path):
    """The rows of the patch CSV ``source`` whose label is ``label``, with absolute paths."""
    with open(source) as handle:
        rows = [row for row in csv.DictReader(handle) if row["label"] == label]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "slide"])
        writer.writeheader()
        writer.writerows({**row, "path": str(source.parent / row["path"])} for row in rows)
    return path


@pytest.mark.parametrize("single", ["test", "train"])
def test_a_split_of_one_class_is_reported_in_words_without_scikit_learn_warnings(tiny_demo, tiny_checkpoint,
                                                                                  tmp_path, single):
    splits = {name: tiny_demo / f"knn_{name}.csv" for name in ("train", "test")}
    splits[single] = one_class_csv(splits[single], "normal", tmp_path / f"{single}_normal.csv")
    out = tmp_path / "report"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["--checkpoint", str(tiny_checkpoint), "--train", str(splits["train"]), "--test",
                     str(splits["test"]), "--out", str(out), "--device", "cpu", "--num_workers", "0",
                     "--no_baselines", "--no_embedding"]) == 0
    assert not [w for w in caught if "sklearn" in w.filename], [str(w.message) for w in caught]
    report = json.loads((out / "report.json").read_text())
    row = report["rows"][0]
    markdown = (out / "report.md").read_text()
    if single == "test":
        assert row["f1"] is None and row["per_class"]["tumor"]["f1"] is None
        assert report["warnings"][0] == ("the test set holds only class normal: F1 of tumor is undefined (null in "
                                         "report.json, - in report.md); add tumor patches to the test set to score it")
        assert f"| {row['encoder']} | backbone | knn, k = 1 | - |" in markdown
    else:
        assert row["f1"] == 0.0 and row["per_class"]["tumor"]["precision"] is None  # every tumour patch missed
        assert report["warnings"] == [
            "the training set holds only class normal: every test patch is predicted normal; add patches of tumor "
            "to the training set",
            *(f"{row['encoder']}, {classifier}: tumor is never predicted: precision undefined (- in the per-class "
              "table)" for classifier in ("knn, k = 1", "linear, C = 1"))]
        assert f"| - / 0.000 / 0.000 ({row['per_class']['tumor']['support']}) |" in markdown
    assert "**Warnings**" in markdown and report["warnings"][-1] in markdown


@pytest.mark.parametrize("flag, value, message", [
    ("--batch_size", "0", "--batch_size must be at least 1 (got 0)"),
    ("--num_workers", "-1", "--num_workers must be at least 0 (got -1)"),
    ("--resize", "0", "--resize must be at least 1 (got 0)"),
])
def test_a_number_out_of_its_range_is_refused_naming_the_flag(tmp_path, capsys, flag, value, message):
    assert main(["--checkpoint", "a.pth", "--train", "train.csv", "--test", "test.csv", "--out", str(tmp_path / "r"),
                 flag, value]) == 2
    assert capsys.readouterr().out == f"error: {message}\n"


def test_an_out_folder_that_is_a_file_or_lies_under_one_is_refused_before_any_work(tiny_demo, tiny_checkpoint,
                                                                                   tmp_path, capsys):
    blocker = tmp_path / "report.md"
    blocker.write_text("an earlier report")
    args = ["--checkpoint", str(tiny_checkpoint), "--train", str(tiny_demo / "knn_train.csv"),
            "--test", str(tiny_demo / "knn_test.csv"), "--device", "cpu", "--num_workers", "0", "--no_baselines",
            "--no_embedding"]
    assert main([*args, "--out", str(blocker)]) == 2
    assert capsys.readouterr().out == (f"error: --out {blocker} is a file, not a folder: pass a folder (it is "
                                       "created if needed)\n")
    assert main([*args, "--out", str(blocker / "knn")]) == 2
    assert capsys.readouterr().out == (f"error: --out {blocker / 'knn'} cannot be created: {blocker} is a file, "
                                       "not a folder\n")
    assert main([*args, "--out", str(tmp_path / "r"), "--cache_dir", str(blocker)]) == 2
    assert f"error: --cache_dir {blocker} is a file, not a folder" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_tables_of_slide_corners_score_as_the_same_patches_written_as_files(tiny_checkpoint, tmp_path):
    setup = slide_setup(tmp_path)
    tables = tmp_path / "tables"  # the job's tables, away from the job: the job is named by --job or --coords
    tables.mkdir()
    for split in ("train", "test"):
        shutil.copy(setup.job / f"{split}.csv", tables)
    common = ["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--num_workers", "0", "--batch_size", "3",
              "--no_baselines", "--no_embedding", "--k", "1", "3"]

    def scores(name, folder, *where):
        out = tmp_path / name
        assert main([*common, "--train", str(folder / "train.csv"), "--test", str(folder / "test.csv"),
                     "--out", str(out), *where]) == 0
        rows = json.loads((out / "report.json").read_text())["rows"]
        return [{key: row[key] for key in ("classifier", "k", "f1", "macro_f1", "accuracy", "confusion_matrix",
                                           "train_patches", "test_slides")} for row in rows]

    expected = scores("files", setup.patches)
    assert [(row["classifier"], row["train_patches"]) for row in expected] == [("knn", 8), ("knn", 8), ("linear", 8)]
    assert scores("job_folder", setup.job) == expected  # a table in a tiling job reads the job's slides
    assert scores("job", tables, "--job", str(setup.job)) == expected
    assert scores("coords", tables, "--coords", str(setup.coords), "--slides", str(setup.slides)) == expected


def test_a_table_naming_an_unknown_slide_or_an_unlisted_corner_is_refused(tiny_checkpoint, tmp_path, capsys):
    setup = slide_setup(tmp_path)
    bad = setup.job / "bad.csv"
    header = ("slide", "x", "y", "label", "path")

    def refusal(*where, train=bad):
        assert main(["--checkpoint", str(tiny_checkpoint), "--train", str(train), "--test",
                     str(setup.job / "test.csv"), "--out", str(tmp_path / "r"), "--device", "cpu", *where]) == 2
        return capsys.readouterr().out

    write_csv(bad, header, [("normal_a", 0, 0, "normal", ""), ("ghost", 0, 0, "tumor", "")])
    assert (f"error: {bad}: 1 slide(s) have no coordinate file (e.g. ghost; the 4 known include normal_a, "
            "normal_b, tumor_a)") in refusal()
    write_csv(bad, header, [("normal_a", 0, 0, "normal", ""), ("normal_a", 32, 0, "normal", "")])
    assert (f"error: {bad}: 1 row(s) name patches that {setup.coords / 'normal_a.h5'} does not list (e.g. x 32, "
            "y 0)") in refusal()
    outside = tmp_path / "train.csv"
    shutil.copy(setup.job / "train.csv", outside)
    assert f"{tmp_path} is not a tiling job (no job.json): pass --job JOB" in refusal(train=outside)
    assert "--job brings its own coordinates and slides" in refusal("--job", str(setup.job), "--coords", "c")
    assert "--coords and --slides go together" in refusal("--coords", str(setup.coords))
    assert not (tmp_path / "r").exists()
