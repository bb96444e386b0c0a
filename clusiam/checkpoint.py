"""Checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint is a plain dict. The authors' keys keep their meaning (``epoch``: epochs
completed, ``state_dict``: the model, ``optimizer``: the optimizer); clusiam adds ``step``,
``config`` (the resolved options, and the number of processes that trained it),
``normalization`` (the mean/std the views were normalised with, which evaluation must
reuse) and ``pretraining_slides``, the leakage ledger: the names of the slides it was
pretrained on and a digest of their patches, from which an evaluation counts the test
slides its encoder has seen (:mod:`clusiam.ledger`); where the run asked for them, ``init``
(what ``--init`` started the backbone from: :mod:`clusiam.initial_weights`) and ``best``
(which epoch ``best.pth`` holds: :mod:`clusiam.best`). Nothing in it depends on the
number of processes, so any world size resumes it: random streams are reseeded from
(seed, epoch, rank) at every epoch instead of stored.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clusiam.errors import CheckpointError
from clusiam.files import write_atomically
from clusiam.models import PretrainModel

FORMAT_VERSION = 1
REQUIRED_KEYS = ("epoch", "step", "state_dict", "config", "normalization")
# Options that define the network: a checkpoint resumes only a run that agrees on them.
ARCHITECTURE_OPTIONS = ("model_type", "backbone", "feat_size", "num_clusters")



def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically: a crash never leaves a half-written checkpoint."""
    def write(temporary: Path) -> None:
        with open(temporary, "wb") as handle:  # a Python file, so that a full disk raises OSError(ENOSPC)
            torch.save({"format_version": FORMAT_VERSION, **state}, handle)

    write_atomically(path, write)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a clusiam checkpoint safely (tensors and plain Python values only)."""
    path = Path(path)
    if path.is_dir():
        inside = " (it holds last.pth)" if (path / "last.pth").is_file() else ""
        raise CheckpointError(f"{path} is a folder, not a checkpoint{inside}: pass the checkpoint file, e.g. "
                              f"{path / 'last.pth'}; to resume its run, pretrain.py --save_path {path} --resume auto")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check its path")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a checkpoint (torch.save writes a zip archive, and this file is not "
                              "one, or not a whole one): pass a last.pth or checkpoint_NNNN.pth that pretrain.py wrote")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, which would run whatever code the file holds.
        raise CheckpointError(f"{path} holds objects other than tensors and plain values, so it was refused for "
                              "safety (checkpoints are read without running code from them): pass a checkpoint "
                              "that pretrain.py wrote") from None
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable clusiam checkpoint "
                              f"({type(error).__name__}: {error})") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a clusiam checkpoint "
                              "(the dict pretrain.py writes)")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if isinstance(state.get("config"), dict):
        missing += [f"config.{key}" for key in ARCHITECTURE_OPTIONS if key not in state["config"]]
    if missing:
        raise CheckpointError(f"{path} is not a clusiam checkpoint: it lacks {', '.join(missing)}")
    return state


def load_pretrained(path: str | os.PathLike) -> tuple[PretrainModel, dict[str, Any]]:
    """The trained network of a checkpoint (in eval mode) and the checkpoint itself.
    Evaluation, MIL and export all read checkpoints through this one function."""
    state = load_checkpoint(path)
    config = state["config"]
    model = PretrainModel(config["model_type"], config["backbone"], config["feat_size"], config["num_clusters"])
    check_weights(model, state, path)
    model.load_state_dict(state["state_dict"])
    return model.eval(), state


def check_weights(model: nn.Module, state: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose weights do not fit ``model``, in one line with counts and the
    first few names (torch's own message lists every key)."""
    found = misfit(model.state_dict(), state["state_dict"])
    if found:
        config = state["config"]
        raise CheckpointError(f"{path}: its weights do not fit a {config['model_type']} {config['backbone']} network "
                              f"with {config['feat_size']} features and {config['num_clusters']} clusters: "
                              f"{'; '.join(found)}")


def misfit(own: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """How ``given`` weights miss a network's ``own`` state dict: counts of missing, unexpected
    and reshaped keys, each with its first few names; empty when they fit."""
    faults = {"missing": [key for key in own if key not in given],
              "unexpected": [key for key in given if key not in own],
              "of another shape": [key for key in own if key in given
                                   and tuple(getattr(given[key], "shape", ())) != tuple(own[key].shape)]}
    return [f"{len(keys)} {fault} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
            for fault, keys in faults.items() if keys]
