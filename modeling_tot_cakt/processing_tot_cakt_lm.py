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

import json
import os
import shutil
from dataclasses import dataclass

import numpy as np
from transformers import AutoFeatureExtractor, AutomaticSpeechRecognitionPipeline, AutoTokenizer, ProcessorMixin
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


ALPHABET_FILE = "alphabet.json"  # pyctcdecode's folder layout: the alphabet beside the model's files, ...
LANGUAGE_MODEL_DIR = "language_model"  # ... and the n-gram model with its weights in this subfolder
ATTRS_FILE = "attrs.json"
UNIGRAMS_FILE = "unigrams.txt"
KENLM_SUFFIXES = (".arpa", ".bin", ".binary")
# pyctcdecode's own entries in attrs.json besides the weights; they keep its defaults here.
EXTRA_ATTRS = {"unk_score_offset": -10.0, "score_boundary": True}


def checked_weight(name: str, value, source: str) -> float:
    """`value` as a finite float, or a ValueError that names the weight and where it came from."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ValueError(
            f"{source}: the language model weight {name} must be a finite number, got {value!r}; set it again "
            "(e.g. `python -m modeling_tot_cakt.training.language_model attach ...`)."
        )
    return float(value)


class CharacterLMDecoder:
    """
    A CTC beam-search decoder with a character n-gram language model: pyctcdecode's `BeamSearchDecoderCTC`
    over [`decoder_labels`], built, saved and loaded through pyctcdecode's and kenlm's public API only, in
    pyctcdecode's folder layout (``alphabet.json``; ``language_model/`` with ``attrs.json``, ``unigrams.txt``
    and the KenLM file).

    Args:
        labels: the alphabet, one label per CTC token id ([`decoder_labels`]).
        kenlm_model_path: the KenLM model (ARPA or binary) estimated on space-separated characters.
        unigrams: the characters the model knows.
        alpha: the language model weight.
        beta: the bonus per character.
    """

    def __init__(self, labels, kenlm_model_path: str | os.PathLike, unigrams, alpha: float, beta: float):
        kenlm, pyctcdecode = decoding_libraries()
        self.labels = list(labels)
        self.kenlm_model_path = os.fspath(kenlm_model_path)
        self.unigrams = list(unigrams)
        self.alpha = checked_weight("alpha", alpha, "CharacterLMDecoder")
        self.beta = checked_weight("beta", beta, "CharacterLMDecoder")
        try:
            kenlm_model = kenlm.Model(self.kenlm_model_path)
        except Exception as error:  # kenlm raises OSError, UnicodeDecodeError, ... by what the file holds
            raise ValueError(
                f"{self.kenlm_model_path} is not a KenLM model that kenlm can read ({type(error).__name__}: "
                f"{error}); estimate it again or attach the language model again."
            ) from error
        self.language_model = pyctcdecode.LanguageModel(
            kenlm_model, unigrams=self.unigrams, alpha=self.alpha, beta=self.beta
        )
        self.beam_search = pyctcdecode.BeamSearchDecoderCTC(
            pyctcdecode.Alphabet(self.labels, is_bpe=True), self.language_model
        )

    @classmethod
    def from_dir(cls, folder: str | os.PathLike) -> CharacterLMDecoder:
        """The decoder saved in `folder` (a model folder holding ``alphabet.json`` and ``language_model/``)."""
        alphabet_path = os.path.join(folder, ALPHABET_FILE)
        language_model_dir = os.path.join(folder, LANGUAGE_MODEL_DIR)
        with open(alphabet_path, encoding="utf-8") as handle:
            labels = read_json(handle, alphabet_path).get("labels")
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise ValueError(f"{alphabet_path} has no list of string 'labels': rebuild the decoder and save it again.")
        attrs_path = os.path.join(language_model_dir, ATTRS_FILE)
        with open(attrs_path, encoding="utf-8") as handle:
            attrs = read_json(handle, attrs_path)
        with open(os.path.join(language_model_dir, UNIGRAMS_FILE), encoding="utf-8") as handle:
            unigrams = handle.read().splitlines()
        kenlm_files = [name for name in sorted(os.listdir(language_model_dir)) if name.endswith(KENLM_SUFFIXES)]
        if len(kenlm_files) != 1:
            raise ValueError(
                f"{language_model_dir} must hold exactly one KenLM file ({', '.join(KENLM_SUFFIXES)}), found "
                f"{kenlm_files}: attach the language model again."
            )
        return cls(
            labels,
            os.path.join(language_model_dir, kenlm_files[0]),
            unigrams,
            checked_weight("alpha", attrs.get("alpha"), attrs_path),
            checked_weight("beta", attrs.get("beta"), attrs_path),
        )

    def __deepcopy__(self, memo):
        # `ProcessorMixin.to_dict` deep-copies the processor's attributes before it drops this one; a KenLM model
        # cannot be copied, and nothing of it is serialised there.
        return self

    def save_to_dir(self, folder: str | os.PathLike) -> None:
        """Write ``alphabet.json`` and ``language_model/`` (replacing an earlier one) into `folder`."""
        with open(os.path.join(folder, ALPHABET_FILE), "w", encoding="utf-8") as handle:
            json.dump({"labels": self.labels, "is_bpe": True}, handle, ensure_ascii=False)
        language_model_dir = os.path.join(folder, LANGUAGE_MODEL_DIR)
        if os.path.isdir(language_model_dir):
            shutil.rmtree(language_model_dir)  # pyctcdecode would load an earlier KenLM file left beside this one
        os.makedirs(language_model_dir)
        with open(os.path.join(language_model_dir, ATTRS_FILE), "w", encoding="utf-8") as handle:
            json.dump({"alpha": self.alpha, "beta": self.beta, **EXTRA_ATTRS}, handle)
        with open(os.path.join(language_model_dir, UNIGRAMS_FILE), "w", encoding="utf-8") as handle:
            handle.writelines(f"{unigram}\n" for unigram in sorted(set(self.unigrams)))
        shutil.copy2(self.kenlm_model_path, language_model_dir)

    def set_weights(self, alpha: float, beta: float) -> None:
        """Make `alpha`, `beta` the weights this decoder decodes and saves with."""
        self.alpha = checked_weight("alpha", alpha, "set_weights")
        self.beta = checked_weight("beta", beta, "set_weights")
        self.beam_search.reset_params(alpha=self.alpha, beta=self.beta)

    def decode_beams(self, logits: np.ndarray, alpha: float | None = None, beta: float | None = None, **beam_kwargs):
        """
        pyctcdecode's beams `(text, lm_state, word_frames, logit_score, combined_score)`, best first, of one
        utterance's `(frames, vocab)` logits, with weights `alpha`, `beta` for this call only (the decoder's own
        by default). `beam_kwargs`: `beam_width`, `beam_prune_logp`, `token_min_logp`, `prune_history`.
        """
        self.beam_search.reset_params(
            alpha=self.alpha if alpha is None else checked_weight("alpha", alpha, "decode"),
            beta=self.beta if beta is None else checked_weight("beta", beta, "decode"),
        )
        try:
            return self.beam_search.decode_beams(logits, **beam_kwargs)
        finally:
            self.beam_search.reset_params(alpha=self.alpha, beta=self.beta)


def check_alphabet(decoder: CharacterLMDecoder, tokenizer) -> None:
    """Refuse a decoder whose alphabet is not [`decoder_labels`] of `tokenizer` (another vocabulary, or the same
    characters in another order: either would decode the wrong characters)."""
    expected = decoder_labels(tokenizer)
    if decoder.labels != expected:
        wrong = next((i for i, pair in enumerate(zip(decoder.labels, expected)) if pair[0] != pair[1]), None)
        where = f"first difference at token id {wrong}" if wrong is not None else "the lengths differ"
        raise ValueError(
            "The decoder's alphabet (alphabet.json) does not match the tokenizer: expected one label per token id "
            f"in the order of vocab.json ({len(expected)} labels), got {len(decoder.labels)}, {where}. Attach the "
            "language model again, or rebuild the decoder with "
            "modeling_tot_cakt.processing_tot_cakt_lm.build_decoder(tokenizer, ...)."
        )


def read_json(handle, path: str) -> dict:
    """The JSON object in the open file `handle`, or a ValueError that names `path`."""
    try:
        value = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): attach the language model again.") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, not a JSON object: attach the language model again.")
    return value


def build_decoder(tokenizer, kenlm_model_path: str | os.PathLike, unigrams, alpha: float, beta: float):
    """
    A [`CharacterLMDecoder`] over [`decoder_labels`] of `tokenizer` with the KenLM model at `kenlm_model_path`
    (ARPA or binary, estimated on space-separated characters), `unigrams` (the characters it knows), LM weight
    `alpha` and insertion bonus `beta` (per character).
    """
    return CharacterLMDecoder(decoder_labels(tokenizer), kenlm_model_path, unigrams, alpha, beta)


# What a Hub repository's decoder needs beside the model's own files.
HUB_DECODER_PATTERNS = [ALPHABET_FILE, f"{LANGUAGE_MODEL_DIR}/*"]
HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download")


def load_decoder(pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs) -> CharacterLMDecoder | None:
    """The decoder saved in a model folder or Hub repository, or None (with a warning saying what to install)
    where pyctcdecode or kenlm is missing."""
    try:
        decoding_libraries()
    except ImportError as error:
        logger.warning(
            f"{pretrained_model_name_or_path} holds a character language model, but {error} Decoding is greedy."
        )
        return None
    folder = os.fspath(pretrained_model_name_or_path)
    if not os.path.isdir(folder):
        from huggingface_hub import snapshot_download

        kwargs = {name: hub_kwargs[name] for name in HUB_KWARGS if hub_kwargs.get(name) is not None}
        folder = snapshot_download(folder, allow_patterns=HUB_DECODER_PATTERNS, **kwargs)
    return CharacterLMDecoder.from_dir(folder)


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

    def __init__(self, feature_extractor, tokenizer, decoder: CharacterLMDecoder | None = None):
        super().__init__(feature_extractor, tokenizer)
        if decoder is not None:
            check_alphabet(decoder, tokenizer)
        self.decoder = decoder

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """
        Load the feature extractor and the tokenizer through their Auto classes (so a folder saved with this
        package's feature extractor loads under `trust_remote_code=True` where the package is absent), then the
        decoder (``alphabet.json``, ``language_model/``) from the folder or Hub repository.
        """
        feature_extractor = AutoFeatureExtractor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls(feature_extractor, tokenizer, load_decoder(pretrained_model_name_or_path, **kwargs))

    def to_dict(self) -> dict:
        """`ProcessorMixin.to_dict` without the decoder: it is saved as files of its own ([`save_pretrained`])."""
        output = super().to_dict()
        output.pop("decoder", None)
        return output

    def save_pretrained(self, save_directory, **kwargs):
        """Save as `ProcessorMixin` does, plus the decoder's ``alphabet.json`` and ``language_model/``."""
        saved = super().save_pretrained(save_directory, **kwargs)
        if self.decoder is not None:
            self.decoder.save_to_dir(save_directory)
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
        text, _, _, logit_score, combined_score = self.decoder.decode_beams(
            logits,
            alpha=alpha,
            beta=beta,
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


def logits_stride(stride, ratio: float):
    """A chunk's `(samples, left, right)` stride (or a list of them) in logit frames, `ratio` frames a sample."""

    def in_frames(total, left, right):
        frames = int(round(total * ratio))
        return frames, int(round(left / total * frames)), int(round(right / total * frames))

    return in_frames(*stride) if isinstance(stride, tuple) else [in_frames(*item) for item in stride]


class TOTCAKTSpeechRecognitionPipeline(AutomaticSpeechRecognitionPipeline):
    """
    transformers' ASR pipeline for a model folder with a character language model: this pipeline loads the
    folder's decoder (``alphabet.json``, ``language_model/``, a [`CharacterLMDecoder`]) and runs the beam search
    itself on each clip's logits (chunks joined, their strides cut off, padding frames left out); the
    one-character words are joined without spaces. ``return_timestamps="char"`` (or ``"word"``) gives one chunk
    per character. Beam settings go through ``decoder_kwargs``, e.g. ``{"beam_width": 32}``. Without pyctcdecode
    or kenlm the pipeline decodes greedily, as the stock one does.

    transformers' own language-model branch (the pipeline's `decoder` argument, deprecated and due to go in v6)
    is never used: a decoder that transformers side-loads for the processor's name is replaced by this one.
    """

    def __init__(self, *args, decoder=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.decoder = decoder if isinstance(decoder, CharacterLMDecoder) else load_decoder(self.model.name_or_path)
        if self.decoder is not None:
            check_alphabet(self.decoder, self.tokenizer)

    def _forward(self, model_inputs, return_timestamps=False, **generate_kwargs):
        if self.decoder is None:
            return super()._forward(model_inputs, return_timestamps=return_timestamps, **generate_kwargs)
        attention_mask = model_inputs.pop("attention_mask", None)
        stride = model_inputs.pop("stride", None)
        model_inputs.pop("num_frames", None)
        out = {"is_last": model_inputs.pop("is_last")}
        logits = self.model(model_inputs.pop(self.model.main_input_name), attention_mask=attention_mask).logits
        out["logits"] = logits
        if attention_mask is not None:  # padded frames of a batched clip are not decoded
            out["frame_lengths"] = self.model.base_model.frame_mask(logits.shape[1], attention_mask).sum(-1)
        if stride is not None:
            out["stride"] = logits_stride(stride, 1 / self.model.config.inputs_to_logits_ratio)
        return {**out, **model_inputs}

    def postprocess(self, model_outputs, decoder_kwargs=None, return_timestamps=None, **kwargs):
        if self.decoder is None:
            return super().postprocess(
                model_outputs, decoder_kwargs=decoder_kwargs, return_timestamps=return_timestamps, **kwargs
            )
        pieces, extra = [], {}
        for output in model_outputs:
            logits = output.pop("logits")[0].float().numpy()
            lengths = output.pop("frame_lengths", None)
            if lengths is not None:
                logits = logits[: int(lengths[0])]
            stride = output.pop("stride", None)
            if stride is not None:
                total, left, right = stride
                logits = logits[left : total - right]
            pieces.append(logits)
            output.pop("is_last", None)
            for key, value in output.items():
                extra.setdefault(key, []).append(value)
        text, _, word_frames, _, _ = self.decoder.decode_beams(np.concatenate(pieces), **(decoder_kwargs or {}))[0]
        result = {"text": join_characters(text)}
        if return_timestamps:
            seconds = self.model.config.inputs_to_logits_ratio / self.feature_extractor.sampling_rate
            result["chunks"] = [
                {"text": word, "timestamp": (start * seconds, end * seconds)} for word, (start, end) in word_frames
            ]
        return {**result, **extra}


__all__ = [
    "CharacterLMDecoder",
    "CharacterLMDecoderOutput",
    "TOTCAKTProcessorWithLM",
    "TOTCAKTSpeechRecognitionPipeline",
    "build_decoder",
    "decoder_labels",
    "join_characters",
    "load_decoder",
]
