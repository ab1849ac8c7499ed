"""Whether a saved folder (a checkpoint, a staged final model, a model to load) was completely written.

A save is complete only when every file in it was written to the end. Two kinds of evidence are used:

- a manifest ([`FILE_MANIFEST`]: each file's name and size), written atomically as the last step of a save,
  so that a folder with a manifest whose files all have their recorded sizes was finished;
- the files' own structure, which catches a cut-off file also where no manifest exists (folders written
  by earlier versions): a safetensors file must hold exactly the bytes its header describes, a torch file
  (`optimizer.pt`, `rng_state.pth`, `training_args.bin`: zip archives) must end with its zip directory,
  a JSON file must parse.

Every problem is described in words that name the file, for logs and error messages.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile

FILE_MANIFEST = "saved_files.json"
# A safetensors header longer than this is not a header but garbage (real ones are kilobytes).
MAX_SAFETENSORS_HEADER = 100 * 2**20
TORCH_ARCHIVE_SUFFIXES = (".pt", ".pth", ".bin")


def write_json_atomically(path: str | os.PathLike, value, **dump_kwargs) -> None:
    """
    Write `value` as JSON to `path` through a temporary file in the same folder and a rename, so that a
    process killed meanwhile leaves either the old file or the new one, never half of one. The temporary
    file is `<path>.<pid>.tmp`.
    """
    path = os.fspath(path)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(value, handle, **dump_kwargs)
        handle.flush()
        os.fsync(handle.fileno())  # the rename must not reach the disk before the contents
    os.replace(temporary, path)


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with the safetensors file `path` (cut off, not safetensors), or None if it is whole."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return f"{path} has {size} bytes, fewer than a safetensors header needs: it was cut off"
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > MAX_SAFETENSORS_HEADER or 8 + header_size > size:
            return f"{path} is cut off or is not a safetensors file (its header claims {header_size} bytes of {size})"
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, ValueError):
            return f"{path} is not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return f"{path} is not a safetensors file (its header is not a JSON object)"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    expected = 8 + header_size + max(ends, default=0)
    if expected != size:
        return f"{path} has {size} bytes but its header describes {expected}: it was cut off or damaged"
    return None


def torch_archive_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with a file written by `torch.save` (a zip archive), or None if it is whole."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        size = os.path.getsize(path)
        return f"{path} ({size} bytes) is not a complete torch file ({err}): it was cut off or damaged"
    return None


def json_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with the JSON file `path`, or None if it parses."""
    try:
        with open(path, encoding="utf-8") as handle:
            json.load(handle)
    except (UnicodeDecodeError, ValueError) as err:
        return f"{path} is not valid JSON ({err}): it was cut off or damaged"
    return None


def file_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with one saved file, judged by its format (by suffix); None when whole or not checkable."""
    name = os.fspath(path)
    if name.endswith(".safetensors"):
        return safetensors_problem(path)
    if name.endswith(TORCH_ARCHIVE_SUFFIXES):
        return torch_archive_problem(path)
    if name.endswith(".json"):
        return json_problem(path)
    return None


def write_file_manifest(folder: str | os.PathLike) -> None:
    """Record the name and size of every file in `folder` in its [`FILE_MANIFEST`]: the last step of a save."""
    folder = os.fspath(folder)
    sizes = {
        name: os.path.getsize(os.path.join(folder, name))
        for name in sorted(os.listdir(folder))
        if name != FILE_MANIFEST and os.path.isfile(os.path.join(folder, name)) and not name.endswith(".tmp")
    }
    write_json_atomically(os.path.join(folder, FILE_MANIFEST), {"files": sizes}, indent=1, sort_keys=True)


def read_file_manifest(folder: str | os.PathLike) -> dict[str, int] | None:
    """The `{file name: size}` recorded in `folder`'s manifest, or None when it has none (or an unreadable one)."""
    try:
        with open(os.path.join(folder, FILE_MANIFEST), encoding="utf-8") as handle:
            files = json.load(handle)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if isinstance(files, dict) else None


def folder_problem(folder: str | os.PathLike, required: tuple[tuple[str, ...], ...] = ()) -> str | None:
    """
    Why `folder` is not a completely written save, or None when it is.

    Args:
        folder: the saved folder.
        required: groups of file names of which the folder must hold at least one each (e.g.
            `("model.safetensors", "model.safetensors.index.json")`).

    Returns:
        `str | None`: the first problem found, naming the file: a file of the manifest missing or of another
        size than recorded, a required file missing, a file whose format shows it was cut off.
    """
    folder = os.fspath(folder)
    manifest = read_file_manifest(folder)
    for name, size in (manifest or {}).items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{path} is missing (the save recorded it with {size} bytes)"
        if os.path.getsize(path) != size:
            return f"{path} has {os.path.getsize(path)} bytes but {size} were written: it was cut off or changed"
    for names in required:
        if not any(os.path.isfile(os.path.join(folder, name)) for name in names):
            return f"{folder} has no {' or '.join(names)}"
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and not name.endswith(".tmp"):
            problem = file_problem(path)
            if problem:
                return problem
    return None


__all__ = [
    "FILE_MANIFEST",
    "file_problem",
    "folder_problem",
    "json_problem",
    "read_file_manifest",
    "safetensors_problem",
    "torch_archive_problem",
    "write_file_manifest",
    "write_json_atomically",
]
