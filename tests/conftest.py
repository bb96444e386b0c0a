"""Shared fixtures: a tiny synthetic demo set and tiny run options, so the suite stays fast on 2 CPU cores."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from clusiam.demo import DemoSpec, prepare_demo

TINY_DEMO = DemoSpec(seed=0, patch_size=32, slides_per_class=2, grid=4, cmu_patches=False)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """64 synthetic 32 px patches from 4 slides (2 normal, 2 tumour)."""
    return prepare_demo(tmp_path_factory.mktemp("demo"), TINY_DEMO) / "synthetic"


def tiny_run_args(data_dir: Path, save_path: Path, *extra: str) -> list[str]:
    """Options for a run of a few steps at 32 px on the CPU; it writes SAVE_PATH/last.pth only (each checkpoint is
    about 100 MB), unless ``--save_freq`` asks for numbered ones too."""
    return [
        str(data_dir), "--save_path", str(save_path), "--device", "cpu", "--image_size", "32",
        "--batch_size", "16", "--num_worker", "0", "--num_clusters", "8", "--print_freq", "1", *extra,
    ]


def epochs_csv(save_path: Path) -> list[dict]:
    """The rows of a run's logs/epochs.csv."""
    with open(save_path / "logs" / "epochs.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_demo, tmp_path_factory) -> Path:
    """A CluSiam checkpoint after one epoch on the tiny demo set."""
    from clusiam.config import parse_config
    from clusiam.train import train

    return train(parse_config(tiny_run_args(tiny_demo, tmp_path_factory.mktemp("run"), "--epochs", "1")))
