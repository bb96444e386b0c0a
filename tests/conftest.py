"""Shared fixtures: a tiny synthetic demo set and tiny run options, so the suite stays fast on 2 CPU cores."""
from __future__ import annotations

import csv
import re
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


def write_pyramid(path: Path, image, mpp: float, downsamples: tuple[int, ...] = (1, 2, 4),
                  magnification: float | None = None, tile: int = 64) -> Path:
    """A tiled, JPEG-compressed pyramidal TIFF of ``image`` (H, W, 3 uint8) at ``mpp`` um/px on
    level 0, one level per downsample (Aperio's description, so tiffslide reads the resolution
    and the objective power); the tests' many-slide stand-in for a scanner file."""
    import numpy as np
    import tifffile
    from PIL import Image

    image = np.asarray(image, dtype=np.uint8)
    height, width = image.shape[:2]
    description = f"Aperio Image Library clusiam tests\r\n{width}x{height} ({tile}x{tile}) JPEG/RGB Q=90|MPP = {mpp}"
    if magnification:
        description += f"|AppMag = {magnification:g}"
    with tifffile.TiffWriter(path) as writer:
        for index, factor in enumerate(downsamples):
            level = image if factor == 1 else np.asarray(
                Image.fromarray(image).resize((width // factor, height // factor), Image.LANCZOS))
            writer.write(level, tile=(tile, tile), compression="jpeg", photometric="rgb",
                         description=description if index == 0 else None, subfiletype=0 if index == 0 else 1)
    return path


# Every error a command prints is checked as the suite meets it: the flags its advice names must
# be flags of a command the test ran (a message from a module several commands share must not
# advise one command's flag to another's user). A flag in a clause that names another command
# ("the --out folder of python -m clusiam.tile", "pass torchrun a --nproc_per_node") is that
# command's.
COMMAND_NAME = re.compile(r"python -m [\w.]+|\btorchrun\b|\b\w+\.py\b")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_]*")


def advised_flags(text: str) -> set[str]:
    """The flags ``text`` names, but those in a clause that names another command."""
    clauses = re.split(r"[;,]\s+|\s\(|\)", text)
    return {flag for clause in clauses if not COMMAND_NAME.search(clause) for flag in FLAG.findall(clause)}


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """Each test keeps slide checks and statistics (clusiam.kept) in a folder of its own,
    which the commands it runs inherit: no test reuses what another computed."""
    monkeypatch.setenv("CLUSIAM_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True)
def advice_names_only_flags_the_command_has(monkeypatch):
    import argparse

    from clusiam import errors

    flags: set[str] = set()
    slips: list[str] = []
    parse = argparse.ArgumentParser.parse_known_args

    def recording(self, *args, **kwargs):
        flags.update(option for action in self._actions for option in action.option_strings)
        return parse(self, *args, **kwargs)

    message = errors.message

    def checked(error):
        text = message(error)
        if flags:
            slips.extend(f"{flag} in: {text}" for flag in sorted(advised_flags(text) - flags))
        return text

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", recording)
    monkeypatch.setattr(errors, "message", checked)
    yield
    assert not slips, "advice names flags the command does not have:\n" + "\n".join(slips)
