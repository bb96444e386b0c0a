"""The one feature path: patches read from slides give the features the same pixels give as files."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from clusiam.checkpoint import load_pretrained
from clusiam.coords import coordinate_attributes
from clusiam.errors import DataError
from clusiam.features import encode, feature_extractor
from clusiam.slide_source import SlideSource, job_pairs
from clusiam.slides import PatchReader, open_slide
from clusiam.tables import write_csv
from conftest import write_pyramid
from test_slide_source import write_coords

SIDE0, SIZE, MPP = 64, 32, 0.25  # patches of 64 level-0 pixels, read as 32 pixels from level 1
CORNERS = sorted(((x, y) for x in (0, 64) for y in (0, 64)), key=lambda c: f"{c[0]}_{c[1]}")  # file-name order
SLIDES = {"normal_a": "normal", "tumor_a": "tumor", "normal_b": "normal", "tumor_b": "tumor"}
SPLITS = {"train": ("normal_a", "tumor_a"), "test": ("normal_b", "tumor_b")}


def slide_image(label: str, seed: int) -> np.ndarray:
    """128 x 128 noise, pale pink for normal and dark purple for tumour."""
    tint = np.array([230, 180, 200] if label == "normal" else [120, 60, 140], dtype=np.int16)
    noise = np.random.default_rng(seed).integers(-25, 26, (128, 128, 3))
    return np.clip(tint + noise, 0, 255).astype(np.uint8)


def tiler_coords(path: Path, name: str, corners) -> None:
    """A coordinate file as the tiler writes it (TRIDENT's attributes and ours)."""
    write_coords(path, np.array(corners), coordinate_attributes(
        name=name, reader=PatchReader(SIDE0, SIZE, 1, SIZE), downsample=2.0, width=128, height=128,
        level0_mpp=MPP, magnification=None, overlap_px=0, savetodir=path.parent))


def write_pngs(slide_path: Path, folder: Path) -> list[Path]:
    """The slide's patches at CORNERS written as PNG files named <x>_<y>.png: exactly the pixels a slide read gives."""
    folder.mkdir(parents=True)
    slide = open_slide(slide_path)
    reader = PatchReader.for_slide(slide, SIDE0, SIZE)
    files = []
    for x, y in CORNERS:
        reader.read(slide, x, y).save(folder / f"{x}_{y}.png")
        files.append(folder / f"{x}_{y}.png")
    slide.close()
    return files


def slide_setup(root: Path) -> SimpleNamespace:
    """Four slides in ``root/slides``; a tiling job ``root/job`` over them (job.json, coords/) with
    train.csv and test.csv (slide, x, y, label, path empty); the same patches as PNG files in
    ``root/patches/<class>/<slide>/`` with train.csv and test.csv (path, label, slide)."""
    slides, job, patches = root / "slides", root / "job", root / "patches"
    slides.mkdir()
    paths = {name: write_pyramid(slides / f"{name}.tif", slide_image(label, seed), MPP, downsamples=(1, 2))
             for seed, (name, label) in enumerate(SLIDES.items())}
    for name in SLIDES:
        tiler_coords(job / "coords" / f"{name}.h5", name, CORNERS)
    (job / "job.json").write_text(json.dumps({"slides": {name: str(path) for name, path in paths.items()}}))
    files = {name: write_pngs(paths[name], patches / label / name) for name, label in SLIDES.items()}
    for split, names in SPLITS.items():
        write_csv(job / f"{split}.csv", ("slide", "x", "y", "label", "path"),
                  [(name, x, y, SLIDES[name], "") for name in names for x, y in CORNERS])
        write_csv(patches / f"{split}.csv", ("path", "label", "slide"),
                  [(f.relative_to(patches), SLIDES[name], name) for name in names for f in files[name]])
    return SimpleNamespace(slides=slides, job=job, coords=job / "coords", patches=patches, files=files)


def test_slides_and_the_same_pixels_as_files_give_the_same_features(tiny_checkpoint, tmp_path):
    setup = slide_setup(tmp_path)
    source, verdict = SlideSource.checked(job_pairs(setup.job))
    assert verdict.bad == [] and len(source) == 16
    model, state = load_pretrained(tiny_checkpoint)
    options = {"mean": state["normalization"]["mean"], "std": state["normalization"]["std"],
               "device": torch.device("cpu"), "batch_size": 5, "num_workers": 0}
    encoder = feature_extractor(model)
    from_slides = encode(encoder, source, **options)
    files = [f for name in sorted(SLIDES) for f in setup.files[name]]  # job_pairs: slides by name
    assert from_slides.shape == (16, 512)
    np.testing.assert_array_equal(from_slides, encode(encoder, files, **options))
    np.testing.assert_array_equal(encode(encoder, source, **options, indices=[7, 2]), from_slides[[7, 2]])


def test_broken_features_name_the_slide_and_corner(tmp_path):
    class Broken(nn.Module):
        def forward(self, images):
            return torch.full((len(images), 2), float("nan"))

    setup = slide_setup(tmp_path)
    source, _ = SlideSource.checked(job_pairs(setup.job))
    with pytest.raises(DataError, match=r"NaN or infinite features for .*normal_a.tif at \(0, 0\)"):
        encode(Broken(), source, [0.5] * 3, [0.25] * 3, torch.device("cpu"), num_workers=0)
