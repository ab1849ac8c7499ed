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


# Sampling rates a clip can sensibly have. A rate outside (a damaged header) would make resampling to the
# extractor's rate allocate up to the ratio times the decoded samples (1 Hz to 16 kHz: 16,000 times).
MIN_SAMPLING_RATE = 1_000
MAX_SAMPLING_RATE = 768_000
# The most samples (all channels) decoded per byte of the file: uncompressed formats give at most 1, FLAC
# about 1 and low-bitrate Opus / Vorbis about 64. A header claiming more is not believed; decoding stops.
MAX_SAMPLES_PER_BYTE = 64
# Decoding reads this many frames at a time, so memory follows what is actually decoded, not the frame
# count a header claims (a FLAC header can claim 2**36 frames for a 30 kB file).
BLOCK_FRAMES = 1 << 16
# Float samples beyond this magnitude are not audio: a float WAV's full scale is 1.0, and even a file
# written with 16-bit integer scale peaks at 2**15. Huge finite samples overflow the extractors' squares
# (zero or NaN features) instead of failing.
MAX_ABS_SAMPLE = 2.0**15


def check_sampling_rate(sampling_rate: int, name: str) -> int:
    """Return `sampling_rate` if a clip can have it; raise `AudioDecodingError` naming `name` otherwise."""
    if not MIN_SAMPLING_RATE <= sampling_rate <= MAX_SAMPLING_RATE:
        raise AudioDecodingError(
            f"{name} claims a sampling rate of {sampling_rate} Hz, outside {MIN_SAMPLING_RATE}-{MAX_SAMPLING_RATE} Hz: "
            "its header is damaged (resampling it would take far more memory than the clip holds)."
        )
    return sampling_rate


def _read_within_size(sound: soundfile.SoundFile, size: int, name: str) -> np.ndarray:
    """
    Decode `sound` block by block as float32 `(frames, channels)`, refusing to decode more than
    [`MAX_SAMPLES_PER_BYTE`] samples per byte of its `size`: the header's frame count is never trusted
    for an allocation.
    """
    limit = MAX_SAMPLES_PER_BYTE * max(size, BLOCK_FRAMES)
    blocks, decoded = [], 0
    while len(block := sound.read(BLOCK_FRAMES, dtype="float32", always_2d=True)):
        decoded += block.size
        if decoded > limit:
            raise AudioDecodingError(
                f"{name} decodes to more than {MAX_SAMPLES_PER_BYTE} samples per byte of its {size} bytes "
                f"(its header claims {sound.frames} frames): it is damaged."
            )
        blocks.append(block)
    return np.concatenate(blocks) if blocks else np.zeros((0, sound.channels), dtype=np.float32)


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
        AudioDecodingError: the file is missing, libsndfile cannot decode it, its sampling rate is outside
            [`MIN_SAMPLING_RATE`, `MAX_SAMPLING_RATE`], or it decodes to more than [`MAX_SAMPLES_PER_BYTE`]
            samples per byte.
    """
    if isinstance(source, dict) and source.get("array") is not None:
        if source.get("sampling_rate") is None:
            raise AudioDecodingError("An audio entry with an 'array' needs its 'sampling_rate'.")
        try:
            waveform = as_float_waveform(source["array"])
        except ValueError as err:
            raise AudioDecodingError(str(err)) from err
        sampling_rate = check_sampling_rate(int(source["sampling_rate"]), "An audio entry with an 'array'")
        return (waveform[:, None] if waveform.ndim == 1 else waveform), sampling_rate
    if isinstance(source, dict):
        data, path = source.get("bytes"), source.get("path")
        if data is None and path is None:
            raise AudioDecodingError(f"An audio entry needs a 'path' or 'bytes', got {source!r}.")
        source = data if data is not None else path
    if isinstance(source, (bytes, bytearray)):
        handle, name, size = io.BytesIO(source), "<audio bytes>", len(source)
    elif isinstance(source, (str, os.PathLike)):
        handle = name = os.fspath(source)
        if not os.path.isfile(handle):
            raise AudioDecodingError(f"Audio file not found: {name}")
        size = os.path.getsize(handle)
    else:
        raise AudioDecodingError(f"Cannot decode audio from a {type(source).__name__}; pass a path or bytes.")
    try:
        with soundfile.SoundFile(handle) as sound:
            sampling_rate = check_sampling_rate(int(sound.samplerate), name)
            waveform = _read_within_size(sound, size, name)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioDecodingError(f"Cannot decode audio {name}: {err}") from err
    return waveform, sampling_rate


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
    Check that a mono waveform can be trained on: non-empty, finite, of a sane magnitude (at most
    [`MAX_ABS_SAMPLE`]) and not all zeros.

    Returns the waveform unchanged; raises `AudioDecodingError` naming `name` otherwise.
    """
    if waveform.size == 0:
        raise AudioDecodingError(f"{name} has no samples.")
    if not np.all(np.isfinite(waveform)):
        raise AudioDecodingError(f"{name} contains NaN or infinite samples.")
    peak = float(np.max(np.abs(waveform)))
    if peak > MAX_ABS_SAMPLE:
        raise AudioDecodingError(
            f"{name} has samples of magnitude {peak:.3g}, where audio lies in [-1, 1] (float) or up to "
            f"{MAX_ABS_SAMPLE:g} (integer scale): the file is damaged or was written with a wrong scale."
        )
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
    # Checked before resampling too: soxr turns huge finite samples into infinities, and the message
    # should name what the file holds.
    mono = validate_waveform(downmix(waveform), name)
    return validate_waveform(resample(mono, orig_rate, sampling_rate), name)


__all__ = [
    "AudioDecodingError",
    "check_sampling_rate",
    "decode_audio",
    "downmix",
    "load_audio",
    "resample",
    "validate_waveform",
]
