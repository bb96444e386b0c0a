"""Where training patches come from: the one seam between data and the training loop.

A :class:`PatchSource` reads patch ``i`` as an 8-bit RGB image and says what it holds: an
``identity`` (a key of exactly these patches, for the statistics cache and resume checks)
and the ``slides`` the patches come from. The loop, the statistics and the view pipelines
see nothing else, so a new kind of source (patches read from slides, say) plugs in without
touching them. :class:`FolderSource` is a list of patch files.
"""
from __future__ import annotations

import functools
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clusiam.errors import DataError
from clusiam.files import file_list_key, write_atomically
from clusiam.images import load_rgb


class SkipLog:
    """The patches left out of a run (``--skip_bad_files``), one ``path<TAB>why`` line each, in a
    file that the checks write first and that every process and DataLoader worker appends to
    when a patch cannot be read later on (a file changed or gone, a decoder error)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, error: DataError) -> None:
        with open(self.path, "a") as handle:  # one short append per line: writers do not interleave
            handle.write(str(error).replace(": ", "\t", 1).replace("\n", " ") + "\n")

    def count(self) -> int:
        return len(self.path.read_text().splitlines()) if self.path.is_file() else 0


class PatchSource(ABC):
    """Patches as 8-bit RGB images, with what identifies them."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def read(self, index: int) -> Image.Image:
        """Patch ``index`` as an 8-bit RGB image; a patch that cannot be read is a DataError naming it."""

    @property
    @abstractmethod
    def identity(self) -> str:
        """A key that changes whenever the patches may have changed."""

    @property
    @abstractmethod
    def slides(self) -> list[str]:
        """The names of the slides the patches come from, sorted."""

    def dataset(self, transform: Callable[[Image.Image], object], skipped: SkipLog | None = None,
                stand_in: object = None) -> Dataset:
        """A Dataset of ``transform(patch)``, for DataLoader workers (see :class:`TransformedPatches`)."""
        return TransformedPatches(self, transform, skipped, stand_in)


class TransformedPatches(Dataset):
    """Item ``i``: ``transform`` of patch ``i`` of a source. A patch that cannot be read stops
    the run, naming it; with a ``skipped`` log (``--skip_bad_files``) it is listed there
    instead and ``stand_in`` takes its place, or, when that is None, the next readable patch
    (so that batches keep their size and every process its share)."""

    def __init__(self, source: PatchSource, transform: Callable[[Image.Image], object],
                 skipped: SkipLog | None = None, stand_in: object = None) -> None:
        self.source = source
        self.transform = transform
        self.skipped = skipped
        self.stand_in = stand_in

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        for offset in range(len(self.source)):
            try:
                return self.transform(self.source.read((index + offset) % len(self.source)))
            except DataError as error:
                if self.skipped is None:
                    raise DataError(f"{error}. Fix or remove it (a run resumes with --resume auto), or pass "
                                    "--skip_bad_files to leave unreadable patches out") from None
                self.skipped.add(error)
                if self.stand_in is not None:
                    return self.stand_in
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


def channel_statistics(source: PatchSource, num_workers: int = 0,
                       skipped: SkipLog | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over every pixel of the source's patches (values in [0, 1]);
    with ``skipped``, over those that can be read (the others are listed there)."""
    dataset = source.dataset(_pixel_moments, skipped, stand_in=torch.zeros(7, dtype=torch.float64))
    loader = DataLoader(dataset, batch_size=64, num_workers=num_workers, shuffle=False)
    total = torch.zeros(7, dtype=torch.float64)
    for moments in tqdm(loader, desc="channel statistics", unit="batch"):
        total += moments.sum(0)
    count = total[6]
    mean = total[:3] / count
    std = (total[3:6] / count - mean**2).clamp(min=0).sqrt()
    return mean.tolist(), std.tolist()


def cached_channel_statistics(source: PatchSource, cache_path: Path, num_workers: int = 0,
                              skipped: SkipLog | None = None) -> tuple[list[float], list[float]]:
    """:func:`channel_statistics`, reused from ``cache_path`` when it was computed over a
    source of the same identity and recomputed otherwise."""
    key = source.identity
    if cache_path.is_file():
        try:
            cached = json.loads(cache_path.read_text())
        except ValueError:  # a damaged cache is only a cache: compute the statistics again
            cached = {}
        if cached.get("file_list_key") == key:
            return cached["mean"], cached["std"]
    mean, std = channel_statistics(source, num_workers, skipped)
    record = {"file_list_key": key, "num_files": len(source), "mean": mean, "std": std}
    write_atomically(cache_path, lambda temporary: temporary.write_text(json.dumps(record)))
    return mean, std
