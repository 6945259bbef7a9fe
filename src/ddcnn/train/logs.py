"""The training loop's records: sizes in words, and the CSV of one row per epoch."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_text


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 kB"`` (powers of 1000)."""
    for unit in ("B", "kB", "MB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows (lists joined by spaces) to a CSV file atomically (see :func:`~ddcnn.checkpoint.atomic_file`)."""
    flat = [{k: (" ".join(f"{x:.4f}" for x in v) if isinstance(v, list) else v) for k, v in r.items()} for r in rows]
    fields = list(dict.fromkeys(k for r in flat for k in r))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(flat)
    atomic_write_text(path, text.getvalue())
