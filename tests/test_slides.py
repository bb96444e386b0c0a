"""Reading regions of a slide (clusiam/slides.py): the tile reader gives tiffslide's pixels,
edges are padded black, and a truncated file is refused."""
from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import tifffile
import tiffslide
from PIL import Image

from clusiam.demo import CMU_SLIDE
from clusiam.errors import SlideError
from clusiam.slides import LevelTiles, PatchReader, SlideLevel, open_level, open_slide
from conftest import write_pyramid


def he_image(side: int) -> np.ndarray:
    """Real H&E pixels from the CC0 slide, ``side`` x ``side`` (tiled when larger than the slide)."""
    with open_slide(CMU_SLIDE) as slide:
        region = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    return np.tile(region, (side // region.shape[0] + 1, side // region.shape[1] + 1, 1))[:side, :side]


def tiffslide_region(path, level: int, x: int, y: int, size: int) -> np.ndarray:
    with tiffslide.TiffSlide(path) as slide, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "location=.* is out-of-bounds, but padding is requested")
        return np.array(slide.read_region((x, y), level, (size, size)).convert("RGB"))


def regions(width: int, height: int, count: int, seed: int) -> list[tuple[int, int, int]]:
    """(x, y, size) of regions anywhere from inside the slide to across its edges."""
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(-150, width - 1)), int(rng.integers(-150, height - 1)), int(rng.integers(1, 300)))
            for _ in range(count)]


def write_tiled(path, image: np.ndarray, **options) -> None:
    """A one-level tiled TIFF tiffslide reads (no Aperio description)."""
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb", **options)


@pytest.mark.parametrize("layout", ["aperio svs, JPEG tables", "pyramid, 3 levels", "YCbCr 4:2:0 JPEG", "deflate"])
def test_the_tile_reader_gives_tiffslides_pixels_at_every_level_and_edge(tmp_path, layout):
    if layout == "aperio svs, JPEG tables":
        path = CMU_SLIDE
    elif layout == "pyramid, 3 levels":
        path = write_pyramid(tmp_path / "pyramid.tif", he_image(700), mpp=0.25, downsamples=(1, 2, 4), tile=128)
    elif layout == "YCbCr 4:2:0 JPEG":
        path = tmp_path / "ycbcr.tif"
        ycbcr = np.asarray(Image.fromarray(he_image(300)).convert("YCbCr"))
        tifffile.imwrite(path, ycbcr, tile=(64, 64), compression="jpeg", photometric="ycbcr", subsampling=(2, 2))
    else:
        path = tmp_path / "deflate.tif"
        write_tiled(path, he_image(300), compression="zlib")
    with open_slide(path) as slide:
        dimensions, levels = slide.level_dimensions, slide.level_count
    for level in range(levels):
        reader = open_level(path, level)
        assert isinstance(reader, LevelTiles)
        width, height = dimensions[0]
        for x, y, size in regions(width, height, 25, seed=level):
            np.testing.assert_array_equal(reader.region(x, y, size), tiffslide_region(path, level, x, y, size))
        reader.close()


def test_what_lies_outside_the_slide_reads_black_as_through_openslide(tmp_path):
    """TRIDENT's grid runs while x < width, so its last patches reach past the edge; it reads them
    through OpenSlide, whose transparent pixels become black in RGB. So do ours."""
    image = he_image(200)
    path = tmp_path / "edge.tif"
    write_tiled(path, image)
    reader = open_level(path, 0)
    patch = reader.region(150, 170, 64)
    np.testing.assert_array_equal(patch[:30, :50], image[170:200, 150:200])
    assert not patch[30:].any() and not patch[:, 50:].any()
    assert not reader.region(-64, 0, 64).any()  # wholly outside: all black (the check refuses such patches)


def test_a_layout_the_tile_reader_does_not_handle_is_read_through_the_slide_library(tmp_path):
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, he_image(128), photometric="rgb")  # strips, not tiles
    reader = open_level(path, 0)
    assert isinstance(reader, SlideLevel)
    np.testing.assert_array_equal(reader.region(100, 90, 50), tiffslide_region(path, 0, 100, 90, 50))
    with open_slide(path) as slide:  # the tiler and the slide maps read an open slide the same way
        np.testing.assert_array_equal(np.asarray(PatchReader(50, 50, 0, 50).read(slide, 100, 90)),
                                      reader.region(100, 90, 50))
    reader.close()


def test_a_truncated_file_is_refused_naming_it(tmp_path):
    """tifffile reads a tile cut short by the file's end as what is left, and JPEG decodes that
    into wrong pixels without an error: a tile past the end of the file refuses the slide."""
    path = tmp_path / "cut.tif"
    write_tiled(path, he_image(256), compression="jpeg")
    shutil.copyfile(path, tmp_path / "whole.tif")
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 3000)
    assert isinstance(open_level(tmp_path / "whole.tif", 0), LevelTiles)
    with pytest.raises(SlideError, match=r"cut.tif: tiles of level 0 lie past the end of the file .* truncated"):
        open_level(path, 0)
