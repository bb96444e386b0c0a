"""Batched encoding of patches with a frozen encoder, shared by ``evaluate_knn.py``,
``mil/`` and the slide map: uint8 batches from DataLoader workers, normalised on the device,
bf16 autocast and channels_last on GPU, no_grad, a progress bar, and an optional on-disk
cache.

The patches are a :class:`~clusiam.sources.PatchSource`, so patch files
(:class:`~clusiam.sources.FolderSource`, or a plain list of files) and patches read straight
from slides (:class:`~clusiam.slide_source.SlideSource`) go through the same code and give
the same features for the same pixels. Under torchrun, :func:`cached_encode` splits the
patches over the processes: each encodes its share into a part file and rank 0 assembles
them in the original order.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clusiam.distributed import barrier, gather_to_main, is_main, main_computes, rank, shard, world_size
from clusiam.errors import DataError
from clusiam.files import write_atomically
from clusiam.images import uint8_tensor
from clusiam.models import PretrainModel
from clusiam.sources import FolderSource, PatchSource

FEATURE_TYPES = ("backbone", "projector")
CACHE_VERSION = 1
Patches = PatchSource | Sequence[Path]  # what the encoders take: a source, or patch files


def as_source(patches: Patches) -> PatchSource:
    """``patches`` as a source: a list of files becomes a :class:`FolderSource`."""
    return patches if isinstance(patches, PatchSource) else FolderSource(patches)


class PatchTensors(Dataset):
    """Patches ``indices`` (default: all) of a source as uint8 (3, H, W) tensors, all of one
    size (``size`` makes them so); the size to match is patch 0's, so every process of a
    sharded run checks against the same one."""

    def __init__(self, source: PatchSource, size: int | None = None, indices: Sequence[int] | None = None) -> None:
        self.source = source
        self.indices = range(len(source)) if indices is None else indices
        self.size = size
        self.expected = source.read(0).size if len(source) and size is None else (size, size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> torch.Tensor:
        index = self.indices[item]
        return self.tensor(index, self.source.read(index))

    def __getitems__(self, items: list[int]) -> list[torch.Tensor]:
        """Items at once (a DataLoader batch): each slide's patches read together (:meth:`PatchSource.read_many`)."""
        indices = [self.indices[item] for item in items]
        return [self.tensor(index, image) for index, image in zip(indices, self.source.read_many(indices))]

    def tensor(self, index: int, image: Image.Image) -> torch.Tensor:
        """Patch ``index`` (its ``image``) as a tensor of the expected size."""
        if self.size is not None and image.size != self.expected:
            image = image.resize(self.expected, resample=Image.BILINEAR)
        elif image.size != self.expected:
            width, height = self.expected
            raise DataError(
                f"{self.source.describe(index)} is {image.size[0]}x{image.size[1]} but the first patch is "
                f"{width}x{height}: pass --resize N to bring all patches to one size"
            )
        return uint8_tensor(image)


class PixelFeatures(nn.Module):
    """The raw-pixel baseline: the normalised image average-pooled to size x size, flattened."""

    def __init__(self, size: int = 16) -> None:
        super().__init__()
        self.size = size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images, self.size).flatten(1)


def feature_extractor(model: PretrainModel, feature: str = "backbone") -> nn.Module:
    """The part of a pretrained network whose output is the feature: the pooled backbone
    (the paper's choice) or backbone + projector."""
    if feature not in FEATURE_TYPES:
        raise ValueError(f"--feature {feature!r} is unknown; choose one of {', '.join(FEATURE_TYPES)}")
    return model.backbone if feature == "backbone" else nn.Sequential(model.backbone, model.projector)


def cluster_head(model: PretrainModel, feature: str = "backbone") -> nn.Module | None:
    """What maps a ``feature`` (see :func:`feature_extractor`) to the cluster assigner's
    logits, so clusters come from features already computed; None without a cluster head."""
    if not model.method.clustered:
        return None
    assigner = [model.cluster_projector, model.cluster_assigner]
    return nn.Sequential(model.projector, *assigner) if feature == "backbone" else nn.Sequential(*assigner)


@torch.no_grad()
def assign_clusters(head: nn.Module, features: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Each feature row's cluster (argmax of the assigner's logits), the head in eval mode
    (BatchNorm from its running statistics) and left in the mode it was in."""
    device = next(head.parameters()).device
    was_training = head.training
    head.eval()
    try:
        logits = [head(torch.from_numpy(np.asarray(features[i : i + chunk], dtype=np.float32)).to(device)).argmax(1)
                  for i in range(0, len(features), chunk)]
    finally:
        head.train(was_training)
    return torch.cat(logits).cpu().numpy() if logits else np.empty(0, dtype=np.int64)


def precision(device: torch.device) -> str:
    """What :func:`encode` computes in on ``device``: bf16 autocast on GPU, fp32 on CPU. The
    features differ slightly, so caches and feature bags record it."""
    return "bf16" if device.type == "cuda" else "fp32"


@torch.no_grad()
def encode(encoder: nn.Module, patches: Patches, mean: Sequence[float], std: Sequence[float],
           device: torch.device, batch_size: int = 256, num_workers: int = 4, resize: int | None = None,
           allocate: Callable[[tuple[int, int]], np.ndarray] | None = None, desc: str = "encoding",
           indices: Sequence[int] | None = None) -> np.ndarray:
    """Features (N, D) float32 of ``patches`` (or of their ``indices``, a process's share)
    in order, in the array ``allocate((N, D))`` returns once the first batch tells D (a
    memory map, say); (0, 0) for no patches."""
    on_gpu = device.type == "cuda"
    memory_format = torch.channels_last if on_gpu else torch.preserve_format
    encoder = encoder.eval().to(device, memory_format=memory_format)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    dataset = PatchTensors(as_source(patches), resize, indices)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=on_gpu)
    start, out = 0, None
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not is_main()):
        images = batch.to(device, non_blocking=True, memory_format=memory_format).float().div_(255)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision(device) == "bf16"):
            features = encoder((images - mean_t) / std_t).float().cpu().numpy()
        if not np.isfinite(features).all():  # NaN features would still "find" neighbours and score
            first = dataset.source.describe(dataset.indices[start])
            raise DataError(f"the encoder gave NaN or infinite features for {first} (batch from patch {start}): "
                            "its weights are broken; use an earlier checkpoint")
        if out is None:
            shape = (len(dataset), features.shape[1])
            out = allocate(shape) if allocate else np.empty(shape, dtype=np.float32)
        out[start : start + len(features)] = features
        start += len(features)
    return out if out is not None else np.empty((0, 0), dtype=np.float32)


def write_features(path: Path, compute: Callable[[Callable[[tuple[int, int]], np.ndarray]], np.ndarray]) -> None:
    """Write the (N, D) float32 features that ``compute(allocate)`` produces to ``path``
    (.npy) through a memory map, atomically."""

    def write(temporary: Path) -> None:
        out = compute(lambda shape: np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float32, shape=shape))
        if isinstance(out, np.memmap):
            out.flush()
        else:  # nothing was allocated (no patches)
            np.save(temporary, out)

    write_atomically(path, write)


def cached_encode(cache_dir: Path, identity: str, encoder: nn.Module, patches: Patches,
                  mean: Sequence[float], std: Sequence[float], device: torch.device,
                  **options) -> tuple[np.ndarray, bool]:
    """:func:`encode`, stored as ``cache_dir/<key>.npy`` and memory-mapped back. The key
    covers ``identity`` (which encoder: e.g. the checkpoint's content digest and feature
    type), the patches' own identity (for files: the exact file list), the normalisation,
    the precision and the options. Returns the features and whether they came from the cache."""
    source = as_source(patches)
    key_text = "\n".join([f"v{CACHE_VERSION}", identity, source.identity, repr(list(mean)), repr(list(std)),
                          precision(device), repr(options.get("resize"))])
    path = Path(cache_dir) / f"{hashlib.sha256(key_text.encode()).hexdigest()[:32]}.npy"
    if main_computes(path.is_file):  # every process takes the same branch
        return np.load(path, mmap_mode="r"), True
    path.parent.mkdir(parents=True, exist_ok=True)
    processes = world_size()
    if processes == 1:
        write_features(path, lambda allocate: encode(encoder, source, mean, std, device, **options, allocate=allocate))
        return np.load(path, mmap_mode="r"), False
    parts = [path.with_name(f"{path.stem}.part{r}of{processes}.npy") for r in range(processes)]
    write_features(parts[rank()], lambda allocate: encode(encoder, source, mean, std, device, **options,
                                                          allocate=allocate, indices=shard(range(len(source)))))
    barrier()
    if is_main():
        shards = [np.load(part, mmap_mode="r") for part in parts]
        write_features(path, lambda allocate: interleave(shards, len(source), allocate))
        for part in parts:
            part.unlink()
    barrier()
    return np.load(path, mmap_mode="r"), False


def interleave(shards: Sequence[np.ndarray], count: int,
               allocate: Callable[[tuple[int, int]], np.ndarray] | None = None) -> np.ndarray:
    """The features of ``count`` patches in order, from the shards of :func:`clusiam.distributed.shard`
    (shard r holds patches r, r + processes, ...), in the array ``allocate`` gives."""
    dim = max(features.shape[1] for features in shards)
    out = allocate((count, dim)) if allocate else np.empty((count, dim), dtype=np.float32)
    for r, features in enumerate(shards):
        if len(features):  # a process with no patches (fewer patches than processes) has (0, 0)
            out[r :: len(shards)] = features
    return out


def encode_shared(encoder: nn.Module, patches: Patches, mean: Sequence[float], std: Sequence[float],
                  device: torch.device, **options) -> np.ndarray | None:
    """:func:`encode`, each torchrun process encoding its share, gathered in memory on rank 0
    (the other processes get None): for sets that fit in memory and are not kept, such as
    the probes a run takes while it trains."""
    if world_size() == 1:
        return encode(encoder, patches, mean, std, device, **options)
    source = as_source(patches)
    mine = encode(encoder, source, mean, std, device, **options, indices=shard(range(len(source))))
    shards = gather_to_main(mine)
    return interleave(shards, len(source)) if is_main() else None
