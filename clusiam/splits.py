"""Labelled patch splits for patch-level evaluation, and the guard against leakage between
a training and a test split (a slide in both, or the same file twice).

A split is patch files (a folder ``root/<class>/<slide>/<patch>``, or a table of ``path,
label, slide``) or a table of patches read straight from slides (``slide, x, y, label``, as
a tiling job's ``patch_labels.csv``), located through a tiling job or coordinate files."""
from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from clusiam.coords import JOB_FILE
from clusiam.errors import ConfigError, DataError
from clusiam.files import file_digest
from clusiam.images import find_images
from clusiam.slide_source import Pair, SlideSource, is_job, job_pairs, named_pairs
from clusiam.sources import FolderSource, PatchSource
from clusiam.tables import read_csv_rows


@dataclass
class LabelledPatches:
    """Patches with a class label and the slide each comes from, in the source's order."""

    source: PatchSource
    labels: list[str]
    slides: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def read_labelled_patches(source: str | os.PathLike, pairs: dict[str, Pair] | None = None,
                          size: int | None = None) -> LabelledPatches:
    """Labelled patches from a folder laid out ``root/<class>/<slide>/<patch>`` or a table.

    A table whose every row names a file (``path, label, slide``; relative paths start at
    the table's folder) is read from those files, unless ``pairs`` (slide name: slide file and
    coordinate file, from ``--job`` or ``--coords --slides``) say to read it from slides; a
    table without paths (``slide, x, y, label``) is read from ``pairs``, or from the tiling
    job the table sits in. Slide patches are read at ``size`` pixels (default: the
    coordinate files')."""
    source = Path(source)
    if source.suffix.lower() != ".csv":
        if pairs is not None:
            raise ConfigError(f"--job and --coords/--slides read patch tables (slide, x, y, label), but {source} is "
                              "a folder of patch files: pass a table, or leave those options out")
        return folder_patches(source)
    rows = read_csv_rows(source, ("label", "slide"))
    labels, slides = [row["label"].strip() for row in rows], [row["slide"].strip() for row in rows]
    unassigned = [line for line, (label, slide) in enumerate(zip(labels, slides), start=2) if not label or not slide]
    if unassigned:
        raise DataError(f"{source}, line {unassigned[0]}: no slide or label ({len(unassigned)} such rows): "
                        "give every patch its slide and label")
    if pairs is None and all(row.get("path", "").strip() for row in rows):
        return file_patches(source, rows, labels, slides)
    return slide_patches(source, rows, labels, slides, table_pairs(source) if pairs is None else pairs, size)


def folder_patches(root: Path) -> LabelledPatches:
    """Patch files laid out ``root/<class>/<slide>/<patch>``."""
    files = find_images(root, "--train / --test")
    shallow = [p for p in files if len(p.relative_to(root).parts) < 3]
    if shallow:
        raise DataError(
            f"{shallow[0]} is not in a <class>/<slide>/ folder under {root} ({len(shallow)} such files): "
            "lay patches out as root/<class>/<slide>/<patch>, or list them in a CSV with path, label, slide"
        )
    parts = [p.relative_to(root).parts for p in files]
    return LabelledPatches(FolderSource(files), [part[0] for part in parts], [part[1] for part in parts])


def file_patches(table: Path, rows: Sequence[dict], labels: list[str], slides: list[str]) -> LabelledPatches:
    """The patch files a table lists, relative to its folder; each must exist."""
    paths = [table.parent / row["path"].strip() for row in rows]
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise DataError(f"{table}: {len(absent)} listed files do not exist, e.g. {absent[0]}")
    return LabelledPatches(FolderSource(paths), labels, slides)


def table_pairs(table: Path) -> dict[str, Pair]:
    """The slides of the tiling job a table without patch files sits in."""
    if not is_job(table.parent):
        raise DataError(f"{table} names patches by slide, x, y rather than by file, and {table.parent} is not a "
                        f"tiling job (no {JOB_FILE}): pass --job JOB, or --coords DIR --slides DIR, to say where "
                        "its slides are")
    return named_pairs(job_pairs(table.parent))


def slide_patches(table: Path, rows: Sequence[dict], labels: list[str], slides: list[str],
                  pairs: dict[str, Pair], size: int | None) -> LabelledPatches:
    """The patches a table names by slide and corner, read from the slides of ``pairs``,
    grouped by slide (in the order slides first appear) and in the table's order within
    one. Unknown slides, and corners the slide's coordinate file does not list, are refused."""
    missing = [column for column in ("x", "y") if column not in rows[0]]
    if missing:
        raise DataError(f"{table}: a table read from slides needs columns slide, x, y, label; missing "
                        f"{', '.join(missing)}")
    corners = [row_corner(table, line, row) for line, row in enumerate(rows, start=2)]
    members: dict[str, list[int]] = {}  # each slide's rows, slides in the order they first appear
    for index, slide in enumerate(slides):
        members.setdefault(slide, []).append(index)
    unknown = [name for name in members if name not in pairs]
    if unknown:
        known = ", ".join(sorted(pairs)[:3]) or "none"
        raise DataError(f"{table}: {len(unknown)} slide(s) have no coordinate file (e.g. {unknown[0]}; the "
                        f"{len(pairs)} known include {known}): check the table's slide column, or pass the "
                        "tiling job (--job) or --coords/--slides that hold them")
    checked, _ = SlideSource.checked([pairs[name] for name in members], size)
    entries = []
    for name, entry in zip(members, checked.entries):
        wanted = np.array([corners[i] for i in members[name]], dtype=np.int64)
        check_listed(wanted, entry.coords, pairs[name][1], table)
        entries.append(dataclasses.replace(entry, coords=wanted))
    order = [index for indices in members.values() for index in indices]
    return LabelledPatches(SlideSource(entries), [labels[i] for i in order], [slides[i] for i in order])


def row_corner(table: Path, line: int, row: dict) -> tuple[int, int]:
    """A row's patch corner (x, y), in level-0 pixels."""
    try:
        return int(row["x"]), int(row["y"])
    except ValueError:
        raise DataError(f"{table}, line {line}: x and y must be whole numbers of level-0 pixels (got "
                        f"{row['x']!r}, {row['y']!r})") from None


def check_listed(wanted: np.ndarray, listed: np.ndarray, coords_path: Path, table: Path) -> None:
    """Refuse corners of ``wanted`` that are not ``listed`` in the slide's coordinate file: a
    table made from other coordinates would read patches at places no one labelled."""
    known = set(map(tuple, listed.tolist()))
    absent = [corner for corner in map(tuple, wanted.tolist()) if corner not in known]
    if absent:
        raise DataError(f"{table}: {len(absent)} row(s) name patches that {coords_path} does not list (e.g. x "
                        f"{absent[0][0]}, y {absent[0][1]}): make the table from the same coordinates")


def patch_files(patches: LabelledPatches) -> list[Path]:
    """The files of a split read from files; patches read from slides have none (a slide
    in both splits is caught by its name)."""
    return patches.source.files if isinstance(patches.source, FolderSource) else []


def split_overlap(train: LabelledPatches, test: LabelledPatches) -> list[str]:
    """What leaks between a training and a test split: slides in both, and test files
    identical (same bytes) to training files. Only files whose size matches a file on the
    other side are hashed, each once, so this stays linear in the number of files."""
    problems = []
    shared_slides = sorted(set(train.slides) & set(test.slides))
    if shared_slides:
        problems.append(f"{len(shared_slides)} slide(s) are in both train and test, "
                        f"e.g. {', '.join(shared_slides[:3])}")
    train_sizes = {path: path.stat().st_size for path in patch_files(train)}
    test_sizes = {path: path.stat().st_size for path in patch_files(test)}
    shared_sizes = set(train_sizes.values()) & set(test_sizes.values())
    train_by_digest = {file_digest(path): path for path, size in train_sizes.items() if size in shared_sizes}
    identical = []
    for path, size in test_sizes.items():
        if size in shared_sizes and (match := train_by_digest.get(file_digest(path))) is not None:
            identical.append((path, match))
    if identical:
        test_path, train_path = identical[0]
        problems.append(f"{len(identical)} test file(s) are identical to training files, "
                        f"e.g. {test_path} = {train_path}")
    return problems


def table_rows(patches: LabelledPatches, indices: Sequence[int]) -> tuple[list[str], list[list]]:
    """The header and rows of a table that :func:`read_labelled_patches` reads back as exactly
    the patches ``indices``, in that order: ``path, label, slide`` (absolute paths) for patch
    files, ``slide, x, y, label`` for patches read from slides (read through their tiling job)."""
    source = patches.source
    if isinstance(source, FolderSource):
        return ["path", "label", "slide"], [[str(source.files[i].absolute()), patches.labels[i], patches.slides[i]]
                                            for i in indices]
    return ["slide", "x", "y", "label"], [[patches.slides[i], *source.locate(i)[1:], patches.labels[i]]
                                          for i in indices]


def split_by_slide(labels: Sequence[str], slides: Sequence[str], folds: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows kept and the rows of one held-out fold of ``folds``: whole slides on either side,
    and the classes spread over both as far as the slides allow (scikit-learn's
    StratifiedGroupKFold, seeded). Needs at least ``folds`` slides."""
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the least populated class has fewer members than n_splits"
        return next(splitter.split(np.zeros(len(labels)), labels, groups=slides))
