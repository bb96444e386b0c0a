import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from clusiam.errors import DataError
from clusiam.images import IMAGE_EXTENSIONS, check_images, find_images, load_rgb, remember_check
from clusiam.sources import FolderSource, channel_statistics
from clusiam.train import main
from conftest import tiny_run_args


def save_png(path, size=40, seed=0, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def png_bytes(size=40):
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 120, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_missing_or_empty_folder_is_refused_with_its_name(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'} does not exist: give --patches a folder of patch images"):
        find_images(tmp_path / "nope", "--patches")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no patches here")
    with pytest.raises(DataError, match="no images .* found under .*empty"):
        find_images(tmp_path / "empty", "--patches")


def test_images_are_found_at_any_depth_including_the_authors_layout(tmp_path):
    paths = [save_png(tmp_path / "tumor" / "slide_1" / "0_0.png"), save_png(tmp_path / "a.png"),
             save_png(tmp_path / "x" / "y" / "z" / "w" / "deep.PNG")]
    (tmp_path / "tumor" / "slide_1" / "coords.h5").write_bytes(b"not an image")
    assert find_images(tmp_path, "DATA_DIR") == sorted(paths)


def test_the_listing_keeps_sorted_path_order_and_linked_files_but_not_linked_folders(tmp_path):
    names = ["a/b/1.png", "a-b/1.png", "a.b.png", "a/B.PNG", "a b/1.jpeg", "z/deep/er/2.tif"]
    paths = [save_png(tmp_path / name, size=8) for name in names]
    (tmp_path / "linked.png").symlink_to(paths[0])
    (tmp_path / "a" / "folder_link").symlink_to(tmp_path / "z", target_is_directory=True)
    expected = sorted([*paths, tmp_path / "linked.png"])
    assert find_images(tmp_path, "DATA_DIR") == expected
    assert [path for path in sorted(tmp_path.rglob("*")) if path.suffix.lower() in IMAGE_EXTENSIONS
            and path.is_file()] == expected  # what the listing did before, with Path.rglob


def write_bad(tmp_path, kind):
    path = tmp_path / "tumor" / "slide" / f"{kind}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(png_bytes()[:-30])
    elif kind == "not_an_image":
        path.write_text("<html>this is a web page saved as png</html>")
    elif kind == "too_small":
        save_png(path, size=20)
    elif kind == "dangling_link":  # the patch it named was deleted
        path.symlink_to(path.with_name("deleted.png"))
    elif kind == "link_loop":
        path.symlink_to(path)
    elif kind == "truncated_jpeg":
        path = path.with_suffix(".jpg")
        buffer = io.BytesIO()
        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(buffer, format="JPEG")
        path.write_bytes(buffer.getvalue()[:-500])  # cut inside the scan data, past the header
    return path


@pytest.mark.parametrize("kind, reason", [
    ("empty", "empty file"),
    ("truncated", "truncated PNG"),
    ("truncated_jpeg", "truncated JPEG"),
    ("not_an_image", "not a readable image"),
    ("too_small", "20x20, smaller than the crop size 32: pass --image_size 20"),
    ("dangling_link", "a symbolic link that leads nowhere \\(to .*deleted.png: missing"),
    ("link_loop", "a symbolic link that leads nowhere \\(to .*link_loop.png: missing, or a loop"),
])
def test_each_bad_file_stops_the_run_naming_the_file(tmp_path, kind, reason):
    good = [save_png(tmp_path / "normal" / "slide" / f"{i}.png", seed=i) for i in range(3)]
    bad = write_bad(tmp_path, kind)
    with pytest.raises(DataError, match=reason) as error:
        check_images(find_images(tmp_path, "DATA_DIR"), 32, skip_bad_files=False)
    assert str(bad) in str(error.value) and "--skip_bad_files" in str(error.value)
    assert check_images(good, 32, skip_bad_files=False).good == good


def test_the_cli_stops_before_training_on_a_bad_file(tiny_demo, tmp_path, capsys):
    data = tmp_path / "data"
    for i, source in enumerate(sorted(tiny_demo.rglob("*.png"))[:32]):
        (data / f"{i}.png").parent.mkdir(parents=True, exist_ok=True)
        (data / f"{i}.png").write_bytes(source.read_bytes())
    bad = write_bad(data, "truncated")
    assert main(tiny_run_args(data, tmp_path / "run", "--epochs", "1")) == 2
    out = capsys.readouterr().out
    assert f"error: {bad}: truncated PNG" in out
    assert not (tmp_path / "run" / "last.pth").exists()


def test_skip_bad_files_counts_and_lists_what_it_leaves_out(tmp_path, capsys):
    good = [save_png(tmp_path / "ok" / f"{i}.png", seed=i) for i in range(4)]
    bad = [write_bad(tmp_path, kind) for kind in ("empty", "truncated", "not_an_image", "too_small", "dangling_link",
                                                  "link_loop")]
    report = tmp_path / "run" / "skipped_files.txt"
    checked = check_images(find_images(tmp_path, "DATA_DIR"), 32, skip_bad_files=True)
    checked.report(report)
    kept = checked.good
    assert kept == sorted(good)
    assert "skipped 6 of 10 files" in capsys.readouterr().out
    listed = [line.split("\t")[0] for line in report.read_text().splitlines()]
    assert sorted(listed) == sorted(map(str, bad))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "RGB"])
def test_images_are_read_as_rgb(tmp_path, mode):
    path = tmp_path / f"{mode}.png"
    pixels = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    original = Image.fromarray(pixels).convert(mode)
    original.save(path)
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (16, 16)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(original.convert("RGB")))
    if mode == "L":
        rgb = np.asarray(image)
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_batched_augmentation_needs_patches_of_one_size(tmp_path):
    first = save_png(tmp_path / "a" / "0.png", size=40)
    odd = save_png(tmp_path / "a" / "1.png", size=48)
    with pytest.raises(DataError, match=f"{odd}: image is 48x48, unlike the 40x40 of {first}.*--augment pil"):
        check_images([first, odd], 32, skip_bad_files=False, same_size=True)
    assert check_images([first, odd], 32, skip_bad_files=False).good == [first, odd]


def png16(path, pixels):
    """A 16-bit PNG (grey, or RGB for (H, W, 3)) of ``pixels`` (uint16), written chunk by chunk:
    Pillow writes 16-bit grey PNGs but not 16-bit RGB ones."""
    height, width = pixels.shape[:2]
    colour_type = 2 if pixels.ndim == 3 else 0
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("shape", [(40, 40), (40, 40, 3)])
def test_16_bit_pngs_read_as_the_8_bit_image_they_hold_and_their_statistics_follow(tmp_path, shape):
    eight = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    stored = png16(tmp_path / "16" / "a.png", eight.astype(np.uint16) * 257)  # 8-bit values stretched to 16
    expected = np.asarray(Image.fromarray(eight).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(load_rgb(stored)), expected)
    plain = tmp_path / "8" / "a.png"
    plain.parent.mkdir()
    Image.fromarray(eight).save(plain)
    assert check_images([stored], 32, skip_bad_files=False).good == [stored]
    assert channel_statistics(FolderSource([stored])) == channel_statistics(FolderSource([plain]))


def test_images_without_a_fixed_range_are_refused_by_name(tmp_path):
    floats = tmp_path / "float.tif"
    Image.fromarray(np.random.default_rng(0).random((40, 40)).astype(np.float32)).save(floats)
    with pytest.raises(DataError, match=f"{floats}: a floating-point image \\(mode F\\) has no fixed range"):
        check_images([floats], 32, skip_bad_files=False)
    with pytest.raises(DataError, match=f"{floats}: a floating-point image"):
        load_rgb(floats)


def sized_folder(root, odd_first, odd_size=96, good=16):
    """``good`` 64 px patches and ``odd_first`` patches of another size whose names sort first."""
    odd = [save_png(root / f"a{i}.png", size=odd_size, seed=100 + i) for i in range(odd_first)]
    return odd, [save_png(root / f"b{i:02d}.png", size=64, seed=i) for i in range(good)]


@pytest.mark.parametrize("odd_first", [1, 8])
def test_mixed_sizes_keep_the_size_most_patches_have_and_count_the_others(tmp_path, capsys, odd_first):
    odd, good = sized_folder(tmp_path, odd_first)
    files = find_images(tmp_path, "DATA_DIR")
    checked = check_images(files, 32, skip_bad_files=True, same_size=True)
    assert checked.good == good and [path for path, _ in checked.bad] == odd
    assert all("96x96, unlike the 64x64 most patches have" in why for _, why in checked.bad)
    assert f"keeping the 16 patches of 64x64, the size most have; left out: {odd_first} of 96x96" in \
        capsys.readouterr().out
    with pytest.raises(DataError, match=f"{odd[0]}: image is 96x96, unlike the 64x64 of {good[0]} and 15 other "
                                        f"files \\(others: {odd_first} of 96x96\\).*--skip_bad_files"):
        check_images(files, 32, skip_bad_files=False, same_size=True)


def corrupt_png(path):
    """A PNG whose compressed pixels were damaged in the middle; its end marker is intact."""
    data = bytearray(png_bytes(64))
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def corrupt_jpeg(path):
    """A JPEG with bytes that no JPEG stream holds (a marker 0xFFB1) written over the middle of its
    compressed data; its end marker is intact. (Most damage inside a JPEG's compressed data
    decodes without any error, which no reader can tell from a real image.)"""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    middle = len(data) // 2
    data[middle : middle + 16] = b"\xff\xb1" * 8
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("corrupt", [corrupt_png, corrupt_jpeg])
def test_a_file_damaged_in_the_middle_is_found_by_the_check(tmp_path, corrupt):
    good = [save_png(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    bad = corrupt(tmp_path / "z" / "damaged.img")
    bad = bad.rename(bad.with_suffix(".png" if corrupt is corrupt_png else ".jpg"))
    with pytest.raises(DataError, match=f"{bad}: corrupt (PNG|JPEG) .*--skip_bad_files"):
        check_images(find_images(tmp_path, "DATA_DIR"), 32, skip_bad_files=False)
    checked = check_images(find_images(tmp_path, "DATA_DIR"), 32, skip_bad_files=True)
    assert checked.good == good and [path for path, _ in checked.bad] == [bad]


def flip_middle_bytes_keeping_size_and_time(path):
    """Damage ``path`` in the middle, then give it back its modification time: its size and
    time (all a file-list key sees) are unchanged, only a check that opens it can tell."""
    status = path.stat()
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(byte ^ 0xFF for byte in data[middle : middle + 8])
    path.write_bytes(bytes(data))
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))


def test_a_second_check_of_unchanged_files_reuses_the_verdict_without_opening_them(tmp_path, capsys):
    good = [save_png(tmp_path / "a" / f"{i}.png", seed=i) for i in range(6)]
    small = save_png(tmp_path / "a" / "small.png", size=20)
    files = find_images(tmp_path, "DATA_DIR")
    cache = tmp_path / "run" / "checked_files.json"
    first = check_images(files, 32, skip_bad_files=True, same_size=True, cache=cache)
    assert first.good == good and [path for path, _ in first.bad] == [small] and not cache.exists()  # only read
    remember_check(cache, first)

    flip_middle_bytes_keeping_size_and_time(good[2])
    assert [path for path, _ in check_images(files, 32, skip_bad_files=True).bad] == [good[2], small]  # it shows
    assert check_images(files, 32, skip_bad_files=True, same_size=True, cache=cache) == first  # not opened
    assert "reusing the check of 7 unchanged files" in capsys.readouterr().out

    os.utime(good[2])  # a new modification time: checked again
    again = check_images(files, 32, True, same_size=True, cache=cache)
    assert [path for path, _ in again.bad] == [good[2], small]
    remember_check(cache, again)
    assert check_images(files, 32, True, same_size=True, cache=cache) == again
    assert "reusing the check of 7 unchanged files" in capsys.readouterr().out
    added = save_png(tmp_path / "b" / "new.png", seed=9)
    assert added in check_images(find_images(tmp_path, "DATA_DIR"), 32, True, same_size=True, cache=cache).good
    assert small in check_images(find_images(tmp_path, "DATA_DIR"), 16, True, cache=cache).good  # other options
    assert "reusing" not in capsys.readouterr().out
    cache.write_text('{"key": ')  # cut short: checked again, not an error
    assert small not in check_images(find_images(tmp_path, "DATA_DIR"), 32, True, cache=cache).good
