import csv
import json
import shutil

import h5py
import matplotlib
import numpy as np
import pytest
import tiffslide
from PIL import Image

from clusiam.demo import CMU_SLIDE
from clusiam.slidemap import TILE_ALPHA, cluster_palette, main as slidemap_main
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
    assert tile_main([str(folder), "--out", str(tmp_path / "a"), "--workers", "1"]) == 0
    assert "records no microns-per-pixel; pass --slide_mpp" in (tmp_path / "a_index" / "failed_slides.txt").read_text()
    assert tile_main([str(folder), "--out", str(tmp_path / "b"), "--workers", "1", "--slide_mpp", "0.5"]) == 0
    assert len(list((tmp_path / "b" / "plain").glob("*.png"))) > 0


@pytest.mark.parametrize("kind", ["asap", "geojson"])
def test_an_annotation_polygon_labels_exactly_the_tiles_inside_it(slides, tiled, tmp_path, kind):
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
    with h5py.File(tmp_path / "labelled_index" / "cmu.h5") as handle:
        labels = dict(zip(map(tuple, handle["coords"][:]), [l.decode() for l in handle["label"][:]]))
        fractions = handle["tumor_fraction"][:]
    covered = {c for c in labels if x0 <= c[0] < x1 - 1 and y0 <= c[1] < y1 - 1}
    assert set(inside) <= covered
    assert {c for c, label in labels.items() if label == "tumor"} == covered
    assert sorted(fractions)[-len(covered):] == pytest.approx([1.0] * len(covered), abs=0.01)
    rows = list(csv.DictReader(open(tmp_path / "labelled_index" / "patch_labels.csv")))
    assert sum(r["label"] == "tumor" for r in rows) == len(covered)
    assert all((tmp_path / "labelled_index" / r["path"]).is_file() for r in rows)  # paths evaluate_knn.py can read


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


def test_a_checkpoint_without_clusters_cannot_draw_a_cluster_map(slides, tiled, tiny_demo, tmp_path, capsys):
    from clusiam.config import parse_config
    from clusiam.train import train
    from conftest import tiny_run_args

    simsiam = train(parse_config(tiny_run_args(tiny_demo, tmp_path / "run", "--model_type", "simsiam", "--epochs", "1")))
    assert slidemap_main(["--checkpoint", str(simsiam), "--slide", str(slides / "cmu.svs"), "--patches", str(tiled[0]),
                          "--out", str(tmp_path / "maps"), "--device", "cpu"]) == 2
    assert "simsiam checkpoint, which has no clusters" in capsys.readouterr().out
