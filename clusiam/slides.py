"""Whole-slide images: opening one, its resolution, and reading a patch from it.

The tiler, the slide patch source and the slide map all read slides through these
functions, so that a patch means the same pixels everywhere: a field of view of
``side0`` level-0 pixels, read from the coarsest pyramid level still at least as fine as
the target resolution and resized with antialiasing (Lanczos) to the patch size.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from clusiam.errors import SlideError

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".mrxs", ".vms", ".vmu", ".bif", ".svslide")


def open_slide(path: Path):
    """A slide through tiffslide; through openslide when tiffslide cannot read it and
    openslide is installed."""
    import tiffslide

    try:
        slide = tiffslide.TiffSlide(path)
        _ = slide.level_dimensions  # tiffslide reads a file's structure on first use: a broken file fails here
        return slide
    except Exception as tiff_error:
        try:
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


def level0_mpp(slide, path: Path, override: float | None) -> float:
    """Microns per pixel at level 0, from ``override`` (``--slide_mpp``) or the file."""
    if override:
        return override
    mpp = slide_property(slide, "mpp-x")
    if mpp is None:
        raise SlideError(f"{path}: the file records no microns-per-pixel; pass --slide_mpp "
                         "(e.g. 0.25 for 40x, 0.5 for 20x)")
    return mpp


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

    def read(self, slide, x: int, y: int) -> Image.Image:
        """The patch whose top-left corner is (x, y) in level-0 pixels, as 8-bit RGB."""
        patch = slide.read_region((int(x), int(y)), self.level, (self.read_size, self.read_size)).convert("RGB")
        if self.read_size != self.size:
            patch = patch.resize((self.size, self.size), Image.LANCZOS)
        return patch
