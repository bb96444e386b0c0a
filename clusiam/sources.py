"""Where training patches come from: the one seam between data and the training loop.

A :class:`PatchSource` reads patch ``i`` as an 8-bit RGB image and says what it holds: an
``identity`` (a key of exactly these patches, for the statistics cache and resume checks)
and the ``slides`` the patches come from. The loop, the statistics and the view pipelines
see nothing else, so a new kind of source (patches read from slides, say) plugs in without
touching them. :class:`FolderSource` is a list of patch files.
"""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from clusiam.errors import DataError, counted
from clusiam.files import file_list_key
from clusiam.images import load_rgb
from clusiam.kept import Kept, key_of


class SkipLog:
    """The patches left out of a run (``--skip_bad_files``), one ``path<TAB>why`` line each, in a
    file that the checks write first and that every process and DataLoader worker appends to
    when a patch cannot be read later on (a file changed or gone, a decoder error)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.written: set[str] = set()  # by this process: a patch (or slide) failing every epoch is listed once

    def add(self, error: DataError) -> None:
        line = str(error).replace(": ", "\t", 1).replace("\n", " ") + "\n"
        if line in self.written:
            return
        self.written.add(line)
        with open(self.path, "a") as handle:  # one short append per line: writers do not interleave
            handle.write(line)

    def count(self) -> int:
        return len(self.path.read_text().splitlines()) if self.path.is_file() else 0


class PatchSource(ABC):
    """Patches as 8-bit RGB images, with what identifies them."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def read(self, index: int) -> Image.Image:
        """Patch ``index`` as an 8-bit RGB image; a patch that cannot be read is a DataError naming it."""

    def read_many(self, indices: Sequence[int], as_stored: bool = False) -> list:
        """Patches ``indices``: images (:meth:`read`), or with ``as_stored`` pixels (:meth:`pixels`)."""
        return [self.pixels(index) if as_stored else self.read(index) for index in indices]

    def pixels(self, index: int) -> np.ndarray:
        """Patch ``index`` as stored, (H, W, 3) uint8, before any resize to the patch size: for a
        slide without a level at the patches' resolution, more pixels than :meth:`read` gives (the
        views of pretraining resize on the training device, where their crop resizes anyway)."""
        return np.array(self.read(index))

    @property
    def patch_size(self) -> int | None:
        """The side of every patch as :meth:`read` gives it, where :meth:`pixels` may give more; None: as stored."""
        return None

    statistics_patches = 20_000  # patches the channel statistics sample by default (see STATISTICS_SAMPLE)

    def statistics_sample(self, size: int, seed: int) -> np.ndarray:
        """The patches the channel statistics read: ``size`` drawn uniformly (:func:`seeded_sample`)."""
        return seeded_sample(len(self), size, seed)

    def sample_groups(self, indices: np.ndarray) -> np.ndarray:
        """Which draw of :meth:`statistics_sample` each of ``indices`` came from, for the standard
        error of the statistics: each patch its own, where patches are drawn one by one."""
        return np.arange(len(indices))

    def slide_sizes(self) -> list[int] | None:
        """The patches of each slide, when the patches are slide after slide and cheap to read
        only while their slide is open (the training order then keeps each worker on few
        slides: :mod:`clusiam.order`); None when any order reads as fast."""
        return None

    @property
    @abstractmethod
    def identity(self) -> str:
        """A key that changes whenever the patches may have changed."""

    @property
    @abstractmethod
    def slides(self) -> list[str]:
        """The names of the slides the patches come from, sorted."""

    def describe(self, index: int) -> str:
        """Patch ``index`` as a message to the user names it (its file, or its slide and corner)."""
        return f"patch {index}"

    def next_to_try(self, index: int) -> int:
        """After patch ``index`` could not be read, the next patch worth trying: the next one
        (a source whose patches fail together, such as a slide's, skips past them all)."""
        return index + 1

    def dataset(self, transform: Callable[[Image.Image], object], skipped: SkipLog | None = None,
                stand_in: object = None, as_stored: bool = False) -> Dataset:
        """A Dataset of ``transform(patch)``, for DataLoader workers (see :class:`TransformedPatches`);
        with ``as_stored``, of ``transform(pixels)`` (:meth:`pixels`)."""
        return TransformedPatches(self, transform, skipped, stand_in, as_stored)


class TransformedPatches(Dataset):
    """Item ``i``: ``transform`` of patch ``i`` of a source (its image, or with ``as_stored``
    its pixels as stored). A patch that cannot be read stops the run, naming it; with a
    ``skipped`` log (``--skip_bad_files``) it is listed there instead and ``stand_in`` takes
    its place, or, when that is None, the next readable patch (so that batches keep their
    size and every process its share)."""

    def __init__(self, source: PatchSource, transform: Callable[[object], object],
                 skipped: SkipLog | None = None, stand_in: object = None, as_stored: bool = False) -> None:
        self.source = source
        self.transform = transform
        self.skipped = skipped
        self.stand_in = stand_in
        self.as_stored = as_stored

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, indices: list[int]) -> list:
        """Items ``indices`` at once (a DataLoader worker's part of a batch), read together
        (:meth:`PatchSource.read_many`); where one cannot be read, each is read alone, and named,
        listed or replaced as :meth:`__getitem__` says."""
        try:
            patches = self.source.read_many(indices, self.as_stored)
        except DataError:
            return [self[index] for index in indices]
        return [self.transform(patch) for patch in patches]

    def __getitem__(self, index: int):
        position = index
        for _ in range(len(self.source)):
            try:
                patch = self.source.pixels(position) if self.as_stored else self.source.read(position)
                return self.transform(patch)
            except DataError as error:
                if self.skipped is None:
                    raise DataError(f"{error}. Fix or remove it (a run resumes with --resume auto), or pass "
                                    "--skip_bad_files to leave unreadable patches out") from None
                self.skipped.add(error)
                if self.stand_in is not None:
                    return self.stand_in
                position = self.source.next_to_try(position) % len(self.source)
        raise DataError(f"none of the {counted(len(self.source), 'patch', 'patches')} can be read; see "
                        f"{self.skipped.path}")


class FolderSource(PatchSource):
    """Patch image files; the slide of a patch is the folder that holds it (the authors'
    ``root/<class>/<slide>/<patch>.png``)."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> Image.Image:
        return load_rgb(self.files[index])

    def describe(self, index: int) -> str:
        return str(self.files[index])

    @functools.cached_property
    def identity(self) -> str:
        """The file list's key (paths, sizes, modification times)."""
        return file_list_key(self.files)

    @property
    def slides(self) -> list[str]:
        return sorted({path.parent.name for path in self.files})


def _pixel_moments(image: Image.Image) -> torch.Tensor:
    """Per-channel sum, sum of squares (float64) and the pixel count of one image."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float64).reshape(-1, 3) / 255.0)
    count = torch.tensor([float(pixels.shape[0])], dtype=torch.float64)
    return torch.cat([pixels.sum(0), (pixels**2).sum(0), count])


# A folder's statistics are those of a seeded random sample of at most 20,000 patches
# (PatchSource.statistics_patches). A channel's mean over 20,000 patches lies within about
# 0.001 of the whole set's (the means of the CC0 slide's 64 px patches spread by 0.10-0.14,
# and 0.14 / sqrt(20,000) = 0.001; on 100,000 of them the sample's mean and std were within
# 0.0007); reading them takes 5 s from 64 px files on two cores. Slides sample fewer patches,
# slide by slide (SlideSource.statistics_sample): benchmarks/startup.py, RESULTS.md.
STATISTICS_SAMPLE = PatchSource.statistics_patches
STATISTICS_SEED = 0


class Statistics(NamedTuple):
    """Per-channel mean and std of pixel values in [0, 1], and the mean's standard error
    (between the sample's draws: patches, or a slide source's slides)."""

    mean: list[float]
    std: list[float]
    mean_error: list[float] | None  # None from a single draw
    patches: int
    draws: int

    def __str__(self) -> str:
        error = "none from one draw" if self.mean_error is None else np.round(self.mean_error, 4).tolist()
        return (f"mean {np.round(self.mean, 4).tolist()} (standard error {error}), std "
                f"{np.round(self.std, 4).tolist()}, from {counted(self.patches, 'patch', 'patches')} in "
                f"{counted(self.draws, 'draw')}")


def seeded_sample(count: int, sample_size: int, seed: int) -> np.ndarray:
    """Indices of a sample of ``count`` patches: all of them, or ``sample_size`` drawn without
    replacement by ``seed``, sorted (a slide source then reads slide by slide, its workers
    keeping few slides open). The statistics of a folder, the probes and the embedding maps sample so."""
    if count <= sample_size:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, sample_size, replace=False))


def channel_statistics(source: PatchSource, num_workers: int = 0, skipped: SkipLog | None = None,
                       sample_size: int | None = None, seed: int = STATISTICS_SEED) -> Statistics:
    """Per-channel mean and std over every pixel of the patches the source's
    :meth:`~PatchSource.statistics_sample` picks (``sample_size``, default the source's
    ``statistics_patches``); with ``skipped``, over those that can be read (the others are
    listed there)."""
    sample = source.statistics_sample(sample_size or source.statistics_patches, seed)
    groups = np.unique(source.sample_groups(sample), return_inverse=True)[1].reshape(-1)
    dataset = source.dataset(_pixel_moments, skipped, stand_in=torch.zeros(7, dtype=torch.float64))
    loader = DataLoader(Subset(dataset, sample.tolist()), batch_size=64, num_workers=num_workers, shuffle=False)
    totals = np.zeros((groups.max(initial=0) + 1, 7))
    done = 0
    for moments in tqdm(loader, desc="channel statistics", unit="batch"):
        np.add.at(totals, groups[done:done + len(moments)], moments.numpy())
        done += len(moments)
    count = totals[:, 6].sum()
    mean = totals[:, :3].sum(0) / count
    std = np.sqrt(np.clip(totals[:, 3:6].sum(0) / count - mean**2, 0, None))
    draws = len(totals)
    residuals = totals[:, :3] - mean * totals[:, 6:7]  # the ratio estimator's linearisation, draw by draw
    error = np.sqrt(draws / (draws - 1) * (residuals**2).sum(0)) / count if draws > 1 else None
    return Statistics(mean.tolist(), std.tolist(), None if error is None else error.tolist(), len(sample), draws)


STATISTICS = Kept("channel_statistics")


def cached_channel_statistics(source: PatchSource, num_workers: int = 0, skipped: SkipLog | None = None,
                              sample_size: int | None = None, seed: int = STATISTICS_SEED) -> Statistics:
    """:func:`channel_statistics`, kept (:mod:`clusiam.kept`) for any later run over a source of
    the same identity with the same sample (its size and seed), and said on the console."""
    key = key_of(source.identity, len(source), sample_size or source.statistics_patches, seed)
    kept = STATISTICS.get([key]).get(key)
    statistics = Statistics(**kept) if kept else channel_statistics(source, num_workers, skipped, sample_size, seed)
    if not kept:
        STATISTICS.put({key: statistics._asdict()})
    print(f"channel statistics{' (kept from an earlier run)' if kept else ''}: {statistics}")
    return statistics
