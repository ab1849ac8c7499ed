"""Audio loading without FFmpeg/torchcodec: decode with soundfile, downmix, resample with soxr.

`datasets` rows reach this module as a file path, raw encoded bytes, the `{"path", "bytes"}`
dict that `datasets.Audio(decode=False)` stores (the bytes win when both are present, as in
`datasets` itself), or an in-memory `{"array", "sampling_rate"}` dict (the decoded form), whose
integer PCM samples are scaled to float like every other input of the package
([`~feature_extraction_tot_cakt.as_float_waveform`]).
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import soundfile
import soxr

from ..feature_extraction_tot_cakt import as_float_waveform


class AudioDecodingError(ValueError):
    """An audio file or buffer that cannot be turned into a usable waveform."""


def decode_audio(source: Any) -> tuple[np.ndarray, int]:
    """
    Decode an encoded audio file (any format libsndfile reads: WAV, FLAC, OGG, MP3, ...).

    Args:
        source: a path (`str` / `os.PathLike`), encoded `bytes`, a dict with keys `path` and/or
            `bytes` (the storage format of `datasets.Audio(decode=False)`), or a dict with `array`
            (`(samples,)` or `(samples, channels)`, float or integer PCM) and `sampling_rate`.

    Returns:
        `(waveform, sampling_rate)`: float32 array of shape `(samples, channels)` and its rate in Hz.

    Raises:
        AudioDecodingError: the file is missing or libsndfile cannot decode it.
    """
    if isinstance(source, dict) and source.get("array") is not None:
        if source.get("sampling_rate") is None:
            raise AudioDecodingError("An audio entry with an 'array' needs its 'sampling_rate'.")
        try:
            waveform = as_float_waveform(source["array"])
        except ValueError as err:
            raise AudioDecodingError(str(err)) from err
        return (waveform[:, None] if waveform.ndim == 1 else waveform), int(source["sampling_rate"])
    if isinstance(source, dict):
        data, path = source.get("bytes"), source.get("path")
        if data is None and path is None:
            raise AudioDecodingError(f"An audio entry needs a 'path' or 'bytes', got {source!r}.")
        source = data if data is not None else path
    if isinstance(source, (bytes, bytearray)):
        handle, name = io.BytesIO(source), "<audio bytes>"
    elif isinstance(source, (str, os.PathLike)):
        handle = name = os.fspath(source)
        if not os.path.isfile(handle):
            raise AudioDecodingError(f"Audio file not found: {name}")
    else:
        raise AudioDecodingError(f"Cannot decode audio from a {type(source).__name__}; pass a path or bytes.")
    try:
        waveform, sampling_rate = soundfile.read(handle, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioDecodingError(f"Cannot decode audio {name}: {err}") from err
    return waveform, int(sampling_rate)


def downmix(waveform: np.ndarray) -> np.ndarray:
    """Average the channels of a `(samples, channels)` array into a mono `(samples,)` array."""
    return waveform.mean(axis=1) if waveform.ndim == 2 else waveform


def resample(waveform: np.ndarray, orig_sampling_rate: int, target_sampling_rate: int) -> np.ndarray:
    """Resample a mono `(samples,)` float array with soxr (high quality); a no-op at equal rates."""
    if orig_sampling_rate == target_sampling_rate:
        return waveform
    return soxr.resample(waveform, orig_sampling_rate, target_sampling_rate, quality="HQ").astype(np.float32)


def validate_waveform(waveform: np.ndarray, name: str = "audio") -> np.ndarray:
    """
    Check that a mono waveform can be trained on: non-empty, finite and not all zeros.

    Returns the waveform unchanged; raises `AudioDecodingError` naming `name` otherwise.
    """
    if waveform.size == 0:
        raise AudioDecodingError(f"{name} has no samples.")
    if not np.all(np.isfinite(waveform)):
        raise AudioDecodingError(f"{name} contains NaN or infinite samples.")
    if not np.any(waveform):
        raise AudioDecodingError(f"{name} is digital silence (all samples are zero).")
    return waveform


def load_audio(source: Any, sampling_rate: int) -> np.ndarray:
    """
    Decode, downmix to mono, resample to `sampling_rate` and validate one audio entry.

    Args:
        source: path, bytes or `{"path", "bytes"}` dict (see [`decode_audio`]).
        sampling_rate (`int`): the feature extractor's rate in Hz.

    Returns:
        `np.ndarray` of shape `(samples,)`, float32, at `sampling_rate`.
    """
    waveform, orig_rate = decode_audio(source)
    path = source.get("path") if isinstance(source, dict) else source
    in_memory = "<audio array>" if isinstance(source, dict) and source.get("array") is not None else "<audio bytes>"
    name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else in_memory
    return validate_waveform(resample(downmix(waveform), orig_rate, sampling_rate), name)


__all__ = ["AudioDecodingError", "decode_audio", "downmix", "load_audio", "resample", "validate_waveform"]
