"""Export a pretrained encoder as the weight file a segmentation stage loads.

    python -m clusiam.export runs/mit/last.pth --format lpd --out pretrained/mit_b1.pth [--bgr]
    python -m clusiam.export runs/clusiam/last.pth --format torchvision --out resnet18_clusiam.pth
    python -m clusiam.export runs/vit/last.pth --format timm --out vit_s16_clusiam.pth [--safetensors]

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
from clusiam.errors import ExportError, run_command
from clusiam.files import check_output_folder, file_digest, write_atomically
from clusiam.mit import MixVisionTransformer

LPD_KEYS_FILE = Path(__file__).parent / "assets" / "lpd_mit_b1_keys.tsv"
FAMILY_OF_FORMAT = {"lpd": "mit", "torchvision": "torchvision", "timm": "timm"}
BACKBONES_OF_FORMAT = {"lpd": "mit_b1", "torchvision": "resnet18 or resnet50", "timm": "a timm model"}
SETTINGS = ("model_type", "backbone", "feat_size", "num_clusters", "alpha", "epochs", "batch_size", "lr",
            "weight_decay", "fix_pred_lr", "image_size", "augment", "seed")



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


def export(checkpoint: Path, fmt: str, out: Path, bgr: bool = False, safetensors: bool = False) -> Path:
    """Write the export and its JSON; return the weight file's path."""
    if bgr and fmt != "lpd":
        raise ExportError("--bgr applies to --format lpd (LPD reads images with OpenCV)")
    if safetensors and fmt == "lpd":
        raise ExportError("--safetensors cannot go with --format lpd: "
                          "LPD reads ./pretrained/mit_b1.pth with torch.load")
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
                          f"{BACKBONES_OF_FORMAT[fmt]}")
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
    parser = argparse.ArgumentParser(prog="python -m clusiam.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--format", dest="fmt", required=True, choices=list(FAMILY_OF_FORMAT))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bgr", action="store_true", help="for BGR input (LPD reads with OpenCV)")
    parser.add_argument("--safetensors", action="store_true", help="write .safetensors instead of a torch pickle")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: export(args.checkpoint, args.fmt, args.out, args.bgr, args.safetensors))


if __name__ == "__main__":
    raise SystemExit(main())
