"""
Feature extractors that take integer PCM as well as float samples.

transformers' `Wav2Vec2FeatureExtractor` and `SeamlessM4TFeatureExtractor` take an integer array as it is: the
raw-waveform one returns int16 magnitudes (up to 32767) as float64 features, the log-mel one overflows on int16
(`OverflowError`) and wraps int32 silently. The two classes here are those stock classes with one change: every
raw waveform given to `__call__` (one array, a list of arrays, a batched 2-D array, or torch tensors) that holds
integer samples is first scaled to float32 in [-1, 1] by [`as_float_waveform`], as soundfile scales integer PCM.
Float input reaches the stock code untouched, so it gives the stock features bit for bit.

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


def scale_integer_pcm(raw_speech):
    """
    What a feature extractor's `__call__` takes (one waveform, a list or tuple of them, a batched 2-D array), with
    every integer array or tensor scaled by [`as_float_waveform`]. Anything else is returned as it came (the same
    object), so float input reaches the feature extractor unchanged.
    """
    if not isinstance(raw_speech, (list, tuple)):
        return _scale_if_integer(raw_speech)
    if not raw_speech or np.isscalar(raw_speech[0]):  # one waveform as a list of numbers: it has no dtype
        return raw_speech
    scaled = [_scale_if_integer(waveform) for waveform in raw_speech]
    if all(new is old for new, old in zip(scaled, raw_speech)):
        return raw_speech
    return type(raw_speech)(scaled)


class IntegerPCMFeatureExtractorMixin:
    """
    Put before a transformers audio feature extractor: its `__call__` then scales integer PCM in the raw
    waveforms first ([`scale_integer_pcm`]).
    """

    def __call__(self, raw_speech, *args, **kwargs):
        return super().__call__(scale_integer_pcm(raw_speech), *args, **kwargs)


class TOTCAKTFeatureExtractor(IntegerPCMFeatureExtractorMixin, Wav2Vec2FeatureExtractor):
    """`Wav2Vec2FeatureExtractor` (the raw waveform, for wav2vec2 / HuBERT / WavLM / data2vec-audio encoders) that
    also takes integer PCM."""


class TOTCAKTLogMelFeatureExtractor(IntegerPCMFeatureExtractorMixin, SeamlessM4TFeatureExtractor):
    """`SeamlessM4TFeatureExtractor` (stacked log-mel filter banks, for Wav2Vec2-BERT encoders) that also takes
    integer PCM."""


__all__ = [
    "IntegerPCMFeatureExtractorMixin",
    "TOTCAKTFeatureExtractor",
    "TOTCAKTLogMelFeatureExtractor",
    "as_float_waveform",
    "scale_integer_pcm",
]
