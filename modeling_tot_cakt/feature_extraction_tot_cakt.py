"""
Feature extractors that take integer PCM as well as float samples.

transformers' `Wav2Vec2FeatureExtractor` and `SeamlessM4TFeatureExtractor` take an integer array as it is: the
raw-waveform one returns int16 magnitudes (up to 32767) as float64 features, the log-mel one overflows on int16
(`OverflowError`) and wraps int32 silently. The two classes here are those stock classes with two changes:

- every raw waveform given to `__call__` (one array, a list of arrays, a batched 2-D array, or torch tensors) that
  holds integer samples is first scaled to float32 in [-1, 1] by [`as_float_waveform`], as soundfile scales
  integer PCM;
- float samples so large that the stock code overflows float32 (audio scaled by 1e20 gave all-zero raw-waveform
  features and a transcript of silence; beyond about 1e31 the log-mel features are NaN) give the features of the
  same audio at a scale that does not overflow, which both normalisations make the same features.

Other float input reaches the stock code untouched, so it gives the stock features bit for bit.

They are saved with a model (`auto_map` in `processor_config.json`, this file next to the weights), so
`AutoProcessor`, `AutoFeatureExtractor` and `pipeline(..., trust_remote_code=True)` use them where this package
is not installed. This file imports only numpy and transformers.
"""

import numpy as np
from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2FeatureExtractor
from transformers.utils import is_torch_tensor


def as_float_waveform(audio) -> np.ndarray:
    """
    A waveform as float32 samples in [-1, 1], as the feature extractors expect.

    Integer PCM is scaled by its full scale: `int16 / 2**15`, `int32 / 2**31`, `int8 / 2**7`, and unsigned
    8-bit (WAV's `PCM_U8`) re-centred as `(uint8 - 128) / 2**7`. Float arrays are only cast to float32.

    Args:
        audio (`np.ndarray` or array-like of any shape, e.g. `(samples,)`, `(samples, channels)` or
            `(batch, samples)`): the samples.

    Returns:
        `np.ndarray` of the same shape, float32.
    """
    audio = np.asarray(audio)
    if audio.dtype == np.uint8:
        return ((audio.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    if np.issubdtype(audio.dtype, np.signedinteger):
        full_scale = float(np.iinfo(audio.dtype).max) + 1.0
        return (audio.astype(np.float64) / full_scale).astype(np.float32)
    if np.issubdtype(audio.dtype, np.floating):
        return audio.astype(np.float32, copy=False)
    raise ValueError(f"Audio samples must be integer PCM or floating point, got an array of {audio.dtype}.")


def _scale_if_integer(waveform):
    """`waveform` scaled by [`as_float_waveform`] if it is an integer (or boolean) array or tensor, else itself."""
    if is_torch_tensor(waveform):
        if waveform.is_floating_point() or waveform.is_complex():
            return waveform
        waveform = waveform.cpu().numpy()
    if isinstance(waveform, np.ndarray) and waveform.dtype.kind in "biu":
        return as_float_waveform(waveform)  # boolean (and unsigned wider than 8 bits) is refused there
    return waveform


def map_waveforms(raw_speech, function):
    """
    What a feature extractor's `__call__` takes (one waveform, a list or tuple of them, a batched 2-D array), with
    `function` applied to each array or tensor in it (a batched array as a whole). Returned as it came (the same
    object) where `function` changed nothing.
    """
    if not isinstance(raw_speech, (list, tuple)):
        return function(raw_speech)
    if not raw_speech or np.isscalar(raw_speech[0]):  # one waveform as a list of numbers: it has no dtype
        return raw_speech
    mapped = [function(waveform) for waveform in raw_speech]
    if all(new is old for new, old in zip(mapped, raw_speech)):
        return raw_speech
    return type(raw_speech)(mapped)


def scale_integer_pcm(raw_speech):
    """
    `raw_speech` ([`map_waveforms`]) with every integer array or tensor scaled by [`as_float_waveform`]. Anything
    else is returned as it came (the same object), so float input reaches the feature extractor unchanged.
    """
    return map_waveforms(raw_speech, _scale_if_integer)


class IntegerPCMFeatureExtractorMixin:
    """
    Put before a transformers audio feature extractor: its `__call__` then scales integer PCM in the raw
    waveforms first ([`scale_integer_pcm`]).
    """

    def __call__(self, raw_speech, *args, **kwargs):
        return super().__call__(scale_integer_pcm(raw_speech), *args, **kwargs)


def _squares_overflow_float32(waveform: np.ndarray, length: int) -> bool:
    """Whether the sum of squares of `waveform[:length]` can overflow float32 (samples beyond about 1e17 for a
    second of 16 kHz audio), which turns transformers' variance into inf and its normalised waveform into zeros."""
    peak = float(np.max(np.abs(waveform[:length]), initial=0.0))
    return peak * peak * max(int(length), 1) > float(np.finfo(np.float32).max)


class TOTCAKTFeatureExtractor(IntegerPCMFeatureExtractorMixin, Wav2Vec2FeatureExtractor):
    """`Wav2Vec2FeatureExtractor` (the raw waveform, for wav2vec2 / HuBERT / WavLM / data2vec-audio encoders) that
    also takes integer PCM, and normalises float samples too large for float32 squares (e.g. audio scaled by 1e20)
    to the features of the same audio at any other scale instead of all zeros."""

    @staticmethod
    def zero_mean_unit_var_norm(input_values, attention_mask, padding_value: float = 0.0) -> list[np.ndarray]:
        """
        transformers' zero-mean unit-variance normalisation, waveform by waveform. A waveform whose squares would
        overflow float32 ([`_squares_overflow_float32`]) is normalised in float64, which no float32 sample can
        overflow; the normalisation does not depend on the scale, so its features are those of the same audio at
        [-1, 1] (to float32 rounding). Every other waveform gets transformers' result bit for bit.
        """
        lengths = [len(vector) for vector in input_values]
        masks = [None] * len(lengths)
        if attention_mask is not None:
            masks = [[mask] for mask in attention_mask]
            lengths = np.asarray(attention_mask, np.int32).sum(-1)
        normed = []
        for vector, length, mask in zip(input_values, lengths, masks):
            wide = _squares_overflow_float32(vector, length)
            vector = np.asarray(vector, dtype=np.float64) if wide else vector
            (normed_vector,) = Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm([vector], mask, padding_value)
            normed.append(normed_vector.astype(np.float32) if wide else normed_vector)
        return normed


# The largest peak transformers' log-mel filter banks take without overflowing float32: they multiply the samples by
# 2**15 (Kaldi's 16-bit scale) and keep the spectrum in complex64, where a bin is at most 2 x 512 (pre-emphasis, FFT
# length) times the peak. Beyond it (about 1e31) the features are NaN.
MAX_FBANK_PEAK = float(np.finfo(np.float32).max) / (2**15 * 2 * 512)


def _within_fbank_range(waveform):
    """
    A float waveform (array or tensor; a batched 2-D array row by row) whose peak exceeds [`MAX_FBANK_PEAK`], divided
    by the power of two that brings its peak into [0.5, 1) (as a numpy array); any other input as it came. The
    scaling moves every log-mel energy of the clip by one constant, which the per-bin normalisation removes.
    """
    if is_torch_tensor(waveform):
        if not waveform.is_floating_point():
            return waveform
        array = waveform.detach().cpu().float().numpy()
        scaled = _within_fbank_range(array)
        return waveform if scaled is array else scaled
    if not (isinstance(waveform, np.ndarray) and waveform.dtype.kind == "f"):
        return waveform
    if waveform.ndim == 2:
        rows = [_within_fbank_range(row) for row in waveform]
        return waveform if all(new is old for new, old in zip(rows, waveform)) else np.stack(rows)
    peak = float(np.max(np.abs(waveform), initial=0.0))
    if not peak > MAX_FBANK_PEAK or peak == np.inf:
        return waveform
    return np.ldexp(waveform, -np.frexp(peak)[1]).astype(waveform.dtype)


class TOTCAKTLogMelFeatureExtractor(IntegerPCMFeatureExtractorMixin, SeamlessM4TFeatureExtractor):
    """`SeamlessM4TFeatureExtractor` (stacked log-mel filter banks, for Wav2Vec2-BERT encoders) that also takes
    integer PCM, and float samples too large for its float32 spectrum (beyond about 1e31, e.g. audio scaled by 1e38),
    which get the features of the same audio at a smaller scale ([`_within_fbank_range`]) instead of NaN."""

    def __call__(self, raw_speech, *args, **kwargs):
        return super().__call__(map_waveforms(raw_speech, _within_fbank_range), *args, **kwargs)


__all__ = [
    "IntegerPCMFeatureExtractorMixin",
    "MAX_FBANK_PEAK",
    "TOTCAKTFeatureExtractor",
    "TOTCAKTLogMelFeatureExtractor",
    "as_float_waveform",
    "map_waveforms",
    "scale_integer_pcm",
]
