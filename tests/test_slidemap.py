"""Cluster maps and heatmaps over a slide of a tiling job, on a job tiled with --coords_only
(no patch file anywhere) from the CC0 demo slide."""
import csv

import h5py
import matplotlib
import numpy as np
import pytest
import tiffslide
from PIL import Image

from clusiam.demo import CMU_SLIDE
from clusiam.slidemap import TILE_ALPHA, cluster_palette, tile_clusters
from clusiam.slidemap import main as slidemap_main
from clusiam.sources import FolderSource
from clusiam.tables import write_csv
from clusiam.tile import main as tile_main

NAME = CMU_SLIDE.stem


def tile(job, *extra):
    """The demo slide at 4 um/px in 32 px patches (about 50 tiles of 257 level-0 pixels): quick to encode."""
    assert tile_main([str(CMU_SLIDE), "--out", str(job), "--workers", "1", "--mpp", "4", "--size", "32", *extra]) == 0
    with h5py.File(job / "coords" / f"{NAME}.h5") as handle:
        return handle["coords"][:], float(handle["coords"].attrs["patch_size_level0"])


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A coordinates-only job: its corners and the tiles' side in level-0 pixels."""
    folder = tmp_path_factory.mktemp("job") / "job"
    coords, side = tile(folder, "--coords_only")
    assert not (folder / "patches").exists()
    return folder, coords, side


def painted_colours(picture_path, rows, side, map_mpp=4.0):
    """The colour blended into the centre of each tile, recovered from the picture and a
    fresh thumbnail: picture = (1 - alpha) thumbnail + alpha colour."""
    picture = np.asarray(Image.open(picture_path)).astype(float)
    with tiffslide.TiffSlide(CMU_SLIDE) as slide:
        scale = map_mpp / 0.499
        size = (round(slide.dimensions[0] / scale), round(slide.dimensions[1] / scale))
        thumbnail = np.asarray(slide.get_thumbnail(size).convert("RGB").resize(size)).astype(float)
    centres = [(int((int(r["y"]) + side / 2) / scale), int((int(r["x"]) + side / 2) / scale)) for r in rows]
    return [(picture[y, x] - (1 - TILE_ALPHA) * thumbnail[y, x]) / TILE_ALPHA for y, x in centres]


def test_a_coords_only_cluster_map_colours_every_tile_by_the_cluster_of_its_pixels(job, tiny_checkpoint, tmp_path):
    folder, coords, side = job
    maps = tmp_path / "maps"
    assert slidemap_main(["--checkpoint", str(tiny_checkpoint), "--job", str(folder), "--slide", NAME,
                          "--out", str(maps), "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(maps / f"{NAME}_clusters.csv")))
    assert [[int(r["x"]), int(r["y"])] for r in rows] == coords.tolist()
    palette = cluster_palette(8).astype(float)
    for row, colour in zip(rows, painted_colours(maps / f"{NAME}_clusters.png", rows, side)):
        assert np.abs(colour - palette[int(row["cluster"])]).max() < 4  # uint8 rounding, divided by alpha
    tile(tmp_path / "files")  # the same tiles written as PNG files: the same pixels, so the same clusters
    files = FolderSource([tmp_path / "files" / "patches" / NAME / f"{x}_{y}.png" for x, y in coords])
    assert tile_clusters(str(tiny_checkpoint), files, "cpu", 64).tolist() == [int(r["cluster"]) for r in rows]


def test_heatmap_colours_tiles_by_score(job, tmp_path):
    folder, coords, side = job
    rows = [{"x": str(x), "y": str(y), "score": str(i)} for i, (x, y) in enumerate(coords)]
    scores = write_scores(tmp_path / "scores.csv", [(r["x"], r["y"], r["score"]) for r in rows])
    assert slidemap_main(["--scores", str(scores), "--job", str(folder), "--slide", str(CMU_SLIDE),
                          "--out", str(tmp_path / "maps")]) == 0
    colours = painted_colours(tmp_path / "maps" / f"{NAME}_heatmap.png", rows, side)
    inferno = matplotlib.colormaps["inferno"]
    for i in (0, len(rows) // 2, len(rows) - 1):
        assert np.abs(colours[i] - np.array(inferno(i / (len(rows) - 1))[:3]) * 255).max() < 4


def write_scores(path, rows, header=("x", "y", "score")):
    write_csv(path, header, rows)
    return path


def test_tiles_without_a_score_are_counted_and_drawn_grey(job, tmp_path, capsys):
    folder, coords, side = job
    scored = [(x, y, i) for i, (x, y) in enumerate(coords[::2])]  # every other tile
    scores = write_scores(tmp_path / "scores.csv", scored)
    assert slidemap_main(["--scores", str(scores), "--job", str(folder), "--slide", NAME,
                          "--out", str(tmp_path / "maps")]) == 0
    unscored = len(coords) - len(scored)
    assert (f"{unscored} of {len(coords)} tiles of {NAME} have no score in {scores}; drawn grey"
            in capsys.readouterr().out)
    rows = [{"x": x, "y": y} for x, y in coords]
    colours = painted_colours(tmp_path / "maps" / f"{NAME}_heatmap.png", rows, side)
    inferno = matplotlib.colormaps["inferno"]
    for i, colour in enumerate(colours):
        expected = np.array(inferno(i // 2 / (len(scored) - 1))[:3]) * 255 if i % 2 == 0 else np.full(3, 128)
        assert np.abs(colour - expected).max() < 4


@pytest.mark.parametrize("case, message", [
    ("wrong column", "scores.csv: needs columns x, y, score; missing score"),
    ("fractional x", "scores.csv, line 2: x='10.5', y='0', score='1'; x and y must be whole level-0 pixels"),
    ("no scores file", "error: --scores {tmp}/absent.csv does not exist: pass a CSV with columns x, y, score"),
    ("no annotation file", "error: --annotations {tmp}/nope.xml does not exist: pass an ASAP .xml"),
    ("broken annotation file", "error: {tmp}/broken.xml is not a readable annotation file (ParseError"),
    ("not a job", "error: {tmp} is not a tiling job (no job.json): pass the --out folder of python -m clusiam.tile"),
    ("slide not in the job", "error: the tiling job {job} has no coordinates for slide other (it has "
                             "cmu_small_region): tile it with python -m clusiam.tile SLIDE --out {job}"),
])
def test_unusable_inputs_are_refused_by_name(job, tmp_path, capsys, case, message):
    folder, coords, _ = job
    header, rows = ("x", "y", "score"), [(*coords[0], 1)]  # one good score, for the cases about other inputs
    if case == "wrong column":
        header = ("x", "y", "value")
    elif case == "fractional x":
        rows = [("10.5", 0, 1)]
    scores = (tmp_path / "absent.csv" if case == "no scores file"
              else write_scores(tmp_path / "scores.csv", rows, header))
    (tmp_path / "broken.xml").write_text("<ASAP_Annotations><Annotations><Annotation Name=")  # cut short
    annotations = {"no annotation file": "nope.xml", "broken annotation file": "broken.xml"}.get(case)
    extra = ["--annotations", str(tmp_path / annotations)] if annotations else []
    assert slidemap_main(["--scores", str(scores), "--job", str(tmp_path if case == "not a job" else folder),
                          "--slide", "other" if case == "slide not in the job" else NAME,
                          "--out", str(tmp_path / "maps"), *extra]) == 2
    assert message.format(tmp=tmp_path, job=folder) in capsys.readouterr().out


def test_a_checkpoint_without_clusters_cannot_draw_a_cluster_map(job, tiny_demo, tmp_path, capsys):
    from clusiam.config import parse_config
    from clusiam.train import train
    from conftest import tiny_run_args

    simsiam = train(parse_config(tiny_run_args(tiny_demo, tmp_path / "run", "--model_type", "simsiam",
                                               "--epochs", "1")))
    assert slidemap_main(["--checkpoint", str(simsiam), "--job", str(job[0]), "--slide", NAME,
                          "--out", str(tmp_path / "maps"), "--device", "cpu"]) == 2
    assert "simsiam checkpoint, which has no clusters" in capsys.readouterr().out


def test_a_refused_checkpoint_leaves_no_out_folder(job, tmp_path, capsys):
    folder, _, _ = job
    notes = tmp_path / "notes.pth"
    notes.write_text("not a checkpoint")
    assert slidemap_main(["--checkpoint", str(notes), "--job", str(folder), "--slide", NAME,
                          "--out", str(tmp_path / "maps")]) == 2
    assert f"error: {notes} is not a checkpoint" in capsys.readouterr().out
    assert not (tmp_path / "maps").exists()
