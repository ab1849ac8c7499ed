"""Beam-search CTC decoding with a character n-gram language model (pyctcdecode + KenLM), saved with a model.

Mandarin is written without spaces, and pyctcdecode scores its language model on *words*: a word is scored
when the next one begins (and the last at the end of the utterance). A character vocabulary with no word
delimiter would make the whole utterance one word, scored once, after the beam has already pruned the
hypotheses the language model would have kept. Here every character is a word of its own: the decoder's
alphabet writes each character token as ``▁<char>`` (pyctcdecode's convention for a token that starts a word)
and the n-gram model is estimated on space-separated characters, so each character is scored in the context of
the characters before it as soon as the beam extends it by the next one. The decoder joins its words with
spaces; the processor and the pipeline remove them.

The folder layout is pyctcdecode's (``alphabet.json`` and ``language_model/`` with the KenLM file,
``unigrams.txt`` and ``attrs.json`` holding the weights ``alpha`` and ``beta``), next to the model's own files.
``AutoProcessor.from_pretrained(folder, trust_remote_code=True)`` gives a [`TOTCAKTProcessorWithLM`] and
``pipeline("automatic-speech-recognition", model=folder, trust_remote_code=True)`` a
[`TOTCAKTSpeechRecognitionPipeline`], both decoding with the language model, in a process where only
torch, transformers, pyctcdecode and kenlm are installed. Without pyctcdecode or kenlm both say what to
install and decode greedily.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from transformers import AutomaticSpeechRecognitionPipeline, ProcessorMixin
from transformers.utils import ModelOutput, logging

logger = logging.get_logger(__name__)

WORD_START = "▁"  # pyctcdecode's marker of a token that begins a word
UNKNOWN_LABEL = "▁⁇▁"  # pyctcdecode's unknown token: a word of its own
# pyctcdecode 0.5.0 declares numpy<2 but runs on numpy 2 (tested here): installed without its dependencies it
# leaves the rest of the stack (pandas, datasets) on numpy 2.
LM_INSTALL_HINT = "pip install kenlm pygtrie && pip install --no-deps pyctcdecode==0.5.0"


def decoder_labels(tokenizer) -> list[str]:
    """
    pyctcdecode's alphabet for a character CTC tokenizer, in token-id order: the pad token (the CTC blank) is
    ``""``, the unknown token pyctcdecode's ``"▁⁇▁"``, the word delimiter a bare ``"▁"`` (a boundary that writes
    nothing), and every other token ``"▁" + token``, a one-character word.
    """
    labels = []
    for token in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))):
        if token == tokenizer.pad_token:
            labels.append("")
        elif token == tokenizer.unk_token:
            labels.append(UNKNOWN_LABEL)
        elif token == getattr(tokenizer, "word_delimiter_token", None):
            labels.append(WORD_START)
        else:
            labels.append(WORD_START + token)
    return labels


def decoding_libraries():
    """
    `(kenlm, pyctcdecode)`. Imported here, inside `try`: transformers refuses to load a remote code file whose
    imports outside `try` blocks are missing, and this one must load, and decode greedily, without them.

    Raises:
        ImportError: one of them is not installed; the message says what to install.
    """
    try:
        import kenlm
        import pyctcdecode
    except ImportError as error:
        raise ImportError(
            f"{error.name} is not installed; to decode with the language model: {LM_INSTALL_HINT}"
        ) from error
    return kenlm, pyctcdecode


def build_decoder(tokenizer, kenlm_model_path: str | os.PathLike, unigrams, alpha: float, beta: float):
    """
    A `pyctcdecode.BeamSearchDecoderCTC` over [`decoder_labels`] with the KenLM model at `kenlm_model_path`
    (ARPA or binary, estimated on space-separated characters), `unigrams` (the characters it knows), LM weight
    `alpha` and insertion bonus `beta` (per character).
    """
    kenlm, pyctcdecode = decoding_libraries()
    language_model = pyctcdecode.LanguageModel(
        kenlm.Model(str(kenlm_model_path)), unigrams=list(unigrams), alpha=alpha, beta=beta
    )
    return pyctcdecode.BeamSearchDecoderCTC(
        pyctcdecode.Alphabet(decoder_labels(tokenizer), is_bpe=True), language_model
    )


def load_decoder(pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs):
    """The decoder saved in a model folder or Hub repository, or None (with a warning saying what to install)
    where pyctcdecode or kenlm is missing."""
    try:
        BeamSearchDecoderCTC = decoding_libraries()[1].BeamSearchDecoderCTC
    except ImportError as error:
        logger.warning(
            f"{pretrained_model_name_or_path} holds a character language model, but {error} Decoding is greedy."
        )
        return None
    if os.path.isdir(pretrained_model_name_or_path):
        return BeamSearchDecoderCTC.load_from_dir(str(pretrained_model_name_or_path))
    allow_patterns = [
        os.path.join(BeamSearchDecoderCTC._LANGUAGE_MODEL_SERIALIZED_DIRECTORY, "*"),
        BeamSearchDecoderCTC._ALPHABET_SERIALIZED_FILENAME,
    ]
    return BeamSearchDecoderCTC.load_from_hf_hub(
        str(pretrained_model_name_or_path), allow_patterns=allow_patterns, **hub_kwargs
    )


def join_characters(text: str) -> str:
    """The decoder's words (one character each) joined back into Mandarin text without spaces."""
    return "".join(text.split())


@dataclass
class CharacterLMDecoderOutput(ModelOutput):
    """
    Beam-search transcripts.

    Args:
        text: the best hypothesis (or one per utterance for `batch_decode`), without spaces.
        logit_score: its acoustic (CTC) log-probability.
        lm_score: its combined score, acoustic plus weighted language model and insertion bonus.
    """

    text: str | list[str] | None = None
    logit_score: float | list[float] | None = None
    lm_score: float | list[float] | None = None


class TOTCAKTProcessorWithLM(ProcessorMixin):
    """
    Feature extractor + character CTC tokenizer + a pyctcdecode beam-search decoder with a character n-gram
    language model (see the module docstring for why every character is a word).

    `decode` / `batch_decode` take CTC *logits* (`(frames, vocab)` / `(batch, frames, vocab)`), as transformers'
    `Wav2Vec2ProcessorWithLM` does, and return transcripts without spaces. With `decoder=None` (pyctcdecode or
    kenlm missing) they decode greedily.

    Args:
        feature_extractor: the model's feature extractor.
        tokenizer: the model's `Wav2Vec2CTCTokenizer`.
        decoder: a `pyctcdecode.BeamSearchDecoderCTC` over [`decoder_labels`] of `tokenizer` (see
            [`build_decoder`]), or None.
    """

    def __init__(self, feature_extractor, tokenizer, decoder=None):
        super().__init__(feature_extractor, tokenizer)
        if decoder is not None:
            expected = decoder_labels(tokenizer)
            if list(decoder._alphabet.labels) != expected:
                raise ValueError(
                    "The decoder's alphabet does not match the tokenizer: expected one label per token id in the "
                    f"order of vocab.json ({len(expected)} labels), got {len(decoder._alphabet.labels)}. Rebuild "
                    "the decoder with modeling_tot_cakt.processing_tot_cakt_lm.build_decoder(tokenizer, ...)."
                )
        self.decoder = decoder
        # pyctcdecode keeps the weights of the last call; decode() without them uses the saved ones.
        language_model = None if decoder is None else decoder.model_container[decoder._model_key]
        self.saved_weights = None if language_model is None else (language_model.alpha, language_model.beta)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load the feature extractor, the tokenizer and the decoder (``alphabet.json``, ``language_model/``)."""
        feature_extractor, tokenizer = cls._get_arguments_from_pretrained(pretrained_model_name_or_path, **kwargs)
        hub_kwargs = {name: kwargs[name] for name in ("revision", "token", "cache_dir") if name in kwargs}
        return cls(feature_extractor, tokenizer, load_decoder(pretrained_model_name_or_path, **hub_kwargs))

    def save_pretrained(self, save_directory, **kwargs):
        """Save as `ProcessorMixin` does, plus the decoder's ``alphabet.json`` and ``language_model/``."""
        saved = super().save_pretrained(save_directory, **kwargs)
        if self.decoder is not None:
            self.decoder.save_to_dir(str(save_directory))
        return saved

    def __call__(self, audio=None, text=None, **kwargs):
        """Features of `audio` (the feature extractor) and/or label ids of `text` (the tokenizer, as `labels`)."""
        if audio is None and text is None:
            raise ValueError("Give `audio` and/or `text`.")
        sampling_rate = kwargs.pop("sampling_rate", None)
        inputs = self.feature_extractor(audio, sampling_rate=sampling_rate, **kwargs) if audio is not None else None
        if text is None:
            return inputs
        encodings = self.tokenizer(text, **kwargs)
        if inputs is None:
            return encodings
        inputs["labels"] = encodings["input_ids"]
        return inputs

    def pad(self, *args, **kwargs):
        """The feature extractor's `pad`."""
        return self.feature_extractor.pad(*args, **kwargs)

    def decode(
        self,
        logits: np.ndarray,
        beam_width: int | None = None,
        alpha: float | None = None,
        beta: float | None = None,
        beam_prune_logp: float | None = None,
        token_min_logp: float | None = None,
    ) -> CharacterLMDecoderOutput:
        """
        Beam-search transcript of one utterance's `(frames, vocab)` CTC logits (padding frames removed).

        `alpha` (LM weight) and `beta` (bonus per character) default to the saved ones (``language_model/
        attrs.json``); `beam_width` to pyctcdecode's default (100).
        """
        logits = np.asarray(logits, dtype=np.float32)
        if logits.ndim != 2 or logits.shape[-1] != len(self.tokenizer):
            raise ValueError(
                f"decode takes the (frames, vocab={len(self.tokenizer)}) logits of one utterance, got shape "
                f"{logits.shape}; use batch_decode for a batch."
            )
        if self.decoder is None:
            ids = logits.argmax(-1)
            text = join_characters(self.tokenizer.decode(ids))
            return CharacterLMDecoderOutput(text=text, logit_score=None, lm_score=None)
        defaults = decoding_libraries()[1].constants
        saved_alpha, saved_beta = self.saved_weights
        self.decoder.reset_params(
            alpha=saved_alpha if alpha is None else alpha,
            beta=saved_beta if beta is None else beta,
            unk_score_offset=None,
            lm_score_boundary=None,
        )
        text, _, _, logit_score, combined_score = self.decoder.decode_beams(
            logits,
            beam_width=defaults.DEFAULT_BEAM_WIDTH if beam_width is None else beam_width,
            beam_prune_logp=defaults.DEFAULT_PRUNE_LOGP if beam_prune_logp is None else beam_prune_logp,
            token_min_logp=defaults.DEFAULT_MIN_TOKEN_LOGP if token_min_logp is None else token_min_logp,
        )[0]
        return CharacterLMDecoderOutput(text=join_characters(text), logit_score=logit_score, lm_score=combined_score)

    def batch_decode(self, logits, frame_lengths=None, **decode_kwargs) -> CharacterLMDecoderOutput:
        """
        [`decode`] of each utterance of `(batch, frames, vocab)` logits; `frame_lengths` (one per utterance) cuts
        off padding frames (without it every frame counts).
        """
        logits = np.asarray(logits, dtype=np.float32)
        if logits.ndim != 3:
            raise ValueError(f"batch_decode takes (batch, frames, vocab) logits, got shape {logits.shape}.")
        lengths = [logits.shape[1]] * len(logits) if frame_lengths is None else [int(n) for n in frame_lengths]
        outputs = [self.decode(utterance[:length], **decode_kwargs) for utterance, length in zip(logits, lengths)]
        return CharacterLMDecoderOutput(
            text=[output.text for output in outputs],
            logit_score=[output.logit_score for output in outputs],
            lm_score=[output.lm_score for output in outputs],
        )


class TOTCAKTSpeechRecognitionPipeline(AutomaticSpeechRecognitionPipeline):
    """
    transformers' ASR pipeline for a model folder with a character language model: the decoder that
    transformers loads from the folder (``alphabet.json``, ``language_model/``) decodes every clip, and its
    one-character words are joined without spaces. ``return_timestamps="char"`` (or ``"word"``) gives one chunk
    per character. Beam settings go through ``decoder_kwargs``, e.g. ``{"beam_width": 32}``. Without pyctcdecode
    or kenlm the pipeline decodes greedily, as the stock one does.
    """

    def __init__(self, *args, decoder=None, **kwargs):
        # The decoder is loaded here, from the folder or repository the model came from: transformers only
        # side-loads one for a stock `...WithLM` processor (and warns that its own path is deprecated).
        super().__init__(*args, **kwargs)
        if decoder is None:
            decoder = load_decoder(self.model.name_or_path)
        if decoder is not None:
            self.decoder = decoder
            self.type = "ctc_with_lm"

    def _sanitize_parameters(self, *args, return_timestamps=None, **kwargs):
        if self.type == "ctc_with_lm" and return_timestamps == "char":
            return_timestamps = "word"  # every word is one character
        return super()._sanitize_parameters(*args, return_timestamps=return_timestamps, **kwargs)

    def postprocess(self, model_outputs, **kwargs):
        output = super().postprocess(model_outputs, **kwargs)
        if self.type == "ctc_with_lm":
            output["text"] = join_characters(output["text"])
        return output


__all__ = [
    "CharacterLMDecoderOutput",
    "TOTCAKTProcessorWithLM",
    "TOTCAKTSpeechRecognitionPipeline",
    "build_decoder",
    "decoder_labels",
    "join_characters",
    "load_decoder",
]
