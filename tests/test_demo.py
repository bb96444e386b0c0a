import csv
import hashlib
from collections import defaultdict

import numpy as np
import pytest
import tiffslide
from PIL import Image

from clusiam.demo import CMU_SLIDE, DemoSpec, main, prepare_demo, write_cmu_patches

SPEC = DemoSpec(seed=5, patch_size=32, slides_per_class=3, grid=6, cmu_patches=False)


def digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return prepare_demo(tmp_path_factory.mktemp("demo"), SPEC) / "synthetic"


def test_the_demo_is_deterministic_from_its_seed(demo, tmp_path):
    assert digest(prepare_demo(tmp_path / "again", SPEC) / "synthetic") == digest(demo)
    other = DemoSpec(seed=6, patch_size=32, slides_per_class=3, grid=6, cmu_patches=False)
    assert digest(prepare_demo(tmp_path / "other", other) / "synthetic") != digest(demo)


def test_a_new_spec_in_the_same_folder_replaces_the_old_patches(tmp_path, capsys):
    prepare_demo(tmp_path, SPEC)
    smaller = DemoSpec(seed=5, patch_size=32, slides_per_class=2, grid=6, cmu_patches=False)
    synthetic = prepare_demo(tmp_path, smaller) / "synthetic"
    listed = {row["path"] for row in csv.DictReader(open(synthetic / "patch_labels.csv"))}
    on_disk = {p.relative_to(synthetic).as_posix() for p in synthetic.rglob("*.png")}
    assert on_disk == listed and len(on_disk) == 2 * 2 * 36
    assert main([str(tmp_path / "bad"), "--slides_per_class", "1", "--no_cmu"]) == 2
    assert "--slides_per_class must be at least 2 (got 1)" in capsys.readouterr().out


def read_patches(demo):
    rows = list(csv.DictReader(open(demo / "patch_labels.csv")))
    for row in rows:
        row["pixels"] = np.asarray(Image.open(demo / row["path"]), dtype=np.float64)
    return rows


def test_labels_are_written_and_tumour_covers_a_small_share_of_positive_slides(demo):
    rows = read_patches(demo)
    slides = dict(csv.reader(open(demo / "slide_labels.csv")))
    assert len(rows) == len(list(demo.rglob("*.png"))) == 6 * 36
    labels = defaultdict(list)
    for row in rows:
        assert row["path"].startswith(f"{slides[row['slide']]}/{row['slide']}/")  # root/<class>/<slide>/<x>_<y>.png
        labels[row["slide"]].append(row["label"])
    for slide, patch_labels in labels.items():
        share = patch_labels.count("tumor") / len(patch_labels)
        assert share == 0 if slides[slide] == "normal" else 0.1 <= share <= 0.3


def nuclear_fraction(pixels):
    """Share of pixels much darker than the patch's bright (stroma) level: nuclei."""
    brightness = pixels.mean(-1)
    return (brightness < 0.6 * np.percentile(brightness, 95)).mean()


def test_classes_differ_by_morphology_while_colour_differs_more_between_slides(demo):
    rows = read_patches(demo)
    by_slide = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_slide[row["slide"]][row["label"]].append(row["pixels"])
    stroma_colour = {}
    for slide, classes in by_slide.items():
        if "tumor" in classes:
            tumour = np.mean([nuclear_fraction(p) for p in classes["tumor"]])
            normal = np.mean([nuclear_fraction(p) for p in classes["normal"]])
            assert tumour > 2 * normal, slide  # crowded large nuclei against sparse small ones
        for label, patches in classes.items():
            bright = [p[p.mean(-1) >= np.percentile(p.mean(-1), 80)] for p in patches]
            chroma = np.concatenate(bright)
            stroma_colour[slide, label] = (chroma / chroma.sum(-1, keepdims=True)).mean(0)
    between_slides = np.std([c for (s, label), c in stroma_colour.items() if label == "normal"], axis=0).sum()
    between_classes = np.mean([np.abs(stroma_colour[s, "tumor"] - stroma_colour[s, "normal"]).sum()
                               for s, label in stroma_colour if label == "tumor"])
    assert between_slides > 2 * between_classes


def test_real_slide_patches_are_cut_at_native_20x_from_tissue(tmp_path):
    kept = write_cmu_patches(tmp_path, patch_size=64)
    files = sorted((tmp_path / "CMU-1-region").glob("*.png"))
    assert kept == len(files) and 200 < kept < (2220 // 64) * (2967 // 64)  # tissue only, not the glass
    with tiffslide.TiffSlide(CMU_SLIDE) as slide:
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.499)
        for path in files[:: max(1, kept // 5)]:
            x, y = map(int, path.stem.split("_"))
            expected = np.asarray(slide.read_region((x, y), 0, (64, 64)).convert("RGB"))
            np.testing.assert_array_equal(np.asarray(Image.open(path)), expected)
