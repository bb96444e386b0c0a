"""Labelled patch splits for patch-level evaluation, and the guard against leakage between
a training and a test split (a slide in both, or the same file twice)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from clusiam.errors import DataError
from clusiam.files import file_digest
from clusiam.images import find_images
from clusiam.tables import read_csv_rows


@dataclass
class LabelledPatches:
    """Patch files with a class label and the slide each comes from."""

    paths: list[Path]
    labels: list[str]
    slides: list[str]


def read_labelled_patches(source: str | os.PathLike) -> LabelledPatches:
    """Labelled patches from a folder laid out ``root/<class>/<slide>/<patch>`` or from a
    CSV with columns ``path, label, slide`` (relative paths are taken from the CSV's folder).
    Every patch must belong to a slide; a listed file that does not exist is an error."""
    source = Path(source)
    if source.suffix.lower() == ".csv":
        rows = read_csv_rows(source, ("path", "label", "slide"))
        paths = [source.parent / row["path"] for row in rows]
        absent = [p for p in paths if not p.is_file()]
        if absent:
            raise DataError(f"{source}: {len(absent)} listed files do not exist, e.g. {absent[0]}")
        labels, slides = [row["label"].strip() for row in rows], [row["slide"].strip() for row in rows]
        unassigned = [row["path"] for row, label, slide in zip(rows, labels, slides) if not label or not slide]
        if unassigned:
            raise DataError(f"{source}: {len(unassigned)} rows have no slide or label, e.g. {unassigned[0]}")
        return LabelledPatches(paths, labels, slides)
    files = find_images(source, "--train / --test")
    shallow = [p for p in files if len(p.relative_to(source).parts) < 3]
    if shallow:
        raise DataError(
            f"{shallow[0]} is not in a <class>/<slide>/ folder under {source} ({len(shallow)} such files): "
            "lay patches out as root/<class>/<slide>/<patch>, or list them in a CSV with path, label, slide"
        )
    parts = [p.relative_to(source).parts for p in files]
    return LabelledPatches(files, [part[0] for part in parts], [part[1] for part in parts])


def split_overlap(train: LabelledPatches, test: LabelledPatches) -> list[str]:
    """What leaks between a training and a test split: slides in both, and test files
    identical (same bytes) to training files. Only files whose size matches a file on the
    other side are hashed, each once, so this stays linear in the number of files."""
    problems = []
    shared_slides = sorted(set(train.slides) & set(test.slides))
    if shared_slides:
        problems.append(f"{len(shared_slides)} slide(s) are in both train and test, "
                        f"e.g. {', '.join(shared_slides[:3])}")
    train_sizes = {path: path.stat().st_size for path in train.paths}
    test_sizes = {path: path.stat().st_size for path in test.paths}
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
