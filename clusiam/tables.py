"""CSV tables: patch and slide lists in, per-slide and per-tile results out.

Readers refuse what would otherwise be read wrong (a missing column, a short row, a slide
listed twice) with the file and line; Excel's UTF-8 byte-order mark is fine.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from clusiam.errors import DataError


def read_csv_rows(path: str | os.PathLike, columns: Sequence[str]) -> list[dict[str, str]]:
    """The rows of a CSV with a header, refusing a missing file, missing columns, no rows or a
    row whose fields do not match the header. A UTF-8 byte-order mark (Excel's "CSV UTF-8")
    is fine."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            header = reader.fieldnames or []
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text: save it as CSV (UTF-8)") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path}: needs columns {', '.join(columns)}; missing {', '.join(missing)}")
    if not rows:
        raise DataError(f"{path} has a header but no rows")
    for line, row in enumerate(rows, start=2):
        if None in row or None in row.values():  # more fields than the header, or fewer
            raise DataError(f"{path}, line {line}: not the header's {len(header)} fields "
                            "(a comma inside a value needs quotes)")
    return rows


def read_table(path: str | os.PathLike, columns: tuple[str, str]) -> dict[str, str]:
    """A two-column CSV as a dict, with clear errors for a missing file, missing columns
    or a slide listed twice."""
    table: dict[str, str] = {}
    for row in read_csv_rows(path, columns):
        key, value = row[columns[0]].strip(), row[columns[1]].strip()
        if key in table:
            raise DataError(f"{path}: slide {key} is listed twice")
        table[key] = value
    return table


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    """A CSV with a header row."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
