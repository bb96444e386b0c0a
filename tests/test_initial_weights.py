import json

import pytest
import torch
from torchvision import models

from clusiam.checkpoint import load_pretrained
from clusiam.config import parse_config
from clusiam.export import main as export_main
from clusiam.files import file_digest
from clusiam.initial_weights import read_initial_weights
from clusiam.knn_eval import main as knn_main
from clusiam.train import build_model, train
from clusiam.train import main as train_main
from conftest import tiny_run_args


@pytest.fixture(scope="module")
def started_from_a_run(tiny_demo, tiny_checkpoint, tmp_path_factory):
    """A CluSiam run whose backbone starts from an earlier run's checkpoint."""
    run = tmp_path_factory.mktemp("init")
    return train(parse_config(tiny_run_args(tiny_demo, run, "--epochs", "1", "--init", str(tiny_checkpoint))))


def test_a_run_records_its_initial_weights_in_checkpoint_ledger_and_model_card(started_from_a_run, tiny_checkpoint,
                                                                              tmp_path, capsys):
    state = torch.load(started_from_a_run, weights_only=True)
    assert state["init"]["source"] == str(tiny_checkpoint) and state["init"]["sha256"] == file_digest(tiny_checkpoint)
    earlier = torch.load(tiny_checkpoint, weights_only=True)["pretraining_slides"]["names"]
    assert state["init"]["pretrained_on"] == earlier  # the slides the initial weights saw, inherited by the ledger
    source, digest = str(tiny_checkpoint), file_digest(tiny_checkpoint)
    assert state["pretraining_slides"]["init"] == {"source": source, "sha256": digest, "slides_known": True}
    assert export_main([str(started_from_a_run), "--format", "hub", "--out", str(tmp_path / "hub")]) == 0
    assert f"**Initial weights:** {source} (SHA-256 {digest})" in \
        (tmp_path / "hub" / "README.md").read_text()


def test_the_knn_report_adds_the_initial_weights_beside_random_init(started_from_a_run, tiny_checkpoint, tiny_demo,
                                                                    tmp_path):
    """The init row is the starting encoder itself: the same data gives the same statistics, so it
    scores exactly as the checkpoint it was read from."""
    out = tmp_path / "report"
    assert knn_main(["--checkpoint", str(started_from_a_run), str(tiny_checkpoint), "--train",
                     str(tiny_demo / "knn_train.csv"), "--test", str(tiny_demo / "knn_test.csv"), "--out", str(out),
                     "--device", "cpu", "--num_workers", "0", "--no_embedding", "--no_linear"]) == 0
    rows = {row["encoder"]: row for row in json.loads((out / "report.json").read_text())["rows"]}
    assert {"init_last", "random_resnet18", "raw_pixels"} <= set(rows)
    source = next(row for row in rows.values() if row["checkpoint"] == str(tiny_checkpoint))
    assert rows["init_last"]["f1"] == source["f1"] and rows["init_last"]["macro_f1"] == source["macro_f1"]
    assert rows["init_last"]["checkpoint"] is None  # a baseline row


@pytest.mark.parametrize("model_type", ["clusiam", "byol"])
def test_torchvision_weights_start_the_backbone_and_the_target_leaving_the_classifier_out(tmp_path, model_type):
    torch.manual_seed(1)
    imagenet_like = models.resnet18(weights=None).state_dict()  # with fc, as torchvision's files are
    torch.save(imagenet_like, tmp_path / "resnet18.pth")
    initial = read_initial_weights(tmp_path / "resnet18.pth", "resnet18")
    assert initial.left_out == ["fc.bias", "fc.weight"]
    args = parse_config(["--model_type", model_type, "--save_path", str(tmp_path / "run")])
    model = build_model(args, torch.device("cpu"), torch.preserve_format, initial)
    backbones = [model.backbone] + ([model.target_backbone] if model_type == "byol" else [])
    for backbone in backbones:
        assert all(torch.equal(value, imagenet_like[key]) for key, value in backbone.state_dict().items())


def test_a_hub_folder_is_read_back_as_the_weights_it_was_written_from(tiny_checkpoint, tmp_path):
    assert export_main([str(tiny_checkpoint), "--format", "hub", "--out", str(tmp_path / "hub")]) == 0
    initial = read_initial_weights(tmp_path / "hub", "resnet18")
    encoder = load_pretrained(tiny_checkpoint)[0].backbone
    assert initial.state.keys() == encoder.state_dict().keys()
    assert all(torch.equal(initial.state[key], value) for key, value in encoder.state_dict().items())
    assert initial.sha256 == file_digest(tmp_path / "hub" / "model.safetensors") and initial.pretrained_on is None


@pytest.mark.parametrize("source, message", [
    ("resnet10t.pth", "does not fit the resnet18 backbone: 64 missing (conv1.weight, layer1.1.conv1.weight, "
                      "layer1.1.bn1.weight, ...); 28 unexpected"),
    ("folder", "holds a resnet10t, not a resnet18: pass --backbone resnet10t"),
    ("text.pth", "is not a weight file torch.load or safetensors can read"),
    ("checkpoint", "is a clusiam checkpoint of a resnet18 backbone, not resnet10t: pass --backbone resnet18"),
])
def test_weights_that_do_not_fit_are_refused_in_one_line_before_any_run_folder(tiny_demo, tiny_checkpoint, tmp_path,
                                                                               capsys, source, message):
    import timm

    if source == "folder":
        (tmp_path / source).mkdir()
        (tmp_path / source / "config.json").write_text(json.dumps({"architecture": "resnet10t"}))
        torch.save({}, tmp_path / source / "model.pth")
    elif source == "checkpoint":
        source = str(tiny_checkpoint)
    elif source == "text.pth":
        (tmp_path / source).write_text("not weights")
    else:
        torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), tmp_path / source)
    backbone = "resnet10t" if source == str(tiny_checkpoint) else "resnet18"
    run = tmp_path / "run"
    assert train_main(tiny_run_args(tiny_demo, run, "--backbone", backbone, "--init", str(tmp_path / source))) == 2
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not run.exists()
