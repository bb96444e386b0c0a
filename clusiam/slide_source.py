"""Patches read straight from whole-slide images: a tiling job, or TRIDENT / CLAM coordinate
files beside a folder of slides, is a :class:`~clusiam.sources.PatchSource` like a folder
of patch files, and no patch is written to disk.

    SlideSource.checked(job_pairs(JOB_DIR))                       # python -m clusiam.tile --out JOB_DIR
    SlideSource.checked(folder_pairs(COORDS_DIR, SLIDES_DIR))     # TRIDENT's or CLAM's coordinates

Checks are per slide, before training: the slide opens, it is the slide its coordinates were
made from (the level-0 size, where the file records it), no patch lies wholly outside it,
and the patches of all slides have one size. A patch that reaches past the slide's edge
(TRIDENT's grid runs while x < width; CLAM pads) is read padded with black, as TRIDENT and
CLAM read it through OpenSlide. A slide that fails is a named error, or with ``skip`` left
out and listed. Each process (and DataLoader worker) keeps its own slides open, the least
recently used closed beyond ``open_slides``; the training order (:mod:`clusiam.order`) keeps
each worker on a few slides at a time.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from clusiam.coords import COORDS, JOB_FILE, SlideCoords, read_coords
from clusiam.errors import ConfigError, DataError, UserError
from clusiam.files import find_files
from clusiam.images import Checked
from clusiam.slides import SLIDE_EXTENSIONS, LevelTiles, PatchReader, SlideLevel, open_level, open_slide
from clusiam.sources import PatchSource
from clusiam.storage import join, location, version

# Slides each process keeps open by default (least recently used closed first); an open
# scanner-size slide costs a few MiB when read tile by tile (clusiam.slides.LevelTiles).
OPEN_SLIDES = 64
TRIDENT_SUFFIX = "_patches"  # TRIDENT names a slide's coordinate file <slide>_patches.h5
Pair = tuple[Path, Path]  # a slide file and its coordinate file


@dataclass(frozen=True)
class SlidePatches:
    """One checked slide: its file, how its patches are read, their corners (level-0 pixels)."""

    path: Path
    name: str
    reader: PatchReader
    coords: np.ndarray

    def key(self) -> str:
        """A key that changes with the slide's file (path, size, modification time), how its
        patches are read, or any corner: for caches and reruns that must not reuse stale work."""
        digest = hashlib.sha256(f"{self.path}\t{version(self.path)}\t{self.reader}\n".encode())
        digest.update(np.ascontiguousarray(self.coords).tobytes())
        return digest.hexdigest()


def is_job(folder: str | os.PathLike | None) -> bool:
    """Whether ``folder`` (a path or URL) is a tiling job (it holds job.json): patches read from its slides."""
    return folder is not None and (location(folder) / JOB_FILE).is_file()


def job_pairs(job: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(slide file, coordinate file) of each slide of a tiling job (a path or URL) that has
    coordinates; a slide path recorded relative is taken from the job folder, so a job moves
    with its slides (to object storage too, where a recorded URL is taken as it is)."""
    job_dir = location(job)
    record = job_dir / JOB_FILE
    if not record.is_file():
        raise DataError(f"{job_dir} is not a tiling job (no {JOB_FILE}): pass the --out folder of "
                        "python -m clusiam.tile")
    try:
        slides = json.loads(record.read_text())["slides"]
        pairs = [(join(job_dir, slides[name]), job_dir / COORDS / f"{name}.h5") for name in sorted(slides)]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise DataError(f"{record} is not a tiling job record ({type(error).__name__}: {error}): tile the slides "
                        "again with python -m clusiam.tile") from None
    listed = {path.name for path in (job_dir / COORDS).iterdir()} if (job_dir / COORDS).is_dir() else set()
    pairs = [(slide, coords) for slide, coords in pairs if coords.name in listed]
    if not pairs:
        raise DataError(f"{job_dir / 'coords'} holds no coordinate file of the {len(slides)} slides in {record}: "
                        "tile the slides again, or pass another job")
    return pairs


def folder_pairs(coords_dir: str | os.PathLike, slides_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(slide file, coordinate file) pairs matched by name (see :func:`slide_name`), each folder
    a path or URL. A name two slides share is refused: either could be the one the
    coordinates were made from."""
    coords = find_files(coords_dir, (".h5",), "coordinate files", "pass the folder of coordinate files (TRIDENT: "
                        "JOB/<mag>x_<size>px_<overlap>px_overlap/patches, CLAM: SAVE_DIR/patches)", "check --coords")
    slides: dict[str, list[Path]] = {}
    for path in find_files(slides_dir, SLIDE_EXTENSIONS, "slides", "pass the folder of the slides", "check --slides"):
        slides.setdefault(path.stem, []).append(path)
    names = [slide_name(path, slides) for path in coords]
    missing = [name for name in names if name not in slides]
    if missing:
        raise DataError(f"--slides {slides_dir} holds no slide for {len(missing)} coordinate file(s) of --coords "
                        f"{coords_dir} (e.g. {missing[0]}): put the slides there, or remove those files")
    shared = next((name for name in names if len(slides[name]) > 1), None)
    if shared is not None:
        raise DataError(f"--slides {slides_dir} holds {len(slides[shared])} slides named {shared} "
                        f"({', '.join(map(str, slides[shared]))}): keep one, or pass a folder with one of each")
    return [(slides[name][0], path) for name, path in zip(names, coords)]


def slide_name(coords_path: Path, slides: Collection[str]) -> str:
    """The slide a coordinate file belongs to: ``<slide>.h5`` (CLAM, the tiler) or
    ``<slide>_patches.h5`` (TRIDENT), the exact name first."""
    stem = coords_path.stem
    if stem not in slides and stem.endswith(TRIDENT_SUFFIX):
        return stem.removesuffix(TRIDENT_SUFFIX)
    return stem


def check_slide(slide_path: Path, coords_path: Path, size: int | None, skip: bool,
                skip_advice: str | None) -> tuple[SlidePatches, int]:
    """One slide and its coordinates, checked; the patches wholly outside it left out under
    ``skip`` (and counted) or refused, with ``skip_advice`` (the flag that leaves them out,
    where the command has one)."""
    entry: SlideCoords = read_coords(coords_path)
    slide = open_slide(slide_path)
    try:
        width, height = slide.dimensions
        if entry.level0_size not in (None, (width, height)):
            raise DataError(f"{coords_path} was made from a slide of {entry.level0_size[0]} x {entry.level0_size[1]} "
                            f"pixels, but {slide_path} is {width} x {height}: pair each coordinate file with its "
                            "own slide")
        reader = entry.reader(slide, size)
        tiles = LevelTiles.of(slide, reader.level, slide_path)  # refuses a truncated file
        if tiles is not None:
            tiles.close()
    finally:
        slide.close()
    x, y = entry.coords[:, 0], entry.coords[:, 1]
    overlaps = (x < width) & (y < height) & (x + reader.side0 > 0) & (y + reader.side0 > 0)
    outside = int((~overlaps).sum())
    if outside and not skip:
        first = entry.coords[~overlaps][0]
        advice = f"; {skip_advice}" if skip_advice else ""
        raise DataError(f"{coords_path}: {outside} of {len(overlaps)} patches lie wholly outside {slide_path} "
                        f"({width} x {height}; e.g. ({first[0]}, {first[1]}) with a side of {reader.side0:g}): "
                        f"is this the right slide?{advice}")
    return SlidePatches(slide_path, entry.name, reader, entry.coords[overlaps]), outside


class SlideSource(PatchSource):
    """The patches of checked slides, read on demand through tiffslide (or openslide)."""

    def __init__(self, slides: Sequence[SlidePatches]) -> None:
        self.entries = list(slides)
        self.open_slides = OPEN_SLIDES  # slides this process keeps open (pretraining: by --slides_per_batch)
        sizes = {entry.reader.size for entry in self.entries}
        if len(sizes) > 1:
            raise DataError(f"the coordinate files give patches of {len(sizes)} sizes ({sorted(sizes)} px): read all "
                            "of them at one size: with --patch_size N in pretrain.py, with --resize N in "
                            "evaluate_knn.py or python -m mil.compute_feats")
        self.offsets = np.cumsum([0, *(len(entry.coords) for entry in self.entries)])
        self._handles: OrderedDict[Path, LevelTiles | SlideLevel] = OrderedDict()
        self._unopenable: dict[Path, object] = {}  # slides this process could not open, and why
        self._pid = os.getpid()

    @classmethod
    def checked(cls, pairs: Sequence[tuple[Path, Path]], size: int | None = None, skip: bool = False,
                skip_advice: str | None = None) -> tuple[SlideSource, Checked]:
        """A source over ``pairs`` of (slide, coordinate file), and the verdict per slide in the
        form the patch-file check gives it, so that a run reports both alike: the slides used
        in full, and each slide or coordinate file that ``skip`` left out in whole or in part,
        with why. ``skip_advice`` ends a refusal where the command can leave bad slides out."""
        kept, complete, left_out = [], [], []
        for slide_path, coords_path in tqdm(pairs, desc="checking slides", unit="slide"):
            try:
                entry, outside = check_slide(slide_path, coords_path, size, skip, skip_advice)
            except UserError as error:
                if not skip:
                    raise
                left_out.append((slide_path, str(error)))
                continue
            if outside:
                left_out.append((coords_path, f"{outside} of {outside + len(entry.coords)} patches lie wholly outside "
                                              f"{slide_path}: left out"))
            else:
                complete.append(slide_path)
            kept.append(entry)
        if not kept:
            first = f"; first: {left_out[0][0]}: {left_out[0][1]}" if left_out else ""
            raise DataError(f"none of the {len(pairs)} slides can be read{first}")
        return cls(kept), Checked(complete, left_out)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[SlidePatches, int, int]:
        """The slide of patch ``index`` and its corner."""
        slide = int(np.searchsorted(self.offsets, index, side="right")) - 1
        entry = self.entries[slide]
        x, y = entry.coords[index - self.offsets[slide]]
        return entry, int(x), int(y)

    def read(self, index: int) -> Image.Image:
        return self.read_many([index])[0]

    def pixels(self, index: int) -> np.ndarray:
        """The patch as read from its pyramid level, before the resize to the patch size."""
        return self.read_many([index], as_stored=True)[0]

    def read_many(self, indices: Sequence[int], as_stored: bool = False) -> list:
        """Each slide's patches among ``indices`` read together (:meth:`LevelTiles.regions`), so
        that a DataLoader worker fetches a remote slide's tiles for its part of a batch at once."""
        slides = np.searchsorted(self.offsets, indices, side="right") - 1
        patches: list = [None] * len(indices)
        for slide in np.unique(slides).tolist():
            places = np.flatnonzero(slides == slide)
            entry = self.entries[slide]
            corners = entry.coords[np.asarray(indices)[places] - self.offsets[slide]]
            level = self._open(entry)
            try:
                pixels = entry.reader.pixels(level, corners.tolist())
            except Exception as error:  # a slide changed, or failing mid-read: name it (and the patch, if one)
                self._handles.pop(entry.path, None)
                where = f" at ({corners[0][0]}, {corners[0][1]})" if len(corners) == 1 else ""
                raise DataError(f"{entry.path}{where}: could not be read ({type(error).__name__}: {error})") from None
            for place, patch in zip(places, pixels):
                patches[place] = patch if as_stored else entry.reader.resized(patch)
        return patches

    def slide_sizes(self) -> list[int]:
        return [len(entry.coords) for entry in self.entries]

    def describe(self, index: int) -> str:
        entry, x, y = self.locate(index)
        return f"{entry.path} at ({x}, {y})"

    def next_to_try(self, index: int) -> int:
        """Past the whole slide when it cannot be opened (it is listed once, not per patch)."""
        slide = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return int(self.offsets[slide + 1]) if self.entries[slide].path in self._unopenable else index + 1

    def _open(self, entry: SlidePatches) -> LevelTiles | SlideLevel:
        """This process's reader of ``entry``'s level: opened once, the least recently used
        closed beyond ``open_slides``."""
        if os.getpid() != self._pid:  # a forked DataLoader worker: the parent's handles are not ours
            self._handles, self._unopenable, self._pid = OrderedDict(), {}, os.getpid()
        path = entry.path
        if path in self._handles:
            self._handles.move_to_end(path)
            return self._handles[path]
        if path not in self._unopenable:
            try:
                self._handles[path] = open_level(path, entry.reader.level)
            except Exception as error:  # gone, or no longer a slide: every patch of it fails alike
                self._unopenable[path] = error if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
        if path in self._unopenable:
            raise DataError(f"{path}: cannot be opened any more ({self._unopenable[path]})")
        while len(self._handles) > self.open_slides:
            self._handles.popitem(last=False)[1].close()
        return self._handles[path]

    def __getstate__(self) -> dict:  # a spawned worker opens its own slides
        return {**self.__dict__, "_handles": OrderedDict()}

    @functools.cached_property
    def identity(self) -> str:
        """A key of every slide's patches (see :meth:`SlidePatches.key`)."""
        return hashlib.sha256("".join(entry.key() for entry in self.entries).encode()).hexdigest()

    @property
    def patch_size(self) -> int:
        """The side of every patch, in pixels (one for all slides)."""
        return self.entries[0].reader.size

    @property
    def slides(self) -> list[str]:
        return sorted(entry.name for entry in self.entries)


def add_slide_options(parser: argparse.ArgumentParser, reads: str) -> None:
    """``--job`` or ``--coords --slides``: where a command that encodes patches finds slides,
    the same way in every such command."""
    group = parser.add_argument_group("patches read from slides (no patch files)", reads)
    group.add_argument("--job", default=None, help="a tiling job: the --out folder of python -m clusiam.tile")
    group.add_argument("--coords", default=None,
                       help="a folder of <slide>.h5 coordinate files (TRIDENT's, CLAM's or the tiler's)")
    group.add_argument("--slides", default=None, help="the folder of the slides the --coords files were made from")


def slide_pairs(args: argparse.Namespace) -> dict[str, Pair] | None:
    """The slides ``--job`` or ``--coords --slides`` name (see :func:`named_pairs`); None
    when neither is given."""
    if args.job and (args.coords or args.slides):
        raise ConfigError("--job brings its own coordinates and slides: pass --job JOB or --coords DIR --slides DIR, "
                          "not both")
    if bool(args.coords) != bool(args.slides):
        raise ConfigError("--coords and --slides go together: pass the folder of <slide>.h5 coordinate files and "
                          "the folder of the slides")
    if args.job:
        return named_pairs(job_pairs(args.job))
    return named_pairs(folder_pairs(args.coords, args.slides)) if args.coords else None


def named_pairs(pairs: Sequence[Pair]) -> dict[str, Pair]:
    """(slide file, coordinate file) by slide name: the job's name (its coordinate file's), or
    for TRIDENT's ``<slide>_patches.h5`` the slide's; what tables and bags call a slide."""
    named: dict[str, Pair] = {}
    for slide, coords in pairs:
        name = slide_name(coords, {slide.stem})
        if name in named:
            raise DataError(f"{named[name][1]} and {coords} are both coordinates of slide {name}: keep one")
        named[name] = (slide, coords)
    return named
