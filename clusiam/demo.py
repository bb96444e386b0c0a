"""The built-in demo set: synthetic H&E-like slides with known labels, plus patches cut
from a real CC0 whole-slide image, so every command can run with no data of one's own.

Synthetic slides (deterministic from a seed):
- Patches are rendered in optical density (Beer-Lambert): haematoxylin stains nuclei,
  eosin stains stroma fibres; RGB = exp(-OD).
- Classes differ by morphology only. Normal: small round nuclei, sparse, evenly spaced.
  Tumour: large, elongated, crowded nuclei at random positions, darker chromatin.
- Stain vectors and intensities are drawn per slide, so colour varies more between slides
  than between classes (as across Camelyon16 centres).
- Negative slides are all normal; positive slides hold one tumour region covering a small
  share of the tissue. Patch and slide labels are written beside the images.

Real patches: ``assets/cmu_small_region.svs`` is a 2220 x 2967 px H&E region of the
Carnegie Mellon CMU-1 slide (Aperio SVS, 20x, 0.499 um/px), the OpenSlide project's public
test image, released under CC0 1.0. It carries no annotation, so its patches are unlabelled.

Run ``python -m clusiam.demo OUT_DIR`` to write the set.
"""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from clusiam.augment import RGB_FROM_HED
from clusiam.errors import CommandParser, ConfigError, run_command
from clusiam.files import check_output_folder, make_folder
from clusiam.tables import write_csv

CMU_SLIDE = Path(__file__).parent / "assets" / "cmu_small_region.svs"
DEMO_VERSION = 2

HAEMATOXYLIN, EOSIN = RGB_FROM_HED[0].numpy(), RGB_FROM_HED[1].numpy()  # Ruifrok & Johnston's OD vectors


@dataclass(frozen=True)
class DemoSpec:
    seed: int = 0
    patch_size: int = 64
    slides_per_class: int = 6
    grid: int = 6  # a slide is grid x grid patches of tissue
    cmu_patches: bool = True


def slide_stain(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-slide haematoxylin and eosin OD vectors, scaled by the slide's stain intensity."""
    stains = []
    for vector, scale in ((HAEMATOXYLIN, 1.6), (EOSIN, 0.9)):
        perturbed = np.abs(vector + rng.normal(0.0, 0.12, 3))
        stains.append(perturbed / np.linalg.norm(perturbed) * scale * rng.uniform(0.65, 1.35))
    return stains[0], stains[1]


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    coarse = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(coarse.resize((size, size), Image.BILINEAR), dtype=np.float64) / 255.0


def nucleus_layout(rng: np.random.Generator, tumour: bool, size: int) -> np.ndarray:
    """Rows of (y, x, radius, elongation, angle, haematoxylin density), in pixels."""
    scale = size / 64.0
    if tumour:  # crowded, random, large and pleomorphic
        count = rng.integers(22, 32)
        centres = rng.uniform(0, size, (count, 2))
        radius = rng.uniform(3.2, 5.0, count) * scale
        elongation = rng.uniform(1.0, 1.8, count)
        density = rng.uniform(1.15, 1.5, count)
    else:  # sparse, evenly spaced, small and round
        spacing = 13.0 * scale
        axis = np.arange(spacing / 2, size, spacing)
        centres = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)
        centres = centres + rng.normal(0, 1.5 * scale, centres.shape)
        centres = centres[rng.random(len(centres)) < 0.8]
        count = len(centres)
        radius = rng.uniform(1.8, 2.6, count) * scale
        elongation = rng.uniform(1.0, 1.15, count)
        density = rng.uniform(0.85, 1.1, count)
    angle = rng.uniform(0, np.pi, count)
    return np.column_stack([centres, radius, elongation, angle, density])


def render_patch(rng: np.random.Generator, tumour: bool, stain: tuple[np.ndarray, np.ndarray], size: int) -> np.ndarray:
    """One (size, size, 3) uint8 H&E-like patch."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    theta, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    wobble = 6.0 * smooth_noise(rng, size, 4)
    fibres = 0.5 + 0.5 * np.sin(0.45 * (x * np.cos(theta) + y * np.sin(theta)) * 64 / size + phase + wobble)
    eosin = 0.35 + 0.35 * fibres * smooth_noise(rng, size, 6) + 0.15 * smooth_noise(rng, size, 3)

    haematoxylin = np.zeros((size, size))
    for cy, cx, radius, elongation, angle, density in nucleus_layout(rng, tumour, size):
        dy, dx = y - cy, x - cx
        along = dx * np.cos(angle) + dy * np.sin(angle)
        across = -dx * np.sin(angle) + dy * np.cos(angle)
        distance = np.sqrt((along / (radius * elongation)) ** 2 + (across / radius) ** 2)
        mask = 1.0 / (1.0 + np.exp((distance - 1.0) * 8.0))  # soft-edged ellipse
        haematoxylin = np.maximum(haematoxylin, density * mask)
    eosin *= 1.0 - 0.6 * np.clip(haematoxylin, 0, 1)

    density = haematoxylin[..., None] * stain[0] + eosin[..., None] * stain[1]
    density += rng.normal(0, 0.03, density.shape)
    return (255 * np.exp(-np.clip(density, 0, None))).clip(0, 255).astype(np.uint8)


def tumour_region(rng: np.random.Generator, grid: int) -> np.ndarray:
    """A (grid, grid) boolean map: one elliptical region over 10-30 % of the tiles."""
    rows, cols = np.mgrid[0:grid, 0:grid] + 0.5
    while True:
        cy, cx = rng.uniform(0.2 * grid, 0.8 * grid, 2)
        ry, rx = rng.uniform(0.15 * grid, 0.35 * grid, 2)
        region = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1.0
        if 0.1 <= region.mean() <= 0.3:
            return region


def write_synthetic(root: Path, spec: DemoSpec) -> None:
    """Write the synthetic slides under ``root/<normal|tumor>/<slide>/<x>_<y>.png`` with
    ``patch_labels.csv`` (path, label, slide), ``slide_labels.csv`` (slide, label), and
    ``knn_train.csv`` / ``knn_test.csv``: the patch labels split by slide, half of each class."""
    rng = np.random.default_rng(spec.seed)
    patch_rows, slide_rows = [], []
    slides = [(f"{label}_{i:03d}", label) for label in ("normal", "tumor") for i in range(spec.slides_per_class)]
    for slide, slide_label in tqdm(slides, desc="synthetic slides", unit="slide"):
        stain = slide_stain(rng)
        region = tumour_region(rng, spec.grid) if slide_label == "tumor" else np.zeros((spec.grid,) * 2, bool)
        folder = root / slide_label / slide
        folder.mkdir(parents=True, exist_ok=True)
        for row in range(spec.grid):
            for col in range(spec.grid):
                tumour = bool(region[row, col])
                name = f"{col * spec.patch_size}_{row * spec.patch_size}.png"
                Image.fromarray(render_patch(rng, tumour, stain, spec.patch_size)).save(folder / name)
                patch_rows.append((f"{slide_label}/{slide}/{name}", "tumor" if tumour else "normal", slide))
        slide_rows.append((slide, slide_label))
    write_csv(root / "patch_labels.csv", ("path", "label", "slide"), patch_rows)
    write_csv(root / "slide_labels.csv", ("slide", "label"), slide_rows)
    # A slide-disjoint split for patch-level evaluation: the first half of each class's slides train.
    train_slides = {f"{label}_{i:03d}" for label in ("normal", "tumor") for i in range(spec.slides_per_class // 2)}
    write_csv(root / "knn_train.csv", ("path", "label", "slide"), [r for r in patch_rows if r[2] in train_slides])
    write_csv(root / "knn_test.csv", ("path", "label", "slide"), [r for r in patch_rows if r[2] not in train_slides])


def write_cmu_patches(root: Path, patch_size: int, min_tissue: float = 0.5) -> int:
    """Cut the CC0 slide at its native 20x into non-overlapping tissue patches under
    ``root/CMU-1-region/<x>_<y>.png``; return how many were kept."""
    import tiffslide

    with tiffslide.TiffSlide(CMU_SLIDE) as slide:
        width, height = slide.dimensions
        region = np.asarray(slide.read_region((0, 0), 0, (width, height)).convert("RGB"))
    # Stained tissue is saturated; glass background is near-white and grey.
    saturation = region.max(-1).astype(np.int16) - region.min(-1)
    tissue = saturation > 25
    folder = root / "CMU-1-region"
    folder.mkdir(parents=True, exist_ok=True)
    kept = 0
    for top in range(0, height - patch_size + 1, patch_size):
        for left in range(0, width - patch_size + 1, patch_size):
            if tissue[top : top + patch_size, left : left + patch_size].mean() >= min_tissue:
                patch = region[top : top + patch_size, left : left + patch_size]
                Image.fromarray(patch).save(folder / f"{left}_{top}.png")
                kept += 1
    return kept


def prepare_demo(root: str | Path, spec: DemoSpec = DemoSpec()) -> Path:
    """Write the demo set under ``root`` (``synthetic/`` and ``cmu1/``, which belong to the
    demo) unless the same version and spec are already there; return ``root``."""
    root = Path(root)
    marker = root / "demo.json"
    wanted = {"version": DEMO_VERSION, **asdict(spec)}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return root
    marker.unlink(missing_ok=True)
    for folder in ("synthetic", "cmu1"):  # another spec's patches must not stay beside this one's
        shutil.rmtree(root / folder, ignore_errors=True)
    write_synthetic(root / "synthetic", spec)
    if spec.cmu_patches:
        write_cmu_patches(root / "cmu1", spec.patch_size)
    marker.write_text(json.dumps(wanted))
    return root


def check_spec(spec: DemoSpec) -> DemoSpec:
    """Refuse a spec that cannot make the demo's slide-disjoint train / test split."""
    for name, least in (("patch_size", 8), ("slides_per_class", 2), ("grid", 1)):
        if getattr(spec, name) < least:
            raise ConfigError(f"--{name} must be at least {least} (got {getattr(spec, name)})")
    return spec


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m clusiam.demo", description="Write the clusiam demo patch set.")
    parser.add_argument("out", type=Path, help="folder to write the demo set into")
    parser.add_argument("--seed", type=int, default=DemoSpec.seed,
                        help="seeds the synthetic slides' stains and tumours")
    parser.add_argument("--patch_size", type=int, default=DemoSpec.patch_size, help="patch side in pixels")
    parser.add_argument("--slides_per_class", type=int, default=DemoSpec.slides_per_class,
                        help="synthetic slides of each class, normal and tumor")
    parser.add_argument("--grid", type=int, default=DemoSpec.grid, help="patches per slide side")
    parser.add_argument("--no_cmu", dest="cmu_patches", action="store_false", help="synthetic slides only")
    return parser


def main(argv: list[str] | None = None) -> int:
    def write() -> None:
        args = build_parser().parse_args(argv)
        out = args.__dict__.pop("out")
        spec = check_spec(DemoSpec(**vars(args)))
        print(f"demo set written to {prepare_demo(make_folder(check_output_folder(out, 'OUT_DIR'), 'OUT_DIR'), spec)}")

    return run_command(write)


if __name__ == "__main__":
    raise SystemExit(main())
