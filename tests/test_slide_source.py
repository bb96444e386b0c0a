"""Patches read from slides: tiling jobs and TRIDENT / CLAM coordinate files, built here from
small pyramidal TIFFs (tests/conftest.py) and the CC0 demo slide, without the tiler.

The helpers at the top build those inputs for tests/test_train.py and tests/test_distributed.py too."""
from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
from pathlib import Path

import h5py
import numpy as np
import pytest
import tiffslide
from PIL import Image

from clusiam.config import parse_config
from clusiam.coords import coordinate_attributes
from clusiam.demo import CMU_SLIDE
from clusiam.errors import ConfigError, DataError, SlideError
from clusiam.slide_source import SlideSource, folder_pairs, job_pairs
from clusiam.slides import PatchReader
from clusiam.tables import write_csv
from conftest import write_pyramid

SLIDE_SIDE, SLIDE_MPP, MAGNIFICATION = 256, 0.5, 20.0  # the synthetic slides: 20x, levels at downsamples 1 and 2
PATCH, SIDE0 = 32, 64  # their patches: 32 px at 10x (1 um/px), read from level 1 without resizing


def write_slide(path: Path, seed: int, side: int = SLIDE_SIDE, downsamples: tuple[int, ...] = (1, 2)) -> Path:
    """A synthetic 20x slide of smooth colour blotches (no two seeds alike), by default with a 10x level."""
    blotches = np.random.default_rng(seed).integers(40, 230, (side // 16, side // 16, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(blotches).resize((side, side), Image.BICUBIC))
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_pyramid(path, image, SLIDE_MPP, downsamples=downsamples, magnification=MAGNIFICATION)


def grid(width: int, height: int, side0: int = SIDE0) -> np.ndarray:
    """Top-left corners of a grid of side0 x side0 tiles inside a width x height slide."""
    xs, ys = np.meshgrid(np.arange(0, width - side0 + 1, side0), np.arange(0, height - side0 + 1, side0))
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)


def write_coords(path: Path, coords: np.ndarray, attributes: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("coords", data=np.asarray(coords, dtype=np.int64)).attrs.update(attributes)
    return path


def tiler_attributes(slide_path: Path, side0: float = SIDE0, size: int = PATCH) -> dict:
    """The attributes the tiler writes for ``slide_path`` tiled at ``side0`` level-0 pixels per ``size`` px patch."""
    with tiffslide.TiffSlide(slide_path) as slide:
        reader = PatchReader.for_slide(slide, side0, size)
        width, height = slide.dimensions
        return coordinate_attributes(
            name=slide_path.stem, reader=reader, downsample=slide.level_downsamples[reader.level], width=width,
            height=height, level0_mpp=float(slide.properties["tiffslide.mpp-x"]), magnification=MAGNIFICATION,
            overlap_px=0, savetodir=slide_path.parent)


def trident_attributes(width: int, height: int, size: int = PATCH, level0_magnification: float = MAGNIFICATION,
                       target_magnification: float = 10.0) -> dict:
    """What TRIDENT writes: patch_size pixels at target_magnification."""
    return {"patch_size": size, "patch_size_level0": round(size * level0_magnification / target_magnification),
            "level0_magnification": level0_magnification, "target_magnification": target_magnification,
            "overlap": 0, "level0_width": width, "level0_height": height, "name": "trident", "savetodir": "out"}


def clam_attributes(level: int, size: int = PATCH) -> dict:
    """What CLAM writes: patch_size pixels read at pyramid level patch_level, and no level-0 size."""
    return {"patch_size": size, "patch_level": level, "downsample": (2.0**level, 2.0**level),
            "level_dim": (SLIDE_SIDE >> level, SLIDE_SIDE >> level),
            "downsampled_level_dim": (SLIDE_SIDE >> level, SLIDE_SIDE >> level), "name": "clam", "save_path": "out"}


def write_job(job_dir: Path, names: tuple[str, ...] = ("a", "b")) -> Path:
    """A tiling job of synthetic slides (a grid of 16 patches each), as python -m clusiam.tile writes one:
    job.json naming each slide file, and coords/<slide>.h5 with the tiler's attributes. Every second
    slide has no 10x level, like most 40x Aperio scans (levels at 40x, 10x, 2.5x) for 20x patches:
    its patches are read at twice their size, so the job mixes two read sizes."""
    slides = {}
    for seed, name in enumerate(names):
        slide = write_slide(job_dir.parent / f"{job_dir.name}_slides" / f"{name}.tif", seed,
                            downsamples=(1,) if seed % 2 else (1, 2))
        write_coords(job_dir / "coords" / f"{name}.h5", grid(SLIDE_SIDE, SLIDE_SIDE), tiler_attributes(slide))
        slides[name] = str(slide)
    (job_dir / "job.json").write_text(json.dumps({"slides": slides}))
    return job_dir


def write_coords_and_slides(folder: Path) -> tuple[Path, Path]:
    """--coords and --slides folders: slide ``t`` with a TRIDENT-layout file (named as TRIDENT names it), slide
    ``c`` with a CLAM-layout one."""
    coords, slides = folder / "coords", folder / "slides"
    write_coords(coords / "t_patches.h5", grid(SLIDE_SIDE, SLIDE_SIDE), trident_attributes(SLIDE_SIDE, SLIDE_SIDE))
    write_coords(coords / "c.h5", grid(SLIDE_SIDE, SLIDE_SIDE), clam_attributes(level=1))
    for seed, name in enumerate("tc"):
        write_slide(slides / "nested" / f"{name}.tif", seed + 10)
    return coords, slides


def pixels(source: SlideSource) -> list[np.ndarray]:
    return [np.asarray(source.read(index)) for index in range(len(source))]


def test_trident_clam_and_tiler_layouts_read_the_pixels_of_the_tilers_geometry(tmp_path):
    slide = write_slide(tmp_path / "s.tif", seed=0)
    corners = grid(SLIDE_SIDE, SLIDE_SIDE)
    layouts = {"tiler": tiler_attributes(slide), "trident": trident_attributes(SLIDE_SIDE, SLIDE_SIDE),
               "clam": clam_attributes(level=1)}
    del layouts["trident"]["patch_size_level0"]  # older TRIDENT files: the field of view from the magnifications
    with tiffslide.TiffSlide(slide) as handle:
        reader = PatchReader.for_slide(handle, SIDE0, PATCH)
        expected = [np.asarray(reader.read(handle, x, y)) for x, y in corners]
    assert (reader.level, reader.read_size) == (1, PATCH)
    for layout, attributes in layouts.items():
        source, checked = SlideSource.checked([(slide, write_coords(tmp_path / layout / "s.h5", corners, attributes))])
        assert checked.bad == [] and source.patch_size == PATCH
        for got, want in zip(pixels(source), expected):
            np.testing.assert_array_equal(got, want, err_msg=layout)

    # The CC0 slide has one level: TRIDENT's 32 px at 10x and CLAM's 64 px at level 0 read at --patch_size 32
    # are the same field of view, resized alike.
    with tiffslide.TiffSlide(CMU_SLIDE) as handle:
        width, height = handle.dimensions
        corners = grid(width, height, side0=512)[:6]
        reader = PatchReader.for_slide(handle, 64, 32)
        expected = [np.asarray(reader.read(handle, x, y)) for x, y in corners]
    assert (reader.level, reader.read_size) == (0, 64)
    trident = write_coords(tmp_path / "cmu_t.h5", corners, trident_attributes(width, height, 32, 20.0, 10.0))
    clam = write_coords(tmp_path / "cmu_c.h5", corners, clam_attributes(level=0, size=64))
    from_trident, _ = SlideSource.checked([(CMU_SLIDE, trident)])
    from_clam, _ = SlideSource.checked([(CMU_SLIDE, clam)], size=32)
    for a, b, want in zip(pixels(from_trident), pixels(from_clam), expected):
        np.testing.assert_array_equal(a, want)
        np.testing.assert_array_equal(b, want)


def test_coordinates_of_another_slide_or_outside_the_slide_are_refused_naming_the_file(tmp_path):
    small, large = write_slide(tmp_path / "small.tif", 0, side=128), write_slide(tmp_path / "large.tif", 1)
    of_large = write_coords(tmp_path / "large.h5", grid(SLIDE_SIDE, SLIDE_SIDE), tiler_attributes(large))
    with pytest.raises(DataError, match="was made from a slide of 256 x 256 pixels, but .*small.tif is 128 x 128") \
            as error:
        SlideSource.checked([(small, of_large)])
    assert str(of_large) in str(error.value)

    # CLAM records no level-0 size: the patches that fall outside the slide give it away. The
    # advice names a flag only where the command has one.
    clam = write_coords(tmp_path / "clam.h5", grid(SLIDE_SIDE, SLIDE_SIDE), clam_attributes(level=1))
    with pytest.raises(DataError, match=r"12 of 16 patches lie wholly outside .*small.tif") as error:
        SlideSource.checked([(small, clam)])
    assert str(clam) in str(error.value) and "--" not in str(error.value)
    with pytest.raises(DataError, match=r"is this the right slide\?; pass --skip_bad_files to leave them out$"):
        SlideSource.checked([(small, clam)], skip_advice="pass --skip_bad_files to leave them out")

    source, checked = SlideSource.checked([(small, clam), (small, of_large), (large, of_large)], skip=True)
    assert len(source) == 4 + 16 and checked.good == [large]
    assert [what for what, _ in checked.bad] == [clam, small]
    assert "12 of 16 patches lie wholly outside" in checked.bad[0][1]
    assert "pair each coordinate file" in checked.bad[1][1]


def kept_checks(cache: Path) -> dict[str, dict]:
    with sqlite3.connect(cache / "kept.sqlite") as connection:
        return {key: json.loads(value) for key, value in connection.execute("SELECT key, value FROM slide_checks")}


def test_a_slides_check_is_kept_across_runs_and_made_again_when_either_file_changes(tmp_path):
    cache = Path(os.environ["CLUSIAM_CACHE"])  # the test's own (conftest)
    pairs = job_pairs(write_job(tmp_path / "job", names=("a", "b", "c")))
    source, _ = SlideSource.checked(pairs)
    readers = [entry.reader for entry in source.entries]
    assert [entry.read_size for entry in readers] == [PATCH, 2 * PATCH, PATCH]  # b has no 10x level
    kept = kept_checks(cache)
    assert len(kept) == 3 and sorted(verdict["reader"]["read_size"] for verdict in kept.values()) == [32, 32, 64]

    # A marker in every kept verdict: a check that reuses them comes back with it, without opening a slide.
    with sqlite3.connect(cache / "kept.sqlite") as connection:
        for key, verdict in kept.items():
            verdict["reader"]["read_size"] = 99
            connection.execute("UPDATE slide_checks SET value = ? WHERE key = ?", [json.dumps(verdict), key])
    assert [entry.reader.read_size for entry in SlideSource.checked(pairs)[0].entries] == [99, 99, 99]

    # A slide rewritten (its size and modification time change) and a coordinate file touched: checked again.
    shutil.copyfile(pairs[0][0], tmp_path / "copy.tif")
    pairs[0][0].unlink()
    shutil.copyfile(tmp_path / "copy.tif", pairs[0][0])
    os.utime(pairs[2][1], ns=(1, 1))
    again = SlideSource.checked(pairs)[0]
    assert [entry.reader.read_size for entry in again.entries] == [PATCH, 99, PATCH]
    assert len(kept_checks(cache)) == 5  # the new verdicts beside the old ones
    assert [np.asarray(again.read(i)).shape for i in (0, 32)] == [(PATCH, PATCH, 3)] * 2
    with pytest.raises(DataError, match="b.tif changed since it was checked .*read_size=64.* not .*read_size=99"):
        again.read(16)  # the reader of a slide checks it again as it opens it: a wrong verdict reads nothing


def test_pretraining_leaves_a_slide_whose_coordinates_record_its_size_to_its_first_reader(tmp_path):
    """Opening a scanner-size slide costs about 60 ms of parsing: a run over 2,000 slides would
    spend two minutes of one core before its first step. A TRIDENT or tiler coordinate file
    says the slide's size and the field of view, which is all the patches' count needs; the
    process that opens the slide to read checks it then, before any of its pixels is read."""
    cache = Path(os.environ["CLUSIAM_CACHE"])
    small, large = write_slide(tmp_path / "small.tif", 0, side=128), write_slide(tmp_path / "large.tif", 1)
    of_large = write_coords(tmp_path / "large.h5", grid(SLIDE_SIDE, SLIDE_SIDE), tiler_attributes(large))
    source, checked = SlideSource.checked([(large, of_large), (small, of_large)], defer=True)
    assert [entry.reader for entry in source.entries] == [None, None] and len(checked.good) == 2
    assert not (cache / "kept.sqlite").exists() or kept_checks(cache) == {}
    assert np.array_equal([np.asarray(source.read(i)) for i in range(16)],
                          pixels(SlideSource.checked([(large, of_large)])[0]))
    with pytest.raises(DataError, match=rf"{re.escape(str(small))}: cannot be opened \(.*was made from a slide of 256 "
                                        r"x 256 pixels, but .*small.tif is 128 x 128"):
        source.read(16)

    # CLAM's coordinates record no size: checked before, as every other command checks every slide.
    clam = write_coords(tmp_path / "clam.h5", grid(SLIDE_SIDE, SLIDE_SIDE), clam_attributes(level=1))
    with pytest.raises(DataError, match=r"12 of 16 patches lie wholly outside .*small.tif"):
        SlideSource.checked([(small, clam)], defer=True)
    with pytest.raises(SlideError, match=rf"{re.escape(str(tmp_path / 'gone.tif'))}: not a readable slide"):
        SlideSource.checked([(tmp_path / "gone.tif", of_large)], defer=True)  # a missing slide: at once


def test_slides_are_paired_by_name_and_bad_inputs_are_named(tmp_path):
    job = write_job(tmp_path / "job", names=("b", "a"))
    record = json.loads((job / "job.json").read_text())
    shutil.move(tmp_path / "job_slides", job / "slides")  # a job that moved with its slides, recorded relative
    (job / "job.json").write_text(json.dumps({"slides": {name: f"slides/{name}.tif" for name in record["slides"]}}))
    assert job_pairs(job) == [(job / "slides" / "a.tif", job / "coords" / "a.h5"),
                              (job / "slides" / "b.tif", job / "coords" / "b.h5")]
    source, _ = SlideSource.checked(job_pairs(job))
    assert source.slides == ["a", "b"] and len(source) == 32

    (job / "job.json").write_text("{not json")
    with pytest.raises(DataError, match="job.json is not a tiling job record"):
        job_pairs(job)
    with pytest.raises(DataError, match="is not a tiling job \\(no job.json\\)"):
        job_pairs(tmp_path)

    coords, slides = write_coords_and_slides(tmp_path / "folders")
    assert [(s.name, c.name) for s, c in folder_pairs(coords, slides)] == [("c.tif", "c.h5"),
                                                                           ("t.tif", "t_patches.h5")]
    shutil.copy(slides / "nested" / "c.tif", slides / "c.svs")
    with pytest.raises(DataError, match=r"holds 2 slides named c \(.*c.svs, .*c.tif\): keep one"):
        folder_pairs(coords, slides)
    write_coords(coords / "orphan_patches.h5", grid(64, 64), trident_attributes(64, 64))
    with pytest.raises(DataError, match="holds no slide for 1 coordinate file.*e.g. orphan"):
        folder_pairs(coords, slides)


def test_one_patch_size_for_all_slides_and_an_unreadable_slide_is_named(tmp_path):
    slide = write_slide(tmp_path / "s.tif", 0)
    at_32 = write_coords(tmp_path / "32.h5", grid(SLIDE_SIDE, SLIDE_SIDE), tiler_attributes(slide))
    at_64 = write_coords(tmp_path / "64.h5", grid(SLIDE_SIDE, SLIDE_SIDE), tiler_attributes(slide, size=64))
    with pytest.raises(DataError, match=r"patches of 2 sizes \(\[32, 64\] px\): read all of them at one size"):
        SlideSource.checked([(slide, at_32), (slide, at_64)])
    source, _ = SlideSource.checked([(slide, at_32), (slide, at_64)], size=48)
    assert {np.asarray(patch).shape for patch in pixels(source)} == {(48, 48, 3)}

    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00 not a slide")
    with pytest.raises(SlideError, match="broken.tif: not a readable slide"):
        SlideSource.checked([(broken, at_32)])
    source, checked = SlideSource.checked([(broken, at_32), (slide, at_32)], skip=True)
    assert len(source) == 16 and checked.bad[0][0] == broken and "not a readable slide" in checked.bad[0][1]
    with pytest.raises(DataError, match=r"the one slide cannot be read; first: .*broken.tif"):
        SlideSource.checked([(broken, at_32)], skip=True)


@pytest.mark.parametrize("argv, message", [
    (["data", "--coords", "c", "--slides", "s"], "DATA_DIR data and --coords c are two sources of patches"),
    (["--coords", "c"], "--coords needs --slides"),
    (["--slides", "s"], "--slides needs --coords"),
    (["data", "--patch_size", "32"], "--patch_size reads patches from slides, but DATA_DIR data is a folder"),
    (["--patch_size", "0"], "--patch_size must be at least 1"),
])
def test_the_source_options_refuse_bad_combinations(tmp_path, argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config([*argv, "--save_path", str(tmp_path / "run")])


def test_a_slide_lost_under_skip_is_listed_once_and_passed_over_in_one_step(tmp_path):
    """Each patch of a lost slide must not cost an attempt to open it and a line per patch (a slide of n
    patches would cost n^2/2 of both per epoch): the next readable patch is the next slide's first."""
    from clusiam.sources import SkipLog

    source, _ = SlideSource.checked(job_pairs(write_job(tmp_path / "job", names=("a", "b", "c"))))
    lost = source.entries[1].path
    lost.unlink()
    skipped = SkipLog(tmp_path / "skipped_files.txt")
    patches = source.dataset(lambda image: np.asarray(image), skipped)
    first_of_c = np.asarray(source.read(int(source.offsets[2])))
    for index in range(int(source.offsets[1]), int(source.offsets[2])):  # every patch of the lost slide
        assert np.array_equal(patches[index], first_of_c)
    lines = skipped.path.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{lost}\tcannot be opened ({lost}: not a readable slide")
    assert source.next_to_try(int(source.offsets[1]) + 3) == int(source.offsets[2])
    assert source.next_to_try(0) == 1  # a slide that opens: the next patch


def test_a_slide_without_a_level_at_the_patch_resolution_gives_its_pixels_as_read(tmp_path):
    """Pretraining reads such a slide's patches at twice their size and resizes them on the training
    device; every other reader gets them resized on the CPU (Lanczos), as before."""
    source, _ = SlideSource.checked(job_pairs(write_job(tmp_path / "job")))
    with_level, without = 0, int(source.offsets[1])
    assert [entry.reader.read_size for entry in source.entries] == [PATCH, 2 * PATCH]
    assert source.pixels(with_level).shape == (PATCH, PATCH, 3)
    np.testing.assert_array_equal(source.pixels(with_level), np.asarray(source.read(with_level)))
    stored = source.pixels(without)
    assert stored.shape == (2 * PATCH, 2 * PATCH, 3)
    np.testing.assert_array_equal(np.asarray(source.read(without)),
                                  np.asarray(Image.fromarray(stored).resize((PATCH, PATCH), Image.LANCZOS)))


def test_trident_patches_past_the_slide_edge_are_read_padded_with_black_by_every_command(tiny_checkpoint,
                                                                                          tmp_path, capsys):
    """TRIDENT's grid runs while x < width: on slides of 240 px its last column and row of 64 px
    patches reach 16 px past the edge. Pretraining, compute_feats and evaluate_knn read them, the
    part outside black (what OpenSlide gives TRIDENT); a patch wholly outside is still refused."""
    from clusiam.knn_eval import main as knn_main
    from clusiam.train import main as train_main
    from mil.compute_feats import main as features_main

    coords, slides = tmp_path / "coords", tmp_path / "slides"
    corners = np.stack(np.meshgrid(np.arange(0, 240, SIDE0), np.arange(0, 240, SIDE0)), -1).reshape(-1, 2)
    for seed, name in enumerate(("a", "b")):
        write_slide(slides / f"{name}.tif", seed, side=240)
        write_coords(coords / f"{name}_patches.h5", corners, trident_attributes(240, 240))
        write_csv(tmp_path / f"{name}.csv", ("slide", "x", "y", "label"),
                  [(name, x, y, ("normal", "tumor")[index % 2]) for index, (x, y) in enumerate(corners)])
    source, checked = SlideSource.checked(folder_pairs(coords, slides))
    assert checked.bad == [] and len(source) == 32
    corner = int(np.flatnonzero((corners == (192, 192)).all(1))[0])  # level 1: (96, 96), 24 px inside a 120 px level
    edge = np.asarray(source.read(corner))
    assert not edge[24:].any() and not edge[:, 24:].any() and edge[:24, :24].min() > 0
    with tiffslide.TiffSlide(slides / "a.tif") as slide:
        np.testing.assert_array_equal(edge[:24, :24], np.asarray(slide.read_region((192, 192), 1, (24, 24)))[..., :3])

    where = ["--coords", str(coords), "--slides", str(slides)]
    assert train_main([*where, "--save_path", str(tmp_path / "run"), "--device", "cpu", "--image_size", "32",
                       "--batch_size", "16", "--num_worker", "0", "--num_clusters", "4", "--epochs", "1"]) == 0
    common = ["--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--num_workers", "0", "--batch_size", "8"]
    assert features_main([*common, *where, "--out", str(tmp_path / "bags")]) == 0
    with h5py.File(tmp_path / "bags" / "a.h5") as bag:
        assert bag["features"].shape == (16, 512)
    assert knn_main([*common, *where, "--train", str(tmp_path / "a.csv"), "--test", str(tmp_path / "b.csv"),
                     "--out", str(tmp_path / "knn"), "--k", "1", "--no_baselines", "--no_embedding"]) == 0

    write_coords(coords / "b_patches.h5", np.concatenate([corners, [[240, 0]]]), trident_attributes(240, 240))
    assert features_main([*common, *where, "--out", str(tmp_path / "refused")]) == 2
    message = capsys.readouterr().out.splitlines()[-1]
    assert "1 of 17 patches lie wholly outside" in message and "--" not in message.split("right slide?")[1]


def test_a_truncated_slide_is_refused_or_left_out_and_listed_never_read_wrong(tmp_path):
    """A copy cut short: JPEG would decode the tiles across the cut into wrong pixels without an
    error, so the slide is refused when checked (under skip, left out and listed)."""
    job = write_job(tmp_path / "job", names=("a", "b"))
    cut = tmp_path / "job_slides" / "a.tif"
    with open(cut, "r+b") as handle:
        handle.truncate(cut.stat().st_size - 2000)
    with pytest.raises(SlideError, match=rf"{re.escape(str(cut))}: tiles of level 1 lie past the end of the file"):
        SlideSource.checked(job_pairs(job))
    source, checked = SlideSource.checked(job_pairs(job), skip=True)
    assert source.slides == ["b"] and [path for path, _ in checked.bad] == [cut]
    assert "truncated; copy it again" in checked.bad[0][1]
