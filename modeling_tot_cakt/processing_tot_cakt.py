"""Processor glue: a feature extractor matched to the encoder plus a Mandarin character CTC tokenizer.

The processor is a stock transformers class (`Wav2Vec2Processor`, or `Wav2Vec2BertProcessor` for
log-mel encoders), so `AutoProcessor` and `pipeline("automatic-speech-recognition")` load it without
remote code.
"""

from __future__ import annotations

import json
import os

import numpy as np
from transformers import (
    AutoConfig,
    PretrainedConfig,
    ProcessorMixin,
    SeamlessM4TFeatureExtractor,
    Wav2Vec2BertProcessor,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Processor,
)

PAD_TOKEN = "[PAD]"  # also the CTC blank, id 0
UNK_TOKEN = "[UNK]"
# Mandarin is written without spaces, and normalised transcripts contain none; the delimiter is kept
# in the vocabulary only because `Wav2Vec2CTCTokenizer` cannot save and reload a tokenizer without one.
WORD_DELIMITER_TOKEN = "|"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, WORD_DELIMITER_TOKEN)


def vocabulary_from_characters(characters) -> dict[str, int]:
    """`{[PAD]: 0, [UNK]: 1, |: 2, <characters in sorted order>...}`: the CTC vocabulary layout."""
    symbols = sorted(set(characters) - set(SPECIAL_TOKENS) - {" "})
    return {token: index for index, token in enumerate((*SPECIAL_TOKENS, *symbols))}


# Encoders that take log-mel filter banks (SeamlessM4T front-end) instead of the raw waveform.
LOG_MEL_ENCODERS = ("wav2vec2-bert",)
NUM_MEL_BINS = 80


def as_float_waveform(audio) -> np.ndarray:
    """
    A waveform as float32 samples in [-1, 1], as the feature extractors expect.

    Integer PCM is scaled by its full scale: `int16 / 2**15`, `int32 / 2**31`, `int8 / 2**7`, and unsigned
    8-bit (WAV's `PCM_U8`) re-centred as `(uint8 - 128) / 2**7`. transformers' extractors take integer
    arrays as they are: the raw-waveform one returns float64 values that a float32 model rejects
    (`expected scalar type Double`), and the log-mel one overflows on int16 (`OverflowError`) and wraps
    int32 silently. Float arrays are only cast to float32.

    Args:
        audio (`np.ndarray` or array-like of shape `(samples,)` or `(samples, channels)`): the samples.

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


def create_tokenizer(vocab_file: str | os.PathLike) -> Wav2Vec2CTCTokenizer:
    """
    A character-level `Wav2Vec2CTCTokenizer` for Mandarin from a `vocab.json` (`{symbol: id}`).

    The vocabulary must contain `[PAD]` (the CTC blank), `[UNK]` and the word delimiter `|`
    (see [`vocabulary_from_characters`]). Transcripts are expected normalised, without spaces.
    """
    with open(vocab_file, encoding="utf-8") as handle:
        vocab = json.load(handle)
    for token in SPECIAL_TOKENS:
        if token not in vocab:
            raise ValueError(
                f"{vocab_file} has no '{token}' entry; a CTC vocabulary needs {', '.join(SPECIAL_TOKENS)} "
                "(build it with modeling_tot_cakt.processing_tot_cakt.vocabulary_from_characters)."
            )
    return Wav2Vec2CTCTokenizer(
        str(vocab_file),
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        eos_token=None,
        word_delimiter_token=WORD_DELIMITER_TOKEN,
        do_lower_case=False,
    )


def create_feature_extractor(encoder_config: PretrainedConfig | dict | None = None, sampling_rate: int = 16000):
    """
    The feature extractor an encoder expects: the normalised raw waveform for wav2vec2 / HuBERT /
    WavLM / data2vec-audio; for Wav2Vec2-BERT, 80-bin log-mel filter banks (10 ms hop) with
    `stride` consecutive frames stacked, where `stride = feature_projection_input_dim / 80`. A larger
    stride is a free frame-rate reduction: stride 2 gives 20 ms encoder frames, stride 4 gives 40 ms.
    """
    if isinstance(encoder_config, dict):
        encoder_config = AutoConfig.for_model(**encoder_config)
    model_type = encoder_config.model_type if encoder_config is not None else "wav2vec2"
    if model_type in LOG_MEL_ENCODERS:
        stride, remainder = divmod(encoder_config.feature_projection_input_dim, NUM_MEL_BINS)
        if remainder or stride < 1:
            raise ValueError(
                f"encoder_config.feature_projection_input_dim must be a multiple of {NUM_MEL_BINS} (mel bins x "
                f"stacked frames), got {encoder_config.feature_projection_input_dim}."
            )
        return SeamlessM4TFeatureExtractor(
            feature_size=NUM_MEL_BINS,
            num_mel_bins=NUM_MEL_BINS,
            sampling_rate=sampling_rate,
            stride=stride,
            padding_value=1.0,
            return_attention_mask=True,
        )
    return Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=sampling_rate, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )


def create_processor(
    vocab_file: str | os.PathLike,
    encoder_config: PretrainedConfig | dict | None = None,
    sampling_rate: int = 16000,
) -> ProcessorMixin:
    """
    Build the processor for a TOT-CAKT model: feature extractor for `encoder_config` + character tokenizer.

    Args:
        vocab_file: path of a `vocab.json` mapping characters to CTC ids (`[PAD]` = blank, `[UNK]`).
        encoder_config: the model's `config.encoder_config` (decides raw waveform vs log-mel input).
        sampling_rate: the rate audio is resampled to before feature extraction.

    Returns:
        A `Wav2Vec2Processor` or `Wav2Vec2BertProcessor`; `save_pretrained`/`AutoProcessor` work as usual.
    """
    feature_extractor = create_feature_extractor(encoder_config, sampling_rate)
    tokenizer = create_tokenizer(vocab_file)
    if isinstance(feature_extractor, SeamlessM4TFeatureExtractor):
        return Wav2Vec2BertProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    return Wav2Vec2Processor(feature_extractor=feature_extractor, tokenizer=tokenizer)


__all__ = [
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "UNK_TOKEN",
    "WORD_DELIMITER_TOKEN",
    "as_float_waveform",
    "create_feature_extractor",
    "create_processor",
    "create_tokenizer",
    "vocabulary_from_characters",
]
