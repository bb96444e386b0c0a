"""The tiler: slides into a job folder (patches, coordinates, thumbnails, tables, job.json), with
and without patch files, on the CC0 demo slide and on small generated pyramids."""
import contextlib
import csv
import io
import json
import os
import re
import shutil

import h5py
import numpy as np
import pytest
import shapely
import tiffslide
from PIL import Image

from clusiam.coords import read_coords
from clusiam.demo import CMU_SLIDE
from clusiam.slide_source import SlideSource, job_pairs
from clusiam.slides import PatchReader, open_slide
from clusiam.tile import main as tile_main

# TRIDENT's coords attributes: its reader needs the first three, and writes all of them.
TRIDENT_ATTRIBUTES = ("patch_size", "level0_magnification", "target_magnification", "patch_size_level0", "overlap",
                      "level0_width", "level0_height", "name", "savetodir")


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    shutil.copy(CMU_SLIDE, folder / "cmu.svs")
    (folder / "broken.svs").write_bytes(b"II*\x00 this is not a slide")
    return folder


def coords_file(job, slide="cmu"):
    """The coordinates and the ``coords`` attributes of a slide of a job."""
    with h5py.File(job / "coords" / f"{slide}.h5") as handle:
        return handle["coords"][:], dict(handle["coords"].attrs)


def tile_once(slides, job, *extra):
    assert tile_main([str(slides), "--out", str(job), "--workers", "1", *extra]) == 0
    return coords_file(job)


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def tiled(slides, tmp_path_factory):
    job = tmp_path_factory.mktemp("tiles") / "job"
    coords, attrs = tile_once(slides, job)
    return job, coords, attrs


def test_the_slides_resolution_is_read_and_tiles_come_from_tissue(tiled):
    job, coords, attrs = tiled
    with tiffslide.TiffSlide(CMU_SLIDE) as slide:
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.499)
        assert float(slide.properties["tiffslide.objective-power"]) == 20
    assert attrs["level0_mpp"] == pytest.approx(0.499) and attrs["level0_magnification"] == 20
    assert attrs["patch_level"] == 0 and attrs["patch_size"] == 224  # read at its own size: CLAM's reader agrees
    # The thumbnail shows a strip of tissue over about a third of the 9 x 13 grid of 224 px tiles.
    assert 30 <= len(coords) <= 50
    for x, y in coords:
        patch = np.asarray(Image.open(job / "patches" / "cmu" / f"{x}_{y}.png"))
        assert patch.shape == (224, 224, 3)
        assert (patch.min(-1) > 220).mean() < 0.5  # no kept tile is mostly white glass


def test_coordinates_map_back_to_the_same_pixels(tiled):
    job, coords, _ = tiled
    with tiffslide.TiffSlide(CMU_SLIDE) as slide:
        for x, y in coords[:: max(1, len(coords) // 6)]:
            expected = np.asarray(slide.read_region((int(x), int(y)), 0, (224, 224)).convert("RGB"))
            np.testing.assert_array_equal(np.asarray(Image.open(job / "patches" / "cmu" / f"{x}_{y}.png")), expected)


def test_half_the_resolution_gives_about_a_quarter_of_the_tiles(slides, tiled, tmp_path):
    coords, attrs = tile_once(slides, tmp_path / "coarse", "--mpp", "1.0")
    assert attrs["patch_size_level0"] == round(224 / 0.499) and "patch_level" not in attrs  # read at 449 px
    assert 0.15 <= len(coords) / len(tiled[1]) <= 0.35
    assert Image.open(tmp_path / "coarse" / "patches" / "cmu" / f"{coords[0][0]}_{coords[0][1]}.png").size == (224, 224)


def test_a_corrupt_slide_is_reported_and_skipped_and_the_job_names_the_slides_it_holds(slides, tiled):
    job = tiled[0]
    failed = (job / "failed_slides.txt").read_text()
    assert "broken.svs" in failed and "cmu.svs" not in failed
    rows = read_rows(job / "tiles.csv")
    assert [r["slide"] for r in rows] == ["cmu"] and int(rows[0]["tiles"]) == len(tiled[1])
    assert (job / "thumbnails" / "cmu.png").is_file() and not (job / ".unfinished").exists()
    record = json.loads((job / "job.json").read_text())
    assert record["slides"] == {"cmu": str((slides / "cmu.svs").resolve())} and record["coords_only"] is False
    assert record["options"]["mpp"] == 0.5 and record["options"]["annotations"] is None
    assert job_pairs(job) == [((slides / "cmu.svs").resolve(), job / "coords" / "cmu.h5")]


def test_a_slide_without_resolution_needs_slide_mpp(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    region = tiffslide.TiffSlide(CMU_SLIDE).read_region((600, 600), 0, (1100, 2000)).convert("RGB")
    region.save(folder / "plain.tif")  # a TIFF that records no microns per pixel
    assert tile_main([str(folder), "--out", str(tmp_path / "a"), "--workers", "1"]) == 2  # no slide could be tiled
    assert "records no microns-per-pixel; pass --slide_mpp" in (tmp_path / "a" / "failed_slides.txt").read_text()
    assert tile_main([str(folder), "--out", str(tmp_path / "b"), "--workers", "1", "--slide_mpp", "0.5"]) == 0
    assert len(list((tmp_path / "b" / "patches" / "plain").glob("*.png"))) > 0


def crop(x, y, width, height):
    """Level-0 pixels of the CC0 slide, (height, width, 3) uint8."""
    with tiffslide.TiffSlide(CMU_SLIDE) as slide:
        return np.asarray(slide.read_region((x, y), 0, (width, height)).convert("RGB"))


@pytest.fixture(scope="module")
def unscaled(tmp_path_factory):
    """Slides a.tif and b.tif, the same 1100 x 2000 px of the CC0 slide in TIFFs that record no
    resolution, and the CC0 slide itself (0.499 um/px)."""
    folder = tmp_path_factory.mktemp("unscaled")
    for name in ("a", "b"):
        Image.fromarray(crop(600, 600, 1100, 2000)).save(folder / f"{name}.tif")
    shutil.copy(CMU_SLIDE, folder / "cmu.svs")
    return folder


@pytest.mark.parametrize("table, listed", [
    ("slide,mpp\na.tif,0.5\nb,0.25\n", {"a": 0.5, "b": 0.25}),  # by file name or stem; cmu keeps its file's
    ("wsi,mpp,note\nb.tif,0.5,\ncmu.svs,1.0,wins over the file's 0.499\na.tif,0.25,\n",  # TRIDENT's columns
     {"a": 0.25, "b": 0.5, "cmu": 1.0}),
])
def test_a_slide_mpp_csv_gives_each_slide_it_lists_its_own_resolution(unscaled, tmp_path, table, listed):
    (tmp_path / "mpp.csv").write_text(table)
    expected = {"cmu": 0.499, **listed}
    assert coarse(unscaled, tmp_path / "p", "--slide_mpp", str(tmp_path / "mpp.csv"), "--size", "16") == 0
    rows = {row["slide"]: row for row in read_rows(tmp_path / "p" / "tiles.csv")}
    for name, mpp in expected.items():
        coords, attrs = coords_file(tmp_path / "p", name)
        assert attrs["level0_mpp"] == pytest.approx(mpp) and float(rows[name]["mpp"]) == pytest.approx(mpp)
        assert attrs["mpp"] == 4.0 and attrs["patch_size_level0"] == round(16 * 4 / mpp)
        assert int(rows[name]["tiles"]) == len(coords) > 0
    a, b = (len(coords_file(tmp_path / "p", name)[0]) for name in "ab")  # one image: twice the um/px, 4x the tiles
    assert 3.5 <= max(a, b) / min(a, b) <= 5  # 120 and 28 grid positions
    assert json.loads((tmp_path / "p" / "job.json").read_text())["options"]["slide_mpp"] == listed


def test_a_slide_the_csv_does_not_list_keeps_the_files_resolution_or_is_named(unscaled, tmp_path):
    (tmp_path / "mpp.csv").write_text("slide,mpp\na,0.5\n")
    assert coarse(unscaled, tmp_path / "p", "--slide_mpp", str(tmp_path / "mpp.csv")) == 0
    assert [row["slide"] for row in read_rows(tmp_path / "p" / "tiles.csv")] == ["a", "cmu"]
    assert coords_file(tmp_path / "p", "cmu")[1]["level0_mpp"] == pytest.approx(0.499)
    assert ((tmp_path / "p" / "failed_slides.txt").read_text().split("\t")[1] ==
            f"SlideError: {unscaled / 'b.tif'}: the file records no microns-per-pixel; add a row for b.tif to the "
            "--slide_mpp CSV (e.g. 0.25 for 40x, 0.5 for 20x)\n")


@pytest.mark.parametrize("content, message", [
    (None, " is neither a number nor a CSV file: pass the level-0 um/px of every slide"),
    (b"\xff\xfe\x00slide", " is not UTF-8 text: save it as CSV (UTF-8)"),
    (b"name,resolution\na,0.5\n", " needs columns slide,mpp (or TRIDENT's wsi,mpp); it has name, resolution"),
    (b"slide,mpp\na,0.5\nb,0\n", ", line 3: mpp '0' of b is not a number above 0; give its level-0 um/px"),
    (b"wsi,mpp\na.tif,0.5\nb.tif,40x\n", ", line 3: mpp '40x' of b is not a number above 0"),
    (b"slide,mpp\na.tif,0.5\na,0.25\n", ", line 3: slide a is listed twice; keep one row"),
])
def test_a_bad_slide_mpp_csv_is_refused_before_any_slide_is_read(unscaled, tmp_path, capsys, content, message):
    table = tmp_path / "mpp.csv"
    if content is not None:
        table.write_bytes(content)
    assert coarse(unscaled, tmp_path / "p", "--slide_mpp", str(table)) == 2
    assert capsys.readouterr().out.startswith(f"error: --slide_mpp {table}{message}")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("kind", ["asap", "geojson"])
def test_an_annotation_polygon_labels_exactly_the_tiles_inside_it(slides, tiled, tmp_path, kind, capsys):
    _, coords, attrs = tiled
    side = attrs["patch_size_level0"]
    inside = sorted(map(tuple, coords))[10:12]  # two kept tiles of one column or row
    x0, y0 = min(x for x, _ in inside), min(y for _, y in inside)
    x1, y1 = max(x for x, _ in inside) + side, max(y for _, y in inside) + side
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if kind == "asap":
        points = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(corners))
        (annotations / "cmu.xml").write_text(
            f'<ASAP_Annotations><Annotations><Annotation Name="t" Type="Polygon" PartOfGroup="_0">'
            f"<Coordinates>{points}</Coordinates></Annotation></Annotations></ASAP_Annotations>")
    else:
        ring = [[float(x), float(y)] for x, y in corners + corners[:1]]
        feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                   "properties": {"classification": {"name": "Tumor"}}}
        (annotations / "cmu.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    job = tmp_path / "labelled"
    assert tile_main([str(slides), "--out", str(job), "--workers", "1", "--annotations", str(annotations)]) == 0
    assert ("1 of 2 slide(s) have no annotation file in " f"{annotations} (e.g. broken.svs)") in capsys.readouterr().out
    with h5py.File(job / "coords" / "cmu.h5") as handle:
        labels = dict(zip(map(tuple, handle["coords"][:]), [label.decode() for label in handle["label"][:]]))
        fractions = handle["tumor_fraction"][:]
    covered = {c for c in labels if x0 <= c[0] < x1 - 1 and y0 <= c[1] < y1 - 1}
    assert set(inside) <= covered
    assert {c for c, label in labels.items() if label == "tumor"} == covered
    assert sorted(fractions)[-len(covered):] == pytest.approx([1.0] * len(covered), abs=0.01)
    rows = read_rows(job / "patch_labels.csv")
    assert list(rows[0]) == ["slide", "x", "y", "label", "path"]
    assert {(int(r["x"]), int(r["y"])) for r in rows if r["label"] == "tumor"} == covered
    for row in rows:  # each patch twice: by its file (from the job folder) and by its slide and corner
        assert row["path"] == f"patches/cmu/{row['x']}_{row['y']}.png" and (job / row["path"]).is_file()


def coarse(slides, out, *extra):
    """Tile at 4 um/px into 32 px patches (257 level-0 pixels, resized; about 35 tiles): quick."""
    return tile_main([str(slides), "--out", str(out), "--workers", "1", "--mpp", "4", "--size", "32", *extra])


def kept_fractions(slide, out, min_tissue):
    """The tissue fractions the coordinate file records for the tiles ``--min_tissue`` keeps, and
    the tiles of the whole grid, from the tile side and slide size it records."""
    assert coarse(slide, out, "--coords_only", "--min_tissue", min_tissue) == 0
    with h5py.File(out / "coords" / f"{slide.stem}.h5") as handle:
        attributes, fractions = dict(handle["coords"].attrs), handle["tissue_fraction"][:]
    side = attributes["patch_size_level0"]  # the grid steps by a whole tile: no --overlap
    grid = ((attributes["level0_width"] - side) // side + 1) * ((attributes["level0_height"] - side) // side + 1)
    return fractions, grid


def test_min_tissue_0_keeps_the_tiles_that_touch_tissue_as_tridents_does(slides, tmp_path):
    touching, grid = kept_fractions(slides / "cmu.svs", tmp_path / "zero", "0")
    some, _ = kept_fractions(slides / "cmu.svs", tmp_path / "some", "0.01")
    assert grid == 8 * 11 and 20 <= len(touching) < grid  # the slide's glass beside the tissue is not kept
    assert touching.min() > 0 and len(touching) >= len(some) >= 20 and some.min() >= 0.01


def test_the_summary_speaks_of_one_slide_in_the_singular(slides, tmp_path, capsys):
    assert coarse(slides / "cmu.svs", tmp_path / "p", "--coords_only") == 0
    tiles = read_rows(tmp_path / "p" / "tiles.csv")[0]["tiles"]
    summary = capsys.readouterr().out.splitlines()[-1]
    assert summary == f"coordinates of {tiles} patches from 1 slide into {tmp_path / 'p'}"


def test_a_slide_without_annotation_file_is_labelled_normal_throughout(slides, tmp_path, capsys):
    (tmp_path / "annotations").mkdir()  # Camelyon16's normal slides have no XML
    assert coarse(slides, tmp_path / "p", "--annotations", str(tmp_path / "annotations")) == 0
    assert "2 of 2 slide(s) have no annotation file" in capsys.readouterr().out
    with h5py.File(tmp_path / "p" / "coords" / "cmu.h5") as handle:
        tiles, fractions = len(handle["coords"]), handle["tumor_fraction"][:]
    assert 20 <= tiles <= 50 and fractions.tolist() == [0.0] * tiles
    rows = read_rows(tmp_path / "p" / "patch_labels.csv")
    assert len(rows) == tiles and {r["label"] for r in rows} == {"normal"} and {r["slide"] for r in rows} == {"cmu"}


def assert_no_nan(attributes):
    for key, value in attributes.items():
        if not isinstance(value, str):
            assert np.isfinite(np.asarray(value, dtype=float)).all(), key


def test_coords_only_writes_no_patch_and_its_coordinates_read_the_pixels_a_patch_run_wrote(slides, tmp_path):
    (tmp_path / "annotations").mkdir()
    options = ("--overlap", "0.25", "--annotations", str(tmp_path / "annotations"))
    assert coarse(slides, tmp_path / "files", *options) == 0
    assert coarse(slides, tmp_path / "job", "--coords_only", *options) == 0
    job = tmp_path / "job"
    assert not (job / "patches").exists() and [p.name for p in job.rglob("*.png")] == ["cmu.png"]  # the thumbnail
    assert json.loads((job / "job.json").read_text())["coords_only"] is True
    coords, attrs = coords_file(job)
    np.testing.assert_array_equal(coords, coords_file(tmp_path / "files")[0])
    assert set(TRIDENT_ATTRIBUTES) <= set(attrs) and "patch_level" not in attrs  # read at 257 px, resized to 32
    assert (attrs["patch_size"], attrs["patch_size_level0"], attrs["overlap"]) == (32, 257, 8)  # overlap in pixels
    assert attrs["level0_magnification"] == 20 and attrs["target_magnification"] == pytest.approx(20 * 32 / 256.5,
                                                                                                  rel=1e-3)
    assert (attrs["level0_width"], attrs["level0_height"], attrs["name"]) == (2220, 2967, "cmu")
    assert attrs["savetodir"] == str(job.resolve() / "coords")
    assert_no_nan(attrs)
    with h5py.File(job / "coords" / "cmu.h5") as handle:
        assert "paths" not in handle and {"tissue_fraction", "tumor_fraction", "label"} <= set(handle)
    rows = read_rows(job / "patch_labels.csv")
    assert [[int(r["x"]), int(r["y"])] for r in rows] == coords.tolist() and {r["path"] for r in rows} == {""}
    assert float(read_rows(job / "tiles.csv")[0]["seconds"]) > 0
    assert read_coords(job / "coords" / "cmu.h5").coords.tolist() == coords.tolist()
    source, _ = SlideSource.checked(job_pairs(job))
    for index in range(0, len(source), 5):
        x, y = coords[index]
        files = np.asarray(Image.open(tmp_path / "files" / "patches" / "cmu" / f"{x}_{y}.png"))
        np.testing.assert_array_equal(np.asarray(source.read(index)), files)


def pyramid_job(tmp_path, downsamples, magnification):
    """A 256 px square of noise at 0.25 um/px (40x) with the given pyramid levels, tiled at
    0.5 um/px into 32 px patches, every tile kept (the noise, grey on the mask, counted as tissue)."""
    from conftest import write_pyramid

    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    slide = write_pyramid(tmp_path / "forty.tif", image, mpp=0.25, downsamples=downsamples,
                          magnification=magnification)
    job = tmp_path / "job"
    assert tile_main([str(slide), "--out", str(job), "--workers", "1", "--mpp", "0.5", "--size", "32",
                      "--min_tissue", "0", "--saturation_threshold", "0", "--min_object_um2", "0"]) == 0
    return job


@pytest.mark.parametrize("downsamples, magnification, patch_level", [
    ((1,), 40, None),  # 32 px at 20x are 64 px of level 0: CLAM's patch_size 32 at level 0 is another field of view
    ((1, 2), 40, 1),  # a 20x level: read at its own size, so CLAM's patch_level 1 and patch_size 32 agree
    ((1,), None, None),  # no objective power in the file: 10 / mpp
])
def test_clams_patch_level_is_written_only_where_its_patch_size_means_the_same_patch(tmp_path, downsamples,
                                                                                     magnification, patch_level):
    job = pyramid_job(tmp_path, downsamples, magnification)
    coords, attrs = coords_file(job, "forty")
    assert len(coords) == 16 and attrs["patch_size"] == 32 and attrs["patch_size_level0"] == 64
    assert attrs["level0_magnification"] == 40 and attrs["target_magnification"] == 20
    assert attrs.get("patch_level") == patch_level and attrs["read_level"] == len(downsamples) - 1
    assert_no_nan(attrs)
    source, _ = SlideSource.checked(job_pairs(job))
    for index, (x, y) in enumerate(coords):
        files = np.asarray(Image.open(job / "patches" / "forty" / f"{x}_{y}.png"))
        np.testing.assert_array_equal(np.asarray(source.read(index)), files)


def test_tiling_a_job_again_keeps_the_earlier_slides_that_still_have_coordinates(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        shutil.copy(CMU_SLIDE, tmp_path / name / f"{name}.svs")
    job = tmp_path / "job"
    assert coarse(tmp_path / "a", job) == 0
    assert coarse(tmp_path / "b", job, "--coords_only") == 0
    record = json.loads((job / "job.json").read_text())
    assert record["slides"] == {"a": str(tmp_path / "a" / "a.svs"), "b": str(tmp_path / "b" / "b.svs")}
    assert record["coords_only"] is True and record["options"]["size"] == 32  # some patches exist only as coordinates
    assert [r["slide"] for r in read_rows(job / "tiles.csv")] == ["a", "b"]
    assert (job / "patches" / "a").is_dir() and not (job / "patches" / "b").exists()
    (job / "coords" / "a.h5").unlink()
    assert coarse(tmp_path / "b", job) == 0
    record = json.loads((job / "job.json").read_text())
    assert list(record["slides"]) == ["b"] and record["coords_only"] is False
    assert [r["slide"] for r in read_rows(job / "tiles.csv")] == ["b"] and (job / "patches" / "b").is_dir()


def test_a_slide_that_now_fails_leaves_nothing_of_its_earlier_tiling(tmp_path, capsys):
    """The job must never describe a slide that was not tiled: re-tiled into the job and failing
    (the file damaged since), its coordinates, patches, thumbnail and rows go, and it is listed."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        shutil.copy(CMU_SLIDE, tmp_path / name / f"{name}.svs")
    job = tmp_path / "job"
    assert coarse(tmp_path / "a", job) == 0 and coarse(tmp_path / "b", job) == 0
    assert (job / "coords" / "b.h5").is_file() and (job / "patches" / "b").is_dir()
    (tmp_path / "b" / "b.svs").write_bytes(b"II*\x00 damaged since")
    assert coarse(tmp_path / "b", job) == 2  # nothing of this run could be tiled
    assert "removed the earlier coordinates, patches and thumbnails of 1 slide(s) that could not be tiled again (b)" \
        in capsys.readouterr().out
    assert not (job / "coords" / "b.h5").exists() and not (job / "patches" / "b").exists()
    assert not (job / "thumbnails" / "b.png").exists()
    assert list(json.loads((job / "job.json").read_text())["slides"]) == ["a"]
    assert [r["slide"] for r in read_rows(job / "tiles.csv")] == ["a"] and (job / "patches" / "a").is_dir()
    assert (job / "failed_slides.txt").read_text().startswith(f"{tmp_path / 'b' / 'b.svs'}\t")


@pytest.mark.parametrize("extra, reason", [
    (["--slide_mpp", "0.001"],  # a wrong resolution: each 32 px tile would span 128000 level-0 pixels
     "a 32 px tile at 4 um/px spans 128000 level-0 pixels, more than the slide's 2220 x 2967 at 0.001 um/px; "
     "check --slide_mpp"),
    (["--saturation_threshold", "1"], "no tile holds 60% tissue (0.0 mm2 of tissue found); see thumbnails/cmu.png"),
    (["--saturation_threshold", "1", "--min_tissue", "0"],
     "no tile touches tissue (0.0 mm2 of tissue found); see thumbnails/cmu.png in the job folder, and set "
     "--saturation_threshold"),
])
def test_a_slide_that_gives_no_patch_is_a_warning_naming_it(slides, tmp_path, capsys, extra, reason):
    assert coarse(slides, tmp_path / "p", *extra) == 0
    warning = f"{slides / 'cmu.svs'} gave 0 patches: {reason}"
    assert f"warning: {warning}" in capsys.readouterr().out
    rows = read_rows(tmp_path / "p" / "tiles.csv")
    assert list(rows[0]) == ["slide", "tiles", "tissue_area_mm2", "mpp", "level", "otsu_threshold", "tumor_tiles",
                             "seconds", "warnings"]
    assert rows[0]["tiles"] == "0" and rows[0]["warnings"].startswith(warning)


@pytest.fixture(scope="module")
def glassless(tmp_path_factory):
    """512 px squares of the CC0 slide as pyramids at 0.5 um/px, tiled at 2 um/px into 32 px
    patches (a grid of 4 x 4): tissue from edge to edge (dermis and epidermis, in which Otsu's
    split finds no tissue), one stain colour throughout, and glass (in which Otsu's split found
    13 tiles of tissue). Returns the folder, the rows of tiles.csv by slide and what the console
    showed."""
    from conftest import write_pyramid

    folder, job = tmp_path_factory.mktemp("glassless"), tmp_path_factory.mktemp("glassless_job")
    tissue = crop(769, 1923, 512, 512)
    stain = np.broadcast_to(tissue.mean((0, 1)).astype(np.uint8), tissue.shape)
    for name, image in {"tissue": tissue, "stain": stain, "glass": crop(1700, 0, 512, 512)}.items():
        write_pyramid(folder / f"{name}.tif", image, mpp=0.5)
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        assert tile_main([str(folder), "--out", str(job), "--workers", "1", "--mpp", "2", "--size", "32"]) == 0
    return folder, {row["slide"]: row for row in read_rows(job / "tiles.csv")}, console.getvalue()


def fallback_note(path, found):
    """The start and the end of the note in tiles.csv of a slide whose tissue is not Otsu's split."""
    return (f"{path}: {found} found (Otsu's threshold ",
            "glass has less than 0.1): saturation threshold 0.1 used instead of Otsu's (pass --saturation_threshold "
            "to choose)")


@pytest.mark.parametrize("name", ["tissue", "stain"])
def test_a_crop_with_no_glass_is_tissue_from_edge_to_edge_and_says_so(glassless, name):
    folder, rows, console = glassless
    row = rows[name]
    assert row["tiles"] == "16" and row["otsu_threshold"] == "0.1"
    start, end = fallback_note(folder / f"{name}.tif", "no glass")
    assert row["warnings"].startswith(start) and row["warnings"].endswith(end)
    assert f"warning: {row['warnings']}" in console


def test_otsus_threshold_on_tissue_alone_finds_none(glassless, tmp_path):
    folder, rows, _ = glassless
    otsu = re.search(r"Otsu's threshold ([\d.]+)", rows["tissue"]["warnings"])[1]  # what the tiler used before
    assert float(otsu) > 0.3
    assert tile_main([str(folder / "tissue.tif"), "--out", str(tmp_path / "p"), "--workers", "1", "--mpp", "2",
                      "--size", "32", "--saturation_threshold", otsu]) == 0
    row = read_rows(tmp_path / "p" / "tiles.csv")[0]
    assert row["tiles"] == "0" and "gave 0 patches: no tile holds 60% tissue (0.0 mm2 of tissue" in row["warnings"]


def test_glass_alone_gives_no_patch_and_a_slide_with_glass_keeps_otsus_threshold(glassless, tiled):
    folder, rows, _ = glassless
    assert rows["glass"]["tiles"] == "0" and rows["glass"]["otsu_threshold"] == "0.1"
    zero, note = rows["glass"]["warnings"].rsplit("; ", 1)
    start, end = fallback_note(folder / "glass.tif", "only glass")
    assert note.startswith(start) and note.endswith(end)
    assert zero == (f"{folder / 'glass.tif'} gave 0 patches: no tile holds 60% tissue (0.0 mm2 of tissue found); see "
                    "thumbnails/glass.png in the job folder, and lower --min_tissue or set --saturation_threshold")
    cmu = read_rows(tiled[0] / "tiles.csv")[0]
    assert (cmu["otsu_threshold"], cmu["tiles"], cmu["warnings"]) == ("0.209", "40", "")  # Otsu's, as before


@pytest.mark.parametrize("name, content", [
    ("cmu.xml", '<ASAP_Annotations><Annotations>'
                '<Annotation Type="Dot" PartOfGroup="_0"><Coordinates><Coordinate Order="0" X="900" Y="900"/>'
                '</Coordinates></Annotation>'
                '<Annotation Type="PointSet" PartOfGroup="_0"><Coordinates><Coordinate Order="0" X="900" Y="900"/>'
                '<Coordinate Order="1" X="1500" Y="1500"/></Coordinates></Annotation>'
                '</Annotations></ASAP_Annotations>'),
    ("cmu.geojson", json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [900.0, 900.0]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[1000.0, 900.0], [900.0, 1200.0]]},
         "properties": {}}]})),
    ("cmu.geojson", json.dumps({"type": "FeatureCollection", "features": []})),
])
def test_an_annotation_file_without_a_polygon_is_a_warning_naming_it(slides, tmp_path, capsys, name, content):
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    (annotations / name).write_text(content)
    assert coarse(slides, tmp_path / "p", "--annotations", str(annotations)) == 0
    warning = (f"{annotations / name} holds no tumour polygon (only dots, lines or points, exclusions, or nothing): "
               "every tile of cmu is labelled normal")
    assert f"warning: {warning}" in capsys.readouterr().out
    rows = read_rows(tmp_path / "p" / "tiles.csv")
    assert int(rows[0]["tiles"]) > 0 and rows[0]["tumor_tiles"] == "0" and rows[0]["warnings"].startswith(warning)


def test_a_missing_annotation_folder_is_refused(slides, tmp_path, capsys):
    assert coarse(slides, tmp_path / "p", "--annotations", str(tmp_path / "nope")) == 2
    assert f"error: --annotations {tmp_path / 'nope'} does not exist" in capsys.readouterr().out
    assert not (tmp_path / "p").exists()


def test_every_slide_needs_a_class_before_anything_is_tiled(slides, tmp_path, capsys):
    classes = tmp_path / "slides.csv"
    classes.write_text("slide,label\ncmu,tumor\n")
    assert coarse(slides, tmp_path / "p", "--classes", str(classes)) == 2
    assert (f"error: --classes {classes} lists no class for 1 slide(s): broken; add them to it, or drop --classes"
            in capsys.readouterr().out)
    assert not (tmp_path / "p").exists()
    classes.write_text("slide,label\ncmu,tumor\nbroken,normal\n")
    assert coarse(slides, tmp_path / "p", "--classes", str(classes)) == 0
    assert [p.name for p in (tmp_path / "p" / "patches").iterdir()] == ["tumor"]
    assert 20 <= len(list((tmp_path / "p" / "patches" / "tumor" / "cmu").glob("*.png"))) <= 50


def test_two_slides_of_one_name_are_refused_before_anything_is_tiled(tmp_path, capsys):
    for folder in ("x", "y"):
        (tmp_path / "slides" / folder).mkdir(parents=True)
        shutil.copy(CMU_SLIDE, tmp_path / "slides" / folder / "cmu.svs")
    assert coarse(tmp_path / "slides", tmp_path / "p") == 2
    assert "are both named cmu, and a job keeps one coordinate file per slide name" in capsys.readouterr().out
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("flags, message", [
    (["--overlap", "1"], "--overlap 1.0 must be in [0, 1)"), (["--mpp", "0"], "--mpp 0.0 must be above 0"),
    (["--size", "0"], "--size 0 must be at least 1"), (["--min_tissue", "1.5"], "--min_tissue 1.5 must be in [0, 1]"),
    (["--size", "2", "--overlap", "0.75"], "--overlap 0.75 of a 2 px tile rounds to 2 px, the whole tile")])
def test_impossible_flags_are_refused_before_any_slide_is_read(slides, tmp_path, capsys, flags, message):
    assert tile_main([str(slides), "--out", str(tmp_path / "p"), *flags]) == 2
    assert capsys.readouterr().out.startswith(f"error: {message}")
    assert not (tmp_path / "p").exists()


def test_a_damaged_job_record_is_refused_before_any_slide_is_read(slides, tmp_path, capsys):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "job.json").write_text("{not json")
    assert coarse(slides, tmp_path / "p") == 2
    assert f"error: {tmp_path / 'p' / 'job.json'} is not the job record" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["job.json"]


def test_a_slide_that_fails_half_way_leaves_no_patches(slides, tmp_path, capsys):
    # A folder where the slide's coordinate file belongs: moving cmu into place, after all its patches are read, fails.
    (tmp_path / "p" / "coords" / "cmu.h5").mkdir(parents=True)
    assert coarse(slides, tmp_path / "p") == 2
    assert (f"error: none of the 2 slide(s) could be tiled; the reasons are in {tmp_path / 'p'}"
            in capsys.readouterr().out)
    failed = (tmp_path / "p" / "failed_slides.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in failed] == [str(slides / "broken.svs"), str(slides / "cmu.svs")]
    assert "Is a directory" in failed[1]
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["coords", "failed_slides.txt", "job.json",
                                                                  "thumbnails"]
    assert list((tmp_path / "p" / "thumbnails").iterdir()) == []
    assert json.loads((tmp_path / "p" / "job.json").read_text())["slides"] == {}


def test_retiling_replaces_a_slides_patches_and_out_can_be_the_current_folder(slides, tmp_path, monkeypatch):
    (tmp_path / "p").mkdir()
    monkeypatch.chdir(tmp_path / "p")
    assert coarse(slides, ".") == 0
    first = sorted(p.name for p in (tmp_path / "p" / "patches" / "cmu").iterdir())
    assert coarse(slides, ".", "--size", "64") == 0  # tiles twice as large: fewer, at other corners
    second = sorted(p.name for p in (tmp_path / "p" / "patches" / "cmu").iterdir())
    assert second == sorted(f"{x}_{y}.png" for x, y in coords_file(tmp_path / "p")[0])
    assert 0 < len(second) < len(first) / 2


def test_the_grid_keeps_exactly_the_tiles_with_enough_tissue_and_annotations_give_area_shares():
    from clusiam.tile import ReadPlan, tissue_tiles, tumour_fractions

    # A 32 x 24 level-0 slide, 8 px tiles on an 8 px grid, seen on a thumbnail at 2 level-0 px per pixel.
    plan = ReadPlan(level0_mpp=0.25, magnification=40.0, width=32, height=24, reader=PatchReader(8.0, 8, 0, 8),
                    downsample=1.0, step0=8.0, thumb_scale=2.0)
    mask = np.zeros((12, 16), bool)
    mask[0:4, 0:4] = True  # tile (0, 0): all tissue
    mask[4:8, 4:7] = True  # tile (8, 8): 12 of 16 thumbnail pixels
    mask[8:12, 12:14] = True  # tile (24, 16): half
    coords, tissue = tissue_tiles(mask, plan, min_tissue=0.6)
    assert coords.tolist() == [[0, 0], [8, 8]] and tissue == [1.0, 0.75]
    coords, tissue = tissue_tiles(mask, plan, min_tissue=0.5)
    assert coords.tolist() == [[0, 0], [8, 8], [24, 16]] and tissue == [1.0, 0.75, 0.5]
    region = shapely.box(4, 0, 12, 16)  # the right half of tile (0, 0), the left half of (8, 8)
    np.testing.assert_allclose(tumour_fractions(coords, 8.0, region), [0.5, 0.5, 0.0])


def test_the_read_plan_reads_the_level_that_is_fine_enough_and_covers_the_asked_field_of_view(slides):
    from clusiam.tile import TilingOptions, plan_reading

    slide = open_slide(slides / "cmu.svs")  # one level, 0.499 um/px
    try:
        plan = plan_reading(slide, slides / "cmu.svs", TilingOptions(mpp=1.0, size=224, overlap=0.25))
    finally:
        slide.close()
    assert (plan.reader.level, plan.downsample, plan.magnification) == (0, 1.0, 20.0)
    assert plan.reader.side0 == pytest.approx(224 / 0.499) and plan.reader.read_size == round(224 / 0.499)
    assert plan.step0 == pytest.approx(0.75 * plan.reader.side0)  # an overlap of 56 of the 224 pixels
    assert plan.thumb_scale == pytest.approx(4.0 / 0.499)


def test_layouts_link_each_coordinate_file_where_trident_and_clam_open_it(slides, tiled, tmp_path):
    """``--layout trident clam`` links ``coords/<slide>.h5`` where the other tools look. What each
    assertion mirrors (TRIDENT a91fa849, CLAM 53e2409d):

    - TRIDENT ``run_batch_of_slides.py`` names the folder of a patching
      ``f"{float(mag):g}x_{patch_size}px_{overlap}px_overlap"``; ``Processor.run_patch_feature_extraction_job``
      opens ``JOB/<folder>/patches/<slide>_patches.h5``; ``WSI.extract_patch_features`` reads it with
      ``IO.read_coords`` (dataset ``coords`` and its attributes) and needs ``patch_size``,
      ``level0_magnification`` and ``target_magnification`` (else it falls back to CLAM's reader).
    - CLAM ``extract_features_fp.py`` opens ``--data_h5_dir``/``patches/<slide_id>.h5``;
      ``dataset_h5.Whole_Slide_Bag_FP`` reads ``coords`` and the attributes ``patch_level`` and
      ``patch_size``, and each patch as ``wsi.read_region(coord, patch_level, (patch_size, patch_size))``.
    """
    job = tmp_path / "job"
    tile_once(slides, job, "--coords_only", "--layout", "trident", "clam")
    trident, clam = job / "20x_224px_0px_overlap" / "patches" / "cmu_patches.h5", job / "patches" / "cmu.h5"
    assert os.readlink(trident) == "../../coords/cmu.h5" and os.readlink(clam) == "../coords/cmu.h5"
    assert [p.name for p in trident.parent.iterdir()] == ["cmu_patches.h5"]  # the broken slide failed: no link
    with h5py.File(trident) as handle:
        coords, attrs = handle["coords"][:], dict(handle["coords"].attrs)
    assert coords.dtype == np.int64 and coords.tolist() == tiled[1].tolist()
    assert (attrs["patch_size"], attrs["level0_magnification"]) == (224, 20)  # 20x: the job's --mpp 0.5
    assert attrs["target_magnification"] == pytest.approx(20 * 0.499 / 0.5)  # what TRIDENT reads, not the name
    with h5py.File(clam) as handle:
        (x, y), clam_attrs = handle["coords"][0], dict(handle["coords"].attrs)
    level, size = int(clam_attrs["patch_level"]), int(clam_attrs["patch_size"])
    with tiffslide.TiffSlide(slides / "cmu.svs") as slide:
        patch = np.asarray(slide.read_region((int(x), int(y)), level, (size, size)).convert("RGB"))
    np.testing.assert_array_equal(patch, np.asarray(Image.open(tiled[0] / "patches" / "cmu" / f"{x}_{y}.png")))
    # extract_features_fp.py --csv_path: Dataset_All_Bags reads the slide_id column, cut at --slide_ext .svs
    assert read_rows(job / "process_list_autogen.csv") == [{"slide_id": "cmu.svs"}]
    # Without --layout, the job is as it always was.
    assert not list(tiled[0].glob("*px_overlap")) and not list((tiled[0] / "patches").glob("*.h5"))


def test_a_slide_tiled_again_is_linked_only_where_its_new_coordinates_belong(slides, tmp_path, capsys):
    job = tmp_path / "job"
    tile_once(slides, job, "--coords_only", "--layout", "trident", "clam")
    # At 4 um/px the slide has no level of its own: no patch_level, so CLAM's extractor would misread it.
    assert coarse(slides, job, "--coords_only", "--layout", "trident", "clam") == 0
    links = [str(p.relative_to(job)) for p in job.glob("*/patches/*.h5")]
    assert links == ["2.5x_32px_0px_overlap/patches/cmu_patches.h5"]
    assert not os.path.lexists(job / "patches" / "cmu.h5")
    warning = "cmu: not linked as patches/cmu.h5 for CLAM, whose extractor reads patch_size pixels at patch_level"
    assert warning in capsys.readouterr().out and warning in read_rows(job / "tiles.csv")[0]["warnings"]
    assert coarse(slides, job, "--coords_only") == 0  # tiled again without --layout: no link is left behind
    assert not list(job.glob("*/patches/*.h5"))
    (job / "patches" / "cmu.h5").write_text("CLAM's own file")  # never replaced by a link: cmu fails
    assert tile_main([str(slides), "--out", str(job), "--workers", "1", "--coords_only", "--layout", "clam"]) == 2
    assert (job / "patches" / "cmu.h5").read_text() == "CLAM's own file"
    failed = (job / "failed_slides.txt").read_text()
    assert f"{job / 'patches' / 'cmu.h5'} is a file, not a link --layout made" in failed


def test_saturation_otsu_and_the_speck_removal_are_skimages_to_the_bit():
    """The tiler looks saturation up by each pixel's brightest and darkest channel and takes
    Otsu's threshold and the class medians from their counts: the values of skimage's rgb2hsv,
    threshold_otsu and np.median on the pixels themselves, and its remove_small_holes and
    remove_small_objects, on the CC0 slide's thumbnail and on random pixels."""
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    from clusiam import tile

    with open_slide(CMU_SLIDE) as slide:
        thumbnail = np.asarray(tile.slide_thumbnail(slide, 4 / 0.499))
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    table = tile.saturation_table().ravel()
    for image in (thumbnail, noise):
        saturation, pairs = rgb2hsv(image)[..., 1], tile.channel_pairs(image)
        np.testing.assert_array_equal(table[pairs], saturation)
        counts = np.bincount(pairs.ravel(), minlength=table.size)
        values, counts = table[counts > 0], counts[counts > 0]
        otsu = tile.otsu_threshold(values, counts)
        assert otsu == threshold_otsu(saturation)
        for paler in (True, False):
            side, pixels = (values <= otsu) == paler, (saturation <= otsu) == paler
            assert tile.weighted_median(values[side], counts[side]) == np.median(saturation[pixels])
        mask = saturation > otsu
        expected = remove_small_objects(remove_small_holes(mask, max_size=8), max_size=20)
        tile.remove_specks(mask, 1.0, tile.TilingOptions(max_hole_um2=8, min_object_um2=20))
        np.testing.assert_array_equal(mask, expected)


def test_a_slide_too_large_for_a_fine_mask_is_masked_coarser_with_about_the_same_tiles(monkeypatch):
    """A mask over MASK_PIXELS is made at a whole multiple of --mask_mpp, from the level read at
    --mask_mpp (here the CC0 slide stands for a scanner-size one): the tiles barely change."""
    from clusiam import tile

    options = tile.TilingOptions(mpp=2.0, size=32)
    with open_slide(CMU_SLIDE) as slide:
        fine = tile.plan_reading(slide, CMU_SLIDE, options)
        mask, *_ = tile.find_tissue(slide, CMU_SLIDE, fine, options)
        monkeypatch.setattr(tile, "MASK_PIXELS", mask.size // 3)
        coarse_plan = tile.plan_reading(slide, CMU_SLIDE, options)
        coarse_mask, *_ = tile.find_tissue(slide, CMU_SLIDE, coarse_plan, options)
    assert coarse_plan.thumb_scale == 2 * fine.thumb_scale and coarse_mask.shape == (185, 138)
    before, after = (len(tile.tissue_tiles(m, plan, 0.6)[0]) for m, plan in ((mask, fine), (coarse_mask, coarse_plan)))
    assert before > 100 and abs(after - before) <= 0.05 * before


def test_the_mask_of_a_large_slide_takes_memory_bounded_by_its_caps_not_by_the_slide(tmp_path, monkeypatch):
    """The tissue mask's arrays stay within what MASK_PIXELS and STRIP_PIXELS allow, however
    large the slide (here caps 64 and 256 times smaller than the defaults stand for a scanner
    slide's, on a 6,000 px slide): NumPy's allocations, traced, at their peak. Today's float64
    saturation image of the 4 um/px thumbnail alone would be 13.5 MB; benchmarks/tile_cohort.py
    measures the whole process at scanner size (262-269 MiB)."""
    import tracemalloc

    from clusiam import tile
    from conftest import write_pyramid

    image = np.full((6000, 6000, 3), 235, dtype=np.uint8)  # glass, with the CC0 slide's tissue in a corner
    image[:2967, :2220] = crop(0, 0, 2220, 2967)
    path = write_pyramid(tmp_path / "large.tif", image, mpp=0.5, downsamples=(1, 4, 16), magnification=20)
    del image
    monkeypatch.setattr(tile, "MASK_PIXELS", 2**14)
    monkeypatch.setattr(tile, "STRIP_PIXELS", 2**16)
    options = tile.TilingOptions(mpp=1.0, size=64)
    tile.saturation_table()  # made once a process (from 65,536 pixels): not the slide's
    with open_slide(path) as slide:
        plan = tile.plan_reading(slide, path, options)
        tracemalloc.start()
        mask, *_ = tile.find_tissue(slide, path, plan, options)
        coords, _ = tile.tissue_tiles(mask, plan, options.min_tissue)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert mask.size <= 2**14 and 100 <= len(coords) <= 200  # the tissue found at a coarser mask
    float_saturation = (6000 * 0.5 / 4) ** 2 * 3 * 8  # bytes: the 750 x 750 thumbnail as float64 HSV
    bound = 8 * 3 * 2**16 + 64 * 2**14  # a strip's RGB as float64, and 64 bytes a mask pixel
    assert peak < bound < float_saturation / 5, (peak, bound)


@pytest.mark.parametrize("tiled", [True, False])
def test_a_level_read_in_strips_makes_the_image_read_whole(tmp_path, monkeypatch, tiled):
    """A large level is read for the mask a strip of rows at a time, each resized to its rows of
    the image: through the tile reader (a tiled TIFF) and through read_region (a TIFF of strips,
    which is not read tile by tile), the image read as one strip."""
    from clusiam import tile
    from clusiam.slides import LevelTiles

    path = CMU_SLIDE if tiled else tmp_path / "plain.tif"
    if not tiled:
        Image.fromarray(crop(600, 600, 1100, 2000)).save(path)
    with open_slide(path) as slide:
        assert (LevelTiles.of(slide, 0, path) is not None) == tiled
        monkeypatch.setattr(tile, "STRIP_PIXELS", 10**9)
        whole = tile.mask_image(slide, path, 16.0, 8.0)
        monkeypatch.setattr(tile, "STRIP_PIXELS", 200_000)  # about 10 image rows a strip
        strips = tile.mask_image(slide, path, 16.0, 8.0)
    assert whole.shape == ((185, 139, 3) if tiled else (125, 69, 3))
    assert np.abs(strips.astype(int) - whole).max() <= 1


def test_a_job_run_again_skips_the_slides_it_holds_and_tiles_those_whose_file_or_options_changed(tmp_path, capsys):
    folder, job = tmp_path / "slides", tmp_path / "job"
    folder.mkdir()
    for name in ("a", "b"):
        shutil.copy(CMU_SLIDE, folder / f"{name}.svs")

    def coordinate_times():
        return {name: (job / "coords" / f"{name}.h5").stat().st_mtime_ns for name in "ab"}

    def run(*extra):
        assert coarse(folder, job, *extra) == 0
        assert [row["slide"] for row in read_rows(job / "tiles.csv")] == ["a", "b"]
        assert list(json.loads((job / "job.json").read_text())["slides"]) == ["a", "b"]
        return capsys.readouterr().out

    assert "skipped" not in run()
    first, rows = coordinate_times(), read_rows(job / "tiles.csv")
    assert "skipped 2 of 2 slide(s), already tiled from the same file (size and modification time) with the same " \
           "options; tiling 0" in run()
    assert coordinate_times() == first and read_rows(job / "tiles.csv") == rows  # the rows come from the files
    os.utime(folder / "a.svs", ns=(first["a"], first["a"] + 10**9))  # a slide file written since
    assert "skipped 1 of 2 slide(s)" in run()
    second = coordinate_times()
    assert second["a"] > first["a"] and second["b"] == first["b"]
    assert "skipped" not in run("--min_tissue", "0.5")  # other options: every slide again
    assert all(coordinate_times()[name] > second[name] for name in "ab")


def test_a_killed_job_keeps_the_slides_it_finished_and_resumes_with_the_rest(tmp_path, capsys):
    """A run killed (SIGKILL) part-way leaves complete coordinate files and a staged slide; run
    again, it tiles only the slides it had not finished, and its tables and job.json name them all."""
    import signal
    import subprocess
    import sys
    import time

    folder, job = tmp_path / "slides", tmp_path / "job"
    folder.mkdir()
    for index in range(5):
        (folder / f"s{index}.svs").symlink_to(CMU_SLIDE)
    command = [sys.executable, "-m", "clusiam.tile", str(folder), "--out", str(job), "--workers", "1",
               "--mpp", "1", "--size", "64"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while len(list((job / "coords").glob("*.h5"))) < 2 and process.poll() is None:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = {path.stem: path.stat().st_mtime_ns for path in (job / "coords").glob("*.h5")}
    assert 2 <= len(done) < 5 and not (job / "tiles.csv").exists()
    assert tile_main([str(folder), "--out", str(job), "--workers", "1", "--mpp", "1", "--size", "64"]) == 0
    assert f"skipped {len(done)} of 5 slide(s)" in capsys.readouterr().out
    assert {name: (job / "coords" / f"{name}.h5").stat().st_mtime_ns for name in done} == done
    rows = read_rows(job / "tiles.csv")
    assert [row["slide"] for row in rows] == [f"s{index}" for index in range(5)]
    assert len({row["tiles"] for row in rows}) == 1 and not (job / ".unfinished").exists()
    assert len(json.loads((job / "job.json").read_text())["slides"]) == 5


def test_the_default_workers_are_the_cores_or_what_the_memory_holds(monkeypatch, capsys):
    from clusiam import machine, tile

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(machine, "available_mib", lambda: 64 * tile.SLIDE_PEAK_MIB)
    assert tile.default_workers() == min(cores, 64)
    monkeypatch.setattr(machine, "available_mib", lambda: tile.SLIDE_PEAK_MIB - 1)
    assert tile.default_workers() == 1
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"--workers 1: {cores} core(s), 0.7 GiB of memory available at {tile.SLIDE_PEAK_MIB} MiB a slide (pass "
        "--workers to choose)")
