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

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from clusiam.errors import DataError
from clusiam.files import file_list_key, read_cache, write_cache
from clusiam.images import load_rgb


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
        raise DataError(f"none of the {len(self.source)} patches can be read; see {self.skipped.path}")


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


# The statistics are those of a seeded random sample of at most this many patches. A channel's
# mean over 20,000 patches lies within about 0.001 of the whole set's (the means of the CC0
# slide's 64 px patches spread by 0.10-0.14, and 0.14 / sqrt(20,000) = 0.001; on 100,000 of
# them the sample's mean and std were within 0.0007). Reading 20,000 takes 5 s from 64 px files
# and 43 s from slides at 224 px on two cores, against 22 s for all 100,000 files and over half
# an hour for a million patches from slides (benchmarks/startup.py, RESULTS.md).
STATISTICS_SAMPLE = 20_000
STATISTICS_SEED = 0


def seeded_sample(count: int, sample_size: int, seed: int) -> np.ndarray:
    """Indices of a sample of ``count`` patches: all of them, or ``sample_size`` drawn without
    replacement by ``seed``, sorted (a slide source then reads slide by slide, its workers
    keeping few slides open). The statistics, the probes and the embedding maps sample so."""
    if count <= sample_size:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, sample_size, replace=False))


def channel_statistics(source: PatchSource, num_workers: int = 0, skipped: SkipLog | None = None,
                       sample_size: int = STATISTICS_SAMPLE,
                       seed: int = STATISTICS_SEED) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over every pixel of the patches :func:`seeded_sample`
    picks (values in [0, 1]); with ``skipped``, over those that can be read (the others are
    listed there)."""
    dataset = source.dataset(_pixel_moments, skipped, stand_in=torch.zeros(7, dtype=torch.float64))
    sample = Subset(dataset, seeded_sample(len(source), sample_size, seed).tolist())
    loader = DataLoader(sample, batch_size=64, num_workers=num_workers, shuffle=False)
    total = torch.zeros(7, dtype=torch.float64)
    for moments in tqdm(loader, desc="channel statistics", unit="batch"):
        total += moments.sum(0)
    count = total[6]
    mean = total[:3] / count
    std = (total[3:6] / count - mean**2).clamp(min=0).sqrt()
    return mean.tolist(), std.tolist()


def cached_channel_statistics(source: PatchSource, cache_path: Path, num_workers: int = 0,
                              skipped: SkipLog | None = None, sample_size: int = STATISTICS_SAMPLE,
                              seed: int = STATISTICS_SEED) -> tuple[list[float], list[float]]:
    """:func:`channel_statistics`, reused from ``cache_path`` when it was computed over a
    source of the same identity with the same sample (its size and seed, which the cache
    records), and recomputed otherwise."""
    sample = {"file_list_key": source.identity, "num_files": len(source),
              "sample_size": min(len(source), sample_size), "sample_seed": seed}
    cached = read_cache(cache_path)
    if {name: cached.get(name) for name in sample} == sample:
        return cached["mean"], cached["std"]
    mean, std = channel_statistics(source, num_workers, skipped, sample_size, seed)
    write_cache(cache_path, {**sample, "mean": mean, "std": std})
    return mean, std
