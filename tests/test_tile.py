import csv
import json
import shutil

import h5py
import matplotlib
import numpy as np
import pytest
import shapely
import tiffslide
from PIL import Image

from clusiam.demo import CMU_SLIDE
from clusiam.slidemap import TILE_ALPHA, cluster_palette
from clusiam.slidemap import main as slidemap_main
from clusiam.tables import write_csv
from clusiam.tile import main as tile_main


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    shutil.copy(CMU_SLIDE, folder / "cmu.svs")
    (folder / "broken.svs").write_bytes(b"II*\x00 this is not a slide")
    return folder


def tile_once(slides, out, *extra):
    assert tile_main([str(slides), "--out", str(out), "--workers", "1", *extra]) == 0
    with h5py.File(out.with_name(out.name + "_index") / "cmu.h5") as handle:
        return handle["coords"][:], dict(handle["coords"].attrs), handle


@pytest.fixture(scope="module")
def tiled(slides, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiles") / "patches"
    coords, attrs, _ = tile_once(slides, out)
    return out, coords, attrs


def test_the_slides_resolution_is_read_and_tiles_come_from_tissue(tiled):
    out, coords, attrs = tiled
    with tiffslide.TiffSlide(CMU_SLIDE) as slide:
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.499)
        assert float(slide.properties["tiffslide.objective-power"]) == 20
    assert attrs["level0_mpp"] == pytest.approx(0.499) and attrs["level0_magnification"] == 20
    assert attrs["patch_level"] == 0 and attrs["patch_size"] == 224
    # The thumbnail shows a strip of tissue over about a third of the 9 x 13 grid of 224 px tiles.
    assert 30 <= len(coords) <= 50
    for x, y in coords:
        patch = np.asarray(Image.open(out / "cmu" / f"{x}_{y}.png"))
        assert patch.shape == (224, 224, 3)
        assert (patch.min(-1) > 220).mean() < 0.5  # no kept tile is mostly white glass


def test_coordinates_map_back_to_the_same_pixels(tiled):
    out, coords, _ = tiled
    with tiffslide.TiffSlide(CMU_SLIDE) as slide:
        for x, y in coords[:: max(1, len(coords) // 6)]:
            expected = np.asarray(slide.read_region((int(x), int(y)), 0, (224, 224)).convert("RGB"))
            np.testing.assert_array_equal(np.asarray(Image.open(out / "cmu" / f"{x}_{y}.png")), expected)


def test_half_the_resolution_gives_about_a_quarter_of_the_tiles(slides, tiled, tmp_path):
    coords, attrs, _ = tile_once(slides, tmp_path / "coarse", "--mpp", "1.0")
    assert attrs["patch_size_level0"] == pytest.approx(224 / 0.499)
    assert 0.15 <= len(coords) / len(tiled[1]) <= 0.35
    assert Image.open(tmp_path / "coarse" / "cmu" / f"{coords[0][0]}_{coords[0][1]}.png").size == (224, 224)


def test_a_corrupt_slide_is_reported_and_skipped(tiled, capsys):
    out = tiled[0]
    index = out.with_name(out.name + "_index")
    failed = (index / "failed_slides.txt").read_text()
    assert "broken.svs" in failed and "cmu.svs" not in failed
    rows = list(csv.DictReader(open(index / "tiles.csv")))
    assert [r["slide"] for r in rows] == ["cmu"] and int(rows[0]["tiles"]) == len(tiled[1])
    assert (index / "cmu_thumbnail.png").is_file()


def test_a_slide_without_resolution_needs_slide_mpp(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    region = tiffslide.TiffSlide(CMU_SLIDE).read_region((600, 600), 0, (1100, 2000)).convert("RGB")
    region.save(folder / "plain.tif")  # a TIFF that records no microns per pixel
    assert tile_main([str(folder), "--out", str(tmp_path / "a"), "--workers", "1"]) == 2  # no slide could be tiled
    assert "records no microns-per-pixel; pass --slide_mpp" in (tmp_path / "a_index" / "failed_slides.txt").read_text()
    assert tile_main([str(folder), "--out", str(tmp_path / "b"), "--workers", "1", "--slide_mpp", "0.5"]) == 0
    assert len(list((tmp_path / "b" / "plain").glob("*.png"))) > 0


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
    out = tmp_path / "labelled"
    assert tile_main([str(slides), "--out", str(out), "--workers", "1", "--annotations", str(annotations)]) == 0
    assert ("1 of 2 slide(s) have no annotation file in " f"{annotations} (e.g. broken.svs)") in capsys.readouterr().out
    with h5py.File(tmp_path / "labelled_index" / "cmu.h5") as handle:
        labels = dict(zip(map(tuple, handle["coords"][:]), [label.decode() for label in handle["label"][:]]))
        fractions = handle["tumor_fraction"][:]
    covered = {c for c in labels if x0 <= c[0] < x1 - 1 and y0 <= c[1] < y1 - 1}
    assert set(inside) <= covered
    assert {c for c, label in labels.items() if label == "tumor"} == covered
    assert sorted(fractions)[-len(covered):] == pytest.approx([1.0] * len(covered), abs=0.01)
    rows = list(csv.DictReader(open(tmp_path / "labelled_index" / "patch_labels.csv")))
    assert sum(r["label"] == "tumor" for r in rows) == len(covered)
    assert all((tmp_path / "labelled_index" / r["path"]).is_file() for r in rows)  # paths evaluate_knn.py can read


def coarse(slides, out, *extra):
    """Tile at 4 um/px into 32 px patches (256 level-0 pixels, about 35 tiles): quick."""
    return tile_main([str(slides), "--out", str(out), "--workers", "1", "--mpp", "4", "--size", "32", *extra])


def test_a_slide_without_annotation_file_is_labelled_normal_throughout(slides, tmp_path, capsys):
    (tmp_path / "annotations").mkdir()  # Camelyon16's normal slides have no XML
    assert coarse(slides, tmp_path / "p", "--annotations", str(tmp_path / "annotations")) == 0
    assert "2 of 2 slide(s) have no annotation file" in capsys.readouterr().out
    with h5py.File(tmp_path / "p_index" / "cmu.h5") as handle:
        tiles, fractions = len(handle["coords"]), handle["tumor_fraction"][:]
    assert 20 <= tiles <= 50 and fractions.tolist() == [0.0] * tiles
    rows = list(csv.DictReader(open(tmp_path / "p_index" / "patch_labels.csv")))
    assert len(rows) == tiles and {r["label"] for r in rows} == {"normal"} and {r["slide"] for r in rows} == {"cmu"}


def tiles_csv(index):
    with open(index / "tiles.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("extra, reason", [
    (["--slide_mpp", "0.001"],  # a wrong resolution: each 32 px tile would span 128000 level-0 pixels
     "a 32 px tile at 4 um/px spans 128000 level-0 pixels, more than the slide's 2220 x 2967 at 0.001 um/px; "
     "check --slide_mpp"),
    (["--saturation_threshold", "1"], "no tile holds 60% tissue (0.0 mm2 of tissue found)"),
])
def test_a_slide_that_gives_no_patch_is_a_warning_naming_it(slides, tmp_path, capsys, extra, reason):
    assert coarse(slides, tmp_path / "p", *extra) == 0
    warning = f"{slides / 'cmu.svs'} gave 0 patches: {reason}"
    assert f"warning: {warning}" in capsys.readouterr().out
    rows = tiles_csv(tmp_path / "p_index")
    assert list(rows[0]) == ["slide", "tiles", "tissue_area_mm2", "mpp", "level", "otsu_threshold", "tumor_tiles",
                             "seconds", "warnings"]
    assert rows[0]["tiles"] == "0" and rows[0]["warnings"].startswith(warning)


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
    rows = tiles_csv(tmp_path / "p_index")
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
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["tumor"]
    assert 20 <= len(list((tmp_path / "p" / "tumor" / "cmu").glob("*.png"))) <= 50


@pytest.mark.parametrize("flag, value, message", [
    ("--overlap", "1", "--overlap 1.0 must be in [0, 1)"), ("--mpp", "0", "--mpp 0.0 must be above 0"),
    ("--size", "0", "--size 0 must be at least 1"), ("--min_tissue", "1.5", "--min_tissue 1.5 must be in [0, 1]")])
def test_impossible_flags_are_refused_before_any_slide_is_read(slides, tmp_path, capsys, flag, value, message):
    assert tile_main([str(slides), "--out", str(tmp_path / "p"), flag, value]) == 2
    assert capsys.readouterr().out.startswith(f"error: {message}")
    assert not (tmp_path / "p").exists() and not (tmp_path / "p_index").exists()


def test_a_slide_that_fails_half_way_leaves_no_patches(slides, tmp_path, capsys):
    # A folder where the slide's index belongs: cmu's patches are all read before moving it in fails.
    (tmp_path / "p_index" / "cmu.h5").mkdir(parents=True)
    assert coarse(slides, tmp_path / "p") == 2
    assert (f"error: none of the 2 slide(s) could be tiled; the reasons are in {tmp_path / 'p_index'}"
            in capsys.readouterr().out)
    failed = (tmp_path / "p_index" / "failed_slides.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in failed] == [str(slides / "broken.svs"), str(slides / "cmu.svs")]
    assert "Is a directory" in failed[1]
    assert list((tmp_path / "p").rglob("*")) == []
    assert sorted(p.name for p in (tmp_path / "p_index").iterdir()) == ["cmu.h5", "failed_slides.txt", "tiles.csv"]


def test_retiling_replaces_a_slides_patches_and_out_can_be_the_current_folder(slides, tmp_path, monkeypatch):
    (tmp_path / "p").mkdir()
    monkeypatch.chdir(tmp_path / "p")
    assert coarse(slides, ".") == 0
    first = sorted(p.name for p in (tmp_path / "p" / "cmu").iterdir())
    assert coarse(slides, ".", "--size", "64") == 0  # tiles twice as large: fewer, at other corners
    second = sorted(p.name for p in (tmp_path / "p" / "cmu").iterdir())
    with h5py.File(tmp_path / "p_index" / "cmu.h5") as handle:
        assert second == sorted(f"{x}_{y}.png" for x, y in handle["coords"][:])
    assert 0 < len(second) < len(first) / 2


def painted_colours(picture_path, slide_path, rows, map_mpp=4.0):
    """The colour blended into the centre of each tile, recovered from the picture and a
    fresh thumbnail: picture = (1 - alpha) thumbnail + alpha colour."""
    picture = np.asarray(Image.open(picture_path)).astype(float)
    with tiffslide.TiffSlide(slide_path) as slide:
        scale = map_mpp / 0.499
        size = (round(slide.dimensions[0] / scale), round(slide.dimensions[1] / scale))
        thumbnail = np.asarray(slide.get_thumbnail(size).convert("RGB").resize(size)).astype(float)
    centres = [(int((int(r["y"]) + 112) / scale), int((int(r["x"]) + 112) / scale)) for r in rows]
    return [(picture[y, x] - (1 - TILE_ALPHA) * thumbnail[y, x]) / TILE_ALPHA for y, x in centres]


def test_cluster_map_colours_every_tile_by_its_cluster(slides, tiled, tiny_checkpoint, tmp_path):
    out, maps = tiled[0], tmp_path / "maps"
    assert slidemap_main(["--checkpoint", str(tiny_checkpoint), "--slide", str(slides / "cmu.svs"),
                          "--patches", str(out), "--out", str(maps), "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(maps / "cmu_clusters.csv")))
    assert len(rows) == len(tiled[1]) and all(0 <= int(r["cluster"]) < 8 for r in rows)
    palette = cluster_palette(8).astype(float)
    for row, colour in zip(rows, painted_colours(maps / "cmu_clusters.png", slides / "cmu.svs", rows)):
        assert np.abs(colour - palette[int(row["cluster"])]).max() < 4  # uint8 rounding, divided by alpha


def test_heatmap_colours_tiles_by_score(slides, tiled, tmp_path):
    out, coords = tiled[0], tiled[1]
    scores = tmp_path / "scores.csv"
    rows = [{"x": str(x), "y": str(y), "score": str(i)} for i, (x, y) in enumerate(coords)]
    with open(scores, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["x", "y", "score"])
        writer.writeheader()
        writer.writerows(rows)
    assert slidemap_main(["--scores", str(scores), "--slide", str(slides / "cmu.svs"), "--patches", str(out),
                          "--out", str(tmp_path / "maps")]) == 0
    colours = painted_colours(tmp_path / "maps" / "cmu_heatmap.png", slides / "cmu.svs", rows)
    inferno = matplotlib.colormaps["inferno"]
    for i in (0, len(rows) // 2, len(rows) - 1):
        assert np.abs(colours[i] - np.array(inferno(i / (len(rows) - 1))[:3]) * 255).max() < 4


def write_scores(path, rows, header=("x", "y", "score")):
    write_csv(path, header, rows)
    return path


def test_tiles_without_a_score_are_counted_and_drawn_grey(slides, tiled, tmp_path, capsys):
    out, coords = tiled[0], tiled[1]
    scored = [(x, y, i) for i, (x, y) in enumerate(coords[::2])]  # every other tile
    scores = write_scores(tmp_path / "scores.csv", scored)
    assert slidemap_main(["--scores", str(scores), "--slide", str(slides / "cmu.svs"), "--patches", str(out),
                          "--out", str(tmp_path / "maps")]) == 0
    unscored = len(coords) - len(scored)
    assert f"{unscored} of {len(coords)} tiles of cmu have no score in {scores}; drawn grey" in capsys.readouterr().out
    rows = [{"x": x, "y": y} for x, y in coords]
    colours = painted_colours(tmp_path / "maps" / "cmu_heatmap.png", slides / "cmu.svs", rows)
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
])
def test_unusable_scores_and_annotations_are_refused_by_name(slides, tiled, tmp_path, capsys, case, message):
    header, rows = ("x", "y", "score"), [(*tiled[1][0], 1)]  # one good score, for the cases about annotations
    if case == "wrong column":
        header = ("x", "y", "value")
    elif case == "fractional x":
        rows = [("10.5", 0, 1)]
    scores = (tmp_path / "absent.csv" if case == "no scores file"
              else write_scores(tmp_path / "scores.csv", rows, header))
    (tmp_path / "broken.xml").write_text("<ASAP_Annotations><Annotations><Annotation Name=")  # cut short
    annotations = {"no annotation file": "nope.xml", "broken annotation file": "broken.xml"}.get(case)
    extra = ["--annotations", str(tmp_path / annotations)] if annotations else []
    assert slidemap_main(["--scores", str(scores), "--slide", str(slides / "cmu.svs"), "--patches", str(tiled[0]),
                          "--out", str(tmp_path / "maps"), *extra]) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().out


def test_a_checkpoint_without_clusters_cannot_draw_a_cluster_map(slides, tiled, tiny_demo, tmp_path, capsys):
    from clusiam.config import parse_config
    from clusiam.train import train
    from conftest import tiny_run_args

    simsiam = train(parse_config(tiny_run_args(tiny_demo, tmp_path / "run", "--model_type", "simsiam",
                                               "--epochs", "1")))
    assert slidemap_main(["--checkpoint", str(simsiam), "--slide", str(slides / "cmu.svs"), "--patches", str(tiled[0]),
                          "--out", str(tmp_path / "maps"), "--device", "cpu"]) == 2
    assert "simsiam checkpoint, which has no clusters" in capsys.readouterr().out


def test_the_grid_keeps_exactly_the_tiles_with_enough_tissue_and_annotations_give_area_shares():
    from clusiam.tile import ReadPlan, tissue_tiles, tumour_fractions

    # A 32 x 24 level-0 slide, 8 px tiles on an 8 px grid, seen on a thumbnail at 2 level-0 px per pixel.
    plan = ReadPlan(level0_mpp=0.25, magnification=40.0, width=32, height=24, level=0, downsample=1.0, tile0=8.0,
                    step0=8.0, read_size=8, thumb_scale=2.0)
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
    from clusiam.tile import TilingOptions, open_slide, plan_reading

    slide = open_slide(slides / "cmu.svs")  # one level, 0.499 um/px
    try:
        plan = plan_reading(slide, slides / "cmu.svs", TilingOptions(mpp=1.0, size=224, overlap=0.25))
    finally:
        slide.close()
    assert (plan.level, plan.downsample, plan.magnification) == (0, 1.0, 20.0)
    assert plan.tile0 == pytest.approx(224 / 0.499) and plan.read_size == round(224 / 0.499)
    assert plan.step0 == pytest.approx(0.75 * plan.tile0) and plan.thumb_scale == pytest.approx(4.0 / 0.499)
