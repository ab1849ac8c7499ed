"""Speech datasets for CTC training: loading, transcript normalisation, featurisation, bad-row
filtering and the character vocabulary.

Every loader returns a `datasets.Dataset` (or `IterableDataset` when streaming) with two columns:
`audio` (a file path, or a `{"bytes", "path"}` dict: the storage of `datasets.Audio`) and `text`
(the raw transcript). Audio is decoded later by [`prepare_speech_example`] with soundfile, so
neither FFmpeg nor torchcodec is needed.

Sources:
- a Hub dataset or a local folder that `datasets.load_dataset` reads (parquet, arrow, ...), or a
  folder written by `Dataset.save_to_disk`;
- an `audiofolder` folder (`<split>/metadata.csv|jsonl` with a `file_name` column);
- a CSV / JSON Lines manifest (audio path relative to the manifest, or absolute, plus transcript);
- AISHELL-1 in its published layout (`wav/<split>/<speaker>/*.wav`,
  `transcript/aishell_transcript_v0.8.txt`).

Rows that cannot be trained on (missing or undecodable audio, empty transcripts, transcripts
that normalise to nothing, audio outside the duration range) are marked during preprocessing
and dropped by [`drop_bad_rows`], which logs how many were dropped and why.
"""

from __future__ import annotations

import codecs
import csv
import glob
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from datasets import (
    Audio,
    Dataset,
    Features,
    IterableDataset,
    List,
    Value,
    concatenate_datasets,
    load_dataset,
    load_from_disk,
)
from datasets.exceptions import DatasetGenerationError

from ..processing_tot_cakt import vocabulary_from_characters
from .audio import AudioDecodingError, load_audio
from .audio_identity import audio_keyed_fingerprint
from .saved_files import write_json_atomically
from .transcripts import split_transcript

logger = logging.getLogger(__name__)

AUDIO_COLUMN = "audio"
TEXT_COLUMN = "text"
LENGTH_COLUMN = "input_length"
LABELS_COLUMN = "labels"
REMOVED_COLUMN = "removed_characters"
SKIP_REASON_COLUMN = "skip_reason"
SKIP_DETAIL_COLUMN = "skip_detail"

AISHELL_TRANSCRIPT = os.path.join("transcript", "aishell_transcript_v0.8.txt")
# Local layouts name their splits after folders; "validation" (the `datasets` name) is "dev" in AISHELL-1.
SPLIT_FOLDER_ALIASES = {"validation": ("validation", "dev")}
MANIFEST_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}
AUDIOFOLDER_METADATA = ("metadata.csv", "metadata.jsonl")

SpeechDataset = Dataset | IterableDataset
# The Arrow storage of `datasets.Audio` as a plain struct. `Audio(decode=False)` would also keep rows
# undecoded, but `datasets` still runs the Audio *encoder* (which needs torchcodec) on streamed rows
# after a column rename; a plain struct holds the same bytes and path without either codec.
ENCODED_AUDIO = {"bytes": Value("binary"), "path": Value("string")}


# ----------------------------------------------------------------------------------------- sources
def _split_parts(split: str) -> list[str]:
    """`"train+dev"` -> `["train", "dev"]` (the `datasets` syntax for concatenated splits)."""
    return [part.strip() for part in split.split("+") if part.strip()]


def _concatenate(parts: list[SpeechDataset]) -> SpeechDataset:
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _split_folder(root: str, split: str) -> str:
    """The folder of `split` under `root`, honouring [`SPLIT_FOLDER_ALIASES`]."""
    for name in SPLIT_FOLDER_ALIASES.get(split, (split,)):
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    available = sorted(entry for entry in os.listdir(root) if os.path.isdir(os.path.join(root, entry)))
    raise ValueError(f"No folder for split '{split}' under {root}; available splits: {available}.")


def _rows_generator(rows: list[dict]) -> Iterator[dict]:
    yield from rows


def _from_rows(rows: list[dict], streaming: bool, cache_dir: str | None) -> SpeechDataset:
    # `from_generator` writes Arrow files to the datasets cache (keyed by the rows themselves), so
    # later `.map` calls are cached on disk instead of holding every waveform in memory.
    features = Features({AUDIO_COLUMN: Value("string"), TEXT_COLUMN: Value("string")})
    if streaming:
        return IterableDataset.from_generator(_rows_generator, gen_kwargs={"rows": rows}, features=features)
    return Dataset.from_generator(_rows_generator, gen_kwargs={"rows": rows}, features=features, cache_dir=cache_dir)


def check_utf8(path: str, what: str) -> None:
    """
    Raise a `ValueError` naming `path` (a manifest or transcript file, described by `what`) when it is not
    UTF-8 text, the only encoding the readers accept: a GBK or Big5 file would otherwise fail deep inside
    a CSV or JSON reader with a bare `UnicodeDecodeError`.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{what} {path} is not UTF-8 text (byte 0x{block[err.start]:02x} at offset {offset + err.start} "
                    f"cannot be decoded): save it as UTF-8, e.g. `iconv -f GBK -t UTF-8 {os.path.basename(path)}`."
                ) from err
            offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{what} {path} is not UTF-8 text (it ends inside a character): save it as UTF-8."
            ) from err


def read_aishell_transcripts(path: str) -> dict[str, str]:
    """
    Read `aishell_transcript_v0.8.txt`: one `<utt_id> <space separated words>` per line.

    Raises:
        ManifestError: an utterance id listed on several lines with different texts (all such ids are named,
            with their lines); one listed again with the same text is only warned about.
    """
    check_utf8(path, "The transcript file")
    transcripts, lines = {}, {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            fields = line.split(maxsplit=1)
            if not fields:
                continue
            if len(fields) == 1:
                logger.warning("%s:%d: utterance %s has no transcript; it is skipped.", path, line_number, fields[0])
                continue
            lines.setdefault(fields[0], []).append((line_number, fields[1].strip()))
            transcripts[fields[0]] = fields[1].strip()
    _check_repeated_utterances(path, {utt_id: listed for utt_id, listed in lines.items() if len(listed) > 1})
    return transcripts


def _check_repeated_utterances(path: str, repeated: dict[str, list[tuple[int, str]]]) -> None:
    """Refuse utterance ids of the transcript file `path` listed with different texts (`{id: [(line, text)]}`):
    which text belongs to the recording cannot be told. Ids listed again with the same text lose nothing: warned."""
    if not repeated:
        return

    def described(utt_id: str) -> str:
        listed = repeated[utt_id]
        return f"{utt_id} on lines {', '.join(str(number) for number, _ in listed)} ({' / '.join(text for _, text in listed)})"

    conflicting = [utt_id for utt_id, listed in repeated.items() if len({text for _, text in listed}) > 1]
    if conflicting:
        raise ManifestError(
            f"The transcript file {path} lists {len(conflicting)} utterance id(s) more than once with different "
            f"texts: {'; '.join(described(utt_id) for utt_id in conflicting[:5])}. Which text belongs to the "
            "recording cannot be told: keep the line that matches each <utt_id>.wav and delete the others."
        )
    logger.warning(
        "The transcript file %s lists %d utterance id(s) more than once with the same text (%s); one line of each is "
        "used.",
        path,
        len(repeated),
        "; ".join(described(utt_id) for utt_id in list(repeated)[:5]),
    )


def load_aishell_split(
    aishell_dir: str, split: str, *, streaming: bool = False, cache_dir: str | None = None
) -> SpeechDataset:
    """
    Load one split of AISHELL-1 from its published layout.

    Args:
        aishell_dir: the `data_aishell` folder, holding `wav/{train,dev,test}/<speaker>/<utt_id>.wav`
            (the per-speaker archives extracted) and `transcript/aishell_transcript_v0.8.txt`.
        split: `train`, `dev` (or `validation`), `test`, or several joined with `+`.

    Returns:
        A dataset with `audio` (wav path) and `text` (raw transcript) columns, sorted by utterance id.
        Wav files without a transcript line are left out and counted in the log.
    """
    transcript_path = os.path.join(aishell_dir, AISHELL_TRANSCRIPT)
    wav_root = os.path.join(aishell_dir, "wav")
    if not (os.path.isfile(transcript_path) and os.path.isdir(wav_root)):
        raise ValueError(
            f"{aishell_dir} is not an AISHELL-1 folder: expected {AISHELL_TRANSCRIPT} and wav/<split>/<speaker>/*.wav "
            "(extract the per-speaker archives under wav/ first)."
        )
    transcripts = read_aishell_transcripts(transcript_path)
    rows, untranscribed = [], 0
    for part in _split_parts(split):
        wav_paths = sorted(glob.glob(os.path.join(_split_folder(wav_root, part), "*", "*.wav")))
        if not wav_paths:
            raise ValueError(f"No wav files under {os.path.join(wav_root, part)}/<speaker>/.")
        for wav_path in wav_paths:
            utt_id = os.path.splitext(os.path.basename(wav_path))[0]
            if utt_id in transcripts:
                rows.append({AUDIO_COLUMN: wav_path, TEXT_COLUMN: transcripts[utt_id]})
            else:
                untranscribed += 1
    if untranscribed:
        logger.warning("AISHELL-1 %s: %d wav files have no transcript and are skipped.", split, untranscribed)
    return _from_rows(rows, streaming, cache_dir)


def _check_columns(columns: Iterable[str], required: dict[str, str], where: str) -> None:
    columns = list(columns)
    for flag, column in required.items():
        if column not in columns:
            raise ValueError(f"{where} has no column '{column}' (set --{flag}); its columns are {columns}.")


class ManifestError(ValueError):
    """A manifest that cannot be read as it stands; the message names the file, row and column."""


class _JsonInteger(str):
    """The literal text of a JSON integer (`json.loads(parse_int=...)`), told apart from a JSON string."""


class _JsonFloat(str):
    """The literal text of a JSON number with a fraction or an exponent."""


def _json_value_kind(value) -> str:
    """How a parsed JSON value is described in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (_JsonInteger, _JsonFloat)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r:.80}"
    return f"a JSON {'object' if isinstance(value, dict) else 'array'}"


def _json_cell(value, column: str, where: str, *, is_text: bool) -> str | None:
    """
    One cell of a JSON manifest as the string the schema declares. A transcript is a JSON string, or an
    integer read as its literal digits (`110` -> `"110"`, the way it is written, so nothing is re-interpreted);
    an audio path is a string, or null for a row without audio (skipped and counted later). Anything else is
    ambiguous and refused.
    """
    numbers = (_JsonFloat,) if is_text else (_JsonFloat, _JsonInteger)
    if isinstance(value, str) and not isinstance(value, numbers):
        return str(value)
    if value is None and not is_text:
        return None
    expected = "a JSON string (or an integer)" if is_text else "a JSON string (or null for a row without audio)"
    raise ManifestError(
        f"{where}: column '{column}' holds {_json_value_kind(value)}, but it must be {expected}; "
        f'write it in quotes, e.g. "{column}": "...".'
    )


def _reject_duplicate_keys(pairs: list[tuple]) -> dict:
    keys = [key for key, _ in pairs]
    duplicated = sorted({key for key in keys if keys.count(key) > 1})
    if duplicated:
        raise ManifestError(f"the key(s) {duplicated} appear more than once in one row")
    return dict(pairs)


def _parse_json(text: str):
    # Numbers keep their literal text, and NaN / Infinity (which Python's json accepts) count as numbers.
    return json.loads(
        text,
        parse_int=_JsonInteger,
        parse_float=_JsonFloat,
        parse_constant=_JsonFloat,
        object_pairs_hook=_reject_duplicate_keys,
    )


def _json_records(manifest_path: str) -> Iterator[tuple[str, object]]:
    """`(where, record)` for each row of a JSON Lines file, or of a `.json` file holding one array of rows."""
    with open(manifest_path, encoding="utf-8-sig") as handle:
        content = handle.read()
    if content.lstrip().startswith("["):  # one JSON document: an array of row objects
        try:
            records = _parse_json(content)
        except (json.JSONDecodeError, ManifestError) as err:
            raise ManifestError(f"Manifest {manifest_path} is not valid JSON: {err}.") from err
        for index, record in enumerate(records, start=1):
            yield f"Manifest {manifest_path}, row {index}", record
        return
    row = 0
    # Split on "\n" only: `splitlines` would also cut at U+2028 or U+0085, which a JSON string may hold.
    for line_number, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        row += 1
        where = f"Manifest {manifest_path}, row {row} (line {line_number})"
        try:
            yield where, _parse_json(line)
        except (json.JSONDecodeError, ManifestError) as err:
            raise ManifestError(f"{where} is not a valid JSON object: {err}. Each line must hold one row.") from err


def _read_json_manifest(manifest_path: str, audio_column: str, text_column: str) -> list[dict]:
    rows = []
    for where, record in _json_records(manifest_path):
        if not isinstance(record, dict):
            raise ManifestError(f"{where} is {_json_value_kind(record)}, not a JSON object with named columns.")
        if not rows:  # the first row names the columns, as a CSV header does
            _check_columns(
                record,
                {"audio_column_name": audio_column, "text_column_name": text_column},
                f"Manifest {manifest_path}",
            )
        for column in (audio_column, text_column):
            if column not in record:
                raise ManifestError(f"{where} has no '{column}' field (its fields are {sorted(record)}).")
        rows.append(
            {
                AUDIO_COLUMN: _json_cell(record[audio_column], audio_column, where, is_text=False),
                TEXT_COLUMN: _json_cell(record[text_column], text_column, where, is_text=True),
            }
        )
    return rows


def _delimited_records(manifest_path: str, dialect: dict, fix: str) -> Iterator[tuple[str, list[str]]]:
    """`(where, cells)` for the header and then each non-blank row of a CSV/TSV file; a quoting error names its row."""
    with open(manifest_path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, **dialect)
        row = 0
        while True:
            first_line = reader.line_num + 1  # a quoted cell may span lines: name the row by its first
            where = f"Manifest {manifest_path}, row {row} (line {first_line})" if row else f"Manifest {manifest_path}"
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                raise ManifestError(f"{where}: {err}; {fix}.") from err
            if row and not any(cell.strip() for cell in cells):
                continue  # a blank line
            yield where, cells
            row += 1


def _read_delimited_manifest(manifest_path: str, audio_column: str, text_column: str) -> list[dict]:
    """
    Rows of a CSV (RFC 4180 quoting, strict) or TSV manifest. A TSV has no quoting at all: a transcript may
    start with `"` and stays one cell of one row. A row whose number of cells differs from the header's (an
    unquoted comma in a CSV transcript, a missing tab) is an error naming its row, not a cut transcript.
    """
    if manifest_path.lower().endswith(".tsv"):
        dialect, fix = {"delimiter": "\t", "quoting": csv.QUOTE_NONE}, "separate the cells with one tab each"
    else:
        dialect, fix = {"delimiter": ",", "strict": True}, 'quote a cell that holds a comma or a quote ("a,b")'
    records = _delimited_records(manifest_path, dialect, fix)
    _, header = next(records, ("", []))
    where = f"Manifest {manifest_path}"
    _check_columns(header, {"audio_column_name": audio_column, "text_column_name": text_column}, where)
    for column in (audio_column, text_column):
        if header.count(column) > 1:
            raise ManifestError(f"{where} has {header.count(column)} columns named '{column}' in its header.")
    audio_index, text_index = header.index(audio_column), header.index(text_column)
    rows = []
    for where, cells in records:
        if len(cells) != len(header):
            raise ManifestError(
                f"{where}: {len(cells)} cells where the header has {len(header)} ({cells!r:.200}); {fix}."
            )
        rows.append({AUDIO_COLUMN: cells[audio_index], TEXT_COLUMN: cells[text_index]})
    return rows


def read_manifest_rows(manifest_path: str, audio_column_name: str, text_column_name: str) -> list[dict]:
    """
    Read a manifest's rows with a declared schema: `{"audio": str | None, "text": str}`, transcripts
    verbatim, audio paths resolved against the manifest's folder.

    Raises:
        ManifestError: a row that cannot be read unambiguously (wrong number of cells, bad quoting, a
            transcript that is not a string, invalid JSON), naming the file, row and column.
        EmptySplitError: the manifest lists no utterance.
    """
    is_json = MANIFEST_FORMATS[os.path.splitext(manifest_path)[1].lower()] == "json"
    read = _read_json_manifest if is_json else _read_delimited_manifest
    rows = read(manifest_path, audio_column_name, text_column_name)
    if not rows:
        why = "it holds no row" if is_json else "it has no row below its header"
        raise EmptySplitError(f"Manifest {manifest_path} lists no utterances ({why}).")
    base_dir = os.path.dirname(os.path.abspath(manifest_path))
    for row in rows:
        if row[AUDIO_COLUMN] and not os.path.isabs(row[AUDIO_COLUMN]):
            row[AUDIO_COLUMN] = os.path.join(base_dir, row[AUDIO_COLUMN])
    return rows


def load_manifest(
    manifest_path: str,
    *,
    audio_column_name: str = AUDIO_COLUMN,
    text_column_name: str = TEXT_COLUMN,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> SpeechDataset:
    """
    Load a CSV/TSV or JSON Lines manifest with one utterance per row (see [`read_manifest_rows`]).

    Args:
        manifest_path: `.csv`, `.tsv`, `.json` or `.jsonl` file.
        audio_column_name: column with the audio file path, relative to the manifest's folder or absolute.
        text_column_name: column with the transcript.

    Returns:
        A dataset with `audio` (absolute path) and `text` (string) columns.
    """
    extension = os.path.splitext(manifest_path)[1].lower()
    if extension not in MANIFEST_FORMATS:
        raise ValueError(f"Unsupported manifest {manifest_path}: use one of {sorted(MANIFEST_FORMATS)}.")
    if not os.path.isfile(manifest_path):
        raise ValueError(f"Manifest not found: {manifest_path}")
    check_utf8(manifest_path, "Manifest")
    rows = read_manifest_rows(manifest_path, audio_column_name, text_column_name)
    try:
        return _from_rows(rows, streaming, cache_dir)
    except (pa.ArrowException, DatasetGenerationError) as err:
        raise ValueError(f"Manifest {manifest_path} could not be stored as a dataset: {err}") from err


def is_audiofolder(path: str) -> bool:
    """Whether `path` is a local `audiofolder` dataset (has a `metadata.csv|jsonl` somewhere below)."""
    if not os.path.isdir(path):
        return False
    return any(glob.glob(os.path.join(path, "**", name), recursive=True) for name in AUDIOFOLDER_METADATA)


def load_audiofolder_split(
    folder: str,
    split: str,
    *,
    text_column_name: str = TEXT_COLUMN,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> SpeechDataset:
    """
    Load one split of an `audiofolder` dataset: `<folder>/<split>/**/metadata.csv|jsonl` whose
    `file_name` column points at audio files relative to the metadata file (a single split may
    also keep its metadata at `<folder>/` directly).

    `datasets`' own audiofolder builder encodes audio with torchcodec even when it only stores
    paths, so the metadata files are read as manifests instead.
    """
    parts = []
    for part in _split_parts(split):
        # A single-split audiofolder keeps its metadata at the root; `datasets` calls that split "train".
        split_dir = folder if part == "train" and _has_metadata(folder) else _split_folder(folder, part)
        metadata = sorted(
            path
            for name in AUDIOFOLDER_METADATA
            for path in glob.glob(os.path.join(split_dir, "**", name), recursive=True)
        )
        if not metadata:
            names = " or ".join(AUDIOFOLDER_METADATA)
            raise ValueError(f"Split '{part}' of the audiofolder {folder} has no {names} under {split_dir}.")
        parts += [
            load_manifest(
                path,
                audio_column_name="file_name",
                text_column_name=text_column_name,
                streaming=streaming,
                cache_dir=cache_dir,
            )
            for path in metadata
        ]
    return _concatenate(parts)


def _has_metadata(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in AUDIOFOLDER_METADATA)


def _canonical_columns(dataset: SpeechDataset, audio_column_name: str, text_column_name: str) -> SpeechDataset:
    dataset = dataset.select_columns([audio_column_name, text_column_name])
    if audio_column_name != AUDIO_COLUMN:
        dataset = dataset.rename_column(audio_column_name, AUDIO_COLUMN)
    if text_column_name != TEXT_COLUMN:
        dataset = dataset.rename_column(text_column_name, TEXT_COLUMN)
    return dataset


def load_hub_split(
    dataset_name: str,
    dataset_config_name: str | None,
    split: str,
    *,
    audio_column_name: str = AUDIO_COLUMN,
    text_column_name: str = TEXT_COLUMN,
    streaming: bool = False,
    cache_dir: str | None = None,
    token: str | bool | None = None,
) -> SpeechDataset:
    """
    Load a split with `datasets.load_dataset` (a Hub id or a local folder of data files) or
    `datasets.load_from_disk` (a folder written by `save_to_disk`). An `Audio` column is cast to its
    undecoded storage ([`ENCODED_AUDIO`]), so rows carry the encoded bytes/path and soundfile decodes them.
    """
    if os.path.isfile(os.path.join(dataset_name, "dataset_dict.json")):
        dataset = _concatenate([load_from_disk(dataset_name)[part] for part in _split_parts(split)])
    elif os.path.isfile(os.path.join(dataset_name, "state.json")):
        dataset = load_from_disk(dataset_name)
    else:
        try:
            dataset = load_dataset(
                dataset_name, dataset_config_name, split=split, streaming=streaming, cache_dir=cache_dir, token=token
            )
        except (ImportError, DatasetGenerationError) as err:
            if "torchcodec" not in f"{err} {err.__cause__}":
                if isinstance(err, ImportError):
                    raise
                # datasets says only "An error occurred while generating the dataset"; the reason is its cause.
                raise ValueError(
                    f"datasets could not read '{dataset_name}' (split '{split}'): {err.__cause__ or err}. Fix that "
                    "data file, or describe the files with a CSV/JSONL manifest (--train_manifest/--eval_manifest), "
                    "whose errors name the file, row and column."
                ) from err
            raise ValueError(
                f"datasets needs torchcodec to build '{dataset_name}' from audio files. Install torchcodec (and "
                "FFmpeg), or describe the files with a CSV/JSONL manifest (--train_manifest/--eval_manifest)."
            ) from err
    if streaming and isinstance(dataset, Dataset):
        dataset = dataset.to_iterable_dataset()
    if dataset.column_names is not None:
        _check_columns(
            dataset.column_names,
            {"audio_column_name": audio_column_name, "text_column_name": text_column_name},
            f"Dataset '{dataset_name}' split '{split}'",
        )
    features = dataset.features or {}
    if isinstance(features.get(audio_column_name), Audio):
        dataset = dataset.cast_column(audio_column_name, ENCODED_AUDIO)
    return _canonical_columns(dataset, audio_column_name, text_column_name)


def load_speech_split(
    split: str,
    *,
    manifest: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    aishell_dir: str | None = None,
    audio_column_name: str = AUDIO_COLUMN,
    text_column_name: str = TEXT_COLUMN,
    streaming: bool = False,
    cache_dir: str | None = None,
    token: str | bool | None = None,
) -> SpeechDataset:
    """
    Load one split from whichever source is given: a manifest file, an AISHELL-1 folder, or a
    dataset name/folder (audiofolder, `save_to_disk` folder, or anything `load_dataset` reads).

    Returns a dataset with the columns `audio` and `text`.
    """
    if manifest is not None:
        return load_manifest(
            manifest,
            audio_column_name=audio_column_name,
            text_column_name=text_column_name,
            streaming=streaming,
            cache_dir=cache_dir,
        )
    if aishell_dir is not None:
        return load_aishell_split(aishell_dir, split, streaming=streaming, cache_dir=cache_dir)
    if dataset_name is None:
        raise ValueError("No data source: pass --dataset_name, --train_manifest/--eval_manifest or --aishell_dir.")
    if is_audiofolder(dataset_name):
        return load_audiofolder_split(
            dataset_name, split, text_column_name=text_column_name, streaming=streaming, cache_dir=cache_dir
        )
    return load_hub_split(
        dataset_name,
        dataset_config_name,
        split,
        audio_column_name=audio_column_name,
        text_column_name=text_column_name,
        streaming=streaming,
        cache_dir=cache_dir,
        token=token,
    )


# ------------------------------------------------------------------------------- preprocessing
def normalize_text_example(example: dict, do_lower_case: bool = True) -> dict:
    """
    Normalise `example["text"]` (see [`normalize_transcript`]) and mark rows without usable text.

    Returns `{"text", "removed_characters", "skip_reason", "skip_detail"}`: `removed_characters` holds what
    normalisation dropped (see [`split_transcript`]); `skip_reason` is `""` for a good row.
    """
    raw = example[TEXT_COLUMN]
    if not isinstance(raw, str) or not raw.strip():
        return {
            TEXT_COLUMN: "",
            REMOVED_COLUMN: "",
            SKIP_REASON_COLUMN: "empty transcript",
            SKIP_DETAIL_COLUMN: _describe(example),
        }
    text, removed = split_transcript(raw, do_lower_case=do_lower_case)
    if not text:
        return {
            TEXT_COLUMN: "",
            REMOVED_COLUMN: removed,
            SKIP_REASON_COLUMN: "transcript empty after normalisation",
            SKIP_DETAIL_COLUMN: f"{_describe(example)}: {raw[:80]!r}",
        }
    return {TEXT_COLUMN: text, REMOVED_COLUMN: removed, SKIP_REASON_COLUMN: "", SKIP_DETAIL_COLUMN: ""}


def _character_name(char: str) -> str:
    """`'，' U+FF0C` style: the character and its code point, so that whitespace and controls show."""
    return f"{char!r} U+{ord(char):04X}"


def report_removed_characters(removed: Iterable[str], split_name: str, shown: int = 20) -> Counter:
    """
    Count the characters normalisation removed from a split's transcripts (the `removed_characters` column)
    and log them, most frequent first: `train: normalisation removed 7 characters from 3 of 4 transcripts:
    ' ' U+0020 x4, ',' U+002C x2, '%' U+0025 x1`.

    Returns the counts per character.
    """
    counts: Counter = Counter()
    transcripts = touched = 0
    for characters in removed:
        transcripts += 1
        touched += bool(characters)
        counts.update(characters)
    if not counts:
        logger.info("%s: normalisation removed no character from the %d transcripts.", split_name, transcripts)
        return counts
    listed = ", ".join(f"{_character_name(char)} x{count}" for char, count in counts.most_common(shown))
    more = f" and {len(counts) - shown} more kinds" if len(counts) > shown else ""
    logger.info(
        "%s: normalisation removed %d characters from %d of %d transcripts: %s%s.",
        split_name,
        sum(counts.values()),
        touched,
        transcripts,
        listed,
        more,
    )
    return counts


def _describe(example: dict) -> str:
    audio = example.get(AUDIO_COLUMN)
    path = audio.get("path") if isinstance(audio, dict) else audio
    return str(path) if path else "<audio bytes>"


def _empty_input(feature_extractor) -> np.ndarray:
    """A zero-length input of the extractor's dtype and trailing shape: `(0,)` or `(0, features)`."""
    rate = feature_extractor.sampling_rate
    probe = feature_extractor(np.zeros(rate // 10, dtype=np.float32), sampling_rate=rate)
    return np.asarray(probe[feature_extractor.model_input_names[0]][0])[:0]


def speech_features(feature_extractor) -> Features:
    """
    Output schema of [`prepare_speech_example`]: the feature extractor's main input (a waveform
    `(samples,)` or a `(frames, features)` matrix), `labels`, `input_length` (samples at the
    extractor's rate), the normalised `text` and the skip columns. Fixing it up front lets
    placeholder rows of skipped utterances share the schema of good rows.
    """
    rank = _empty_input(feature_extractor).ndim
    input_feature = List(Value("float32")) if rank == 1 else List(List(Value("float32")))
    return Features(
        {
            feature_extractor.model_input_names[0]: input_feature,
            LABELS_COLUMN: List(Value("int32")),
            LENGTH_COLUMN: Value("int64"),
            TEXT_COLUMN: Value("string"),
            SKIP_REASON_COLUMN: Value("string"),
            SKIP_DETAIL_COLUMN: Value("string"),
        }
    )


def prepare_speech_example(
    example: dict,
    *,
    feature_extractor,
    tokenizer,
    min_input_length: int = 0,
    max_input_length: int | None = None,
) -> dict:
    """
    Decode one row's audio (soundfile, mono, resampled to the extractor's rate), run the feature
    extractor and encode the normalised transcript into CTC label ids.

    Args:
        example: row with `audio`, normalised `text`, `skip_reason` and `skip_detail`.
        feature_extractor: e.g. `Wav2Vec2FeatureExtractor` or `SeamlessM4TFeatureExtractor`.
        tokenizer: the CTC tokenizer (`Wav2Vec2CTCTokenizer`).
        min_input_length, max_input_length: allowed duration in samples at the extractor's rate
            (bounds excluded, as in `run_speech_recognition_ctc.py`).

    Returns:
        `{<input name>, "labels", "input_length", "text", "skip_reason", "skip_detail"}`; rows that
        cannot be used get empty inputs and a `skip_reason`.
    """
    input_name = feature_extractor.model_input_names[0]

    def skipped(reason: str, detail: str) -> dict:
        return {
            input_name: _empty_input(feature_extractor),
            LABELS_COLUMN: [],
            LENGTH_COLUMN: 0,
            TEXT_COLUMN: example[TEXT_COLUMN],
            SKIP_REASON_COLUMN: reason,
            SKIP_DETAIL_COLUMN: detail,
        }

    if example[SKIP_REASON_COLUMN]:
        return skipped(example[SKIP_REASON_COLUMN], example[SKIP_DETAIL_COLUMN])
    if not example[AUDIO_COLUMN]:  # None, or an empty manifest cell
        return skipped("missing audio", f"no audio path or bytes in the row of transcript {example[TEXT_COLUMN]!r}")
    try:
        waveform = load_audio(example[AUDIO_COLUMN], feature_extractor.sampling_rate)
    except AudioDecodingError as err:
        return skipped("unreadable audio", str(err))
    length = len(waveform)
    if length <= min_input_length:
        return skipped("audio too short", f"{_describe(example)}: {length} samples")
    if max_input_length is not None and length >= max_input_length:
        return skipped("audio too long", f"{_describe(example)}: {length} samples")
    features = np.asarray(feature_extractor(waveform, sampling_rate=feature_extractor.sampling_rate)[input_name][0])
    if not np.all(np.isfinite(features)):  # would make the loss NaN at the same step on every rerun
        return skipped("non-finite features", f"{_describe(example)}: the feature extractor gives NaN or Inf")
    return {
        input_name: features,
        LABELS_COLUMN: tokenizer(example[TEXT_COLUMN]).input_ids,
        LENGTH_COLUMN: length,
        TEXT_COLUMN: example[TEXT_COLUMN],
        SKIP_REASON_COLUMN: "",
        SKIP_DETAIL_COLUMN: "",
    }


def _keep_streamed_row(example: dict, split_name: str) -> bool:
    if not example[SKIP_REASON_COLUMN]:
        return True
    logger.warning("%s: skipping a row (%s): %s", split_name, example[SKIP_REASON_COLUMN], example[SKIP_DETAIL_COLUMN])
    return False


class EmptySplitError(ValueError):
    """A split with no usable row left: training or evaluating on it would fail later, or mean nothing."""


def drop_bad_rows(dataset: SpeechDataset, split_name: str, num_proc: int | None = None) -> SpeechDataset:
    """
    Remove rows marked with a `skip_reason` and log how many were removed, per reason, with a few
    examples. A streamed dataset logs each skipped row as it goes by.

    Raises:
        EmptySplitError: no row is left (the split was empty, or every row was skipped); the message
            gives the counts, the reasons and a few examples.
    """
    if isinstance(dataset, IterableDataset):
        return dataset.filter(_keep_streamed_row, fn_kwargs={"split_name": split_name})
    if len(dataset) == 0:
        raise EmptySplitError(
            f"The {split_name} split has no rows: check the data source and split name (and --max_*_samples)."
        )
    reasons = dataset[SKIP_REASON_COLUMN]
    counts = Counter(reason for reason in reasons if reason)
    if not counts:
        logger.info("%s: all %d rows are usable.", split_name, len(dataset))
        return dataset
    summary = ", ".join(f"{count} {reason}" for reason, count in counts.most_common())
    bad_indices = [index for index, reason in enumerate(reasons) if reason]
    examples = "; ".join(dataset.select(bad_indices[:5])[SKIP_DETAIL_COLUMN])
    if len(bad_indices) == len(dataset):
        raise EmptySplitError(
            f"The {split_name} split has no usable row: all {len(dataset)} rows were skipped ({summary}). "
            f"Examples: {examples}. Fix the data (audio paths are relative to the manifest's folder) or its source."
        )
    logger.warning(
        "%s: skipped %d of %d rows (%s). Examples: %s", split_name, len(bad_indices), len(dataset), summary, examples
    )
    return dataset.filter(lambda reason: not reason, input_columns=SKIP_REASON_COLUMN, num_proc=num_proc)


def remove_skip_columns(dataset: SpeechDataset) -> SpeechDataset:
    """Drop the bookkeeping columns once bad rows are gone."""
    return dataset.remove_columns([SKIP_REASON_COLUMN, SKIP_DETAIL_COLUMN])


def _map_kwargs(dataset: SpeechDataset, num_proc: int | None, load_from_cache_file: bool, desc: str) -> dict:
    # Streamed datasets map lazily in the data loader: no worker processes, no cache, no progress bar.
    if isinstance(dataset, IterableDataset):
        return {}
    return {"num_proc": num_proc, "load_from_cache_file": load_from_cache_file, "desc": desc}


def normalize_split(
    dataset: SpeechDataset,
    split_name: str,
    *,
    do_lower_case: bool = True,
    num_proc: int | None = None,
    load_from_cache_file: bool = True,
) -> SpeechDataset:
    """
    Normalise the `text` column of a loaded split and mark rows without usable text (they are
    dropped, and counted, together with bad audio by [`featurize_split`]). The characters normalisation
    removed are counted and logged ([`report_removed_characters`]); a streamed split is not read ahead
    to count them.
    """
    dataset = dataset.map(
        normalize_text_example,
        fn_kwargs={"do_lower_case": do_lower_case},
        **_map_kwargs(dataset, num_proc, load_from_cache_file, f"normalise {split_name} transcripts"),
    )
    if not isinstance(dataset, Dataset):
        return dataset.remove_columns([REMOVED_COLUMN])
    if REMOVED_COLUMN not in dataset.column_names:  # an empty split: `map` never ran the function
        return dataset
    report_removed_characters(dataset[REMOVED_COLUMN], split_name)
    return dataset.remove_columns([REMOVED_COLUMN])


def featurize_split(
    dataset: SpeechDataset,
    split_name: str,
    *,
    feature_extractor,
    tokenizer,
    min_input_length: int = 0,
    max_input_length: int | None = None,
    num_proc: int | None = None,
    load_from_cache_file: bool = True,
) -> SpeechDataset:
    """
    Turn a normalised split into model inputs ([`prepare_speech_example`]), then drop and count
    the rows that cannot be used.

    Returns a dataset with the extractor's input column, `labels`, `input_length` and `text`.

    The cache of this step follows the audio files' size and modification time as well as the rows
    ([`audio_keyed_fingerprint`]): a file fixed or replaced in place is decoded again, and the log names it.
    """
    fn_kwargs = {
        "feature_extractor": feature_extractor,
        "tokenizer": tokenizer,
        "min_input_length": min_input_length,
        "max_input_length": max_input_length,
    }
    features = speech_features(feature_extractor)
    map_kwargs = _map_kwargs(dataset, num_proc, load_from_cache_file, f"decode and featurise {split_name} audio")
    if isinstance(dataset, Dataset):
        transform = [prepare_speech_example, fn_kwargs, features]
        map_kwargs["new_fingerprint"] = audio_keyed_fingerprint(dataset, AUDIO_COLUMN, transform, split_name)
    dataset = dataset.map(
        prepare_speech_example, fn_kwargs=fn_kwargs, remove_columns=[AUDIO_COLUMN], features=features, **map_kwargs
    )
    return remove_skip_columns(drop_bad_rows(dataset, split_name, num_proc=num_proc))


# ------------------------------------------------------------------------------------ vocabulary
def build_vocabulary(texts: Iterable[str]) -> dict[str, int]:
    """
    CTC character vocabulary of normalised transcripts, in the layout of
    [`~processing_tot_cakt.vocabulary_from_characters`] (`[PAD]` = 0 is the blank, then `[UNK]`,
    the word delimiter, and every character that occurs, sorted so ids do not depend on data order).
    """
    characters: set[str] = set()
    for text in texts:
        characters.update(text)
    return vocabulary_from_characters(characters)


def write_vocabulary(vocab: dict[str, int], path: str) -> None:
    """Write `vocab` as the `vocab.json` a `Wav2Vec2CTCTokenizer` reads."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # A run killed meanwhile leaves no half-written vocabulary, at most `vocab.json.<pid>.tmp`.
    write_json_atomically(path, vocab, ensure_ascii=False, indent=0)


@dataclass
class OutOfVocabularyReport:
    """Characters of a transcript set that the vocabulary lacks (they become `[UNK]`)."""

    oov_tokens: int
    total_tokens: int
    oov_types: list[str]

    @property
    def oov_rate(self) -> float:
        return self.oov_tokens / self.total_tokens if self.total_tokens else 0.0

    def __str__(self) -> str:
        shown = "".join(self.oov_types[:30]) + ("..." if len(self.oov_types) > 30 else "")
        return (
            f"{self.oov_tokens} of {self.total_tokens} characters ({self.oov_rate:.2%}) are out of vocabulary, "
            f"{len(self.oov_types)} distinct: {shown}"
        )


def count_out_of_vocabulary(texts: Iterable[str], vocab: dict[str, int]) -> OutOfVocabularyReport:
    """Count the characters of `texts` (normalised transcripts) missing from `vocab`."""
    counts: Counter = Counter()
    total = 0
    for text in texts:
        total += len(text)
        counts.update(character for character in text if character not in vocab)
    return OutOfVocabularyReport(sum(counts.values()), total, sorted(counts))


def dataset_texts(dataset: SpeechDataset) -> Iterator[str]:
    """The `text` column of a dataset, without reading (or decoding) any other column."""
    if isinstance(dataset, IterableDataset):
        for row in dataset.select_columns([TEXT_COLUMN]):
            yield row[TEXT_COLUMN]
    else:
        yield from dataset[TEXT_COLUMN]


__all__ = [
    "AUDIO_COLUMN",
    "EmptySplitError",
    "LABELS_COLUMN",
    "LENGTH_COLUMN",
    "TEXT_COLUMN",
    "OutOfVocabularyReport",
    "build_vocabulary",
    "check_utf8",
    "count_out_of_vocabulary",
    "dataset_texts",
    "drop_bad_rows",
    "featurize_split",
    "is_audiofolder",
    "load_aishell_split",
    "load_audiofolder_split",
    "load_hub_split",
    "load_manifest",
    "load_speech_split",
    "ManifestError",
    "read_manifest_rows",
    "normalize_split",
    "normalize_text_example",
    "prepare_speech_example",
    "read_aishell_transcripts",
    "remove_skip_columns",
    "report_removed_characters",
    "speech_features",
    "write_vocabulary",
]
