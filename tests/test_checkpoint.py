import pytest
import torch

from clusiam.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "last.pth"
    save_checkpoint({"epoch": 1, "state_dict": {"w": torch.ones(3)}, "config": {}}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint({"epoch": 2, "state_dict": {"w": torch.zeros(3)}, "config": {"bad": lambda: 0}}, path)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    assert load_checkpoint(path)["epoch"] == 1


def test_loading_refuses_what_is_not_a_clusiam_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")
    torch.save({"model": torch.ones(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="lacks epoch, state_dict, config"):
        load_checkpoint(tmp_path / "other.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable clusiam checkpoint"):
        load_checkpoint(tmp_path / "text.pth")
