"""Whole-slide images: opening one, its resolution, and reading a patch from it.

The tiler, the slide patch source and the slide map all read slides through these
functions, so that a patch means the same pixels everywhere: a field of view of
``side0`` level-0 pixels, read from the coarsest pyramid level still at least as fine as
the target resolution and resized with antialiasing (Lanczos) to the patch size. Pixels
outside the slide read as black (0, 0, 0), as tiffslide pads them and as OpenSlide's
transparent pixels become once converted to RGB (what TRIDENT's and CLAM's patchers get).

Most scanner files are tiled TIFFs (Aperio SVS, generic pyramidal TIFF, Philips, Ventana):
:class:`LevelTiles` reads their patches tile by tile with tifffile's own decoder: the same
pixels, 1.7-1.9 times as fast as tiffslide's ``read_region`` in the training order
(benchmarks/RESULTS.md), holding less memory per open slide (it keeps its level's tile
offsets as arrays; tifffile keeps every level's as Python integers). Any other layout is
read through ``read_region`` (:class:`SlideLevel`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clusiam.errors import SlideError
from clusiam.storage import BLOCK_SIZE, filesystem, is_local, readable

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".mrxs", ".vms", ".vmu", ".bif", ".svslide")
JPEG_COMPRESSIONS = {6, 7, 34892, 33007}  # TIFF codes tifffile decodes with the level's JPEG tables


def open_slide(path: Path):
    """A slide through tiffslide (a local file, or a URL through fsspec's block cache:
    :mod:`clusiam.storage`); a local one through openslide when tiffslide cannot read it and
    openslide is installed."""
    import tiffslide

    try:
        slide = tiffslide.TiffSlide(readable(path))
        _ = slide.level_dimensions  # tiffslide reads a file's structure on first use: a broken file fails here
        return slide
    except Exception as tiff_error:
        try:
            if not is_local(path):
                raise ImportError  # openslide reads local files only
            import openslide
        except ImportError:
            raise SlideError(f"{path}: not a readable slide ({type(tiff_error).__name__}: {tiff_error})") from None
        try:
            return openslide.OpenSlide(str(path))
        except Exception as error:
            raise SlideError(f"{path}: not a readable slide ({type(error).__name__}: {error})") from None


def slide_property(slide, name: str) -> float | None:
    """A numeric property (``mpp-x``, ``objective-power``) as tiffslide or openslide names it; None when absent."""
    for key in (f"tiffslide.{name}", f"openslide.{name}"):
        value = slide.properties.get(key)
        if value:
            return float(value)
    return None


def level0_mpp(slide, path: Path, override: float | dict[str, float] | None) -> float:
    """Microns per pixel at level 0: ``override``'s (``--slide_mpp``: one for every slide, or
    some slides' by stem) where it gives one, else the file's."""
    given = override.get(path.stem) if isinstance(override, dict) else override
    if given:
        return given
    mpp = slide_property(slide, "mpp-x")
    if mpp is None:
        fix = f"add a row for {path.name} to the --slide_mpp CSV" if isinstance(override, dict) else "pass --slide_mpp"
        raise SlideError(f"{path}: the file records no microns-per-pixel; {fix} (e.g. 0.25 for 40x, 0.5 for 20x)")
    return mpp


class SlideLevel:
    """One pyramid level read through the slide library's ``read_region`` (any format it reads)."""

    def __init__(self, slide, level: int) -> None:
        self.slide = slide
        self.level = level

    def region(self, x: int, y: int, size: int) -> np.ndarray:
        """``size`` x ``size`` pixels of the level from level-0 pixel (x, y), (size, size, 3) uint8."""
        region = self.slide.read_region((int(x), int(y)), self.level, (size, size))
        return np.array(region.convert("RGB"))

    def regions(self, corners: Sequence[tuple[int, int]], size: int) -> list[np.ndarray]:
        return [self.region(x, y, size) for x, y in corners]

    def close(self) -> None:
        self.slide.close()


class LevelTiles:
    """One pyramid level of a tiled TIFF, read tile by tile: the tiles' offsets and byte counts
    as arrays, their bytes read through tifffile's file handle (a remote file's in concurrent
    range requests), decoded by tifffile's decoder for the level. Holds its own file handle,
    not the parsed file."""

    def __init__(self, page, downsample: float, path: Path) -> None:
        import tifffile

        self.width, self.height = page.imagewidth, page.imagelength
        self.tile_width, self.tile_height = page.tilewidth, page.tilelength
        self.columns = -(-self.width // self.tile_width)
        self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self.counts = np.asarray(page.databytecounts, dtype=np.int64)
        self.decode = page.decode
        self.decode_options = {"_fullsize": True}
        if page.compression in JPEG_COMPRESSIONS:
            self.decode_options.update(jpegtables=page.jpegtables, jpegheader=page.jpegheader)
        self.fill = page.nodata
        self.downsample = downsample  # level-0 pixels per pixel of the level, as tiffslide computes it
        self.file = tifffile.FileHandle(path) if is_local(path) else None
        self.remote = None if is_local(path) else (filesystem(path), path.path)
        size = self.file.size if self.file else self.remote[0].size(self.remote[1])
        if len(self.counts) and int((self.offsets + self.counts).max()) > size:
            self.close()
            raise SlideError(f"{path}: tiles of level {page.index} lie past the end of the file ({size} bytes): the "
                             "file is truncated; copy it again")

    @classmethod
    def of(cls, slide, level: int, path: Path) -> LevelTiles | None:
        """The level read tile by tile, or None when it is not a plain tiled RGB level of a TIFF
        (then :class:`SlideLevel` reads it)."""
        import tiffslide

        if not isinstance(slide, tiffslide.TiffSlide):
            return None
        properties = slide.properties
        if properties.get("tiffslide.series-composition") or properties.get("tiffslide.series-axes") != "YXS":
            return None
        try:
            series = slide.ts_tifffile.series[properties.get("tiffslide.series-index", 0)]
            levels = series.levels
        except (RuntimeError, NotImplementedError, IndexError):  # a kerchunk-backed slide: no TIFF underneath
            return None
        if level >= len(levels) or len(levels[level].pages) != 1:
            return None
        page = levels[level].keyframe
        plain = (page.is_tiled and page.planarconfig == 1 and page.samplesperpixel == 3 and page.tiledepth == 1
                 and page.imagedepth == 1 and page.dtype == np.uint8
                 and (page.imagewidth, page.imagelength) == tuple(slide.level_dimensions[level]))
        return cls(page, slide.level_downsamples[level], path) if plain else None

    def region(self, x: int, y: int, size: int) -> np.ndarray:
        """``size`` x ``size`` pixels of the level from level-0 pixel (x, y), (size, size, 3) uint8;
        what lies outside the level is black."""
        return self.regions([(x, y)], size)[0]

    def regions(self, corners: Sequence[tuple[int, int]], size: int) -> list[np.ndarray]:
        """:meth:`region` of each level-0 corner. Their tiles are read together and each is
        decoded once, however many of the regions it lies in."""
        spans = [self.span(x, y, size) for x, y in corners]
        needed = sorted({int(index) for _, _, indices in spans for index in indices})
        tiles = {index: None if data is None else self.decode(data, index, **self.decode_options)[0][0]
                 for index, data in zip(needed, self.fetch(needed))}
        return [self.paste(left, top, size, indices, tiles) for left, top, indices in spans]

    def span(self, x: int, y: int, size: int) -> tuple[int, int, np.ndarray]:
        """Where the region from level-0 pixel (x, y) lies on the level (its top-left pixel, where
        tiffslide places it) and the tiles it covers."""
        left, top = int(x / self.downsample), int(y / self.downsample)
        x0, x1 = max(left, 0), min(left + size, self.width)
        y0, y1 = max(top, 0), min(top + size, self.height)
        if x0 >= x1 or y0 >= y1:
            return left, top, np.empty(0, dtype=np.int64)
        columns = np.arange(x0 // self.tile_width, (x1 - 1) // self.tile_width + 1)
        rows = np.arange(y0 // self.tile_height, (y1 - 1) // self.tile_height + 1)
        return left, top, (rows[:, None] * self.columns + columns[None, :]).ravel()

    def fetch(self, indices: list[int]) -> list[bytes | None]:
        """The bytes of the tiles at ``indices`` (None for a tile the file does not hold): from a
        local file in offset order, merging neighbours into one read; from a remote one in
        concurrent range requests, tiles less than :data:`~clusiam.storage.BLOCK_SIZE` apart
        merged into one request (a request costs tens of milliseconds; its bytes little)."""
        if self.remote is None:
            found = {index: data for data, index in
                     self.file.read_segments(self.offsets[indices], self.counts[indices], indices)}
            return [found[index] for index in indices]
        from fsspec.utils import merge_offset_ranges

        stored = [index for index in indices if self.counts[index]]
        fs, name = self.remote
        starts = self.offsets[stored]
        ends = starts + self.counts[stored]
        _, first, last = merge_offset_ranges([name] * len(stored), starts.tolist(), ends.tolist(), max_gap=BLOCK_SIZE)
        blobs = fs.cat_ranges([name] * len(first), first, last)
        request = np.searchsorted(first, starts, side="right") - 1  # the merged request that holds each tile
        found = {index: blobs[r][start - first[r]:end - first[r]]
                 for index, r, start, end in zip(stored, request.tolist(), starts.tolist(), ends.tolist())}
        return [found.get(index) for index in indices]

    def paste(self, left: int, top: int, size: int, indices: np.ndarray,
              tiles: dict[int, np.ndarray | None]) -> np.ndarray:
        """The region at (left, top) of the level from its decoded ``tiles``; black outside the level,
        the level's fill value where the file holds no tile."""
        out = np.zeros((size, size, 3), dtype=np.uint8)
        for index in indices.tolist():
            tile_top, tile_left = index // self.columns * self.tile_height, index % self.columns * self.tile_width
            y0, y1 = max(top, tile_top), min(top + size, tile_top + self.tile_height, self.height)
            x0, x1 = max(left, tile_left), min(left + size, tile_left + self.tile_width, self.width)
            tile = tiles[index]
            out[y0 - top:y1 - top, x0 - left:x1 - left] = (
                self.fill if tile is None else tile[y0 - tile_top:y1 - tile_top, x0 - tile_left:x1 - tile_left])
        return out

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def open_level(path: Path, level: int) -> LevelTiles | SlideLevel:
    """One level of the slide at ``path``, ready to read regions from (see :func:`level_of`)."""
    return level_of(open_slide(path), path, level)


def level_of(slide, path: Path, level: int) -> LevelTiles | SlideLevel:
    """One level of the open ``slide`` (its file at ``path``), which it takes over: read tile by
    tile where the file allows it (:class:`LevelTiles`, the parsed file then closed), else
    through the slide library."""
    try:
        tiles = LevelTiles.of(slide, level, path)
    except BaseException:
        slide.close()
        raise
    if tiles is None:
        return SlideLevel(slide, level)
    slide.close()
    return tiles


@dataclass(frozen=True)
class PatchReader:
    """How one slide's patches are read: a field of view of ``side0`` level-0 pixels, read
    as ``read_size`` pixels at pyramid ``level`` and resized to ``size``."""

    side0: float
    size: int
    level: int
    read_size: int

    @classmethod
    def for_slide(cls, slide, side0: float, size: int) -> PatchReader:
        """Read from the most downsampled level that is still at least as fine as the target."""
        target = side0 / size  # level-0 pixels per output pixel
        level = max((i for i, d in enumerate(slide.level_downsamples) if d <= target * 1.001), default=0)
        return cls(side0, size, level, max(1, round(side0 / slide.level_downsamples[level])))

    def pixels(self, level: LevelTiles | SlideLevel, corners: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """The patches whose top-left corners (level-0 pixels) are ``corners``, as read, before
        any resize: (read_size, read_size, 3) uint8 each, read together."""
        return level.regions(corners, self.read_size)

    def resized(self, pixels: np.ndarray) -> Image.Image:
        """Pixels as read, as the patch: resized to ``size`` with Lanczos where the read size differs."""
        patch = Image.fromarray(pixels)
        if self.read_size != self.size:
            patch = patch.resize((self.size, self.size), Image.LANCZOS)
        return patch

    def read(self, slide, x: int, y: int) -> Image.Image:
        """The patch whose top-left corner is (x, y) in level-0 pixels, as 8-bit RGB, from an open slide."""
        return self.resized(self.pixels(SlideLevel(slide, self.level), [(x, y)])[0])
