"""The order an epoch reads its patches in, cut into the batches each process and each
DataLoader worker reads.

Patches read from slides are cheap only while their slide stays open: a uniform shuffle
over a cohort sends every worker to a different slide at nearly every read, and opening a
scanner's file costs tens of milliseconds and tens of MiB. So, for a source of slides
(:meth:`EpochOrder.of_slides`), an epoch is laid out in **lanes**:

1. the slides, in a new random order each epoch, are dealt out to ``slides_per_batch``
   lanes, each slide to the lane that holds the fewest patches so far (so the lanes hold
   about as many patches each);
2. a lane is its slides one after the other, each slide's patches in a random order of their own;
3. every lane is spread evenly over the whole epoch (its j-th patch at time (j + u) / L, with
   L its length and u a random phase), and the epoch is all lanes merged by time, cut into
   global batches of ``batch_size``, the last partial batch dropped.

So every global batch takes about batch_size / slides_per_batch patches from each lane,
i.e. from at least min(batch size, slides_per_batch, slides) distinct slides (when the lanes
are about as long, which dealing by size gives unless one slide outweighs the rest), while
each lane moves through its slides one at a time. Within a batch the patches are grouped by
lane; process r takes the r-th of ``world_size`` equal slices and cuts it into one part per
DataLoader worker, which PyTorch hands out in turn, so that worker j always reads part j:
the same few lanes, hence the same few open slides, batch after batch. The global batch of
each step is the same patches for any number of processes and workers, and depends only on
the seed, the epoch and the source, so a resumed epoch reads what an uninterrupted one would.

Patch files have no such cost: their epoch is a uniform shuffle (:meth:`EpochOrder.shuffled`,
the paper's recipe), cut the same way.
"""
from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

SLIDES_PER_BATCH = 32  # lanes: each global batch mixes at least this many slides, when there are as many


def epoch_rng(seed: int, epoch: int, *keys: int) -> np.random.Generator:
    """A random stream that depends only on the seed, the epoch and ``keys``."""
    return np.random.default_rng([seed, epoch, *keys])


def deal(sizes: np.ndarray, order: np.ndarray, lanes: int) -> list[list[int]]:
    """The slides of each lane: ``order``'s slides, each to the lane with the fewest patches so far."""
    heap = [(0, lane) for lane in range(lanes)]
    members: list[list[int]] = [[] for _ in range(lanes)]
    for slide in order:
        total, lane = heapq.heappop(heap)
        members[lane].append(int(slide))
        heapq.heappush(heap, (total + int(sizes[slide]), lane))
    return [lane for lane in members if lane]


class Lane:
    """One lane's patches in order: its slides one after the other, each shuffled by its own stream."""

    def __init__(self, slides: list[int], sizes: np.ndarray, starts: np.ndarray, seed: int, epoch: int) -> None:
        self.slides, self.sizes, self.starts = slides, sizes, starts
        self.seed, self.epoch = seed, epoch
        self.length = int(sizes[slides].sum())
        self.slide, self.position = 0, 0  # the slide being read (its place in the lane), and where in it
        self.shuffled = self.patches_of(0)

    def patches_of(self, place: int) -> np.ndarray:
        slide = self.slides[place]
        return self.starts[slide] + epoch_rng(self.seed, self.epoch, slide).permutation(int(self.sizes[slide]))

    def take(self, count: int) -> np.ndarray:
        """The lane's next ``count`` patches (indices into the source)."""
        taken = []
        while count > 0:
            piece = self.shuffled[self.position:self.position + count]
            taken.append(piece)
            self.position += len(piece)
            count -= len(piece)
            if self.position == len(self.shuffled) and self.slide + 1 < len(self.slides):
                self.slide, self.position = self.slide + 1, 0
                self.shuffled = self.patches_of(self.slide)
        return np.concatenate(taken) if taken else np.empty(0, dtype=np.int64)


@dataclass(frozen=True)
class EpochOrder:
    """Which patches each step of an epoch reads (see the module's docstring). ``slide_sizes``
    are the patches of each slide, the source's patches being slide after slide; None for a
    uniform shuffle."""

    count: int  # patches in the source
    batch_size: int  # the global batch
    seed: int
    slide_sizes: tuple[int, ...] | None = None
    slides_per_batch: int = SLIDES_PER_BATCH

    @classmethod
    def shuffled(cls, count: int, batch_size: int, seed: int) -> EpochOrder:
        return cls(count, batch_size, seed)

    @classmethod
    def of_slides(cls, slide_sizes: Sequence[int], batch_size: int, seed: int,
                  slides_per_batch: int = SLIDES_PER_BATCH) -> EpochOrder:
        return cls(int(sum(slide_sizes)), batch_size, seed, tuple(int(n) for n in slide_sizes), slides_per_batch)

    @classmethod
    def of_source(cls, source, batch_size: int, seed: int, slides_per_batch: int = SLIDES_PER_BATCH) -> EpochOrder:
        """The order for a :class:`~clusiam.sources.PatchSource`: in lanes of slides where its
        patches are cheap only while their slide is open, else a uniform shuffle."""
        sizes = source.slide_sizes()
        if sizes is None:
            return cls.shuffled(len(source), batch_size, seed)
        return cls.of_slides(sizes, batch_size, seed, slides_per_batch)

    @property
    def steps(self) -> int:
        return self.count // self.batch_size

    def global_batches(self, epoch: int) -> Iterator[np.ndarray]:
        """Each step's global batch (``batch_size`` patch indices), made as they are read."""
        if self.slide_sizes is None:
            order = epoch_rng(self.seed, epoch).permutation(self.count)
            yield from order[:self.steps * self.batch_size].reshape(self.steps, self.batch_size)
            return
        sizes = np.asarray(self.slide_sizes, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        rng = epoch_rng(self.seed, epoch)
        order = [slide for slide in rng.permutation(len(sizes)) if sizes[slide]]  # a slide of no patch: no lane
        members = deal(sizes, order, min(self.slides_per_batch, len(order)))
        lanes = [Lane(slides, sizes, starts, self.seed, epoch) for slides in members]
        lengths = np.array([lane.length for lane in lanes], dtype=np.int64)
        phases = rng.random(len(lanes))
        taken = np.zeros(len(lanes), dtype=np.int64)  # patches each lane has given so far
        # In a stretch of the epoch that holds batch_size patches, lane i holds at most about
        # batch_size * L_i / count of them: enough candidates from each, then the earliest win.
        reach = np.ceil((self.batch_size + len(lanes)) * lengths / self.count).astype(np.int64) + 1
        for _ in range(self.steps):
            counts = np.minimum(reach, lengths - taken)
            lane_of = np.repeat(np.arange(len(lanes)), counts)
            within = np.arange(len(lane_of)) - np.repeat(np.cumsum(counts) - counts, counts)
            times = (taken[lane_of] + within + phases[lane_of]) / lengths[lane_of]
            earliest = np.lexsort((lane_of, times))[:self.batch_size]
            share = np.bincount(lane_of[earliest], minlength=len(lanes))
            yield np.concatenate([lane.take(int(n)) for lane, n in zip(lanes, share) if n])
            taken += share

    def parts(self, epoch: int, rank: int, world_size: int, workers: int) -> EpochParts:
        """What process ``rank`` of ``world_size`` reads, one part per DataLoader worker per step."""
        return EpochParts(self, epoch, rank, world_size, workers)


@dataclass(frozen=True)
class EpochParts:
    """An epoch's index lists for one process, to pass as a DataLoader's ``batch_sampler``:
    ``parts_per_step`` consecutive lists make one step's batch of this process."""

    order: EpochOrder
    epoch: int
    rank: int
    world_size: int
    workers: int

    @property
    def process_batch(self) -> int:
        return self.order.batch_size // self.world_size

    @property
    def parts_per_step(self) -> int:
        return max(1, min(self.workers, self.process_batch))

    def __len__(self) -> int:
        return self.order.steps * self.parts_per_step

    def __iter__(self) -> Iterator[list[int]]:
        size = self.process_batch
        for batch in self.order.global_batches(self.epoch):
            mine = batch[self.rank * size:(self.rank + 1) * size]
            for part in np.array_split(mine, self.parts_per_step):
                yield part.tolist()
