"""Cache keys that follow the audio files a split names, not only their paths.

`datasets` caches the result of `Dataset.map` under a fingerprint of the input rows and the function. A
split whose rows are audio *paths* keeps the same rows when a WAV is fixed or replaced in place, so its
cached features (and its cached failures: a row once skipped as unreadable) would outlive the file.
[`audio_keyed_fingerprint`] adds each file's identity (size and modification time in nanoseconds) to the
fingerprint, and remembers the identities next to the cache so that the log can say which files changed.
Rows that carry their audio bytes need nothing more: the bytes are part of the rows.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from datasets.fingerprint import Hasher

logger = logging.getLogger(__name__)

# How many files a log line names before it only counts the rest.
SHOWN_FILES = 10


def file_identity(path: str) -> list[int] | None:
    """`[size, mtime_ns]` of the file at `path`, or `None` when there is none (a missing file is a state too)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _paths_of(column: pa.ChunkedArray | pa.Array) -> list[str]:
    """The file paths of an audio column: a string column, or the `path` of struct rows without `bytes`."""
    if pa.types.is_struct(column.type):
        names = [column.type.field(index).name for index in range(column.type.num_fields)]
        if "path" not in names:
            return []
        paths = pc.struct_field(column, "path")
        if "bytes" in names:  # rows holding their bytes are decoded from them, whatever the path says
            paths = pc.filter(paths, pc.is_null(pc.struct_field(column, "bytes")))
        column = paths
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return []
    return [path for path in column.to_pylist() if path]


def audio_file_identities(dataset: Dataset, audio_column: str) -> dict[str, list[int] | None]:
    """The [`file_identity`] of every file the rows of `dataset` name in `audio_column`, by path."""
    identities: dict[str, list[int] | None] = {}
    # Arrow batches: the paths are read without turning any audio bytes into Python objects.
    for batch in dataset.select_columns([audio_column]).with_format("arrow").iter(batch_size=8192):
        for path in _paths_of(batch.column(audio_column)):
            if path not in identities:
                identities[path] = file_identity(path)
    return identities


def _changed_files(before: dict, now: dict) -> list[str]:
    return sorted(path for path in now if path in before and before[path] != now[path])


def _read_identities(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):  # none yet, or a file cut by a killed run: nothing to compare with
        return {}


def _write_identities(path: str, identities: dict) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"  # renamed into place, so a killed run leaves no half file
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(identities, handle, ensure_ascii=False)
    os.replace(temporary, path)


def audio_keyed_fingerprint(dataset: Dataset, audio_column: str, transform: list, split_name: str) -> str:
    """
    The fingerprint under which `dataset.map(...)` should cache a transform that decodes `audio_column`:
    the dataset's fingerprint, the `transform` (the function and everything that shapes its output) and the
    identity of every audio file the rows name. A file fixed or replaced in place gives a new fingerprint,
    so its features (or its failure) are computed again; the log names the files that changed since the
    split was last prepared.
    """
    identities = audio_file_identities(dataset, audio_column)
    base = Hasher.hash([dataset._fingerprint, *transform])
    digest = hashlib.sha256(json.dumps(sorted(identities.items())).encode("utf-8")).hexdigest()
    fingerprint = Hasher.hash([base, digest])
    if not dataset.cache_files:  # an in-memory dataset: `map` caches nothing that could go stale
        return fingerprint
    cache_dir = os.path.dirname(dataset.cache_files[0]["filename"])
    record = os.path.join(cache_dir, f"audio-identities-{base}.json")
    changed = _changed_files(_read_identities(record), identities)
    if changed:
        cached = bool(glob.glob(os.path.join(cache_dir, f"cache-{fingerprint}*.arrow")))
        more = f" and {len(changed) - SHOWN_FILES} more" if len(changed) > SHOWN_FILES else ""
        logger.warning(
            "%s: %d audio files changed (size or modification time) since the split was last prepared: %s%s. %s",
            split_name,
            len(changed),
            ", ".join(changed[:SHOWN_FILES]),
            more,
            "Their current versions were prepared before: that cache is used."
            if cached
            else "The split's cached features no longer apply: it is decoded and featurised again.",
        )
    _write_identities(record, identities)
    return fingerprint


__all__ = ["audio_file_identities", "audio_keyed_fingerprint", "file_identity"]
