"""Weights in: a run's backbone started from weights a lab already has (``pretrain.py --init``).

    python pretrain.py DATA --backbone resnet50 --init resnet50_imagenet.pth
    python pretrain.py DATA --backbone vit_small_patch16_224 --init path/to/hub_folder
    python pretrain.py DATA --init runs/clusiam/last.pth          # continue from an earlier run's encoder

``--init`` takes a torchvision or timm state dict (``.pth``, ``.pt``, ``.bin``, ``.safetensors``;
a dict nesting it under ``state_dict`` or ``model`` too), a folder with ``config.json`` and one
weight file (a timm / Hugging Face folder, ``clusiam.export --format hub``'s, or a SegformerModel
for ``mit_b1``), or a clusiam checkpoint or export. The source's classifier (``fc``, ``head``) is
left out, and said so; every other key must match the backbone's names and shapes exactly.
What was read (path, SHA-256 of the weight file, the keys left out) is recorded in every
checkpoint of the run, in its exports' model cards, and in the leakage ledger, which for a
clusiam checkpoint also inherits the slides that checkpoint was pretrained on.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clusiam.backbones import build_backbone
from clusiam.checkpoint import misfit
from clusiam.errors import ConfigError, counted
from clusiam.files import file_digest
from clusiam.ledger import pretraining_slides
from clusiam.mit import from_segformer_state

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth")  # a folder's, in the order looked for
CLASSIFIERS = ("fc.", "head.", "classifier.")  # torchvision's, timm's and transformers' classifier layers
ADVICE = ("pass a torchvision or timm state dict, a hub folder, or a clusiam checkpoint or export made for "
          "--backbone {backbone}, or the --backbone the weights were made for")


@dataclass(frozen=True)
class InitialWeights:
    """Backbone weights read from ``--init``, and what a checkpoint records of them."""

    source: str  # the path as given
    sha256: str  # of the weight file read
    state: dict[str, Tensor]  # under the backbone's own names
    left_out: list[str]  # the source's classifier keys
    pretrained_on: list[str] | None  # a clusiam checkpoint's ledger: slides these weights have already seen

    def summary(self) -> str:
        left_out = f"; left out the source's classifier ({', '.join(self.left_out)})" if self.left_out else ""
        return (f"initial weights: {self.source} (SHA-256 {self.sha256[:12]}...), {len(self.state)} tensors"
                f"{left_out}")

    def record(self) -> dict[str, Any]:
        """Plain values, for checkpoints (read with ``weights_only=True``) and model cards."""
        return {"source": self.source, "sha256": self.sha256, "left_out": self.left_out,
                "pretrained_on": self.pretrained_on}


def read_initial_weights(path: str | os.PathLike, backbone: str) -> InitialWeights:
    """The weights at ``path`` for ``backbone``, checked key by key against a freshly built one."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--init {path} does not exist: check the path")
    weight_file, state, ledger = read_source(path, backbone)
    reference = build_backbone(backbone)[0].state_dict()
    left_out = sorted(key for key in state if key not in reference and key.startswith(CLASSIFIERS))
    state = {key: value for key, value in state.items() if key not in left_out}
    faults = misfit(reference, state)
    if faults:
        raise ConfigError(f"--init {path} does not fit the {backbone} backbone: {'; '.join(faults)}: "
                          + ADVICE.format(backbone=backbone))
    return InitialWeights(str(path), file_digest(weight_file), state, left_out, ledger)


def read_source(path: Path, backbone: str) -> tuple[Path, dict[str, Tensor], list[str] | None]:
    """(the weight file, its tensors under the backbone's names, a clusiam checkpoint's ledger)."""
    if path.is_dir():
        return read_folder(path, backbone)
    state = read_tensors(path, backbone)
    if isinstance(state.get("state_dict"), dict) and isinstance(state.get("config"), dict):  # a clusiam checkpoint
        trained = state["config"].get("backbone")
        if trained != backbone:
            raise ConfigError(f"--init {path} is a clusiam checkpoint of a {trained} backbone, not {backbone}: "
                              f"pass --backbone {trained}, or weights made for {backbone}")
        backbone_state = {key.removeprefix("backbone."): value for key, value in state["state_dict"].items()
                          if key.startswith("backbone.")}
        return path, backbone_state, pretraining_slides(state)
    nested = next((state[key] for key in ("state_dict", "model") if isinstance(state.get(key), dict)), state)
    return path, tensors_only(nested, path), None


def read_folder(folder: Path, backbone: str) -> tuple[Path, dict[str, Tensor], None]:
    """A folder with ``config.json`` and one weight file: timm's (``architecture``) or a SegformerModel's."""
    config_file = folder / "config.json"
    weight_file = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if not config_file.is_file() or weight_file is None:
        raise ConfigError(f"--init {folder} is a folder without config.json and a weight file "
                          f"({' or '.join(WEIGHT_FILES)}): pass a hub folder, or the weight file itself")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"--init {config_file} cannot be read as JSON ({error}): pass a hub folder") from None
    made_for = "mit_b1" if config.get("model_type") == "segformer" else config.get("architecture")
    if made_for is None:
        raise ConfigError(f"--init {config_file} names no architecture (timm's \"architecture\" or a SegformerModel's "
                          "\"model_type\"): " + ADVICE.format(backbone=backbone))
    if made_for != backbone:
        raise ConfigError(f"--init {folder} holds a {made_for}, not a {backbone}: pass --backbone {made_for}")
    state = read_tensors(weight_file, backbone)
    return weight_file, from_segformer_state(state) if made_for == "mit_b1" else state, None


def read_tensors(path: Path, backbone: str) -> dict[str, Any]:
    """A weight file's contents, read without running code from it."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch and safetensors raise many kinds for a file that is not theirs
        raise ConfigError(f"--init {path} is not a weight file torch.load or safetensors can read "
                          f"({type(error).__name__}): " + ADVICE.format(backbone=backbone)) from None
    if not isinstance(state, dict):
        raise ConfigError(f"--init {path} holds a {type(state).__name__}, not a state dict: "
                          "pass a file of named tensors")
    return state


def tensors_only(state: dict[str, Any], path: Path) -> dict[str, Tensor]:
    """A state dict's tensors; anything else in it (a step count, a name) means it is not one."""
    others = [key for key, value in state.items() if not isinstance(value, Tensor)]
    if others:
        raise ConfigError(f"--init {path} holds {counted(len(others), 'value')} other than tensors "
                          f"({', '.join(others[:3])}): pass a state dict (the weights alone)")
    return state


def start_from(backbones: list[nn.Module], initial: InitialWeights) -> None:
    """Load the weights into each of ``backbones`` (the online one, and the BYOL family's target)."""
    for backbone in backbones:
        backbone.load_state_dict(initial.state, strict=True)
