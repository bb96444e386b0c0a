import json
import os
import sqlite3
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from clusiam.slide_source import SlideSource
from clusiam.sources import FolderSource, cached_channel_statistics, channel_statistics, seeded_sample
from conftest import write_pyramid
from test_images import save_png


def test_statistics_cover_exactly_the_training_files(tmp_path):
    files = [save_png(tmp_path / "a" / "b" / f"{i}.png", size=24 + 8 * i, seed=i) for i in range(3)]
    outsider = save_png(tmp_path / "a" / "outsider.png", size=64, seed=99)
    statistics = channel_statistics(FolderSource(files))
    pixels = np.concatenate([np.asarray(Image.open(f)).reshape(-1, 3) / 255.0 for f in files])
    np.testing.assert_allclose(statistics.mean, pixels.mean(0), atol=1e-9)
    np.testing.assert_allclose(statistics.std, pixels.std(0), atol=1e-9)
    assert (statistics.patches, statistics.draws) == (3, 3)
    assert not np.allclose(channel_statistics(FolderSource(files + [outsider])).mean, statistics.mean)


def kept_statistics(cache: Path) -> list[dict]:
    with sqlite3.connect(cache / "kept.sqlite") as connection:
        return [json.loads(value) for (value,) in connection.execute("SELECT value FROM channel_statistics")]


def test_statistics_are_kept_for_any_run_over_the_same_files_and_computed_again_when_they_change(tmp_path, capsys):
    cache = Path(os.environ["CLUSIAM_CACHE"])  # the test's own (conftest)
    files = [save_png(tmp_path / "p" / f"{i}.png", seed=i) for i in range(3)]
    first = cached_channel_statistics(FolderSource(files))
    assert first == channel_statistics(FolderSource(files)) and kept_statistics(cache) == [first._asdict()]
    with sqlite3.connect(cache / "kept.sqlite") as connection:  # if the kept record is read, this marker comes back
        connection.execute("UPDATE channel_statistics SET value = ?", [json.dumps({**first._asdict(),
                                                                                  "mean": [0.1, 0.2, 0.3]})])
    assert cached_channel_statistics(FolderSource(files)).mean == [0.1, 0.2, 0.3]
    assert "kept from an earlier run" in capsys.readouterr().out

    # another file list, a file changed in place, another sample: each computed, and kept beside the others
    assert cached_channel_statistics(FolderSource(files[:2])) == channel_statistics(FolderSource(files[:2]))
    save_png(files[0], seed=42)
    assert cached_channel_statistics(FolderSource(files)) == channel_statistics(FolderSource(files)) != first
    assert cached_channel_statistics(FolderSource(files), sample_size=2) == channel_statistics(
        FolderSource(files), sample_size=2)
    assert len(kept_statistics(cache)) == 4

    (cache / "kept.sqlite").write_bytes(b"not a database" * 100)  # damaged: computed, with a warning
    assert cached_channel_statistics(FolderSource(files)) == channel_statistics(FolderSource(files))
    assert "cannot use the cache" in capsys.readouterr().err


def test_a_folder_source_reads_rgb_through_a_transform_names_its_slides_and_changes_identity_with_a_file(tmp_path):
    files = [save_png(tmp_path / "tumor" / slide / f"{i}.png", size=8, seed=i, mode=mode)
             for i, (slide, mode) in enumerate([("s1", "RGB"), ("s1", "L"), ("s2", "RGBA")])]
    source = FolderSource(files)
    assert len(source) == 3 and source.slides == ["s1", "s2"]
    dataset = source.dataset(lambda image: (image.mode, image.size))
    assert [dataset[i] for i in range(3)] == [("RGB", (8, 8))] * 3
    before = source.identity
    save_png(files[1], size=8, seed=7)
    assert FolderSource(files).identity != before and FolderSource(files[:2]).identity != before


def toned_patches(folder, count, seed=0):
    """``count`` 8 px patches, each noise around a tone of its own: the patches' means spread
    widely, so a sample's statistics differ measurably from the whole set's."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        pixels = rng.integers(40, 216, 3) + rng.normal(0, 20, (8, 8, 3))
        files.append(folder / f"{i:04d}.png")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(files[-1])
    return files


def test_statistics_of_a_large_source_come_from_a_seeded_sample_close_to_the_whole(tmp_path):
    source = FolderSource(toned_patches(tmp_path, 400))
    whole = channel_statistics(source, sample_size=400)
    sample = channel_statistics(source, sample_size=100)
    assert (sample.patches, sample.draws) == (100, 100)
    assert channel_statistics(source, sample_size=100) == sample  # the same sample every time
    assert channel_statistics(source, sample_size=100, seed=1) != sample

    patch_means = np.stack([np.asarray(source.read(i)).reshape(-1, 3).mean(0) / 255 for i in range(400)])
    standard_error = patch_means.std(0) / np.sqrt(100) * np.sqrt(1 - 100 / 400)  # of a mean over 100 of 400
    error = np.abs(np.subtract(sample.mean, whole.mean))
    assert (error > 1e-4).all() and (error < 4 * standard_error).all(), (error, standard_error)
    np.testing.assert_allclose(sample.mean_error, standard_error / np.sqrt(1 - 100 / 400), rtol=0.2)
    assert np.allclose(sample.std, whole.std, rtol=0.1) and sample.std != whole.std
    assert list(seeded_sample(400, 100, 0)) == sorted(set(seeded_sample(400, 100, 0)))
    assert list(seeded_sample(50, 100, 0)) == list(range(50))  # a source no larger than the sample: all of it


def toned_slides(folder: Path, count: int, side: int = 80, patch: int = 8) -> SlideSource:
    """``count`` slides, each noise around a tone of its own (slide means spread widely, as
    stains do between labs), with TRIDENT coordinates of every ``patch`` px tile."""
    rng = np.random.default_rng(0)
    corners = np.array([(x, y) for y in range(0, side, patch) for x in range(0, side, patch)])
    pairs = []
    for index in range(count):
        pixels = rng.integers(40, 216, 3) + rng.normal(0, 20, (side, side, 3))
        slide = write_pyramid(folder / f"s{index}.tif", np.clip(pixels, 0, 255).astype(np.uint8), mpp=0.5,
                              downsamples=(1,), magnification=20)
        coords = folder / f"s{index}_patches.h5"
        with h5py.File(coords, "w") as handle:
            handle.create_dataset("coords", data=corners).attrs.update({
                "patch_size": patch, "patch_size_level0": patch, "level0_magnification": 20,
                "target_magnification": 20, "level0_width": side, "level0_height": side})
        pairs.append((slide, coords))
    return SlideSource.checked(pairs)[0]


def test_slide_statistics_read_a_few_slides_whole_and_say_their_error_between_slides(tmp_path):
    source = toned_slides(tmp_path, 24)  # 2,400 patches of 8 px
    whole = channel_statistics(source, sample_size=len(source))
    sample = channel_statistics(source, sample_size=6 * SlideSource.PATCHES_PER_DRAW)
    assert channel_statistics(source, sample_size=6 * SlideSource.PATCHES_PER_DRAW) == sample  # seeded
    picked = source.statistics_sample(6 * SlideSource.PATCHES_PER_DRAW, 0)
    slides = np.unique(source.sample_groups(picked))
    assert sample.patches == len(picked) == 6 * 64 and sample.draws == len(slides) <= 6  # 6 draws of 64 patches
    pixels = np.concatenate([np.asarray(source.read(i)).reshape(-1, 3) / 255 for i in picked])
    np.testing.assert_allclose(sample.mean, pixels.mean(0), atol=1e-9)  # exactly the pixels of the picked patches

    # The pooled estimate is off the whole set's by what its standard error (between slides) says.
    slide_means = np.stack([np.concatenate([np.asarray(source.read(i)).reshape(-1, 3) / 255
                                            for i in range(start, start + 100)]).mean(0)
                            for start in range(0, len(source), 100)])
    error = np.abs(np.subtract(sample.mean, whole.mean))
    assert (error > 1e-4).all() and (error < 4 * np.asarray(sample.mean_error)).all(), (error, sample.mean_error)
    spread = slide_means.std(0, ddof=1) / np.sqrt(sample.draws)  # what a sample of that many slides is off by
    assert np.allclose(sample.mean_error, spread, rtol=0.7), (sample.mean_error, spread)
    assert whole.draws == 24 and np.all(np.asarray(whole.mean_error) < np.asarray(sample.mean_error))
