"""Patches read straight from whole-slide images: a tiling job, or TRIDENT / CLAM coordinate
files beside a folder of slides, is a :class:`~clusiam.sources.PatchSource` like a folder
of patch files, and no patch is written to disk.

    SlideSource.checked(job_pairs(JOB_DIR))                       # python -m clusiam.tile --out JOB_DIR
    SlideSource.checked(folder_pairs(COORDS_DIR, SLIDES_DIR))     # TRIDENT's or CLAM's coordinates

Checks are per slide: the slide opens, it is the slide its coordinates were made from (the
level-0 size, where the file records it), the tiles of the level its patches are read from
lie within the file, no patch lies wholly outside it, and the patches of all slides have one
size. They run on every core, and each slide's verdict is kept (:mod:`clusiam.kept`) under
its file's and its coordinate file's size and modification time, so that a cohort is
checked once, not once per run; a changed file is checked again. Opening a scanner-size
slide costs about 60 ms of parsing (tifffile reads every level's tile index), two minutes of
one core for 2,000 slides: pretraining (``defer``) leaves a slide whose coordinate file
records its size and field of view (TRIDENT's, the tiler's) to the process that first opens
it to read, which checks it then, before reading any of its pixels. A patch that reaches
past the slide's edge (TRIDENT's grid runs while x < width; CLAM pads) is read padded with
black, as TRIDENT and CLAM read it through OpenSlide. A slide that fails is a named error,
or with ``skip`` left out and listed. Each process (and DataLoader worker) keeps its own
slides open, the least recently used closed beyond ``open_slides``; the training order
(:mod:`clusiam.order`) keeps each worker on a few slides at a time.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
from collections import OrderedDict
from collections.abc import Collection, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from clusiam.coords import COORDS, JOB_FILE, SlideCoords, read_coords
from clusiam.errors import ConfigError, DataError, SlideError, UserError
from clusiam.files import find_files
from clusiam.images import Checked
from clusiam.kept import Kept, key_of
from clusiam.machine import cores
from clusiam.slides import SLIDE_EXTENSIONS, LevelTiles, PatchReader, SlideLevel, level_of, open_slide
from clusiam.sources import PatchSource
from clusiam.storage import absolute, join, location, version

# Slides each process keeps open by default (least recently used closed first); an open
# scanner-size slide costs a few MiB when read tile by tile (clusiam.slides.LevelTiles).
OPEN_SLIDES = 64
TRIDENT_SUFFIX = "_patches"  # TRIDENT names a slide's coordinate file <slide>_patches.h5
Pair = tuple[Path, Path]  # a slide file and its coordinate file


@dataclass(frozen=True)
class SlidePatches:
    """One slide's patches: its file, its coordinate file as read, the corners (level-0 pixels)
    read, at ``size`` px, and how its pyramid gives them (None: not checked yet, found by the
    process that opens the slide)."""

    path: Path
    listed: SlideCoords
    coords: np.ndarray
    size: int
    reader: PatchReader | None = None

    @property
    def name(self) -> str:
        return self.listed.name

    def key(self) -> str:
        """A key that changes with the slide's file (path, size, modification time), what a patch
        covers, or any corner: for caches and reruns that must not reuse stale work."""
        listed = self.listed
        digest = hashlib.sha256(f"{self.path}\t{version(self.path)}\t{listed.side0}\t{listed.clam_level}\t"
                                f"{listed.size}\t{self.size}\n".encode())
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


def slide_reader(slide, slide_path: Path, listed: SlideCoords, size: int) -> PatchReader:
    """How ``listed``'s patches are read from the open ``slide`` at ``size`` px; refused when
    the coordinate file records the size of another slide."""
    width, height = slide.dimensions
    if listed.level0_size not in (None, (width, height)):
        raise DataError(f"{listed.path} was made from a slide of {listed.level0_size[0]} x {listed.level0_size[1]} "
                        f"pixels, but {slide_path} is {width} x {height}: pair each coordinate file with its own slide")
    return listed.reader(slide, size)


def slide_verdict(slide_path: Path, listed: SlideCoords, size: int) -> dict:
    """The slide opened and checked (see the module's docstring): its level-0 size and how its
    patches are read, as kept."""
    level, reader, (width, height) = open_patches(SlidePatches(slide_path, listed, listed.coords[:0], size))
    level.close()
    return {"width": width, "height": height, "reader": dataclasses.asdict(reader)}


def open_patches(entry: SlidePatches) -> tuple[LevelTiles | SlideLevel, PatchReader, tuple[int, int]]:
    """The level of ``entry``'s slide its patches are read from (a truncated file refused),
    how, and the slide's level-0 size: the slide checked as it opens, by the check before a
    run and again by the process that reads it."""
    slide = open_slide(entry.path)
    try:
        reader = slide_reader(slide, entry.path, entry.listed, entry.size)
        if entry.reader not in (None, reader):
            raise DataError(f"{entry.path} changed since it was checked (its patches are now read as {reader}, not "
                            f"{entry.reader}): start the run again")
        dimensions = tuple(slide.dimensions)
    except BaseException:
        slide.close()
        raise
    return level_of(slide, entry.path, reader.level), reader, dimensions


CHECKS = Kept("slide_checks")


def check_key(slide_path: Path, listed: SlideCoords, size: int) -> str | UserError:
    """What a slide's verdict is kept under: both files (path, size, modification time) and the
    patch size; the error of a slide that is not there."""
    try:
        slide_version = version(slide_path)
    except OSError as error:
        return SlideError(f"{slide_path}: not a readable slide ({type(error).__name__}: {error.strerror or error})")
    return key_of(absolute(slide_path), slide_version, absolute(listed.path), version(listed.path), size)


def verdict_or_error(slide_path: Path, listed: SlideCoords, size: int) -> dict | UserError:
    """:func:`slide_verdict`, or the error that refuses the slide (for a pool of processes to return)."""
    try:
        return slide_verdict(slide_path, listed, size)
    except UserError as error:
        return error


def verdicts(checks: Sequence[tuple[Path, SlideCoords, int]]) -> list[dict | UserError]:
    """:func:`verdict_or_error` of each (slide, coordinates, size), in order, on every core."""
    if not checks:
        return []
    processes = min(len(checks), cores())
    bar = functools.partial(tqdm, total=len(checks), desc="checking slides", unit="slide")
    if processes <= 1:
        return [verdict_or_error(*check) for check in bar(checks)]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(bar(pool.map(verdict_or_error, *zip(*checks), chunksize=4)))


def kept_verdicts(slides: Sequence[Path], coords: Sequence[SlideCoords | UserError], size: int | None,
                  defer: bool) -> list[dict | UserError | None]:
    """Each slide's verdict: kept from an earlier check of the same files, else checked now and
    kept; None for a slide whose check ``defer`` leaves to its first reader (its coordinate
    file records its size and field of view); the error of a slide that is not there or whose
    coordinates could not be read."""
    def key(slide: Path, listed: SlideCoords | UserError) -> str | UserError:
        return listed if isinstance(listed, UserError) else check_key(slide, listed, size or listed.size)

    with ThreadPoolExecutor(32) as pool:  # a file's size and time: a request each in object storage
        keys = list(pool.map(key, slides, coords))
    found: dict[str, dict | UserError] = CHECKS.get(key for key in keys if isinstance(key, str))
    needed = [i for i, (key, listed) in enumerate(zip(keys, coords)) if isinstance(key, str) and key not in found
              and not (defer and listed.level0_size and listed.side0)]
    checked = verdicts([(slides[i], coords[i], size or coords[i].size) for i in needed])
    fresh = {keys[i]: verdict for i, verdict in zip(needed, checked)}
    CHECKS.put({key: verdict for key, verdict in fresh.items() if not isinstance(verdict, UserError)})
    found.update(fresh)
    return [found.get(key) if isinstance(key, str) else key for key in keys]


def coords_or_error(coords_path: Path) -> SlideCoords | UserError:
    """The coordinate file read, or why it cannot be."""
    try:
        return read_coords(coords_path)
    except UserError as error:
        return error
    except OSError as error:  # gone since it was listed
        return DataError(f"{coords_path}: cannot be read ({error.strerror or error})")


def slide_patches(slide_path: Path, listed: SlideCoords, size: int, verdict: dict | None, skip: bool,
                  skip_advice: str | None) -> tuple[SlidePatches, int]:
    """The patches of a checked slide, and how many lie wholly outside it, which ``skip``
    leaves out or else are refused, with ``skip_advice`` (the flag that leaves them out, where
    the command has one). Without a ``verdict`` (left to the first reader) the slide's size is
    the one its coordinate file records."""
    reader = None if verdict is None else PatchReader(**verdict["reader"])
    width, height = listed.level0_size if verdict is None else (verdict["width"], verdict["height"])
    side0 = listed.side0 if reader is None else reader.side0
    x, y = listed.coords[:, 0], listed.coords[:, 1]
    overlaps = (x < width) & (y < height) & (x + side0 > 0) & (y + side0 > 0)
    outside = int((~overlaps).sum())
    if outside and not skip:
        first = listed.coords[~overlaps][0]
        advice = f"; {skip_advice}" if skip_advice else ""
        raise DataError(f"{listed.path}: {outside} of {len(overlaps)} patches lie wholly outside {slide_path} "
                        f"({width} x {height}; e.g. ({first[0]}, {first[1]}) with a side of {side0:g}): "
                        f"is this the right slide?{advice}")
    corners = listed.coords[overlaps] if outside else listed.coords
    return SlidePatches(slide_path, dataclasses.replace(listed, coords=corners[:0]), corners, size, reader), outside


class SlideSource(PatchSource):
    """The patches of checked slides, read on demand through tiffslide (or openslide)."""

    def __init__(self, slides: Sequence[SlidePatches]) -> None:
        self.entries = list(slides)
        self.open_slides = OPEN_SLIDES  # slides this process keeps open (pretraining: by --slides_per_batch)
        sizes = {entry.size for entry in self.entries}
        if len(sizes) > 1:
            raise DataError(f"the coordinate files give patches of {len(sizes)} sizes ({sorted(sizes)} px): read all "
                            "of them at one size: with --patch_size N in pretrain.py, with --resize N in "
                            "evaluate_knn.py or python -m mil.compute_feats")
        self.offsets = np.cumsum([0, *(len(entry.coords) for entry in self.entries)])
        self._handles: OrderedDict[Path, tuple[LevelTiles | SlideLevel, PatchReader]] = OrderedDict()
        self._unopenable: dict[Path, object] = {}  # slides this process could not open, and why
        self._pid = os.getpid()

    @classmethod
    def checked(cls, pairs: Sequence[tuple[Path, Path]], size: int | None = None, skip: bool = False,
                skip_advice: str | None = None, defer: bool = False) -> tuple[SlideSource, Checked]:
        """A source over ``pairs`` of (slide, coordinate file), each checked (:func:`kept_verdicts`;
        ``defer`` leaves some to their first reader), and the verdict per slide in the form
        the patch-file check gives it, so that a run reports both alike: the slides used in
        full, and each slide or coordinate file that ``skip`` left out in whole or in part,
        with why. ``skip_advice`` ends a refusal where the command can leave bad slides out."""
        coords = [coords_or_error(coords_path) for _, coords_path in tqdm(pairs, desc="reading coordinates",
                                                                           unit="slide")]
        checks = kept_verdicts([slide for slide, _ in pairs], coords, size, defer)
        kept, complete, left_out = [], [], []
        for (slide_path, coords_path), listed, verdict in zip(pairs, coords, checks):
            try:
                if isinstance(verdict, UserError):
                    raise verdict
                entry, outside = slide_patches(slide_path, listed, size or listed.size, verdict, skip, skip_advice)
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
            which = "the one slide cannot" if len(pairs) == 1 else f"none of the {len(pairs):,} slides can"
            raise DataError(f"{which} be read{first}")
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
            level, reader = self._open(entry)
            try:
                pixels = reader.pixels(level, corners.tolist())
            except Exception as error:  # a slide changed, or failing mid-read: name it (and the patch, if one)
                self._handles.pop(entry.path, None)
                where = f" at ({corners[0][0]}, {corners[0][1]})" if len(corners) == 1 else ""
                raise DataError(f"{entry.path}{where}: could not be read ({type(error).__name__}: {error})") from None
            for place, patch in zip(places, pixels):
                patches[place] = patch if as_stored else reader.resized(patch)
        return patches

    def slide_sizes(self) -> list[int]:
        return [len(entry.coords) for entry in self.entries]

    # The statistics read slide by slide: 64 draws of a slide, each slide drawn with a chance
    # proportional to its patches, then 64 of its patches drawn uniformly for each time it was
    # drawn, so that every patch is as likely to be read and the pooled pixels estimate the
    # whole set's. Opening a scanner-size slide costs more than reading 100 patches of an open
    # one, so this reads 4,096 patches from at most 64 slides in about the time a uniform
    # sample of 20,000 (from 2,000 slides) spends opening slides; the estimate's standard
    # error, between slides, is said with it (benchmarks/startup.py, RESULTS.md).
    statistics_patches = 64 * 64
    PATCHES_PER_DRAW = 64

    def statistics_sample(self, size: int, seed: int) -> np.ndarray:
        sizes = np.asarray(self.slide_sizes())
        if len(self) <= size:
            return np.arange(len(self))
        rng = np.random.default_rng(seed)
        draws = rng.multinomial(-(-size // self.PATCHES_PER_DRAW), sizes / sizes.sum())
        return np.concatenate([start + np.sort(rng.choice(count, min(count, drawn * self.PATCHES_PER_DRAW),
                                                          replace=False))
                               for start, count, drawn in zip(self.offsets, sizes, draws) if drawn])

    def sample_groups(self, indices: np.ndarray) -> np.ndarray:
        """The slide of each patch: the statistics' draws are slides."""
        return np.searchsorted(self.offsets, indices, side="right") - 1

    def describe(self, index: int) -> str:
        entry, x, y = self.locate(index)
        return f"{entry.path} at ({x}, {y})"

    def next_to_try(self, index: int) -> int:
        """Past the whole slide when it cannot be opened (it is listed once, not per patch)."""
        slide = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return int(self.offsets[slide + 1]) if self.entries[slide].path in self._unopenable else index + 1

    def _open(self, entry: SlidePatches) -> tuple[LevelTiles | SlideLevel, PatchReader]:
        """This process's reader of ``entry``'s level, and how its patches are read: opened once
        (:func:`open_patches`), the least recently used closed beyond ``open_slides``."""
        if os.getpid() != self._pid:  # a forked DataLoader worker: the parent's handles are not ours
            self._handles, self._unopenable, self._pid = OrderedDict(), {}, os.getpid()
        path = entry.path
        if path in self._handles:
            self._handles.move_to_end(path)
            return self._handles[path]
        if path not in self._unopenable:
            try:
                self._handles[path] = open_patches(entry)[:2]
            except Exception as error:  # gone, or no longer a slide: every patch of it fails alike
                self._unopenable[path] = error if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
        if path in self._unopenable:
            raise DataError(f"{path}: cannot be opened ({self._unopenable[path]})")
        while len(self._handles) > self.open_slides:
            self._handles.popitem(last=False)[1][0].close()
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
        return self.entries[0].size

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
