"""Processor glue: a feature extractor matched to the encoder plus a Mandarin character CTC tokenizer.

The processor and the tokenizer are stock transformers classes (`Wav2Vec2Processor`, or
`Wav2Vec2BertProcessor` for log-mel encoders, with `Wav2Vec2CTCTokenizer`). The feature extractor is
one of this package's (`feature_extraction_tot_cakt.py`): a stock one that also scales integer PCM.
It is saved with `auto_map` and its code file, so `AutoProcessor`, `AutoFeatureExtractor` and
`pipeline("automatic-speech-recognition")` load it with `trust_remote_code=True` where this package is
not installed (and without it where `modeling_tot_cakt` is imported).
"""

from __future__ import annotations

import json
import os

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

from .feature_extraction_tot_cakt import TOTCAKTFeatureExtractor, TOTCAKTLogMelFeatureExtractor, as_float_waveform

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
    WavLM / data2vec-audio ([`TOTCAKTFeatureExtractor`]); for Wav2Vec2-BERT, 80-bin log-mel filter banks
    (10 ms hop) with `stride` consecutive frames stacked, where `stride = feature_projection_input_dim / 80`
    ([`TOTCAKTLogMelFeatureExtractor`]). A larger stride is a free frame-rate reduction: stride 2 gives
    20 ms encoder frames, stride 4 gives 40 ms. Both take float samples in [-1, 1] or integer PCM.
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
        return TOTCAKTLogMelFeatureExtractor(
            feature_size=NUM_MEL_BINS,
            num_mel_bins=NUM_MEL_BINS,
            sampling_rate=sampling_rate,
            stride=stride,
            padding_value=1.0,
            return_attention_mask=True,
        )
    return TOTCAKTFeatureExtractor(
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
        A `Wav2Vec2Processor` or `Wav2Vec2BertProcessor`; `save_pretrained`/`AutoProcessor` work as usual
        (the feature extractor's code file is saved beside them).
    """
    feature_extractor = create_feature_extractor(encoder_config, sampling_rate)
    tokenizer = create_tokenizer(vocab_file)
    if isinstance(feature_extractor, TOTCAKTLogMelFeatureExtractor):
        return Wav2Vec2BertProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    return Wav2Vec2Processor(feature_extractor=feature_extractor, tokenizer=tokenizer)


# The stock class each of the package's feature extractors extends.
PACKAGE_FEATURE_EXTRACTORS = {
    Wav2Vec2FeatureExtractor: TOTCAKTFeatureExtractor,
    SeamlessM4TFeatureExtractor: TOTCAKTLogMelFeatureExtractor,
}


def upgrade_feature_extractor(processor: ProcessorMixin) -> ProcessorMixin:
    """
    `processor`, its feature extractor replaced by the package's class with the same settings if it is the stock
    `Wav2Vec2FeatureExtractor` or `SeamlessM4TFeatureExtractor` (what earlier versions saved with a model): float
    input gives the same features, integer PCM is scaled, and `save_pretrained` writes the new class. Any other
    feature extractor is kept.
    """
    package_class = PACKAGE_FEATURE_EXTRACTORS.get(type(processor.feature_extractor))
    if package_class is not None:
        settings = processor.feature_extractor.to_dict()
        del settings["feature_extractor_type"]
        processor.feature_extractor = package_class(**settings)
    return processor


__all__ = [
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "UNK_TOKEN",
    "WORD_DELIMITER_TOKEN",
    "as_float_waveform",
    "create_feature_extractor",
    "create_processor",
    "create_tokenizer",
    "upgrade_feature_extractor",
    "vocabulary_from_characters",
]
