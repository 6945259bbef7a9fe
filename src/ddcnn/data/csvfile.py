"""``csv:FILE``: 2D images listed in a CSV file of ``path,label[,split]`` rows, decoded as ``imagefolder`` decodes them.

Columns. A header row names ``path`` (or ``file``), ``label`` and optionally ``split``, in any order and case (other
columns are ignored). ``path`` is relative to the CSV file's folder (or absolute); ``label`` is a class name (the
classes are the sorted labels, numerically if all are integers); ``split`` is ``train``, ``val`` (``valid``,
``validation``) or ``test``. Without a split column val and test are carved from the images listed (see
``splits``); with one, every row names its split and some row ``train``. Blank lines are skipped.

Bad input is a one-line :class:`DatasetError` naming the file, the line and what to do: a missing header or label
column, a row without a path, label or known split, a listed file that does not exist, no rows at all.

Decoding (modes, 16-bit gray images, ``--image-size``, ``--intensity``): as ``imagefolder``
(:mod:`ddcnn.data.decode`), once, into ``<cache>/csv/<stem>-<key>/``; the key hashes the CSV's resolved path and
every listed file's path, label, split, size and mtime, so editing the CSV or an image decodes again.

:func:`read_label_table` also reads the ``labels.csv`` of ``nifti`` datasets.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from ..config import DataConfig
from ..errors import ConfigError, DatasetError
from .cache import cache_root
from .dataset import RawDataset
from .decode import ImageFile, read_decoded
from .imagefolder import SPLIT_FOLDERS
from .splits import SPLITS

_PATH_COLUMNS = ("path", "file")


@dataclass(frozen=True)
class LabelRow:
    line: int  # in the CSV file, the header being line 1
    path: Path
    label: str
    split: str | None  # train, val or test; None without a split column


def load_csv(path: str | None, cfg: DataConfig) -> RawDataset:
    if path is None:
        raise ConfigError("csv needs a file: csv:FILE, a CSV of path,label[,split] rows (see `ddcnn datasets`)")
    file = Path(path).expanduser()
    if not file.is_file():
        raise DatasetError(f"{file} does not exist; pass csv:FILE to a CSV file of path,label[,split] rows")
    files, class_names = labelled_files(read_label_table(file, file.parent))
    listing = [(f.split, f.path, f.label, *f.stamp) for f in files]
    folder = cache_root(cfg.cache_dir) / "csv"
    return read_decoded(files, class_names, cfg, folder, f"csv:{file.stem}", str(file.resolve()), listing)


def read_label_table(file: Path, base: Path, what: str = "image") -> list[LabelRow]:
    """The rows of the CSV ``file`` (see the module docstring), their paths relative to ``base``; ``what`` the rows
    list (``image``, ``volume``), for errors."""
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{file} cannot be read ({e}); pass a UTF-8 CSV file of path,label[,split] rows") from None
    records = csv.reader(io.StringIO(text))
    header = next(records, None)
    columns = [c.strip().lower() for c in header or []]
    path_column = next((columns.index(name) for name in _PATH_COLUMNS if name in columns), None)
    if path_column is None or "label" not in columns:
        found = f"the columns {', '.join(header)}" if header else "no header"
        raise DatasetError(
            f"{file} has {found}; its first line must name the columns path (or file), label and optionally split"
        )
    label_column = columns.index("label")
    split_column = columns.index("split") if "split" in columns else None
    rows = []
    for line, record in enumerate(records, start=2):
        if not any(cell.strip() for cell in record):
            continue
        if len(record) < len(columns):
            raise DatasetError(
                f"{file} line {line} has {len(record)} fields but the header {len(columns)}; fill every column"
            )
        rows.append(_row(file, base, line, record, path_column, label_column, split_column, what))
    if not rows:
        raise DatasetError(f"{file} lists no {what}s; add one row per {what}: path,label[,split]")
    if split_column is not None and not any(row.split == "train" for row in rows):
        raise DatasetError(f"{file} has no row of split train; give the training {what}s the split train")
    return rows


def _row(
    file: Path,
    base: Path,
    line: int,
    record: list[str],
    path_column: int,
    label_column: int,
    split_column: int | None,
    what: str,
) -> LabelRow:
    path, label = record[path_column].strip(), record[label_column].strip()
    for column, value in (("path", path), ("label", label)):
        if not value:
            raise DatasetError(f"{file} line {line} has no {column}; fill it in or remove the line")
    split = None
    if split_column is not None:
        value = record[split_column].strip().lower()
        if value not in SPLIT_FOLDERS:
            raise DatasetError(
                f"{file} line {line} has the split {value!r}; use train, val (or valid, validation) or test"
            )
        split = SPLIT_FOLDERS[value]
    full = Path(path).expanduser()
    full = full if full.is_absolute() else base / full
    if not full.is_file():
        raise DatasetError(
            f"{file} line {line} lists {path}, which does not exist (paths are relative to {base}); fix the path or "
            f"remove the line"
        )
    return LabelRow(line, full, label, split)


def class_names_of(labels: list[str]) -> list[str]:
    """The distinct ``labels``, sorted: as numbers if every one is an integer (``2`` before ``10``), else as text."""
    distinct = set(labels)
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


def labelled_files(rows: list[LabelRow]) -> tuple[list[ImageFile], list[str]]:
    """The rows as files of their splits (train first, each split in the CSV's order) and the class names. Rows
    without a split are training files."""
    class_names = class_names_of([row.label for row in rows])
    index = {name: k for k, name in enumerate(class_names)}
    files = []
    for split in SPLITS:
        chosen = [row for row in rows if (row.split or "train") == split]
        for position, row in enumerate(chosen):
            stat = row.path.stat()
            files.append(ImageFile(str(row.path), split, position, index[row.label], (stat.st_size, stat.st_mtime_ns)))
    return files, class_names
