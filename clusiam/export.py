"""Export a pretrained encoder as the weight file a segmentation stage loads, or as a model folder.

    python -m clusiam.export runs/mit/last.pth --format lpd --out pretrained/mit_b1.pth [--bgr]
    python -m clusiam.export runs/clusiam/last.pth --format torchvision --out resnet18_clusiam.pth
    python -m clusiam.export runs/vit/last.pth --format timm --out vit_s16_clusiam.pth [--safetensors]
    python -m clusiam.export runs/clusiam/last.pth --format hub --out clusiam_resnet18/ [--report knn/report.json]

- ``hub``: a folder that loads in one line and that the Hugging Face hub serves unchanged once
  uploaded: for ResNets and timm backbones ``timm.create_model("local-dir:FOLDER", pretrained=True)``
  (written by timm's ``save_for_hf``: ``config.json`` with the constructor's arguments and a
  ``pretrained_cfg`` holding this run's mean/std, input size, interpolation and crop;
  ``model.safetensors``, also eva's ``checkpoint_path``); for MiT-B1
  ``transformers.SegformerModel.from_pretrained(FOLDER)`` (the hub's ``nvidia/mit-b1`` layout).
  Each with a ``README.md`` model card: the method, the data, the training, the initial
  weights, and the KNN and linear F1 of ``--report``.

- ``lpd``: MiT-B1 as LPD loads ``pretrained/mit_b1.pth``: a flat state dict with exactly
  the 176 keys and shapes of ``assets/lpd_mit_b1_keys.tsv``, in that order (LPD drops
  unknown keys silently, so the file is checked against the list before it is written).
  ``--bgr`` reverses the first convolution's input channels for LPD's OpenCV (BGR) input.
- ``torchvision``: a ResNet state dict without ``fc``, with its BatchNorm statistics, for
  a torchvision ResNet whose ``fc`` is ``nn.Identity()`` (strict loading).
- ``timm``: the state dict of ``timm.create_model(name, num_classes=0)`` (strict loading).

A JSON beside the file records the architecture, channel order, normalisation, the
method and its settings, and the source checkpoint's SHA-256. Writes are atomic.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from clusiam.backbones import backbone_family, build_timm
from clusiam.checkpoint import load_pretrained
from clusiam.errors import CommandParser, ExportError, counted, run_command
from clusiam.files import check_output_folder, file_digest, write_atomically
from clusiam.mit import SEGFORMER_CONFIG, MixVisionTransformer, segformer_state

LPD_KEYS_FILE = Path(__file__).parent / "assets" / "lpd_mit_b1_keys.tsv"
FAMILY_OF_FORMAT = {"lpd": "mit", "torchvision": "torchvision", "timm": "timm"}
BACKBONES_OF_FORMAT = {"lpd": "mit_b1", "torchvision": "resnet18 or resnet50", "timm": "a timm model"}
FORMATS = (*FAMILY_OF_FORMAT, "hub")
SETTINGS = ("model_type", "backbone", "feat_size", "num_clusters", "alpha", "epochs", "batch_size", "lr",
            "weight_decay", "fix_pred_lr", "image_size", "augment", "seed")
# What a hub folder's preprocessing says: evaluate_knn.py and compute_feats resize bilinearly (--resize) and
# never crop, so a tool that follows the folder's transforms feeds the encoder what its evaluation fed it.
INTERPOLATION, CROP_PCT = "bilinear", 1.0
# pretrained_cfg fields that describe where the built network's default weights came from (ImageNet for
# timm's resnet18): none of them is true of these weights.
BORROWED_DESCRIPTION = ("tag", "license", "description", "origin_url", "paper_name", "paper_ids", "notes",
                        "hf_hub_id", "hf_hub_filename", "url", "file", "source", "label_names", "label_descriptions")
METHOD_NAMES = {"clusiam": "CluSiam", "clubyol": "CluBYOL", "simsiam": "SimSiam", "byol": "BYOL"}
PAPER = 'Wu et al., "Improving Representation Learning for Histopathologic Images with Cluster Constraints", ICCV 2023'



def lpd_layout() -> dict[str, tuple[int, ...]]:
    """LPD's MiT-B1 keys and shapes, in file order."""
    rows = [line.split("\t") for line in LPD_KEYS_FILE.read_text().splitlines() if line.strip()]
    return {key: tuple(json.loads(shape)) for key, shape in rows}


def target_network(fmt: str, backbone: str) -> nn.Module:
    """A freshly built network of the kind the destination loads the file into."""
    if fmt == "lpd":
        return MixVisionTransformer(strides=(4, 2, 2, 1))  # LPD's strides; the weights do not depend on them
    if fmt == "torchvision":
        network = getattr(models, backbone)(weights=None)
        network.fc = nn.Identity()
        return network
    return build_timm(backbone)


def export_state(encoder: nn.Module, fmt: str, bgr: bool = False) -> dict[str, torch.Tensor]:
    """The encoder's tensors as the destination names and orders them."""
    state = {key: value.detach().clone().contiguous() for key, value in encoder.state_dict().items()}
    if fmt == "lpd":
        state = {key: state[key] for key in lpd_layout() if key in state}
        if bgr:  # LPD feeds OpenCV's BGR images: reverse the input channels of the first convolution
            state["patch_embed1.proj.weight"] = state["patch_embed1.proj.weight"].flip(1).contiguous()
    return state


def check_state(state: dict[str, torch.Tensor], fmt: str, backbone: str) -> None:
    """Refuse, naming the problem, unless every key, shape and dtype is what the
    destination expects and every value is finite."""
    expected = {k: (tuple(v.shape), v.dtype) for k, v in target_network(fmt, backbone).state_dict().items()}
    if fmt == "lpd" and {k: s for k, (s, _) in expected.items()} != lpd_layout():
        raise ExportError(f"the MiT-B1 build does not match {LPD_KEYS_FILE}")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ExportError(f"{fmt} export would be incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, tensor in state.items():
        shape, dtype = expected[key]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ExportError(f"{key}: {tuple(tensor.shape)} {tensor.dtype}, but {fmt} expects {shape} {dtype}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ExportError(f"{key} holds NaN or infinite values: the checkpoint is broken")


def metadata(state: dict, fmt: str, bgr: bool, checkpoint: Path) -> dict:
    config = state["config"]
    mean, std = state["normalization"]["mean"], state["normalization"]["std"]
    order = [2, 1, 0] if bgr else [0, 1, 2]
    return {
        "format": fmt, "architecture": config["backbone"],
        "input_channel_order": "BGR" if bgr else "RGB",
        "normalization": {"mean": [mean[i] for i in order], "std": [std[i] for i in order],
                          "scale": "pixel values / 255"},
        "patch_size": config.get("image_size"),
        "patch_mpp": config.get("patch_mpp"),  # pretrain.py --patch_mpp; None when not given
        "method": config["model_type"], "settings": {k: config.get(k) for k in SETTINGS},
        "epochs_trained": state["epoch"], "source_checkpoint": str(checkpoint),
        "source_sha256": file_digest(checkpoint),
    }


def export(checkpoint: Path, fmt: str, out: Path, bgr: bool = False, safetensors: bool = False,
           report: Path | None = None) -> Path:
    """Write the export (a weight file and its JSON, or a hub folder); return its path."""
    if bgr and fmt != "lpd":
        raise ExportError("--bgr applies to --format lpd (LPD reads images with OpenCV)")
    if safetensors and fmt in ("lpd", "hub"):
        raise ExportError(f"--safetensors cannot go with --format {fmt}: " + (
            "LPD reads ./pretrained/mit_b1.pth with torch.load" if fmt == "lpd" else "a hub folder is safetensors"))
    if report is not None and fmt != "hub":
        raise ExportError("--report goes with --format hub (its model card quotes the scores)")
    if fmt == "hub":
        return export_hub(checkpoint, out, report)
    if out.suffix == ".json":
        raise ExportError(f"--out {out}: the weights need their own name; the JSON is written beside them")
    if safetensors:
        out = out.with_suffix(".safetensors")
    check_export_path(out)
    model, state = load_pretrained(checkpoint)
    backbone = state["config"]["backbone"]
    family = backbone_family(backbone)
    if family != FAMILY_OF_FORMAT[fmt]:
        raise ExportError(f"{checkpoint} was pretrained with the {backbone} backbone; --format {fmt} needs "
                          f"{BACKBONES_OF_FORMAT[fmt]} (--format hub takes any backbone)")
    weights = export_state(model.backbone, fmt, bgr)
    check_state(weights, fmt, backbone)
    info = metadata(state, fmt, bgr, Path(checkpoint))  # before any write: a failure leaves nothing
    if safetensors:
        from safetensors.torch import save_file

        write_atomically(out, lambda path: save_file(weights, str(path)))
    else:
        write_atomically(out, lambda path: save_through_python(weights, path))
    write_atomically(out.with_suffix(".json"), lambda path: path.write_text(json.dumps(info, indent=2)))
    print(f"wrote {out} ({len(weights)} tensors, {sum(t.numel() for t in weights.values()):,} values) "
          f"and {out.with_suffix('.json')}")
    return out


# --- hub folders ----------------------------------------------------------------------------

def export_hub(checkpoint: Path, out: Path, report: Path | None) -> Path:
    """The folder, written under a temporary name and renamed into place whole."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} already exists{' and is not empty' if out.is_dir() else ''}: a hub folder "
                          "is written whole into a new or empty folder; pass another --out or remove it")
    check_output_folder(out.parent, "--out's folder")
    model, state = load_pretrained(checkpoint)
    digest = file_digest(checkpoint)  # once: the report's rows are found by it and the card names it
    scores = report_scores(report, checkpoint, digest) if report is not None else None
    mit = backbone_family(state["config"]["backbone"]) == "mit"
    network = model.backbone if mit else timm_network(model.backbone, state["config"]["backbone"])
    card = model_card(state, checkpoint, digest, scores, network.num_features, "transformers" if mit else "timm")
    write = write_segformer_folder if mit else write_timm_folder
    write_atomically(out, lambda folder: write(network, state, folder, card))
    print(f"wrote {out}: " + ("transformers.SegformerModel.from_pretrained(FOLDER)" if mit else
                              f'timm.create_model("local-dir:{out}", pretrained=True)') + " loads it")
    return out


def timm_network(encoder: nn.Module, backbone: str) -> nn.Module:
    """The encoder as a timm model: itself for a timm backbone; for a torchvision ResNet, timm's
    model of that name, whose parameter names and computation are torchvision's."""
    if backbone_family(backbone) == "timm":
        return encoder
    import timm

    network = timm.create_model(backbone, pretrained=False, num_classes=0)
    network.load_state_dict(encoder.state_dict(), strict=True)
    return network


def write_timm_folder(network: nn.Module, state: dict, folder: Path, card: str) -> None:
    """timm's own writer, with this run's preprocessing and none of the built network's borrowed description."""
    from timm.models import save_for_hf

    network.pretrained_cfg = {key: value for key, value in network.pretrained_cfg.items()
                              if key not in BORROWED_DESCRIPTION}
    network.pretrained_cfg.update(description=card_title(state), paper_name=PAPER)
    save_for_hf(network, str(folder), safe_serialization=True, data_config=data_config(state))
    (folder / "README.md").write_text(card)


def write_segformer_folder(encoder: nn.Module, state: dict, folder: Path, card: str) -> None:
    """MiT-B1 as a transformers SegformerModel folder (config, weights, image processor, card)."""
    from safetensors.torch import save_file

    folder.mkdir()
    save_file(segformer_state(encoder.state_dict()), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(SEGFORMER_CONFIG, indent=2))
    size = state["config"]["image_size"]
    processor = {"image_processor_type": "SegformerImageProcessor", "do_resize": True,
                 "size": {"height": size, "width": size}, "resample": 2,  # PIL's bilinear
                 "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": state["normalization"]["mean"], "image_std": state["normalization"]["std"],
                 "do_reduce_labels": False}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    (folder / "README.md").write_text(card)


def data_config(state: dict) -> dict:
    """The preprocessing the encoder was trained and evaluated with, in timm's terms."""
    size = state["config"]["image_size"]
    return {"mean": tuple(state["normalization"]["mean"]), "std": tuple(state["normalization"]["std"]),
            "input_size": (3, size, size), "interpolation": INTERPOLATION, "crop_pct": CROP_PCT}


def report_scores(report: Path, checkpoint: Path, digest: str) -> list[dict]:
    """The rows of an evaluate_knn.py report.json that scored this very checkpoint (by SHA-256)."""
    try:
        rows = json.loads(report.read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ExportError(f"--report {report} is not an evaluate_knn.py report.json ({type(error).__name__}): "
                          "pass the report.json in evaluate_knn.py's --out folder") from None
    mine = [row for row in rows if row.get("checkpoint_sha256") == digest]
    if not mine:
        raise ExportError(f"--report {report} holds no row for {checkpoint} (none with its SHA-256): pass the report "
                          "of an evaluate_knn.py run that was given this checkpoint")
    return mine


def card_title(state: dict) -> str:
    config = state["config"]
    return f"{METHOD_NAMES[config['model_type']]}-pretrained {config['backbone']} for histopathology (clusiam)"


def model_card(state: dict, checkpoint: Path, digest: str, scores: list[dict] | None, num_features: int,
               library: str) -> str:
    """The folder's README.md: what the encoder is, what it saw, how it trained, how it scores, how to load it."""
    tags = ["image-feature-extraction", "histopathology", "self-supervised", "clusiam", library]
    front = ["---", f"library_name: {library}", "pipeline_tag: image-feature-extraction", "tags:",
             *[f"- {tag}" for tag in tags], "---"]
    method = METHOD_NAMES[state["config"]["model_type"]]
    return "\n".join([*front, f"# {card_title(state)}", "", f"An encoder pretrained with {method} ({PAPER}).", "",
                      "## Model details", "", *card_details(state, checkpoint, digest), *card_scores(scores or []),
                      "", "## Usage", "", *card_usage(state, num_features, library), ""])


def normalization(state: dict) -> tuple[list[float], list[float]]:
    """The checkpoint's mean and std, to 4 decimals (as a card shows them)."""
    return tuple([round(value, 4) for value in state["normalization"][key]] for key in ("mean", "std"))


def card_details(state: dict, checkpoint: Path, digest: str) -> list[str]:
    config, ledger, init = state["config"], state.get("pretraining_slides") or {}, state.get("init")
    data = config.get("data_dir") or config.get("coords") or "the built-in demo set"
    slides = counted(len(ledger["names"]), "slide") if "names" in ledger else "slides not recorded"
    patches = counted(ledger["patches"], "patch", "patches") if "patches" in ledger else "patches not counted"
    mpp = f"{config['patch_mpp']} um/px" if config.get("patch_mpp") else "not recorded (pretrain.py --patch_mpp)"
    clustered = config["model_type"].startswith("clu")
    clusters = f", {config['num_clusters']} clusters, alpha {config['alpha']}" if clustered else ""
    mean, std = normalization(state)
    return [f"- **Method:** {config['model_type']}{clusters}",
            f"- **Backbone:** {config['backbone']}",
            f"- **Data:** {data}: {slides}, {patches}; {config['image_size']} px views; patch scale {mpp}",
            f"- **Training:** {state['epoch']} of {counted(config['epochs'], 'epoch')}, global batch "
            f"{config['batch_size']}, "
            f"lr {config['lr']}, {config.get('world_size', 1)} process(es), seed {config['seed']}",
            "- **Initial weights:** " + (f"{init['source']} (SHA-256 {init['sha256']})" if init else "random"),
            f"- **Normalisation:** mean {mean}, std {std} (pixel values / 255)",
            f"- **Source checkpoint:** {Path(checkpoint).name} (SHA-256 {digest})"]


def card_scores(scores: list[dict]) -> list[str]:
    """The report's rows for this checkpoint, and its ledger line."""
    if not scores:
        return []
    lines = ["", "## Evaluation (evaluate_knn.py)", "", "| classifier | F1 | macro F1 | test patches (slides) |",
             "|---|---|---|---|"]
    for row in scores:
        classifier = f"knn, k = {row['k']}" if row["classifier"] == "knn" else "linear"
        f1 = "-" if row["f1"] is None else format(row["f1"], ".4f")
        lines.append(f"| {classifier} | {f1} | {row['macro_f1']:.4f} | {row['test_patches']} ({row['test_slides']}) |")
    seen = scores[0].get("test_slides_seen_in_pretraining", {}).get("text")
    return lines + (["", f"Test slides seen in pretraining: {seen}."] if seen else [])


def card_usage(state: dict, num_features: int, library: str) -> list[str]:
    """Loading the folder; for timm folders eva's variables too (its configs assume other features and means)."""
    if library == "transformers":
        return ["```python", "from transformers import SegformerModel",
                'model = SegformerModel.from_pretrained("PATH").eval()',
                "stages = model(pixel_values, output_hidden_states=True).hidden_states  # 4 feature maps", "```"]
    config, (mean, std) = state["config"], normalization(state)
    return ["```python", "import timm",
            'model = timm.create_model("local-dir:PATH", pretrained=True).eval()  # or hf-hub:ORG/NAME',
            "transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))",
            "features = model(transform(pil_image).unsqueeze(0))  # [1, num_features]", "```", "",
            "In eva (kaiko-eva), with any of its configs:", "", "```bash",
            f"MODEL_NAME=timm/{config['backbone']} MODEL_EXTRA_KWARGS='{{checkpoint_path: PATH/model.safetensors}}' "
            f"IN_FEATURES={num_features} NORMALIZE_MEAN='{mean}' NORMALIZE_STD='{std}' "
            f"RESIZE_DIM={config['image_size']} eva predict_fit --config CONFIG", "```"]


def check_export_path(out: Path) -> None:
    """Refuse, before any work, a weight file or JSON name that an existing folder holds, and a
    destination folder that cannot be made or written."""
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder: pass a file name for the weights, e.g. {out / 'encoder.pth'}")
    if out.with_suffix(".json").is_dir():
        raise ExportError(f"--out {out}: {out.with_suffix('.json')}, where its JSON goes, is a folder: pass "
                          "another file name")
    check_output_folder(out.parent, "--out's folder")


def save_through_python(weights: dict[str, torch.Tensor], path: Path) -> None:
    """``torch.save`` through a Python file: given a path, torch writes from C++ and a full disk
    is an opaque RuntimeError; through a file object it is an OSError (ENOSPC) underneath,
    which :func:`clusiam.files.write_atomically` reports as a full disk naming the file."""
    with open(path, "wb") as handle:
        torch.save(weights, handle)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m clusiam.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--format", dest="fmt", required=True, choices=FORMATS,
                        help="lpd, torchvision, timm: a weight file and its JSON; hub: a model folder")
    parser.add_argument("--out", type=Path, required=True, help="the weight file, or the hub folder (new or empty)")
    parser.add_argument("--bgr", action="store_true", help="for BGR input (LPD reads with OpenCV)")
    parser.add_argument("--safetensors", action="store_true", help="write .safetensors instead of a torch pickle")
    parser.add_argument("--report", type=Path, default=None,
                        help="with --format hub: an evaluate_knn.py report.json whose rows for this checkpoint the "
                             "model card quotes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    def run() -> None:
        args = build_parser().parse_args(argv)
        export(args.checkpoint, args.fmt, args.out, args.bgr, args.safetensors, args.report)

    return run_command(run)


if __name__ == "__main__":
    raise SystemExit(main())
