import json

import numpy as np
from PIL import Image

from clusiam.sources import FolderSource, cached_channel_statistics, channel_statistics
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
