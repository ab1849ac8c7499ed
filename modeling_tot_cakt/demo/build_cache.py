"""Reuse of what a demo stage built (corpus, teacher, pretrained encoder).

Each stage writes a JSON report into its output folder last, holding the hash of every setting that
decides the output (:func:`settings_hash`). A folder is reused only when that report exists, parses,
carries the expected hash and the stage's files are all there (:func:`read_complete_report`), so a
stage interrupted half-way, or run with other settings, is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path


def settings_hash(key: dict) -> str:
    """16 hex digits of the sha256 of ``key`` as sorted JSON: the cache key of a built folder."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def lines_digest(lines: Sequence[str]) -> str:
    """sha256 (hex) of ``lines`` joined by newlines, e.g. the sentences a stage must leave out."""
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def read_complete_report(
    folder: str | Path, report_file: str, expected_hash: str, required_files: Iterable[str] = ()
) -> dict | None:
    """
    The report ``folder/report_file`` when it carries ``settings_hash == expected_hash`` and every file
    of ``required_files`` exists in ``folder``; None when the report is missing, unreadable or stale, or
    a file is missing (the stage must then build the folder again).
    """
    folder = Path(folder)
    try:
        report = json.loads((folder / report_file).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(report, dict) or report.get("settings_hash") != expected_hash:
        return None
    return report if all((folder / name).is_file() for name in required_files) else None
