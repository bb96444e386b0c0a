import csv
import json
import math
import os
import shutil

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from clusiam.tables import write_csv
from mil.compute_feats import main as compute_main
from mil.dsmil import ABMIL, DSMIL, QUERY_DIM, MaxPooling, MeanPooling
from mil.train import Bag, bag_loss, score
from mil.train import main as train_main
from test_features import SLIDES, slide_setup


def test_dsmil_forward_is_the_papers_formula():
    torch.manual_seed(0)
    model = DSMIL(feature_dim=16, num_classes=2)
    x = torch.randn(30, 16)
    instance_logits, bag_logits, attention = model(x)

    w_i, b_i = model.instance_classifier.weight, model.instance_classifier.bias
    (w1, b1), (w2, b2) = (model.query[0].weight, model.query[0].bias), (model.query[2].weight, model.query[2].bias)

    def q(f):
        return torch.tanh(torch.relu(f @ w1.T + b1) @ w2.T + b2)

    expected_instance = x @ w_i.T + b_i
    critical = [int(expected_instance[:, c].argmax()) for c in range(2)]
    scores = q(x) @ q(x[critical]).T / math.sqrt(QUERY_DIM)
    expected_attention = torch.exp(scores) / torch.exp(scores).sum(0, keepdim=True)
    bag_features = expected_attention.T @ x  # v = identity
    w_b, b_b = model.bag_classifier.weight, model.bag_classifier.bias  # (C, C, D)
    expected_bag = torch.einsum("ocd,cd->o", w_b, bag_features) + b_b
    assert torch.allclose(instance_logits, expected_instance, atol=1e-6)
    assert torch.allclose(attention, expected_attention, atol=1e-6)
    assert torch.allclose(bag_logits, expected_bag, atol=1e-5)


def test_dsmil_trains_and_scores_both_streams_and_a_pooling_baseline_only_its_bag_logits():
    torch.manual_seed(0)
    bag, target = Bag("s", "tumor", torch.randn(30, 16), None), torch.tensor([0.0, 1.0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    for model in (DSMIL(16, 2), MaxPooling(16, 2), MeanPooling(16, 2)):
        instance_logits, bag_logits, _ = model(bag.features)
        top = instance_logits.max(0).values
        two_streams = isinstance(model, DSMIL)
        expected_loss = (0.5 * bce(bag_logits, target) + 0.5 * bce(top, target) if two_streams
                         else bce(bag_logits, target))
        assert torch.allclose(bag_loss(model, bag, target), expected_loss, atol=1e-6)
        expected_score = ((torch.sigmoid(bag_logits) + torch.sigmoid(top)) / 2 if two_streams
                          else torch.sigmoid(bag_logits))
        np.testing.assert_allclose(score(model, bag, average=True)[0], expected_score.detach().numpy(), atol=1e-6)
    mean = MeanPooling(16, 2)
    _, bag_logits, _ = mean(bag.features)  # the mean baseline is not a max in disguise
    assert not torch.allclose(bag_loss(mean, bag, target), 0.5 * bce(bag_logits, target) +
                              0.5 * bce(mean(bag.features)[0].max(0).values, target))


def test_dsmil_starts_orthogonal_with_zero_biases():
    model = DSMIL(feature_dim=64, num_classes=2)
    w = model.query[0].weight  # (128, 64): orthonormal columns
    assert torch.allclose(w.T @ w, torch.eye(64), atol=1e-5)
    assert all(m.bias.abs().sum() == 0 for m in model.modules() if hasattr(m, "bias") and m.bias is not None)


def write_bags(folder, seed=0, slides_per_class=40, shift_test_by=0.0, test_slides=()):
    """Negative bags: 50 N(0, 1) instances; positive bags hide 4 instances shifted by 5 along one direction."""
    # scrambling leaves the bags' draws alone
    rng, scramble = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    direction = np.zeros(32, np.float32)
    direction[:4] = 2.5
    labels = {}
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2 * slides_per_class):
        label = "tumor" if i % 2 else "normal"
        slide = f"{label}_{i:03d}"
        features = rng.standard_normal((50, 32)).astype(np.float32)
        if label == "tumor":
            features[rng.choice(50, 4, replace=False)] += direction
        if slide in test_slides:
            features += shift_test_by * scramble.standard_normal(features.shape).astype(np.float32)
        with h5py.File(folder / f"{slide}.h5", "w") as handle:
            handle["features"] = features
            handle["coords"] = np.stack([np.arange(50) * 224, np.zeros(50, int)], 1)
        labels[slide] = label
    return labels


def write_labels(path, labels):
    write_csv(path, ["slide", "label"], sorted(labels.items()))


def run_mil(tmp_path, feats, labels_csv, name, *extra):
    out = tmp_path / name
    assert train_main(["--feats", str(feats), "--labels", str(labels_csv), "--out", str(out), "--epochs", "30",
                       "--device", "cpu", *extra]) == 0
    return json.loads((out / "report.json").read_text()), out


def test_dsmil_finds_the_few_positive_instances_without_touching_test_early(tmp_path):
    labels = write_bags(tmp_path / "feats")
    write_labels(tmp_path / "slides.csv", labels)
    report, out = run_mil(tmp_path, tmp_path / "feats", tmp_path / "slides.csv", "a")
    run = report["runs"][0]
    assert run["test_auc_tumor"] >= 0.95 and run["test_auc_normal"] >= 0.95
    assert report["slides"] == {"train": 48, "val": 16, "test": 16}

    again, _ = run_mil(tmp_path, tmp_path / "feats", tmp_path / "slides.csv", "b")
    assert again["runs"] == report["runs"]  # same seed, same result

    # Scramble the test bags: selection (best epoch, val AUC, thresholds) must not change.
    predictions = list(csv.DictReader(open(out / "predictions.csv")))
    test_slides = {row["slide"] for row in predictions}
    assert len(test_slides) == 16
    write_bags(tmp_path / "scrambled", shift_test_by=5.0, test_slides=test_slides)
    scrambled, _ = run_mil(tmp_path, tmp_path / "scrambled", tmp_path / "slides.csv", "c")
    for key in ("best_epoch", "val_auc", "thresholds"):
        assert scrambled["runs"][0][key] == run[key], key
    assert scrambled["runs"][0]["test_auc_tumor"] != run["test_auc_tumor"]

    with h5py.File(out / "attention" / "seed0_fold0.h5") as handle:
        assert sorted(handle) == sorted(test_slides)
        slide = sorted(test_slides)[0]
        assert handle[slide]["attention"].shape == (50, 2) and handle[slide]["coords"].shape == (50, 2)
        assert np.allclose(handle[slide]["attention"][:].sum(0), 1.0, atol=1e-5)
    assert (out / "roc.png").stat().st_size > 0 and "test_auc_tumor" in (out / "report.md").read_text()



def test_abmil_forward_is_the_papers_gated_attention_and_has_one_output_to_train():
    torch.manual_seed(0)
    model = ABMIL(feature_dim=16, num_classes=2)
    with torch.no_grad():
        model.classifier.bias.normal_()  # zero at init; made nonzero so that the check below covers it
    h = torch.randn(7, 16)
    instance_logits, bag_logits, attention = model(h)

    V, U, w = model.V.weight, model.U.weight, model.w.weight[0]  # (128, 16), (128, 16), (128,)
    scores = torch.stack([w @ (torch.tanh(V @ h_k) * torch.sigmoid(U @ h_k)) for h_k in h])
    a = torch.exp(scores) / torch.exp(scores).sum()
    z = (a[:, None] * h).sum(0)
    W, b = model.classifier.weight, model.classifier.bias
    assert attention.shape == (7, 2)
    assert torch.allclose(attention, torch.stack([a, a], 1), atol=1e-6)  # one branch, repeated per class
    assert torch.allclose(attention.sum(0), torch.ones(2), atol=1e-6)
    assert torch.allclose(bag_logits, W @ z + b, atol=1e-6)
    assert torch.allclose(instance_logits, h @ W.T + b, atol=1e-6)
    assert torch.allclose(a @ instance_logits, bag_logits, atol=1e-6)  # what the instance logits explain

    bag, target = Bag("s", "tumor", h, None), torch.tensor([0.0, 1.0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert not model.dual_stream
    assert torch.allclose(bag_loss(model, bag, target), bce(bag_logits, target), atol=1e-6)
    np.testing.assert_allclose(score(model, bag, average=True)[0], torch.sigmoid(bag_logits).detach().numpy(),
                               atol=1e-6)


def test_abmil_bag_logits_do_not_depend_on_the_order_of_the_patches():
    torch.manual_seed(0)
    model = ABMIL(feature_dim=16, num_classes=2)
    h, order = torch.randn(20, 16), torch.randperm(20)
    instance_logits, bag_logits, attention = model(h)
    shuffled_instances, shuffled_bag, shuffled_attention = model(h[order])
    assert torch.allclose(shuffled_bag, bag_logits, atol=1e-6)
    assert torch.allclose(shuffled_attention, attention[order], atol=1e-6)
    assert torch.allclose(shuffled_instances, instance_logits[order], atol=1e-6)


def test_abmil_goes_through_the_protocol_and_finds_the_positive_bags(tmp_path):
    labels = write_bags(tmp_path / "feats")
    write_labels(tmp_path / "slides.csv", labels)
    # ABMIL starts from near-uniform attention, i.e. from mean pooling, which sees 4 shifted patches in 50; at the
    # protocol's lr 2e-4 it takes about 30 epochs to find them, at 1e-3 about 10.
    report, out = run_mil(tmp_path, tmp_path / "feats", tmp_path / "slides.csv", "abmil", "--aggregator", "abmil",
                          "--epochs", "10", "--lr", "1e-3")
    run = report["runs"][0]
    assert run["test_auc_tumor"] >= 0.85 and run["test_auc_normal"] >= 0.85  # chance is 0.5
    assert "# Slide classification (abmil)" in (out / "report.md").read_text()
    assert (out / "roc.png").stat().st_size > 0
    with h5py.File(out / "attention" / "seed0_fold0.h5") as handle:
        assert len(handle) == 16
        attention = handle[sorted(handle)[0]]["attention"][:]
        assert attention.shape == (50, 2) and np.allclose(attention[:, 0], attention[:, 1])
        assert np.allclose(attention.sum(0), 1.0, atol=1e-5)


def test_one_sigmoid_output_scores_only_the_positive_class(tmp_path):
    labels = write_bags(tmp_path / "feats", slides_per_class=10)
    write_labels(tmp_path / "slides.csv", labels)
    report, out = run_mil(tmp_path, tmp_path / "feats", tmp_path / "slides.csv", "one", "--num_classes", "1",
                          "--epochs", "3")
    assert report["classes"] == ["tumor"] and list(report["runs"][0]["thresholds"]) == ["tumor"]
    assert set(report["summary"]) == {"test_accuracy", "test_balanced_accuracy", "test_auc_tumor"}
    header = next(csv.reader(open(out / "predictions.csv")))
    assert header == ["seed", "fold", "slide", "label", "score_tumor", "predicted_tumor"]


def test_folds_and_seeds_are_summarised(tmp_path):
    labels = write_bags(tmp_path / "feats", slides_per_class=15)
    write_labels(tmp_path / "slides.csv", labels)
    report, _ = run_mil(tmp_path, tmp_path / "feats", tmp_path / "slides.csv", "cv", "--folds", "3", "--seeds", "2",
                        "--aggregator", "max", "--epochs", "5")
    assert [(r["seed"], r["fold"]) for r in report["runs"]] == [(s, f) for s in (0, 1) for f in (0, 1, 2)]
    aucs = [r["test_auc_tumor"] for r in report["runs"]]
    assert report["summary"]["test_auc_tumor"]["mean"] == pytest.approx(np.mean(aucs))
    assert report["summary"]["test_auc_tumor"]["std"] == pytest.approx(np.std(aucs))


@pytest.mark.parametrize("rows, message", [
    ({"val": ["tumor"]}, "the val split holds only tumor slides"),
    ({"test": ["normal"]}, "the test split holds only normal slides"),
    ({"holdout": ["normal", "tumor"]}, "unknown split name"),
])
def test_a_bad_split_is_refused(tmp_path, capsys, rows, message):
    labels = write_bags(tmp_path / "feats", slides_per_class=6)
    write_labels(tmp_path / "slides.csv", labels)
    slides = sorted(labels)
    split = {s: "train" for s in slides}
    for name, classes in rows.items():
        for label in classes:
            split[next(s for s in slides if labels[s] == label and split[s] == "train")] = name
    for name in ("val", "test"):
        if name not in rows:
            for label in ("normal", "tumor"):
                split[next(s for s in slides if labels[s] == label and split[s] == "train")] = name
    write_csv(tmp_path / "split.csv", ("slide", "split"), list(split.items()))
    code = train_main(["--feats", str(tmp_path / "feats"), "--labels", str(tmp_path / "slides.csv"),
                       "--split", str(tmp_path / "split.csv"), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 2 and message in capsys.readouterr().out


def test_bags_are_checked_before_any_training(tmp_path, capsys):
    labels = write_bags(tmp_path / "feats", slides_per_class=6)
    write_labels(tmp_path / "slides.csv", labels)
    args = ["--feats", str(tmp_path / "feats"), "--labels", str(tmp_path / "slides.csv"),
            "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert train_main([*args, "--epochs", "0"]) == 2
    assert "--epochs must be at least 1 (got 0)" in capsys.readouterr().out
    bag = tmp_path / "feats" / "tumor_011.h5"
    bag.unlink()
    assert train_main(args) == 2
    assert "1 slide(s) have no features in" in capsys.readouterr().out
    with h5py.File(bag, "w") as handle:  # from an encoder of another width
        handle["features"] = np.zeros((5, 16), np.float32)
    assert train_main(args) == 2
    out = capsys.readouterr().out
    assert "were made differently" in out and "tumor_011" in out and "(32,)" in out and "(16,)" in out
    assert not (tmp_path / "out").exists()  # refused before anything was trained or written


def test_a_train_and_test_only_split_like_camelyons_official_one_needs_folds(tmp_path, capsys):
    labels = write_bags(tmp_path / "feats", slides_per_class=8)
    write_labels(tmp_path / "slides.csv", labels)
    split = {s: "test" if int(s[-3:]) < 4 else "train" for s in labels}  # 2 + 2 test slides, 6 + 6 train slides
    write_csv(tmp_path / "split.csv", ("slide", "split"), sorted(split.items()))
    common = ["--split", str(tmp_path / "split.csv"), "--aggregator", "max", "--epochs", "3"]
    refused = ["--feats", str(tmp_path / "feats"), "--labels", str(tmp_path / "slides.csv"),
               "--out", str(tmp_path / "x"), "--device", "cpu", *common]
    assert train_main(refused) == 2
    assert "the val split holds no slides" in capsys.readouterr().out
    assert train_main([*refused, "--folds", "7"]) == 2
    assert "--folds 7 needs at least 7 slides of each class outside the test split" in capsys.readouterr().out

    report, _ = run_mil(tmp_path, tmp_path / "feats", tmp_path / "slides.csv", "folds", *common, "--folds", "3")
    assert report["slides"] == {"train": 12, "val": 0, "test": 4}
    folds = [(r["fold"], r["train_slides"], r["val_slides"]) for r in report["runs"]]
    assert folds == [(0, 8, 4), (1, 8, 4), (2, 8, 4)]


def test_compute_feats_writes_one_bag_per_slide_and_resumes(tiny_demo, tiny_checkpoint, tmp_path, capsys):
    labels = tmp_path / "slides.csv"
    labels.write_text((tiny_demo / "slide_labels.csv").read_text() + "tumor_404,tumor\n")
    args = ["--checkpoint", str(tiny_checkpoint), "--patches", str(tiny_demo), "--out", str(tmp_path / "feats"),
            "--labels", str(labels), "--device", "cpu", "--num_workers", "0", "--batch_size", "8"]
    assert compute_main(args) == 0
    bags = sorted(p.stem for p in (tmp_path / "feats").glob("*.h5"))
    assert bags == ["normal_000", "normal_001", "tumor_000", "tumor_001"]
    with h5py.File(tmp_path / "feats" / "tumor_001.h5") as handle:
        assert handle["features"].shape == (16, 512) and np.isfinite(handle["features"][:]).all()
        coords = handle["coords"][:]
        assert sorted(map(tuple, coords))[:2] == [(0, 0), (0, 32)]
        assert handle.attrs["feature"] == "backbone" and handle.attrs["model_type"] == "clusiam"
        assert handle.attrs["resize"] == 0 and handle.attrs["precision"] == "fp32"
        assert handle["paths"][0].decode().startswith("tumor/tumor_001/")
    out = capsys.readouterr().out
    assert "4 slides encoded" in out and "1 labelled slide(s) have no patches" in out
    assert (tmp_path / "feats" / "slides_without_patches.txt").read_text() == "tumor_404\n"
    assert compute_main(args) == 0
    assert "0 slides encoded, 4 already done" in capsys.readouterr().out
    # Another patch size is another encoding: every bag is made again rather than mixed with the old ones.
    assert compute_main([*args, "--resize", "48"]) == 0
    assert "4 slides encoded, 0 already done" in capsys.readouterr().out
    with h5py.File(tmp_path / "feats" / "tumor_001.h5") as handle:
        assert handle.attrs["resize"] == 48 and handle["features"].shape == (16, 512)


def test_compute_feats_loads_with_what_the_machine_holds_unless_told(tiny_demo, tiny_checkpoint, tmp_path, capsys,
                                                                     monkeypatch):
    from mil.compute_feats import CPU_BATCH, GPU_BATCH, WORKER_PEAK_MIB, build_parser, loading_defaults

    cores = len(os.sched_getaffinity(0))
    assert compute_main(["--checkpoint", str(tiny_checkpoint), "--patches", str(tiny_demo), "--out",
                         str(tmp_path / "feats"), "--device", "cpu"]) == 0
    assert len(list((tmp_path / "feats").glob("*.h5"))) == 4
    batch, workers = capsys.readouterr().out.splitlines()[:2]
    assert batch == f"--batch_size {CPU_BATCH}: encoding on a CPU ({GPU_BATCH} on a GPU; pass --batch_size to choose)"
    count = int(workers.split(":")[0].removeprefix("--num_workers "))
    assert 1 <= count <= cores and workers.startswith(f"--num_workers {count}: {cores} core(s), ")
    assert workers.endswith(f"at {WORKER_PEAK_MIB} MiB a worker (pass --num_workers to choose)")

    def resolved(device, *flags):
        args = build_parser().parse_args(["--checkpoint", "a.pth", "--patches", "p", "--out", "o", *flags])
        loading_defaults(args, torch.device(device))
        return args.batch_size, args.num_workers

    assert resolved("cuda")[0] == GPU_BATCH  # the device's type decides: no GPU is needed to check it
    capsys.readouterr()
    assert resolved("cpu", "--batch_size", "3", "--num_workers", "0") == (3, 0)  # a flag wins, and is not remarked on
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))  # torchrun's processes on this node share its cores
    assert resolved("cpu")[1] == 1


def test_a_corrupt_patch_met_in_a_loader_worker_is_one_error_line_naming_it(tiny_checkpoint, tmp_path, capsys):
    slide = tmp_path / "patches" / "slide_a"
    slide.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(slide / f"{32 * i}_0.png")
    (slide / "96_0.png").write_bytes(b"not a png")  # the fourth patch, read by a worker
    assert compute_main(["--checkpoint", str(tiny_checkpoint), "--patches", str(tmp_path / "patches"), "--out",
                         str(tmp_path / "feats"), "--device", "cpu", "--num_workers", "2", "--batch_size", "2"]) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"error: {slide / '96_0.png'}: cannot be decoded") and "Traceback" not in out
    assert not list((tmp_path / "feats").glob("*.h5"))


def test_a_bag_with_nan_features_is_named_before_any_training(tmp_path, capsys):
    labels = write_bags(tmp_path / "feats", slides_per_class=6)
    write_labels(tmp_path / "slides.csv", labels)
    bag = tmp_path / "feats" / "normal_004.h5"
    with h5py.File(bag, "r+") as handle:
        handle["features"][3, 7] = np.nan
    assert train_main(["--feats", str(tmp_path / "feats"), "--labels", str(tmp_path / "slides.csv"),
                       "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert capsys.readouterr().out == (f"error: {bag} holds NaN or infinite features: encode normal_004 again (delete "
                                       "the bag and run mil.compute_feats; a bag that is there is skipped)\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--epochs", "0", "--epochs must be at least 1 (got 0)"),
    ("--seeds", "0", "--seeds must be at least 1 (got 0)"),
    ("--lr", "0", "--lr must be above 0 (got 0.0)"),
    ("--lr", "nan", "--lr must be above 0 (got nan)"),
    ("--weight_decay", "-0.5", "--weight_decay must be at least 0 (got -0.5)"),
    ("--min_lr", "-0.5", "--min_lr must be at least 0 (got -0.5)"),
    ("--patience", "-1", "--patience must be at least 0 (got -1)"),
    ("--split_seed", "-1", "--split_seed must be at least 0 (got -1)"),
    ("--test_fraction", "1", "--test_fraction must be in (0, 1) (got 1.0)"),
    ("--val_fraction", "0", "--val_fraction must be in (0, 1) (got 0.0)"),
])
def test_a_training_option_out_of_its_range_is_refused_naming_the_flag(tmp_path, capsys, flag, value, message):
    assert train_main(["--feats", "feats", "--labels", "slides.csv", "--out", str(tmp_path / "out"),
                       flag, value]) == 2
    assert capsys.readouterr().out == f"error: {message}\n"


@pytest.mark.parametrize("flag, value, message", [
    ("--batch_size", "0", "--batch_size must be at least 1 (got 0)"),
    ("--num_workers", "-1", "--num_workers must be at least 0 (got -1)"),
    ("--resize", "0", "--resize must be at least 1 (got 0)"),
])
def test_an_encoding_option_out_of_its_range_is_refused_naming_the_flag(tmp_path, capsys, flag, value, message):
    assert compute_main(["--checkpoint", "a.pth", "--patches", "patches", "--out", str(tmp_path / "feats"),
                         flag, value]) == 2
    assert capsys.readouterr().out == f"error: {message}\n"


def test_an_out_folder_that_is_a_file_or_lies_under_one_is_refused_before_any_work(tiny_demo, tiny_checkpoint,
                                                                                   tmp_path, capsys):
    labels = write_bags(tmp_path / "feats", slides_per_class=6)
    write_labels(tmp_path / "slides.csv", labels)
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    commands = {
        "mil.train": lambda out: train_main(["--feats", str(tmp_path / "feats"), "--labels",
                                             str(tmp_path / "slides.csv"), "--out", out, "--device", "cpu"]),
        "mil.compute_feats": lambda out: compute_main(["--checkpoint", str(tiny_checkpoint), "--patches",
                                                       str(tiny_demo), "--out", out, "--device", "cpu",
                                                       "--num_workers", "0"]),
    }
    for name, command in commands.items():
        assert command(str(blocker)) == 2, name
        assert capsys.readouterr().out == (f"error: --out {blocker} is a file, not a folder: pass a folder (it is "
                                           "created if needed)\n")
        assert command(str(blocker / "out")) == 2, name
        assert capsys.readouterr().out == (f"error: --out {blocker / 'out'} cannot be created: {blocker} is a file, "
                                           "not a folder\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats", "results.txt", "slides.csv"]


def same_attributes(a, b):
    return sorted(a) == sorted(b) and all(np.array_equal(a[key], b[key]) for key in a)


def test_compute_feats_from_slides_writes_the_bags_of_the_same_patches_as_files(tiny_checkpoint, tmp_path, capsys):
    setup = slide_setup(tmp_path)
    common = ["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--num_workers", "0", "--batch_size", "3"]
    files, job, coords = tmp_path / "from_files", tmp_path / "from_job", tmp_path / "from_coords"
    assert compute_main([*common, "--patches", str(setup.patches), "--out", str(files)]) == 0
    job_args = [*common, "--job", str(setup.job), "--out", str(job), "--pt_files"]
    assert compute_main(job_args) == 0
    assert f"4 slides encoded, 0 already done, into {job}; 4 tensors written to pt_files" in capsys.readouterr().out
    trident = tmp_path / "trident"  # TRIDENT's names: <slide>_patches.h5; the bags are named after the slides
    trident.mkdir()
    for name in SLIDES:
        shutil.copy(setup.coords / f"{name}.h5", trident / f"{name}_patches.h5")
    assert compute_main([*common, "--coords", str(trident), "--slides", str(setup.slides), "--out", str(coords)]) == 0
    assert sorted(p.name for p in coords.iterdir()) == sorted(f"{name}.h5" for name in SLIDES)
    for name in SLIDES:
        with (h5py.File(files / f"{name}.h5") as from_files, h5py.File(job / f"{name}.h5") as from_job,
              h5py.File(coords / f"{name}.h5") as from_coords, h5py.File(setup.coords / f"{name}.h5") as source):
            features = from_job["features"][:]
            assert features.shape == (4, 512) and features.dtype == np.float32
            np.testing.assert_array_equal(features, from_files["features"][:])
            np.testing.assert_array_equal(features, from_coords["features"][:])
            np.testing.assert_array_equal(from_job["coords"][:], from_files["coords"][:])
            assert same_attributes(from_job["coords"].attrs, source["coords"].attrs)  # copied, as TRIDENT does
            assert from_job.attrs["patches_key"] != from_files.attrs["patches_key"] and "paths" not in from_job
            assert same_attributes(*({k: v for k, v in bag.attrs.items() if k != "patches_key"}
                                     for bag in (from_job, from_files)))
        tensor = torch.load(job / "pt_files" / f"{name}.pt", weights_only=True)
        assert tensor.dtype == torch.float32 and np.array_equal(tensor.numpy(), features)
    assert compute_main(job_args) == 0
    assert f"0 slides encoded, 4 already done, into {job}; 0 tensors written to pt_files" in capsys.readouterr().out
    with h5py.File(setup.coords / "tumor_a.h5", "r+") as retiled:  # the slide tiled again: one patch fewer
        attributes = dict(retiled["coords"].attrs)
        corners = retiled["coords"][1:]
        del retiled["coords"]
        retiled.create_dataset("coords", data=corners).attrs.update(attributes)
    assert compute_main(job_args) == 0
    assert f"1 slide encoded, 3 already done, into {job}; 1 tensor written to pt_files" in capsys.readouterr().out
    with h5py.File(job / "tumor_a.h5") as bag:
        np.testing.assert_array_equal(bag["coords"][:], corners)
    # Bags encoded again without --pt_files leave their tensors stale: the next --pt_files run rewrites them from
    # the bags, encoding nothing.
    assert compute_main([*job_args[:-1], "--resize", "48"]) == 0
    assert compute_main([*job_args, "--resize", "48"]) == 0
    assert f"0 slides encoded, 4 already done, into {job}; 4 tensors written to pt_files" in capsys.readouterr().out
    with h5py.File(job / "tumor_a.h5") as bag:
        assert torch.equal(torch.load(job / "pt_files" / "tumor_a.pt", weights_only=True),
                           torch.from_numpy(bag["features"][:]))


@pytest.mark.parametrize("where, message", [
    ([], "pass one of --patches PATCH_ROOT (patch files), --job JOB or --coords DIR --slides DIR"),
    (["--patches", "p", "--job", "j"], "pass one of --patches PATCH_ROOT (patch files), --job JOB"),
    (["--job", "j", "--slides", "s"], "--job brings its own coordinates and slides"),
])
def test_compute_feats_needs_one_place_to_read_patches_from(tmp_path, capsys, where, message):
    assert compute_main(["--checkpoint", "a.pth", "--out", str(tmp_path / "feats"), "--device", "cpu", *where]) == 2
    assert capsys.readouterr().out.startswith(f"error: {message}")


def test_compute_feats_layouts_put_the_bags_where_clam_and_trident_load_them(tiny_checkpoint, tmp_path, capsys):
    """``--layout clam trident`` lays the bags out for the other tools. What each assertion
    mirrors (CLAM 53e2409d, TRIDENT a91fa849):

    - CLAM ``dataset_modules/dataset_generic.py``, ``Generic_MIL_Dataset.__getitem__``:
      ``torch.load(DATA_DIR/pt_files/<slide_id>.pt)``, a float tensor [N, D]; after
      ``load_from_h5(True)``, ``DATA_DIR/h5_files/<slide_id>.h5``, datasets ``features`` and ``coords``.
    - TRIDENT ``Processor.run_slide_feature_extraction_job``: ``JOB/<coords_dir>/features_<encoder>/<slide>.h5``
      (a ``mean-<encoder>`` slide encoder takes ``features_<encoder>``), ``coords_dir`` named as
      ``run_batch_of_slides.py`` names it, ``f"{float(mag):g}x_{patch_size}px_{overlap}px_overlap"``;
      ``WSI.extract_slide_features`` reads ``features``, ``coords`` and the attributes of ``coords``.
    """
    setup = slide_setup(tmp_path)  # patches of 32 px at 0.5 um/px: 20x
    out = tmp_path / "feats"
    args = ["--checkpoint", str(tiny_checkpoint), "--job", str(setup.job), "--out", str(out), "--device", "cpu",
            "--num_workers", "0"]
    assert compute_main(args) == 0  # without --layout: the bags alone, as before
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{name}.h5" for name in SLIDES)
    assert compute_main([*args, "--layout", "clam", "trident"]) == 0  # the bags there are laid out, not encoded again
    trident = out / "20x_32px_0px_overlap" / "features_clusiam_resnet18"
    assert capsys.readouterr().out.endswith(f"0 slides encoded, 4 already done, into {out}; 4 tensors written to "
                                            f"pt_files; bags linked into {trident}, {out / 'h5_files'}\n")
    for name in SLIDES:
        assert os.readlink(out / "h5_files" / f"{name}.h5") == f"../{name}.h5"
        assert os.readlink(trident / f"{name}.h5") == f"../../{name}.h5"
        with h5py.File(out / "h5_files" / f"{name}.h5") as bag, h5py.File(setup.coords / f"{name}.h5") as source:
            features, coords = bag["features"][:], bag["coords"][:]
            assert features.dtype == np.float32 and features.shape == (4, 512)
            np.testing.assert_array_equal(coords, source["coords"][:])
            assert same_attributes(bag["coords"].attrs, source["coords"].attrs)  # patch_size_level0 and the rest
        tensor = torch.load(out / "pt_files" / f"{name}.pt", weights_only=True)
        assert tensor.dtype == torch.float32 and torch.equal(tensor, torch.from_numpy(features))
    with h5py.File(setup.coords / "tumor_a.h5", "r+") as retiled:  # its coordinates made at 10x since
        retiled["coords"].attrs["mpp"] = 1.0
    assert compute_main([*args, "--layout", "trident"]) == 0
    assert [str(p.relative_to(out)) for p in out.glob("*/features_*/tumor_a.h5")] == [
        "10x_32px_0px_overlap/features_clusiam_resnet18/tumor_a.h5"]


def test_a_layout_a_bag_cannot_be_given_is_refused_before_any_encoding(tiny_checkpoint, tmp_path, capsys):
    setup = slide_setup(tmp_path)
    odd = tmp_path / "odd" / "slide_x"  # patch files whose names give no corner
    odd.mkdir(parents=True)
    shutil.copy(setup.files["tumor_a"][0], odd / "first.png")
    cases = [(setup.patches, "trident", "--layout trident: nothing says at which magnification the patches of slide "
                                        "normal_a were cut"),
             (tmp_path / "odd", "clam", "--layout clam: the patch files of slide slide_x are not named <x>_<y>.<ext>")]
    for patches, layout, message in cases:
        assert compute_main(["--checkpoint", str(tiny_checkpoint), "--patches", str(patches), "--out",
                             str(tmp_path / "feats"), "--device", "cpu", "--layout", layout]) == 2
        assert capsys.readouterr().out.startswith(f"error: {message}")
    assert not (tmp_path / "feats").exists()
