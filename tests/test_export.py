import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn
from torchvision import models
from transformers import SegformerConfig, SegformerModel

from clusiam.checkpoint import load_pretrained
from clusiam.config import parse_config
from clusiam.export import main as export_main
from clusiam.knn_eval import main as knn_main
from clusiam.mit import MixVisionTransformer
from clusiam.train import train
from conftest import tiny_run_args

REPO = Path(__file__).resolve().parents[1]
LPD_TSV = Path(__file__).resolve().parents[2] / "shared" / "specs" / "lpd_mit_b1_keys.tsv"
PACKAGED_TSV = Path(__file__).resolve().parents[1] / "clusiam" / "assets" / "lpd_mit_b1_keys.tsv"


def transformers_name(key: str) -> str:
    """Our (LPD's) MiT-B1 parameter name as transformers 5's SegformerModel calls it."""
    parts = key.split(".")
    stage = int(parts[0][-1]) - 1
    if parts[0].startswith("patch_embed"):
        return f"stages.{stage}.patch_embeddings.{'proj' if parts[1] == 'proj' else 'layer_norm'}.{parts[2]}"
    if parts[0].startswith("norm"):
        return f"stages.{stage}.layer_norm.{parts[1]}"
    block = f"stages.{stage}.blocks.{parts[1]}."
    rest = ".".join(parts[2:])
    renames = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.q": "attention.q_proj",
               "attn.proj": "attention.o_proj", "attn.sr": "attention.sequence_reduction.sequence_reduction",
               "attn.norm": "attention.sequence_reduction.layer_norm"}
    for ours, theirs in renames.items():
        if rest.startswith(ours + "."):
            return block + theirs + rest[len(ours):]
    return block + rest  # mlp.fc1, mlp.dwconv.dwconv, mlp.fc2


@pytest.mark.parametrize("strides", [(4, 2, 2, 2), (4, 2, 2, 1)])
def test_mit_b1_computes_what_transformers_segformer_computes(strides):
    torch.manual_seed(0)
    ours = MixVisionTransformer(strides=strides).eval()
    config = SegformerConfig(hidden_sizes=[64, 128, 320, 512], num_attention_heads=[1, 2, 5, 8], depths=[2, 2, 2, 2],
                             sr_ratios=[8, 4, 2, 1], mlp_ratios=[4, 4, 4, 4], strides=list(strides))
    theirs = SegformerModel(config).eval()
    their_state = theirs.state_dict()
    mapped = {}
    for key, value in ours.state_dict().items():
        if key.endswith("attn.kv.weight") or key.endswith("attn.kv.bias"):
            prefix = transformers_name(key.replace("attn.kv", "attn.q")).replace("q_proj", "{}_proj")
            keys, values = value.chunk(2)  # keys first, then values
            mapped[prefix.format("k")], mapped[prefix.format("v")] = keys, values
        else:
            mapped[transformers_name(key)] = value
    assert set(mapped) == set(their_state)
    theirs.load_state_dict(mapped, strict=True)
    ours_by_name = dict(ours.named_modules())
    for name, module in theirs.named_modules():  # transformers uses eps 1e-5 throughout; take the reference's
        if isinstance(module, nn.LayerNorm):
            module.eps = next(m.eps for n, m in ours_by_name.items()
                              if isinstance(m, nn.LayerNorm) and transformers_name(n + ".weight") == name + ".weight")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(x, output_hidden_states=True).hidden_states
        for mine, reference in zip(ours.stages(x), expected):
            assert mine.shape == reference.shape
            assert (mine - reference).abs().max() < 1e-4


@pytest.fixture(scope="module")
def mit_checkpoint(tiny_demo, tmp_path_factory):
    run = tmp_path_factory.mktemp("mit")
    return train(parse_config(tiny_run_args(tiny_demo, run, "--backbone", "mit_b1", "--epochs", "1",
                                            "--patch_mpp", "0.5")))


def test_the_packaged_key_list_is_the_specs():
    if not LPD_TSV.is_file():
        pytest.skip(f"{LPD_TSV} is not beside this checkout")
    assert PACKAGED_TSV.read_text() == LPD_TSV.read_text()


def features(network, x):
    with torch.no_grad():
        return network.eval()(x)


def test_lpd_export_has_exactly_lpds_keys_and_gives_the_same_features(mit_checkpoint, tmp_path):
    out = tmp_path / "pretrained" / "mit_b1.pth"
    assert export_main([str(mit_checkpoint), "--format", "lpd", "--out", str(out)]) == 0
    state = torch.load(out, weights_only=True)
    listed = [line.split("\t") for line in PACKAGED_TSV.read_text().splitlines()]
    assert len(listed) == 176
    assert [(k, list(v.shape)) for k, v in state.items()] == [(k, json.loads(s)) for k, s in listed]
    assert sum(v.numel() for v in state.values()) == 13_151_424

    lpd = MixVisionTransformer(strides=(4, 2, 2, 1))
    lpd.load_state_dict(state, strict=True)
    encoder = load_pretrained(mit_checkpoint)[0].backbone
    encoder.patch_embed4.proj.stride = (1, 1)  # the same strides as LPD
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for ours, theirs in zip(encoder.eval().stages(x), lpd.eval().stages(x)):
            assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 1e-5
    assert lpd.stages(x)[-1].shape[-1] == 4  # last stage at 1/16 of 64 px

    info = json.loads(out.with_suffix(".json").read_text())
    assert info["architecture"] == "mit_b1" and info["input_channel_order"] == "RGB" and info["method"] == "clusiam"
    assert info["patch_mpp"] == 0.5 and info["patch_size"] == 32 and info["epochs_trained"] == 1
    assert len(info["source_sha256"]) == 64 and len(info["normalization"]["mean"]) == 3


def test_bgr_export_sees_bgr_images_as_the_encoder_sees_rgb(mit_checkpoint, tmp_path):
    out = tmp_path / "mit_b1_bgr.pth"
    assert export_main([str(mit_checkpoint), "--format", "lpd", "--out", str(out), "--bgr"]) == 0
    lpd = MixVisionTransformer()
    lpd.load_state_dict(torch.load(out, weights_only=True), strict=True)
    rgb = torch.randn(2, 3, 64, 64)
    encoder = load_pretrained(mit_checkpoint)[0].backbone
    assert (features(lpd, rgb.flip(1)) - features(encoder, rgb)).abs().max() < 1e-5
    info = json.loads(out.with_suffix(".json").read_text())
    rgb_mean = load_pretrained(mit_checkpoint)[1]["normalization"]["mean"]
    assert info["input_channel_order"] == "BGR" and info["normalization"]["mean"] == rgb_mean[::-1]


def test_torchvision_export_loads_strictly_with_real_batchnorm_statistics(tiny_checkpoint, tmp_path):
    out = tmp_path / "resnet18.pth"
    assert export_main([str(tiny_checkpoint), "--format", "torchvision", "--out", str(out)]) == 0
    state = torch.load(out, weights_only=True)
    network = models.resnet18(weights=None)
    network.fc = nn.Identity()
    network.load_state_dict(state, strict=True)
    assert not torch.allclose(state["bn1.running_var"], torch.ones(64))  # statistics from pretraining, not defaults
    x = torch.randn(2, 3, 64, 64)
    assert (features(network, x) - features(load_pretrained(tiny_checkpoint)[0].backbone, x)).abs().max() < 1e-5


@pytest.fixture(scope="module")
def timm_checkpoint(tiny_demo, tmp_path_factory):
    """A CluSiam checkpoint of a timm backbone (resnet10t: timm's own, no torchvision twin)."""
    return train(parse_config(tiny_run_args(tiny_demo, tmp_path_factory.mktemp("timm"), "--backbone", "resnet10t",
                                            "--epochs", "1")))


def test_timm_export_loads_strictly_and_safetensors_hold_the_same_tensors(timm_checkpoint, tmp_path):
    checkpoint = timm_checkpoint
    assert export_main([str(checkpoint), "--format", "timm", "--out", str(tmp_path / "r10.pth")]) == 0
    assert export_main([str(checkpoint), "--format", "timm", "--out", str(tmp_path / "r10.pth"), "--safetensors"]) == 0
    state = torch.load(tmp_path / "r10.pth", weights_only=True)
    tensors = load_file(tmp_path / "r10.safetensors")
    assert state.keys() == tensors.keys() and all(torch.equal(state[k], tensors[k]) for k in state)
    network = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    network.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    assert (features(network, x) - features(load_pretrained(checkpoint)[0].backbone, x)).abs().max() < 1e-5


@pytest.mark.parametrize("fmt, extra, message", [
    ("lpd", [], "--format lpd needs mit_b1"),
    ("timm", [], "--format timm needs a timm model"),
    ("torchvision", ["--bgr"], "--bgr applies to --format lpd"),
    ("lpd", ["--safetensors"], "--safetensors cannot go with --format lpd"),
    ("torchvision", ["--out", "w.json"], "the weights need their own name"),
])
def test_a_wrong_pairing_is_refused(tiny_checkpoint, tmp_path, capsys, fmt, extra, message):
    assert export_main([str(tiny_checkpoint), "--format", fmt, "--out", str(tmp_path / "x.pth"), *extra]) == 2
    assert message in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_an_out_that_is_a_folder_is_refused_asking_for_a_file_name(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "pretrained"
    folder.mkdir()
    assert export_main([str(tiny_checkpoint), "--format", "torchvision", "--out", str(folder)]) == 2
    assert capsys.readouterr().out == (f"error: --out {folder} is a folder: pass a file name for the weights, e.g. "
                                       f"{folder / 'encoder.pth'}\n")
    assert list(tmp_path.iterdir()) == [folder] and not list(folder.iterdir())


def test_an_out_where_no_folder_can_be_made_is_one_error_naming_it(tiny_checkpoint, capsys):
    """/proc takes no new folder, and a root user passes every permission check: the folder's
    creation fails, and says so in one line (it used to be a FileNotFoundError traceback)."""
    out = Path("/proc/clusiam-test/encoder.pth")
    assert export_main([str(tiny_checkpoint), "--format", "torchvision", "--out", str(out)]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "/proc/clusiam-test" in lines[0]
    assert ("cannot be created" in lines[0]) or ("not writable" in lines[0])


def small_file_size_limit():
    """In the child, before it runs: files may not grow past 1 MiB, and a write past that fails with
    EFBIG (SIGXFSZ, which would kill the process instead, is ignored): a full disk in miniature."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_a_write_that_runs_out_of_room_is_one_error_naming_the_file(tiny_checkpoint, tmp_path):
    out = tmp_path / "resnet18.pth"  # about 45 MB of weights
    result = subprocess.run([sys.executable, "-m", "clusiam.export", str(tiny_checkpoint), "--format", "torchvision",
                             "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300,
                            preexec_fn=small_file_size_limit)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == (f"error: file too large for the limit on this system while writing {out}: free space on "
                             "that disk (or raise the quota) and run again; nothing was written\n")
    assert list(tmp_path.iterdir()) == []  # neither the weights nor their temporary


# --- hub folders ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def knn_report(tiny_demo, tiny_checkpoint, tmp_path_factory):
    """evaluate_knn.py's report.json for the tiny checkpoint."""
    out = tmp_path_factory.mktemp("knn")
    assert knn_main(["--checkpoint", str(tiny_checkpoint), "--train", str(tiny_demo / "knn_train.csv"), "--test",
                     str(tiny_demo / "knn_test.csv"), "--out", str(out), "--device", "cpu", "--num_workers", "0",
                     "--no_baselines", "--no_embedding"]) == 0
    return out / "report.json"


@pytest.mark.parametrize("which", ["tiny_checkpoint", "timm_checkpoint"])
def test_a_hub_folder_loads_in_timm_and_eva_with_nothing_but_its_path(which, request, tmp_path):
    """A torchvision ResNet (as timm's resnet18) and a timm backbone: timm.create_model("local-dir:...",
    pretrained=True) loads it strictly with no other argument, its transforms carry the run's
    preprocessing, and eva's timm backbone (checkpoint_path = the weight file) computes the same."""
    from eva.vision.models import ModelFromRegistry

    checkpoint = request.getfixturevalue(which)
    out = tmp_path / "encoder"
    assert export_main([str(checkpoint), "--format", "hub", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    encoder, state = load_pretrained(checkpoint)
    backbone = state["config"]["backbone"]
    network = timm.create_model(f"local-dir:{out}", pretrained=True)
    x = torch.randn(2, 3, 32, 32)
    assert (features(network, x) - features(encoder.backbone, x)).abs().max() < 1e-5
    data = timm.data.resolve_model_data_config(network)
    assert list(data["mean"]) == state["normalization"]["mean"] and list(data["std"]) == state["normalization"]["std"]
    assert data["input_size"] == (3, 32, 32) and data["interpolation"] == "bilinear" and data["crop_pct"] == 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == backbone and config["model_args"]["num_classes"] == 0
    assert not {"tag", "license", "paper_ids", "origin_url"} & set(config["pretrained_cfg"])  # ImageNet's, not ours
    eva = ModelFromRegistry(f"timm/{backbone}", model_kwargs={"checkpoint_path": str(out / "model.safetensors")})
    assert (features(eva, x) - features(encoder.backbone, x)).abs().max() < 1e-5


def test_a_hub_folder_of_mit_b1_is_a_segformer_model_with_lpds_stages(mit_checkpoint, tmp_path):
    """transformers' SegformerModel.from_pretrained computes the encoder's four stages; its LayerNorms
    all use eps 1e-5 where the reference's blocks use 1e-6, which moves features by about 1e-5."""
    from transformers import AutoImageProcessor

    out = tmp_path / "mit"
    assert export_main([str(mit_checkpoint), "--format", "hub", "--out", str(out)]) == 0
    theirs = SegformerModel.from_pretrained(out).eval()
    encoder, state = load_pretrained(mit_checkpoint)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for ours, reference in zip(encoder.backbone.stages(x), theirs(x, output_hidden_states=True).hidden_states):
            assert ours.shape == reference.shape and (ours - reference).abs().max() < 1e-4
    processor = AutoImageProcessor.from_pretrained(out)
    assert list(processor.image_mean) == state["normalization"]["mean"] and processor.size["height"] == 32
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "patch scale 0.5 um/px" in card


def test_the_model_card_says_what_the_encoder_saw_and_quotes_its_report(tiny_checkpoint, knn_report, tmp_path):
    out = tmp_path / "encoder"
    assert export_main([str(tiny_checkpoint), "--format", "hub", "--out", str(out), "--report", str(knn_report)]) == 0
    card = (out / "README.md").read_text()
    state = load_pretrained(tiny_checkpoint)[1]
    rows = json.loads(knn_report.read_text())["rows"]
    assert "- **Method:** clusiam, 8 clusters, alpha 0.5" in card and "- **Backbone:** resnet18" in card
    ledger = state["pretraining_slides"]
    assert f"{len(ledger['names'])} slides, {ledger['patches']} patches" in card
    assert "1 of 1 epoch, global batch 16" in card and "**Initial weights:** random" in card
    for row in rows:
        assert f"| {format(row['f1'], '.4f')} | {row['macro_f1']:.4f} |" in card
    assert "Test slides seen in pretraining: 2 of 2." in card


def test_hub_exports_refuse_a_used_folder_and_a_report_of_another_checkpoint(tiny_checkpoint, timm_checkpoint,
                                                                             knn_report, tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    assert export_main([str(tiny_checkpoint), "--format", "hub", "--out", str(used)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().out
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
    out = tmp_path / "new"
    assert export_main([str(timm_checkpoint), "--format", "hub", "--out", str(out), "--report", str(knn_report)]) == 2
    assert "holds no row for" in capsys.readouterr().out
    assert export_main([str(tiny_checkpoint), "--format", "timm", "--out", str(out), "--report", str(knn_report)]) == 2
    assert "--report goes with --format hub" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"]  # nothing else, no temporary
