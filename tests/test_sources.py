import json

import numpy as np
from PIL import Image

from clusiam.slide_source import SlidePatches, SlideSource
from clusiam.slides import PatchReader
from clusiam.sources import FolderSource, cached_channel_statistics, channel_statistics, seeded_sample
from conftest import write_pyramid
from test_images import save_png


def test_statistics_cover_exactly_the_training_files(tmp_path):
    files = [save_png(tmp_path / "a" / "b" / f"{i}.png", size=24 + 8 * i, seed=i) for i in range(3)]
    outsider = save_png(tmp_path / "a" / "outsider.png", size=64, seed=99)
    mean, std = channel_statistics(FolderSource(files))
    pixels = np.concatenate([np.asarray(Image.open(f)).reshape(-1, 3) / 255.0 for f in files])
    np.testing.assert_allclose(mean, pixels.mean(0), atol=1e-9)
    np.testing.assert_allclose(std, pixels.std(0), atol=1e-9)
    with_outsider, _ = channel_statistics(FolderSource(files + [outsider]))
    assert not np.allclose(with_outsider, mean)


def test_statistics_cache_is_reused_for_the_same_files_and_refreshed_when_they_change(tmp_path):
    files = [save_png(tmp_path / "p" / f"{i}.png", seed=i) for i in range(3)]
    cache = tmp_path / "run" / "normalization.json"
    first = cached_channel_statistics(FolderSource(files), cache)
    stored = json.loads(cache.read_text())
    stored["mean"] = [0.1, 0.2, 0.3]  # if the cache is read, this marker comes back
    cache.write_text(json.dumps(stored))
    assert cached_channel_statistics(FolderSource(files), cache)[0] == [0.1, 0.2, 0.3]

    # a different file list
    assert cached_channel_statistics(FolderSource(files[:2]), cache) == channel_statistics(FolderSource(files[:2]))
    save_png(files[0], seed=42)  # same path, new content
    assert cached_channel_statistics(FolderSource(files), cache) == channel_statistics(FolderSource(files))
    assert cached_channel_statistics(FolderSource(files), cache) != first
    cache.write_text('{"file_list_key": ')  # cut short: recomputed, not an error
    assert cached_channel_statistics(FolderSource(files), cache) == channel_statistics(FolderSource(files))
    assert json.loads(cache.read_text())["num_files"] == 3


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
    assert channel_statistics(source, sample_size=100) == sample  # the same sample every time
    assert channel_statistics(source, sample_size=100, seed=1) != sample

    patch_means = np.stack([np.asarray(source.read(i)).reshape(-1, 3).mean(0) / 255 for i in range(400)])
    standard_error = patch_means.std(0) / np.sqrt(100) * np.sqrt(1 - 100 / 400)  # of a mean over 100 of 400
    error = np.abs(np.subtract(sample[0], whole[0]))
    assert (error > 1e-4).all() and (error < 4 * standard_error).all(), (error, standard_error)
    assert np.allclose(sample[1], whole[1], rtol=0.1) and sample[1] != whole[1]
    assert list(seeded_sample(400, 100, 0)) == sorted(set(seeded_sample(400, 100, 0)))
    assert list(seeded_sample(50, 100, 0)) == list(range(50))  # a source no larger than the sample: all of it


def test_the_statistics_cache_records_its_sample_and_is_refreshed_for_another(tmp_path):
    source = FolderSource(toned_patches(tmp_path / "p", 150))
    cache = tmp_path / "run" / "normalization.json"
    sampled = cached_channel_statistics(source, cache, sample_size=100)
    stored = json.loads(cache.read_text())
    assert (stored["sample_size"], stored["sample_seed"], stored["num_files"]) == (100, 0, 150)
    assert sampled == channel_statistics(source, sample_size=100)
    assert cached_channel_statistics(source, cache, sample_size=100, seed=3) == channel_statistics(
        source, sample_size=100, seed=3) != sampled
    assert json.loads(cache.read_text())["sample_seed"] == 3


def test_a_slide_source_is_sampled_alike(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    slide = write_pyramid(tmp_path / "s.tif", image, mpp=0.5, downsamples=(1,))
    reader = PatchReader(side0=32, size=32, level=0, read_size=32)
    corners = np.array([(x, y) for y in range(0, 224, 32) for x in range(0, 224, 32)])
    source = SlideSource([SlidePatches(slide, "s", reader, corners)])
    picked = np.concatenate([np.asarray(source.read(i)).reshape(-1, 3) / 255 for i in seeded_sample(49, 20, 0)])
    mean, std = channel_statistics(source, sample_size=20)
    np.testing.assert_allclose(mean, picked.mean(0), atol=1e-9)
    np.testing.assert_allclose(std, picked.std(0), atol=1e-9)
