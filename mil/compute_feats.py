"""Encode every patch of every slide with a pretrained checkpoint: one HDF5 bag per slide.

    python -m mil.compute_feats --checkpoint runs/clusiam/last.pth --patches PATCH_ROOT --out feats/
    python -m mil.compute_feats --checkpoint runs/clusiam/last.pth --job JOB --out feats/ [--pt_files]
    python -m mil.compute_feats --checkpoint runs/clusiam/last.pth --coords DIR --slides DIR --out feats/

A slide is a folder holding patch images (``PATCH_ROOT/<class>/<slide>/`` or
``PATCH_ROOT/<slide>/``), or a slide file whose patches a coordinate file lists (a tiling
job, or TRIDENT's / CLAM's ``<slide>.h5`` beside a folder of slides), read without writing
any patch. Each ``<out>/<slide>.h5`` holds ``features`` (N, D) float32, ``coords`` (N, 2):
from slides, the coordinate file's corners with its attributes copied (as TRIDENT's feature
files do); from files, when every patch is named ``<x>_<y>.<ext>`` (the tiler's names),
beside ``paths`` (N,) relative to PATCH_ROOT; and attributes naming the checkpoint, feature
type, resize and precision. Finished slides are skipped on a rerun that would encode them
the same way; a bag made differently is encoded again. ``--pt_files`` also writes CLAM's
``<out>/pt_files/<slide>.pt`` (a float tensor (N, D)), from the bag, so bags already there
are not encoded again for it. ``--layout clam`` writes them and links each bag as
``<out>/h5_files/<slide>.h5``: CLAM's ``Generic_MIL_Dataset(data_dir=OUT)`` loads either;
``--layout trident`` links each bag as ``<out>/<mag>x_<size>px_<overlap>px_overlap/
features_<encoder>/<slide>.h5``, where TRIDENT's processor (``job_dir=OUT``) finds it.

Under torchrun (``torchrun --nproc_per_node 8 -m mil.compute_feats ...``) each process
encodes its share of the slides.
"""
from __future__ import annotations

import argparse
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from clusiam.checkpoint import load_pretrained
from clusiam.coords import LAYOUTS, read_attributes, trident_folder, trident_folders, write_link
from clusiam.distributed import DEVICE_HELP, add_dist_timeout, barrier, is_main, main_computes, processes, shard
from clusiam.errors import CommandParser, ConfigError, DataError, InRange, counted, run_command
from clusiam.features import FEATURE_TYPES, encode, feature_extractor, precision
from clusiam.files import check_output_folder, file_digest, file_list_key, make_folder, write_atomically
from clusiam.images import find_images
from clusiam.machine import default_processes
from clusiam.slide_source import Pair, SlideSource, add_slide_options, slide_pairs
from clusiam.sources import FolderSource, PatchSource
from clusiam.tables import read_table

COORDINATE_NAME = re.compile(r"^(\d+)_(\d+)$")
# How a bag's features are computed: every bag of one MIL set must agree on these.
ENCODING_ATTRIBUTES = ("checkpoint_sha256", "feature", "resize", "precision")
# Which patches a bag holds (a key of their files, or of the slide, its coordinates and how they
# are read): with the above, what a rerun compares, so that a slide tiled again is encoded again.
PATCHES_KEY = "patches_key"
PT_FOLDER = "pt_files"  # CLAM's name for the folder of <slide>.pt feature tensors
H5_FOLDER = "h5_files"  # and of its <slide>.h5 feature files (features and coords), which --layout clam links
# Patches encoded at a time when --batch_size is left out. ResNet-18 on 224 px patches on a 2-core CPU: 12, 16, 20, 20
# and 23 patches/s in batches of 16, 32, 64, 128 and 256, the process peaking at 1.5 GiB at 64, 1.9 at 128 and 4.6
# at 512: beyond 128, a batch takes memory for little speed.
GPU_BATCH, CPU_BATCH = 512, 128
# Peak memory of one DataLoader worker, with margin: 248 MiB of its own (447 MiB PSS, with its share of the libraries)
# reading 224 px patches from the CC0 slide in batches of 512 (76 and 278 MiB in batches of 128). The default
# --num_workers is the cores, or the available memory divided by this where that is less.
WORKER_PEAK_MIB = 512


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m mil.compute_feats", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--patches", default=None, help="root of the slide folders of patch files")
    parser.add_argument("--out", required=True, help="folder for the <slide>.h5 bags")
    parser.add_argument("--labels", default=None,
                        help="slides.csv (slide, label): slides listed there without patches are reported")
    parser.add_argument("--feature", default="backbone", choices=FEATURE_TYPES,
                        help="backbone output (the paper's) or projector output")
    parser.add_argument("--batch_size", type=int, default=None, action=InRange, at_least=1,
                        help=f"patches encoded at a time (default: {GPU_BATCH} on a GPU, {CPU_BATCH} on a CPU, where "
                        "a larger batch is hardly faster and takes more memory)")
    parser.add_argument("--num_workers", type=int, default=None, action=InRange, at_least=0,
                        help="data loading processes, 0 = in the main process (default: one per core, or as many as "
                        f"the available memory holds at {WORKER_PEAK_MIB} MiB a worker where that is fewer; under "
                        "torchrun, each process its share of the node)")
    parser.add_argument("--resize", type=int, default=None, action=InRange, at_least=1,
                        help="bring every patch to N x N pixels first (patches from slides are read so; default: as "
                        "they are)")
    parser.add_argument("--pt_files", action="store_true",
                        help=f"also write CLAM's OUT/{PT_FOLDER}/<slide>.pt (float tensor N x D)")
    parser.add_argument("--layout", nargs="+", default=["clusiam"], choices=LAYOUTS,
                        help=f"also lay the bags out for CLAM (OUT/{PT_FOLDER}/<slide>.pt, OUT/{H5_FOLDER}/<slide>.h5) "
                        "or TRIDENT (OUT/<mag>x_<size>px_<overlap>px_overlap/features_<encoder>/<slide>.h5)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_slide_options(parser, "instead of --patches: one bag per slide of the coordinate files")
    add_dist_timeout(parser, "the others finishing their slides")
    return parser


@dataclass
class SlideInput:
    """One slide's patches (``indices`` of ``source``, which may hold other slides' too), and
    what its bag records about them beside the features."""

    source: PatchSource
    indices: range
    coords: np.ndarray | None = None  # (N, 2) level-0 corners, where known
    coords_attributes: dict = field(default_factory=dict)  # the coordinate file's, copied onto the bag's coords
    paths: list[str] | None = None  # patch files, relative to --patches
    key: str = ""  # a key of exactly these patches (the bag's PATCHES_KEY)


def read_inputs(args: argparse.Namespace) -> dict[str, SlideInput]:
    """The slides to encode, by name: folders of patch files (``--patches``) or slides with
    coordinate files (``--job``, ``--coords --slides``)."""
    if bool(args.patches) == bool(args.job or args.coords or args.slides):
        raise ConfigError("pass one of --patches PATCH_ROOT (patch files), --job JOB or --coords DIR --slides DIR "
                          "(patches read from slides)")
    pairs = slide_pairs(args)
    return file_inputs(Path(args.patches)) if pairs is None else slide_inputs(pairs, args.resize)


def file_inputs(root: Path) -> dict[str, SlideInput]:
    """Each slide folder's patch files, with corners where their names give them."""
    return {name: SlideInput(FolderSource(files), range(len(files)), coordinates(files),
                             paths=[str(p.relative_to(root)) for p in files], key=file_list_key(files))
            for name, files in slide_patches(root).items()}


def slide_inputs(pairs: dict[str, Pair], size: int | None) -> dict[str, SlideInput]:
    """Each slide's patches, checked by :meth:`SlideSource.checked` and read at ``size`` pixels
    (default: the coordinate files'). All slides share one source, which keeps only a few
    slides open however many there are."""
    source, _ = SlideSource.checked(list(pairs.values()), size)
    return {name: SlideInput(source, range(start, end), entry.coords, read_attributes(coords), key=entry.key())
            for (name, (_, coords)), entry, start, end in zip(pairs.items(), source.entries, source.offsets,
                                                              source.offsets[1:])}


def check_layouts(slides: dict[str, SlideInput], layouts: Sequence[str]) -> None:
    """Refuse, before any encoding, a layout some bag cannot be given: TRIDENT's and CLAM's
    feature files hold the patches' coords, and TRIDENT's folder is named by the magnification
    that a coordinate file records (:func:`clusiam.coords.trident_folder`)."""
    others = [layout for layout in layouts if layout != "clusiam"]
    if not others:
        return
    for name, slide in slides.items():
        if slide.coords is None:
            raise ConfigError(f"--layout {others[0]}: the patch files of slide {name} are not named <x>_<y>.<ext>, so "
                              "its bag would have no coords, which TRIDENT's and CLAM's feature files hold: read the "
                              "patches from slides (--job, or --coords with --slides), or leave --layout out")
        if "trident" in others and trident_folder(slide.coords_attributes) is None:
            raise ConfigError(f"--layout trident: nothing says at which magnification the patches of slide {name} "
                              "were cut (patch files, or a coordinate file without mpp or target_magnification, as "
                              "CLAM writes them), and TRIDENT names its folder by it: read them through coordinate "
                              "files of python -m clusiam.tile or TRIDENT, or leave --layout trident out")


def encoder_name(config: dict, feature: str) -> str:
    """The ``<encoder>`` of TRIDENT's ``features_<encoder>`` folder: the checkpoint's method and
    backbone (``clusiam_resnet18``, as TRIDENT names its own, ``uni_v1``), and the feature type
    where it is not the backbone's, so that two kinds of features never share a folder."""
    name = f"{config['model_type']}_{config['backbone']}"
    return name if feature == "backbone" else f"{name}_{feature}"


def link_layouts(out: Path, slides: dict[str, SlideInput], layouts: Sequence[str], encoder: str) -> list[Path]:
    """Link every bag where CLAM's ``Generic_MIL_Dataset`` (``OUT/h5_files``) and TRIDENT's
    processor (``OUT/<folder>/features_<encoder>``) look for it; return the folders linked
    into. A slide's link in another TRIDENT folder (its coordinates made at another
    magnification, size or overlap since) is removed."""
    folders, earlier = set(), trident_folders(out)
    for name, slide in slides.items():
        bag = out / f"{name}.h5"
        if "clam" in layouts:
            folders.add(out / H5_FOLDER)
            write_link(out / H5_FOLDER / f"{name}.h5", bag)
        if "trident" in layouts:
            folder = out / trident_folder(slide.coords_attributes) / f"features_{encoder}"
            for stale in (other / folder.name / f"{name}.h5" for other in earlier if other != folder.parent):
                if stale.is_symlink():
                    stale.unlink()
            folders.add(folder)
            write_link(folder / f"{name}.h5", bag)
    return sorted(folders)


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


def is_done(path: Path, encoding: tuple, patches_key: str) -> bool:
    """Whether ``path`` is a whole bag of these patches made the way ``encoding`` (see
    :func:`bag_encoding`) says."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as handle:
            return bag_encoding(handle) == encoding and handle.attrs.get(PATCHES_KEY) == patches_key
    except OSError:  # a file cut short by a crash: redo it
        return False


def write_bag(path: Path, features: np.ndarray, slide: SlideInput, attributes: dict) -> None:
    """Write one slide's bag atomically."""

    def write(temporary: Path) -> None:
        with h5py.File(temporary, "w") as handle:
            handle["features"] = features.astype(np.float32)
            if slide.paths is not None:
                handle["paths"] = slide.paths
            if slide.coords is not None:
                handle["coords"] = slide.coords
                handle["coords"].attrs.update(slide.coords_attributes)
            handle.attrs.update(attributes)

    write_atomically(path, write)


def write_pt_files(out: Path, slides: Sequence[str]) -> int:
    """CLAM's ``pt_files/<slide>.pt`` of every bag whose tensor is missing or older than the
    bag (made before the bag was encoded again), each process its share; how many were written."""
    bags = {slide: out / f"{slide}.h5" for slide in slides}
    tensors = {slide: out / PT_FOLDER / f"{slide}.pt" for slide in slides}
    stale = main_computes(lambda: [s for s in slides if not tensors[s].is_file()
                                   or tensors[s].stat().st_mtime_ns < bags[s].stat().st_mtime_ns])
    for slide in shard(stale):
        write_pt(bags[slide], tensors[slide])
    barrier()
    return len(stale)


def write_pt(bag: Path, path: Path) -> None:
    """A bag's features as a plain float32 tensor (N, D), which ``torch.load(weights_only=True)`` reads."""
    with h5py.File(bag, "r") as handle:
        features = torch.from_numpy(handle["features"][:])
    write_atomically(path, lambda temporary: torch.save(features, temporary))


def compute(args: argparse.Namespace) -> dict[str, int]:
    """Write every missing bag (and with ``--pt_files`` tensor); return how many slides were
    encoded, skipped and missing, and how many tensors were written."""
    check_output_folder(args.out, "--out")  # before any work: bags that cannot be written are refused now
    with processes(args.device, args.dist_timeout) as device:
        return compute_on(device, args)


def loading_defaults(args: argparse.Namespace, device: torch.device) -> None:
    """Fill in --batch_size and --num_workers where they are left out, from the device and what
    the machine holds (shared by torchrun's processes on this node); rank 0 says so."""
    notes = []
    if args.batch_size is None:
        on_gpu = device.type == "cuda"
        args.batch_size = GPU_BATCH if on_gpu else CPU_BATCH
        kind, other = ("a GPU", f"{CPU_BATCH} on a CPU") if on_gpu else ("a CPU", f"{GPU_BATCH} on a GPU")
        notes.append(f"--batch_size {args.batch_size}: encoding on {kind} ({other}; pass --batch_size to choose)")
    if args.num_workers is None:
        sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        args.num_workers, why = default_processes("--num_workers", WORKER_PEAK_MIB, "a worker", sharing)
        notes.append(why)
    if is_main():
        for note in notes:
            print(note)


def compute_on(device: torch.device, args: argparse.Namespace) -> dict[str, int]:
    out = Path(args.out)
    slides = read_inputs(args)
    check_layouts(slides, args.layout)
    model, state = load_pretrained(args.checkpoint)
    encoder = feature_extractor(model, args.feature)
    # HDF5 attributes cannot hold None, so no resize is stored as 0.
    encoding = (file_digest(Path(args.checkpoint)), args.feature, args.resize or 0, precision(device))
    attributes = {**dict(zip(ENCODING_ATTRIBUTES, encoding)), "checkpoint": str(Path(args.checkpoint).resolve()),
                  "model_type": state["config"]["model_type"], "backbone": state["config"]["backbone"]}
    missing = sorted(set(read_table(args.labels, ("slide", "label"))) - set(slides)) if args.labels else []
    make_folder(out, "--out")
    # Rank 0 decides what is left, so that no process sees a bag another has just written.
    pending = main_computes(lambda: [s for s in slides if not is_done(out / f"{s}.h5", encoding, slides[s].key)])
    mean, std = state["normalization"]["mean"], state["normalization"]["std"]
    mine = shard(pending, sizes=[len(slides[s].indices) for s in pending])
    if pending:  # said only where there is something to encode
        loading_defaults(args, device)
    for slide in tqdm(mine, desc="slides", unit="slide", disable=not is_main()):
        features = encode(encoder, slides[slide].source, mean, std, device, batch_size=args.batch_size,
                          num_workers=args.num_workers, resize=args.resize, desc=slide, indices=slides[slide].indices)
        write_bag(out / f"{slide}.h5", features, slides[slide], {**attributes, PATCHES_KEY: slides[slide].key})
    barrier()
    pt_files = args.pt_files or "clam" in args.layout
    summary = {"encoded": len(pending), "already_done": len(slides) - len(pending), "without_patches": len(missing),
               "pt_files": write_pt_files(out, list(slides)) if pt_files else 0}
    if is_main():
        linked = link_layouts(out, slides, args.layout, encoder_name(state["config"], args.feature))
        report(summary, out, missing, args, pt_files, linked)
    return summary


def report(summary: dict[str, int], out: Path, missing: Sequence[str], args: argparse.Namespace, pt_files: bool,
           linked: Sequence[Path]) -> None:
    """Say what was done and where the layouts' links are, and list the labelled slides that have no patches."""
    tensors = f"; {counted(summary['pt_files'], 'tensor')} written to {PT_FOLDER}" if pt_files else ""
    links = f"; bags linked into {', '.join(map(str, linked))}" if linked else ""
    print(f"{counted(summary['encoded'], 'slide')} encoded, {summary['already_done']} already done, into "
          f"{out}{tensors}{links}")
    if missing:
        listing = out / "slides_without_patches.txt"
        listing.write_text("".join(f"{s}\n" for s in missing))
        where = args.patches or args.job or args.coords
        print(f"warning: {len(missing)} labelled slide(s) have no patches under {where} (listed in {listing}), "
              f"e.g. {missing[0]}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(lambda: compute(build_parser().parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
