import pickle

import pytest
import torch

from clusiam.checkpoint import load_checkpoint, save_checkpoint
from clusiam.errors import CheckpointError


def checkpoint_state(epoch: int, **config) -> dict:
    return {"epoch": epoch, "step": 4 * epoch, "state_dict": {"w": torch.full((3,), float(epoch))},
            "normalization": {"mean": [0.5] * 3, "std": [0.2] * 3},
            "config": {"model_type": "clusiam", "backbone": "resnet18", "feat_size": 64, "num_clusters": 4, **config}}


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "last.pth"
    save_checkpoint(checkpoint_state(1), path)
    before = path.read_bytes()
    # the lambda cannot be pickled: AttributeError up to Python 3.13, PicklingError from 3.14
    with pytest.raises((AttributeError, pickle.PicklingError)):
        save_checkpoint(checkpoint_state(2, bad=lambda: 0), path)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    assert load_checkpoint(path)["epoch"] == 1


def test_loading_refuses_what_is_not_a_clusiam_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")
    torch.save({"model": torch.ones(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="lacks epoch, step, state_dict, config, normalization"):
        load_checkpoint(tmp_path / "other.pth")
    torch.save(torch.ones(2), tmp_path / "tensor.pth")
    with pytest.raises(CheckpointError, match="holds a Tensor, not a clusiam checkpoint"):
        load_checkpoint(tmp_path / "tensor.pth")
    state = checkpoint_state(1)
    del state["config"]["backbone"]
    torch.save(state, tmp_path / "no_backbone.pth")
    with pytest.raises(CheckpointError, match="lacks config.backbone"):
        load_checkpoint(tmp_path / "no_backbone.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(CheckpointError, match=r"text.pth is not a checkpoint \(torch.save writes a zip archive"):
        load_checkpoint(tmp_path / "text.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "other.pth").read_bytes()[:-100])  # a copy cut short
    with pytest.raises(CheckpointError, match=r"cut.pth is not a checkpoint \(.*, or not a whole one\)"):
        load_checkpoint(tmp_path / "cut.pth")
