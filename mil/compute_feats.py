"""Encode every patch of every slide with a pretrained checkpoint: one HDF5 bag per slide.

    python -m mil.compute_feats --checkpoint runs/clusiam/last.pth --patches PATCH_ROOT --out feats/

A slide is a folder holding patch images (``PATCH_ROOT/<class>/<slide>/`` or
``PATCH_ROOT/<slide>/``). Each ``<out>/<slide>.h5`` holds ``features`` (N, D) float32,
``paths`` (N,) relative to PATCH_ROOT, ``coords`` (N, 2) when every patch is named
``<x>_<y>.<ext>`` (the tiler's names), and attributes naming the checkpoint, feature
type, resize and precision. Finished slides are skipped on a rerun that would encode them
the same way; a bag made differently is encoded again.

Under torchrun (``torchrun --nproc_per_node 8 -m mil.compute_feats ...``) each process
encodes its share of the slides.
"""
from __future__ import annotations

import argparse
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from clusiam.checkpoint import load_pretrained
from clusiam.distributed import add_dist_timeout, barrier, is_main, main_computes, processes, shard
from clusiam.errors import CommandParser, DataError, InRange, run_command
from clusiam.features import FEATURE_TYPES, encode, feature_extractor, precision
from clusiam.files import check_output_folder, file_digest, make_folder, write_atomically
from clusiam.images import find_images
from clusiam.tables import read_table

COORDINATE_NAME = re.compile(r"^(\d+)_(\d+)$")
ENCODING_ATTRIBUTES = ("checkpoint_sha256", "feature", "resize", "precision")  # what decides a bag's features


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m mil.compute_feats", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--patches", required=True, help="root of the slide folders")
    parser.add_argument("--out", required=True, help="folder for the <slide>.h5 bags")
    parser.add_argument("--labels", default=None,
                        help="slides.csv (slide, label): slides listed there without patches are reported")
    parser.add_argument("--feature", default="backbone", choices=FEATURE_TYPES)
    parser.add_argument("--batch_size", type=int, default=512, action=InRange, at_least=1)
    parser.add_argument("--num_workers", type=int, default=8, action=InRange, at_least=0,
                        help="data loading processes (0 = in the main process)")
    parser.add_argument("--resize", type=int, default=None, action=InRange, at_least=1,
                        help="bring every patch to N x N pixels first")
    parser.add_argument("--device", default="auto")
    add_dist_timeout(parser, "the others finishing their slides")
    return parser


def slide_patches(root: Path) -> dict[str, list[Path]]:
    """Patch files grouped by slide (the folder that holds them); slide names must be unique."""
    by_folder: dict[Path, list[Path]] = defaultdict(list)
    for path in find_images(root, "--patches"):
        by_folder[path.parent].append(path)
    slides: dict[str, list[Path]] = {}
    for folder, files in sorted(by_folder.items()):
        if folder == root:
            raise DataError(f"{files[0]} lies directly in {root}: "
                            "put each slide's patches in a folder named after the slide")
        if folder.name in slides:
            raise DataError(f"two folders are named {folder.name} ({folder} and {slides[folder.name][0].parent}): "
                            "slide names must be unique")
        slides[folder.name] = files
    return slides


def coordinates(files: Sequence[Path]) -> np.ndarray | None:
    """(N, 2) x, y from names ``<x>_<y>.png``; None unless every name has that form."""
    matches = [COORDINATE_NAME.match(path.stem) for path in files]
    if not all(matches):
        return None
    return np.array([[int(m.group(1)), int(m.group(2))] for m in matches], dtype=np.int64)


def bag_encoding(handle: h5py.File) -> tuple:
    """How a bag was made: the values of its ENCODING_ATTRIBUTES (None where one is absent)."""
    return tuple(handle.attrs.get(name) for name in ENCODING_ATTRIBUTES)


def is_done(path: Path, encoding: tuple) -> bool:
    """Whether ``path`` is a whole bag made the way ``encoding`` (see :func:`bag_encoding`) says."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as handle:
            return bag_encoding(handle) == encoding
    except OSError:  # a file cut short by a crash: redo it
        return False


def write_bag(path: Path, features: np.ndarray, files: Sequence[Path], root: Path, attributes: dict) -> None:
    """Write one slide's bag atomically."""

    def write(temporary: Path) -> None:
        with h5py.File(temporary, "w") as handle:
            handle["features"] = features.astype(np.float32)
            handle["paths"] = [str(p.relative_to(root)) for p in files]
            coords = coordinates(files)
            if coords is not None:
                handle["coords"] = coords
            handle.attrs.update(attributes)

    write_atomically(path, write)


def compute(args: argparse.Namespace) -> dict[str, int]:
    """Write every missing bag; return how many slides were encoded, skipped and missing."""
    check_output_folder(args.out, "--out")  # before any work: bags that cannot be written are refused now
    with processes(args.device, args.dist_timeout) as device:
        return compute_on(device, args)


def compute_on(device: torch.device, args: argparse.Namespace) -> dict[str, int]:
    root, out = Path(args.patches), Path(args.out)
    model, state = load_pretrained(args.checkpoint)
    encoder = feature_extractor(model, args.feature)
    # HDF5 attributes cannot hold None, so no resize is stored as 0.
    encoding = (file_digest(Path(args.checkpoint)), args.feature, args.resize or 0, precision(device))
    attributes = {**dict(zip(ENCODING_ATTRIBUTES, encoding)), "checkpoint": str(args.checkpoint),
                  "model_type": state["config"]["model_type"], "backbone": state["config"]["backbone"]}
    slides = slide_patches(root)
    missing = sorted(set(read_table(args.labels, ("slide", "label"))) - set(slides)) if args.labels else []
    make_folder(out, "--out")
    # Rank 0 decides what is left, so that no process sees a bag another has just written.
    pending = main_computes(lambda: [s for s in slides if not is_done(out / f"{s}.h5", encoding)])
    mean, std = state["normalization"]["mean"], state["normalization"]["std"]
    mine = shard(pending, sizes=[len(slides[s]) for s in pending])
    for slide in tqdm(mine, desc="slides", unit="slide", disable=not is_main()):
        features = encode(encoder, slides[slide], mean, std, device, batch_size=args.batch_size,
                          num_workers=args.num_workers, resize=args.resize, desc=slide)
        write_bag(out / f"{slide}.h5", features, slides[slide], root, attributes)
    barrier()
    summary = {"encoded": len(pending), "already_done": len(slides) - len(pending), "without_patches": len(missing)}
    if not is_main():
        return summary
    print(f"{summary['encoded']} slides encoded, {summary['already_done']} already done, into {out}")
    if missing:
        listing = out / "slides_without_patches.txt"
        listing.write_text("".join(f"{s}\n" for s in missing))
        print(f"warning: {len(missing)} labelled slide(s) have no patches under {root} (listed in {listing}), "
              f"e.g. {missing[0]}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(lambda: compute(build_parser().parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
