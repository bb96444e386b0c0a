"""The paper's protocol in one command, on a small demo set: every method pretrained, scored by
KNN, the linear probe and DSMIL, and one table that agrees with the reports it came from."""
import json

from clusiam.demo import DemoSpec, prepare_demo
from clusiam.reproduce import main
from clusiam.runlock import RunLock

# Eight slides: enough for mil.train's seeded split (two test, two validation, four training slides).
SPEC = DemoSpec(seed=1, patch_size=32, slides_per_class=4, grid=3, cmu_patches=False)


def test_the_protocol_runs_every_method_and_its_table_repeats_the_reports(tmp_path, capsys):
    data = prepare_demo(tmp_path / "demo", SPEC) / "synthetic"
    out = tmp_path / "reproduce"
    budget = ["--epochs", "1", "--batch_size", "16", "--image_size", "32", "--num_clusters", "8", "--mil_epochs", "3",
              "--mil_seeds", "1", "--device", "cpu", "--num_workers", "0"]
    assert main([str(data), "--out", str(out), *budget, "--", "--print_freq", "2"]) == 0
    table = json.loads((out / "reproduce.json").read_text())
    assert list(table["methods"]) == ["clubyol", "clusiam", "simsiam", "byol"]
    knn = json.loads((out / "knn" / "report.json").read_text())
    for method, row in table["methods"].items():
        run = out / "runs" / f"{method}_seed0" / "last.pth"
        rows = {r["classifier"]: r for r in knn["rows"] if r["checkpoint"] == str(run)}
        assert row["scores"]["knn_f1"] == {"mean": rows["knn"]["f1"], "std": 0.0} and rows["knn"]["k"] == 1
        assert row["scores"]["linear_f1"]["mean"] == rows["linear"]["f1"]
        mil = json.loads((out / "mil" / f"{method}_seed0" / "report.json").read_text())
        assert mil["settings"]["aggregator"] == "dsmil" and mil["slides"] == {"train": 4, "val": 2, "test": 2}
        assert row["scores"]["dsmil_accuracy"]["mean"] == mil["summary"]["test_accuracy"]["mean"]
        assert row["scores"]["dsmil_auc_positive"]["mean"] == mil["summary"]["test_auc_tumor"]["mean"]
        assert row["test_slides_seen_in_pretraining"]["knn"]["text"] == "4 of 4"  # pretrained on every slide
        assert row["test_slides_seen_in_pretraining"]["dsmil"]["text"] == "2 of 2"
    assert table["methods"]["clubyol"]["paper"] == {"knn_f1": 0.768, "dsmil": [0.923, 0.947, 0.975]}
    assert set(table["baselines"]) == {"random_resnet18", "raw_pixels"}
    assert table["budget"]["epochs"] == 1 and not table["tiny_budget"]
    assert "epochs 1 (the paper's: 50)" in table["differences"]
    assert "pretrain.py options: --print_freq 2" in table["differences"]
    assert any(note.startswith("pretrained on test slides") for note in table["differences"])
    markdown = (out / "reproduce.md").read_text()
    assert "| clusiam |" in markdown and "| 0.730 | 0.907 / 0.945 / 0.952 |" in markdown
    assert markdown in capsys.readouterr().out


def test_labels_mil_cannot_use_are_refused_before_any_pretraining(tmp_path, capsys):
    data = prepare_demo(tmp_path / "demo", SPEC) / "synthetic"
    labels = tmp_path / "slides.csv"
    labels.write_text("slide,label\n" + "".join(f"{slide.name},{'abc'[i % 3]}\n"
                                               for i, slide in enumerate(sorted(data.glob("*/*")))))
    assert main([str(data), "--out", str(tmp_path / "r"), "--slide_labels", str(labels), "--device", "cpu"]) == 2
    assert capsys.readouterr().out.startswith(f"error: {labels}: slide classification here is binary")
    assert not (tmp_path / "r" / "runs").exists()


def test_the_runs_own_options_are_refused_after_the_separator(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "r"), "--", "--epochs", "3"]) == 2
    assert capsys.readouterr().out.startswith("error: --epochs after --: the runs' epochs, batch_size")
    assert not (tmp_path / "r").exists()


def test_an_out_folder_another_run_holds_is_refused(tmp_path, capsys):
    lock = RunLock(tmp_path / "r", "--out")
    (tmp_path / "r").mkdir()
    assert lock.acquire() is None  # held by this live process
    try:
        assert main(["--out", str(tmp_path / "r"), "--device", "cpu"]) == 2
    finally:
        lock.release()
    output = capsys.readouterr().out
    assert output.startswith(f"error: {tmp_path / 'r'} is in use by another run") and "pass another --out" in output
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == []  # no demo set written, no stage run
