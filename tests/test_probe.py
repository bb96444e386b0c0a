"""Probes while pretraining (--probe): their columns in epochs.csv and TensorBoard, their scores
against evaluate_knn.py on the same checkpoint and tables, the cluster agreement, and the
probe tables that are refused."""
import csv
import json

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from clusiam.config import parse_config
from clusiam.coords import read_coords
from clusiam.knn_eval import main as knn_main
from clusiam.metrics import cluster_agreement
from clusiam.slide_source import job_pairs, named_pairs
from clusiam.tables import write_csv
from clusiam.train import main as pretrain_main
from clusiam.train import train
from conftest import epochs_csv, tiny_run_args
from test_slide_source import write_job

PROBE_COLUMNS = ["probe_knn_f1_k1", "probe_knn_f1_k20", "probe_linear_f1", "probe_cluster_nmi",
                 "probe_cluster_purity_top5", "probe_seconds"]


@pytest.fixture(scope="module")
def probed_run(tiny_demo, tmp_path_factory):
    """Three CluSiam epochs on the tiny demo set, probed every second epoch (and after the last)."""
    save_path = tmp_path_factory.mktemp("probed")
    train(parse_config(tiny_run_args(tiny_demo, save_path, "--epochs", "3", "--probe",
                                     str(tiny_demo / "patch_labels.csv"), "--probe_every", "2")))
    return save_path


def test_a_probe_writes_its_columns_to_epochs_csv_and_tensorboard(probed_run):
    rows = epochs_csv(probed_run)
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert list(rows[0])[-len(PROBE_COLUMNS):] == PROBE_COLUMNS
    assert all(rows[0][name] == "" for name in PROBE_COLUMNS)  # epoch 1 is not probed
    for row in rows[1:]:
        scores = [float(row[name]) for name in PROBE_COLUMNS[:-1]]
        assert all(0 <= value <= 1 for value in scores) and float(row["probe_seconds"]) > 0
    events = EventAccumulator(str(probed_run / "logs")).Reload()
    steps = [int(row["step"]) for row in rows[1:]]  # the steps of epochs 2 and 3
    for name in PROBE_COLUMNS:
        logged = events.Scalars(f"probe/{name.removeprefix('probe_')}")
        assert [event.step for event in logged] == steps
        assert [event.value for event in logged] == pytest.approx([float(row[name]) for row in rows[1:]])
    # The split: two halves of the 64 patches with no slide in common, each with both classes.
    halves = [list(csv.DictReader(open(probed_run / "probe" / f"{name}.csv"))) for name in ("train", "test")]
    assert sum(map(len, halves)) == 64
    assert not {row["slide"] for row in halves[0]} & {row["slide"] for row in halves[1]}
    assert all({row["label"] for row in half} == {"normal", "tumor"} for half in halves)


def test_the_probe_scores_what_evaluate_knn_scores_on_the_same_checkpoint_and_tables(probed_run, tmp_path):
    out = tmp_path / "report"
    assert knn_main(["--checkpoint", str(probed_run / "last.pth"), "--train", str(probed_run / "probe" / "train.csv"),
                     "--test", str(probed_run / "probe" / "test.csv"), "--k", "1", "20", "--out", str(out),
                     "--device", "cpu", "--num_workers", "0", "--no_baselines", "--no_embedding"]) == 0
    rows = json.loads((out / "report.json").read_text())["rows"]
    expected = {"probe_knn_f1_k1": rows[0]["f1"], "probe_knn_f1_k20": rows[1]["f1"], "probe_linear_f1": rows[2]["f1"]}
    last = epochs_csv(probed_run)[-1]
    assert {name: float(last[name]) for name in expected} == pytest.approx(expected, abs=1e-12)


def test_cluster_agreement_is_one_for_clusters_that_are_the_labels_and_near_zero_for_random_ones():
    labels = ["normal"] * 60 + ["tumor"] * 40
    perfect = cluster_agreement(labels, [3] * 60 + [7] * 40)
    assert perfect == {"cluster_nmi": pytest.approx(1.0), "cluster_purity_top5": 1.0}
    clusters = np.random.default_rng(0).integers(0, 10, 100)
    random = cluster_agreement(labels, clusters)
    assert random["cluster_nmi"] == pytest.approx(normalized_mutual_info_score(labels, clusters))
    assert random["cluster_nmi"] < 0.1
    # Purity of the five largest clusters, by hand: the share of their patches that carry their majority label.
    sizes = np.bincount(clusters, minlength=10)
    largest = np.argsort(-sizes, kind="stable")[:5]
    majority = sum(max((np.asarray(labels)[clusters == c] == name).sum() for name in ("normal", "tumor"))
                   for c in largest)
    assert random["cluster_purity_top5"] == pytest.approx(majority / sizes[largest].sum())
    # Two clusters that split each class in half: every patch is in a pure cluster, and NMI is below 1.
    split = cluster_agreement(labels, [0] * 30 + [1] * 30 + [2] * 20 + [3] * 20)
    assert split["cluster_purity_top5"] == 1.0 and 0.5 < split["cluster_nmi"] < 1.0


def test_a_baseline_method_probes_without_cluster_columns_and_a_resumed_run_adds_its_columns(tiny_demo, tmp_path):
    save_path = tmp_path / "byol"
    train(parse_config(tiny_run_args(tiny_demo, save_path, "--model_type", "byol", "--epochs", "1")))
    train(parse_config(tiny_run_args(tiny_demo, save_path, "--model_type", "byol", "--epochs", "2",
                                     "--resume", "auto", "--probe", str(tiny_demo))))  # a folder root/<class>/<slide>/
    rows = epochs_csv(save_path)
    columns = [name for name in PROBE_COLUMNS if "cluster" not in name]
    assert list(rows[0])[-len(columns):] == columns  # the first run's row, rewritten with the new columns
    assert [row["probe_knn_f1_k1"] != "" for row in rows] == [False, True]


@pytest.mark.parametrize("table, message", [
    ("one_slide", "--probe {table}: its patches come from one slide, and the probe splits by slide"),
    ("few", "--probe {table}: its training half holds 4 patches, fewer than the k = 20 the probe scores"),
    ("no_tumor", "--probe {table}: no class is named tumor; name the positive class with --probe_positive (one of "
                 "a, b)"),
    ("missing", "error: --probe {table} does not exist"),  # the table named once
])
def test_a_probe_table_that_cannot_be_probed_is_refused_before_the_run_folder_exists(tiny_demo, tmp_path, capsys,
                                                                                      table, message):
    rows = list(csv.DictReader(open(tiny_demo / "patch_labels.csv")))
    for row in rows:
        row["path"] = str(tiny_demo / row["path"])
    chosen = {"one_slide": [r for r in rows if r["slide"] == "tumor_000"],
              "few": [r for r in rows if r["slide"] in ("normal_000", "tumor_000")][::4],
              "no_tumor": [{**r, "label": "a" if r["label"] == "normal" else "b"} for r in rows]}.get(table)
    path = tmp_path / f"{table}.csv"
    if chosen is not None:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "label", "slide"])
            writer.writeheader()
            writer.writerows(chosen)
    save_path = tmp_path / "run"
    assert pretrain_main(tiny_run_args(tiny_demo, save_path, "--epochs", "1", "--probe", str(path))) == 2
    assert message.format(table=path) in capsys.readouterr().out
    assert not save_path.exists()


def test_a_probe_of_slide_corners_reads_the_jobs_slides_and_scores_what_evaluate_knn_scores(tmp_path):
    job = write_job(tmp_path / "job", names=("a", "b", "c", "d"))  # 16 patches per slide
    corners = [(name, x, y) for name, (_, coords) in named_pairs(job_pairs(job)).items()
               for x, y in read_coords(coords).coords.tolist()]
    write_csv(job / "patch_labels.csv", ("slide", "x", "y", "label", "path"),
              [(name, x, y, "tumor" if index % 4 == 0 else "normal", "") for index, (name, x, y) in enumerate(corners)])
    save_path = tmp_path / "run"
    train(parse_config(tiny_run_args(job, save_path, "--epochs", "1", "--probe", str(job / "patch_labels.csv"))))
    halves = [list(csv.DictReader(open(save_path / "probe" / f"{name}.csv"))) for name in ("train", "test")]
    assert [len(half) for half in halves] == [32, 32] and list(halves[0][0]) == ["slide", "x", "y", "label"]
    out = tmp_path / "report"
    assert knn_main(["--checkpoint", str(save_path / "last.pth"), "--train", str(save_path / "probe" / "train.csv"),
                     "--test", str(save_path / "probe" / "test.csv"), "--job", str(job), "--k", "1", "20", "--out",
                     str(out), "--device", "cpu", "--num_workers", "0", "--no_baselines", "--no_embedding"]) == 0
    rows = json.loads((out / "report.json").read_text())["rows"]
    last = epochs_csv(save_path)[-1]
    assert [float(last[f"probe_{name}"]) for name in ("knn_f1_k1", "knn_f1_k20", "linear_f1")] == pytest.approx(
        [row["f1"] for row in rows], abs=1e-12)
