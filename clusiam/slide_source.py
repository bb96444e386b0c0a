"""Patches read straight from whole-slide images: a tiling job, or TRIDENT / CLAM coordinate
files beside a folder of slides, is a :class:`~clusiam.sources.PatchSource` like a folder
of patch files, and no patch is written to disk.

    SlideSource.checked(job_pairs(JOB_DIR))                       # python -m clusiam.tile --out JOB_DIR
    SlideSource.checked(folder_pairs(COORDS_DIR, SLIDES_DIR))     # TRIDENT's or CLAM's coordinates

Checks are per slide, before training: the slide opens, it is the slide its coordinates were
made from (the level-0 size, where the file records it), every patch lies inside it, and
the patches of all slides have one size. A slide that fails is a named error, or with
``skip`` left out and listed. Each process (and DataLoader worker) keeps its own few slides
open: readers are not shared across processes.
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
from clusiam.slides import SLIDE_EXTENSIONS, PatchReader, open_slide
from clusiam.sources import PatchSource

OPEN_SLIDES = 16  # slide handles each process keeps open (least recently used closed first)
TRIDENT_SUFFIX = "_patches"  # TRIDENT names a slide's coordinate file <slide>_patches.h5
Pair = tuple[Path, Path]  # a slide file and its coordinate file
EDGE_TOLERANCE = 1  # level-0 pixels a patch may reach past the slide's edge (rounding of the grid)


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
        status = self.path.stat()
        digest = hashlib.sha256(f"{self.path}\t{status.st_size}\t{status.st_mtime_ns}\t{self.reader}\n".encode())
        digest.update(np.ascontiguousarray(self.coords).tobytes())
        return digest.hexdigest()


def is_job(folder: str | os.PathLike | None) -> bool:
    """Whether ``folder`` is a tiling job (it holds job.json), whose patches are read from its slides."""
    return folder is not None and (Path(folder) / JOB_FILE).is_file()


def job_pairs(job_dir: Path) -> list[tuple[Path, Path]]:
    """(slide file, coordinate file) of each slide of a tiling job that has coordinates; a
    slide path recorded relative is taken from the job folder, so a job moves with its slides."""
    record = job_dir / JOB_FILE
    if not record.is_file():
        raise DataError(f"{job_dir} is not a tiling job (no {JOB_FILE}): pass the --out folder of "
                        "python -m clusiam.tile, or --coords DIR --slides DIR")
    try:
        slides = json.loads(record.read_text())["slides"]
        pairs = [(job_dir / slides[name], job_dir / COORDS / f"{name}.h5") for name in sorted(slides)]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise DataError(f"{record} is not a tiling job record ({type(error).__name__}: {error}): tile the slides "
                        "again with python -m clusiam.tile") from None
    pairs = [(slide, coords) for slide, coords in pairs if coords.is_file()]
    if not pairs:
        raise DataError(f"{job_dir / 'coords'} holds no coordinate file of the {len(slides)} slides in {record}: "
                        "tile the slides again, or pass another job")
    return pairs


def folder_pairs(coords_dir: Path, slides_dir: Path) -> list[tuple[Path, Path]]:
    """(slide file, coordinate file) pairs matched by name (see :func:`slide_name`). A name two
    slides share is refused: either could be the one the coordinates were made from."""
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


def check_slide(slide_path: Path, coords_path: Path, size: int | None, skip: bool) -> tuple[SlidePatches, int]:
    """One slide and its coordinates, checked; the patches outside it left out under ``skip``
    (and counted) or refused."""
    entry: SlideCoords = read_coords(coords_path)
    slide = open_slide(slide_path)
    try:
        width, height = slide.dimensions
        if entry.level0_size not in (None, (width, height)):
            raise DataError(f"{coords_path} was made from a slide of {entry.level0_size[0]} x {entry.level0_size[1]} "
                            f"pixels, but {slide_path} is {width} x {height}: pair each coordinate file with its "
                            "own slide")
        reader = entry.reader(slide, size)
    finally:
        slide.close()
    x, y = entry.coords[:, 0], entry.coords[:, 1]
    inside = ((x >= 0) & (y >= 0) & (x + reader.side0 <= width + EDGE_TOLERANCE)
              & (y + reader.side0 <= height + EDGE_TOLERANCE))
    outside = int((~inside).sum())
    if outside and not skip:
        first = entry.coords[~inside][0]
        raise DataError(f"{coords_path}: {outside} of {len(inside)} patches lie (partly) outside {slide_path} "
                        f"({width} x {height}; e.g. ({first[0]}, {first[1]}) with a side of {reader.side0:g}): "
                        "is this the right slide? Pass --skip_bad_files to leave them out")
    return SlidePatches(slide_path, entry.name, reader, entry.coords[inside]), outside


class SlideSource(PatchSource):
    """The patches of checked slides, read on demand through tiffslide (or openslide)."""

    def __init__(self, slides: Sequence[SlidePatches]) -> None:
        self.entries = list(slides)
        sizes = {entry.reader.size for entry in self.entries}
        if len(sizes) > 1:
            raise DataError(f"the coordinate files give patches of {len(sizes)} sizes ({sorted(sizes)} px): read all "
                            "of them at one size with --patch_size N (pretrain.py) or --resize N (evaluate_knn.py, "
                            "mil.compute_feats)")
        self.offsets = np.cumsum([0, *(len(entry.coords) for entry in self.entries)])
        self._handles: OrderedDict[Path, object] = OrderedDict()
        self._unopenable: dict[Path, object] = {}  # slides this process could not open, and why
        self._pid = os.getpid()

    @classmethod
    def checked(cls, pairs: Sequence[tuple[Path, Path]], size: int | None = None,
                skip: bool = False) -> tuple[SlideSource, Checked]:
        """A source over ``pairs`` of (slide, coordinate file), and the verdict per slide in the
        form the patch-file check gives it, so that a run reports both alike: the slides used
        in full, and each slide or coordinate file that ``skip`` left out in whole or in part, with why."""
        kept, complete, left_out = [], [], []
        for slide_path, coords_path in tqdm(pairs, desc="checking slides", unit="slide"):
            try:
                entry, outside = check_slide(slide_path, coords_path, size, skip)
            except UserError as error:
                if not skip:
                    raise
                left_out.append((slide_path, str(error)))
                continue
            if outside:
                left_out.append((coords_path, f"{outside} of {outside + len(entry.coords)} patches lie outside "
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
        entry, x, y = self.locate(index)
        slide = self._open(entry.path)
        try:
            return entry.reader.read(slide, x, y)
        except Exception as error:  # a slide changed, or failing mid-read: name the patch
            self._handles.pop(entry.path, None)
            raise DataError(f"{entry.path} at ({x}, {y}): could not be read ({type(error).__name__}: "
                            f"{error})") from None

    def describe(self, index: int) -> str:
        entry, x, y = self.locate(index)
        return f"{entry.path} at ({x}, {y})"

    def next_to_try(self, index: int) -> int:
        """Past the whole slide when it cannot be opened (it is listed once, not per patch)."""
        slide = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return int(self.offsets[slide + 1]) if self.entries[slide].path in self._unopenable else index + 1

    def _open(self, path: Path):
        """This process's handle on ``path``: opened once, the least recently used closed beyond OPEN_SLIDES."""
        if os.getpid() != self._pid:  # a forked DataLoader worker: the parent's handles are not ours
            self._handles, self._unopenable, self._pid = OrderedDict(), {}, os.getpid()
        if path in self._handles:
            self._handles.move_to_end(path)
            return self._handles[path]
        if path not in self._unopenable:
            try:
                self._handles[path] = open_slide(path)
            except Exception as error:  # gone, or no longer a slide: every patch of it fails alike
                self._unopenable[path] = error if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
        if path in self._unopenable:
            raise DataError(f"{path}: cannot be opened any more ({self._unopenable[path]})")
        while len(self._handles) > OPEN_SLIDES:
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
        return named_pairs(job_pairs(Path(args.job)))
    return named_pairs(folder_pairs(Path(args.coords), Path(args.slides))) if args.coords else None


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
