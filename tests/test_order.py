"""The epoch's order (clusiam/order.py): what each step, process and DataLoader worker reads."""
from __future__ import annotations

import numpy as np
import pytest

from clusiam.order import EpochOrder

# Slides of unequal size, as in a real cohort (a Camelyon16 slide holds 1,000 to 50,000 tissue patches).
COHORT = np.random.default_rng(7).integers(100, 1000, 300).tolist()


def slide_of(order: EpochOrder, indices: np.ndarray) -> np.ndarray:
    ends = np.cumsum(order.slide_sizes)
    return np.searchsorted(ends, indices, side="right")


def epoch(order: EpochOrder, number: int) -> np.ndarray:
    return np.stack(list(order.global_batches(number)))


@pytest.mark.parametrize("batch_size", [256, 16])
def test_every_batch_mixes_many_slides_and_no_patch_repeats(batch_size):
    order = EpochOrder.of_slides(COHORT, batch_size, seed=3)
    batches = epoch(order, 0)
    assert batches.shape == (sum(COHORT) // batch_size, batch_size)
    assert len(np.unique(batches)) == batches.size  # each patch at most once; only the last partial batch is left
    distinct = [len(np.unique(slide_of(order, batch))) for batch in batches]
    assert min(distinct) >= min(batch_size, 32, len(COHORT))
    # ... while each of the 32 lanes moves through its slides one at a time: a slide is read over
    # about 32 / 300 of the epoch, not across all of it (as a uniform shuffle would spread it).
    slides = slide_of(order, batches.ravel()).reshape(batches.shape)
    spans = [np.ptp(np.nonzero((slides == s).any(1))[0]) + 1 for s in range(len(COHORT))]
    assert np.median(spans) < 1.5 * 32 / len(COHORT) * len(batches)


def test_the_order_is_a_function_of_seed_and_epoch_and_new_every_epoch():
    order = EpochOrder.of_slides(COHORT, 64, seed=0)
    first = epoch(order, 0)
    np.testing.assert_array_equal(first, epoch(EpochOrder.of_slides(COHORT, 64, seed=0), 0))  # a resumed epoch
    assert not np.array_equal(first, epoch(order, 1))
    assert not np.array_equal(first, epoch(EpochOrder.of_slides(COHORT, 64, seed=1), 0))
    # Within a batch the patches come grouped by lane, each lane one slide at a time.
    runs = np.count_nonzero(np.diff(slide_of(order, first[0])) != 0) + 1
    assert runs <= 32 + 2


@pytest.mark.parametrize("world_size, workers", [(1, 0), (1, 3), (2, 2), (4, 1)])
def test_processes_and_workers_read_the_same_global_batches(world_size, workers):
    order = EpochOrder.of_slides(COHORT, 64, seed=5)
    expected = epoch(order, 2)
    per_process = [list(order.parts(2, rank, world_size, workers)) for rank in range(world_size)]
    parts = per_process[0]
    step_parts = max(1, workers)
    assert len(parts) == len(order.parts(2, 0, world_size, workers)) == len(expected) * step_parts
    for step, batch in enumerate(expected):
        mine = [sum(process[step * step_parts:(step + 1) * step_parts], []) for process in per_process]
        assert all(len(indices) == 64 // world_size for indices in mine)
        np.testing.assert_array_equal(np.concatenate(mine), batch)


def opened_slides(slides: list[np.ndarray], keep_open: int) -> int:
    """How often a reader of ``slides`` (per step) opens a slide, keeping the ``keep_open`` last used open."""
    open_now: dict[int, None] = {}
    opened = 0
    for step in slides:
        for slide in step.tolist():
            if slide in open_now:
                del open_now[slide]
            else:
                opened += 1
                if len(open_now) == keep_open:
                    del open_now[next(iter(open_now))]
            open_now[slide] = None
    return opened


def test_each_worker_stays_on_a_few_slides():
    """Worker j reads part j of every step: it reads a few slides at once, and with a dozen
    kept open it opens each of its slides about once in the epoch (a uniform shuffle would
    open a slide at nearly every read)."""
    order = EpochOrder.of_slides(COHORT, 256, seed=0)
    workers = 4
    parts = list(order.parts(0, 0, 1, workers))
    for worker in range(workers):
        mine = [slide_of(order, np.array(part)) for part in parts[worker::workers]]
        assert max(len(np.unique(part)) for part in mine) <= 32 // workers + 4  # lanes cut at the edges, new slides
        assert opened_slides(mine, keep_open=12) <= 1.1 * len(set(np.concatenate(mine)))
    uniform = EpochOrder.shuffled(sum(COHORT), 256, seed=0)
    shuffled = [slide_of(order, np.array(part)) for part in list(uniform.parts(0, 0, 1, workers))[::workers]]
    assert opened_slides(shuffled, keep_open=12) > 0.9 * sum(len(part) for part in shuffled)


def test_patch_files_are_shuffled_uniformly():
    order = EpochOrder.shuffled(1000, 100, seed=0)
    batches = epoch(order, 0)
    assert batches.shape == (10, 100) and sorted(batches.ravel()) == list(range(1000))
    assert not np.array_equal(batches, epoch(order, 1))
    # No locality: the first batch draws from the whole range.
    assert batches[0].min() < 100 and batches[0].max() > 900


def test_one_dominant_slide_cannot_be_mixed_away_and_empty_slides_take_no_lane():
    """Lanes of equal length are impossible when one slide holds most patches: its lane then
    fills most of every batch, as it would under a uniform shuffle; nothing is lost. A slide
    whose patches were all left out holds no lane."""
    order = EpochOrder.of_slides([3, 50, 0, 7, 1000], 16, seed=0)
    batches = epoch(order, 0)
    assert len(np.unique(batches)) == batches.size == 16 * (1060 // 16)
    assert set(slide_of(order, batches.ravel()).tolist()) == {0, 1, 3, 4}
    empty = EpochOrder.of_slides([0, 0, 40], 8, seed=0)
    assert sorted(epoch(empty, 0).ravel().tolist()) == list(range(40))
