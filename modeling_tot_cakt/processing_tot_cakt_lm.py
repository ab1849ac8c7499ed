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


# The weights a decoder accepts. A character's log10 probability under the n-gram model lies within a few units,
# so an LM weight far past 100 (or a bonus past +-100 per character) only drowns the acoustics: with alpha 1e30
# every transcript collapses to the likeliest single character. A negative alpha would favour unlikely text.
WEIGHT_RANGES = {"alpha": (0.0, 100.0), "beta": (-100.0, 100.0), "hotword_weight": (0.0, 10_000.0)}


def checked_weight(name: str, value, source: str) -> float:
    """`value` as a float within `WEIGHT_RANGES[name]`, or a ValueError that names the weight and its source."""
    low, high = WEIGHT_RANGES[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(
            f"{source}: the language model weight {name} must be a finite number in [{low:g}, {high:g}], got "
            f"{value!r}; set it again (e.g. `python -m modeling_tot_cakt.training.language_model attach ...`)."
        )
    return float(value)


DEFAULT_HOTWORD_WEIGHT = 10.0  # pyctcdecode's default weight for its own (word) hotwords


class CharacterScorer:
    """
    What the beam search asks of a language model (pyctcdecode's `AbstractLanguageModel` interface: `order`,
    `get_start_state`, `score_partial_token`, `score`, `reset_params`): the character n-gram model's score (if
    there is one) plus a bonus for hotword phrases matched as character *sequences*.

    pyctcdecode's own hotwords match whole space-separated words, and here every character is a word: a phrase
    such as 北京 would never match, and 北 京 would boost every 北 and every 京 on their own. Here a phrase of
    `L` characters earns `weight` once it is complete; while a hypothesis ends in its first `k` characters it
    holds `weight * k / L` (as pyctcdecode scores a partly spelled hotword), which it loses when the next
    character breaks the match. The state of a hypothesis is `(n-gram state, matches in progress)`.
    """

    def __init__(self, ngram=None):
        self.ngram = ngram
        self.hotwords: tuple[str, ...] = ()
        self.hotword_weight = 0.0

    @property
    def order(self) -> int:
        return 1 if self.ngram is None else self.ngram.order

    def get_start_state(self):
        return (None if self.ngram is None else self.ngram.get_start_state(), ())

    def score_partial_token(self, partial_token: str) -> float:
        return 0.0 if self.ngram is None else self.ngram.score_partial_token(partial_token)

    def reset_params(self, **params) -> None:
        if self.ngram is not None:
            self.ngram.reset_params(**params)

    def held(self, matches) -> float:
        """The bonus a hypothesis holds for the hotword prefixes it ends in."""
        return max((self.hotword_weight * k / len(self.hotwords[h]) for h, k in matches), default=0.0)

    def score(self, prev_state, word: str, is_last_word: bool = False):
        ngram_state, matches = prev_state
        score = 0.0
        if self.ngram is not None:
            score, ngram_state = self.ngram.score(ngram_state, word, is_last_word=is_last_word)
        extended = [(h, k + 1) for h, k in matches if self.hotwords[h][k] == word]
        extended += [(h, 1) for h, phrase in enumerate(self.hotwords) if phrase[0] == word]
        completed = sum(k == len(self.hotwords[h]) for h, k in extended)
        in_progress = () if is_last_word else tuple(sorted({(h, k) for h, k in extended if k < len(self.hotwords[h])}))
        bonus = self.hotword_weight * completed + self.held(in_progress) - self.held(matches)
        return score + bonus, (ngram_state, in_progress)


class CharacterLMDecoder:
    """
    A CTC beam-search decoder with a character n-gram language model: pyctcdecode's `BeamSearchDecoderCTC`
    over [`decoder_labels`], built, saved and loaded through pyctcdecode's and kenlm's public API only, in
    pyctcdecode's folder layout (``alphabet.json``; ``language_model/`` with ``attrs.json``, ``unigrams.txt``
    and the KenLM file). Hotwords are phrases of characters ([`CharacterScorer`]).

    Args:
        labels: the alphabet, one label per CTC token id ([`decoder_labels`]).
        kenlm_model_path: the KenLM model (ARPA or binary) estimated on space-separated characters; None for a
            beam search with hotwords alone (nothing to save).
        unigrams: the characters the model knows.
        alpha: the language model weight.
        beta: the bonus per character.
    """

    def __init__(self, labels, kenlm_model_path: str | os.PathLike | None, unigrams=(), alpha=0.5, beta=0.0):
        kenlm, pyctcdecode = decoding_libraries()
        self.labels = list(labels)
        self.kenlm_model_path = None if kenlm_model_path is None else os.fspath(kenlm_model_path)
        self.unigrams = list(unigrams)
        self.alpha = checked_weight("alpha", alpha, "CharacterLMDecoder")
        self.beta = checked_weight("beta", beta, "CharacterLMDecoder")
        ngram = None
        if self.kenlm_model_path is not None:
            try:
                kenlm_model = kenlm.Model(self.kenlm_model_path)
            except Exception as error:  # kenlm raises OSError, UnicodeDecodeError, ... by what the file holds
                raise ValueError(
                    f"{self.kenlm_model_path} is not a KenLM model that kenlm can read ({type(error).__name__}: "
                    f"{error}); estimate it again or attach the language model again."
                ) from error
            check_unigrams(self.labels, kenlm_model, self.unigrams, self.kenlm_model_path)
            ngram = pyctcdecode.LanguageModel(kenlm_model, unigrams=self.unigrams, alpha=self.alpha, beta=self.beta)
        self.scorer = CharacterScorer(ngram)
        self.beam_search = pyctcdecode.BeamSearchDecoderCTC(
            pyctcdecode.Alphabet(self.labels, is_bpe=True), self.scorer
        )
        self.characters = {label[len(WORD_START) :] for label in self.labels if label.startswith(WORD_START)}

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
        if self.kenlm_model_path is None:
            raise ValueError("This decoder has no n-gram model (hotwords alone): there is nothing to save.")
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

    def decode_beams(
        self,
        logits: np.ndarray,
        alpha: float | None = None,
        beta: float | None = None,
        hotwords=None,
        hotword_weight: float = DEFAULT_HOTWORD_WEIGHT,
        **beam_kwargs,
    ):
        """
        pyctcdecode's beams `(text, lm_state, word_frames, logit_score, combined_score)`, best first, of one
        utterance's `(frames, vocab)` logits, with weights `alpha`, `beta` for this call only (the decoder's own
        by default) and `hotwords` (phrases of characters; spaces in them are ignored) boosted by
        `hotword_weight`. `beam_kwargs`: `beam_width`, `beam_prune_logp`, `token_min_logp`, `prune_history`.
        """
        self.beam_search.reset_params(
            alpha=self.alpha if alpha is None else checked_weight("alpha", alpha, "decode"),
            beta=self.beta if beta is None else checked_weight("beta", beta, "decode"),
        )
        self.scorer.hotwords = self.hotword_phrases(hotwords)
        self.scorer.hotword_weight = checked_weight("hotword_weight", hotword_weight, "decode")
        try:
            return self.beam_search.decode_beams(logits, **beam_kwargs)
        finally:
            self.beam_search.reset_params(alpha=self.alpha, beta=self.beta)
            self.scorer.hotwords, self.scorer.hotword_weight = (), 0.0

    def hotword_phrases(self, hotwords) -> tuple[str, ...]:
        """`hotwords` without spaces, each checked to be written in the decoder's characters."""
        if hotwords is None:
            return ()
        if isinstance(hotwords, str):
            raise ValueError(f"hotwords must be a list of phrases, got the string {hotwords!r}; pass [{hotwords!r}].")
        phrases = tuple("".join(str(phrase).split()) for phrase in hotwords)
        for phrase in phrases:
            unknown = sorted(set(phrase) - self.characters)
            if not phrase or unknown:
                raise ValueError(
                    f"The hotword {phrase!r} "
                    + (f"has characters the model cannot write: {unknown}" if unknown else "is empty")
                    + "; give phrases of characters in the model's vocabulary (vocab.json)."
                )
        return phrases


def check_unigrams(labels, kenlm_model, unigrams, kenlm_model_path: str) -> None:
    """
    Refuse a unigram list that leaves out characters of the alphabet which the KenLM model knows: pyctcdecode
    scores a character missing from the list as unknown (an offset of -10), so an emptied or cut list changes
    every transcript with no more than a generic warning.
    """
    listed = set(unigrams)
    characters = [label[len(WORD_START) :] for label in labels if label.startswith(WORD_START) and len(label) > 1]
    missing = [char for char in characters if char not in listed and char in kenlm_model]
    if missing:
        raise ValueError(
            f"The unigram list (language_model/{UNIGRAMS_FILE}) leaves out {len(missing)} characters that the KenLM "
            f"model {kenlm_model_path} knows (e.g. {', '.join(missing[:5])}): it was cut or emptied. Attach the "
            "language model again."
        )


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
        lm_score: its combined score, acoustic plus weighted language model, insertion and hotword bonuses.
        char_offsets: with `output_char_offsets`, its characters with their first and last logit frame.

    With `n_best` > 1 each field holds a list over the hypotheses (for `batch_decode`: one such list per utterance).
    """

    text: str | list[str] | None = None
    logit_score: float | list[float] | None = None
    lm_score: float | list[float] | None = None
    char_offsets: list[dict] | list[list[dict]] | None = None


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
        hotwords=None,
        hotword_weight: float = DEFAULT_HOTWORD_WEIGHT,
        n_best: int = 1,
        output_char_offsets: bool = False,
    ) -> CharacterLMDecoderOutput:
        """
        Beam-search transcript of one utterance's `(frames, vocab)` CTC logits (padding frames removed).

        `alpha` (LM weight) and `beta` (bonus per character) default to the saved ones (``language_model/
        attrs.json``); `beam_width` to pyctcdecode's default (100). `hotwords` are phrases of characters boosted
        as sequences by `hotword_weight` ([`CharacterScorer`]); where the folder has no language model they are
        decoded by a beam search of their own. With `n_best` > 1 each field is a list over the `n_best` best
        hypotheses (fewer where the beam holds fewer). `output_char_offsets` adds each hypothesis' characters with
        their first and last logit frame, as `{"char", "start_offset", "end_offset"}`.
        """
        logits = np.asarray(logits, dtype=np.float32)
        if logits.ndim != 2 or logits.shape[-1] != len(self.tokenizer):
            raise ValueError(
                f"decode takes the (frames, vocab={len(self.tokenizer)}) logits of one utterance, got shape "
                f"{logits.shape}; use batch_decode for a batch."
            )
        if not isinstance(n_best, int) or n_best < 1:
            raise ValueError(f"n_best must be a positive integer, got {n_best!r}.")
        decoder = self.decoder if self.decoder is not None or not hotwords else self.hotword_decoder()
        if decoder is None:
            return self.greedy_output(logits, n_best, output_char_offsets)
        defaults = decoding_libraries()[1].constants
        beams = decoder.decode_beams(
            logits,
            alpha=alpha,
            beta=beta,
            hotwords=hotwords,
            hotword_weight=hotword_weight,
            beam_width=defaults.DEFAULT_BEAM_WIDTH if beam_width is None else beam_width,
            beam_prune_logp=defaults.DEFAULT_PRUNE_LOGP if beam_prune_logp is None else beam_prune_logp,
            token_min_logp=defaults.DEFAULT_MIN_TOKEN_LOGP if token_min_logp is None else token_min_logp,
        )[:n_best]
        fields = {
            "text": [join_characters(text) for text, *_ in beams],
            "logit_score": [beam[3] for beam in beams],
            "lm_score": [beam[4] for beam in beams],
        }
        if output_char_offsets:
            fields["char_offsets"] = [
                [{"char": char, "start_offset": start, "end_offset": end} for char, (start, end) in beam[2]]
                for beam in beams
            ]
        return CharacterLMDecoderOutput(**{name: value if n_best > 1 else value[0] for name, value in fields.items()})

    def greedy_output(self, logits: np.ndarray, n_best: int, output_char_offsets: bool) -> CharacterLMDecoderOutput:
        """The arg-max transcript, in [`decode`]'s form (its one hypothesis; no scores)."""
        decoded = self.tokenizer.decode(logits.argmax(-1), output_char_offsets=output_char_offsets)
        fields = {"text": join_characters(decoded if not output_char_offsets else decoded["text"])}
        if output_char_offsets:
            fields["char_offsets"] = [item for item in decoded["char_offsets"] if item["char"].strip()]
        return CharacterLMDecoderOutput(**{name: value if n_best == 1 else [value] for name, value in fields.items()})

    def hotword_decoder(self) -> CharacterLMDecoder | None:
        """A beam search with hotwords and no n-gram model (built once), or None where pyctcdecode is missing."""
        if "hotwords_only" not in self.__dict__:
            try:
                self.hotwords_only = CharacterLMDecoder(decoder_labels(self.tokenizer), None)
            except ImportError as error:
                logger.warning(f"Hotwords need the beam search, but {error} Decoding is greedy.")
                self.hotwords_only = None
        return self.hotwords_only

    def batch_decode(
        self, logits, frame_lengths=None, num_processes: int | None = None, **decode_kwargs
    ) -> CharacterLMDecoderOutput:
        """
        [`decode`] of each utterance of `(batch, frames, vocab)` logits; `frame_lengths` (one per utterance) cuts
        off padding frames (without it every frame counts). `num_processes` > 1 decodes in that many forked
        processes (POSIX), with the same transcripts as one.
        """
        logits = np.asarray(logits, dtype=np.float32)
        if logits.ndim != 3:
            raise ValueError(f"batch_decode takes (batch, frames, vocab) logits, got shape {logits.shape}.")
        lengths = [logits.shape[1]] * len(logits) if frame_lengths is None else [int(n) for n in frame_lengths]
        utterances = [utterance[:length] for utterance, length in zip(logits, lengths)]
        if num_processes is not None and num_processes > 1:
            outputs = decode_in_processes(self, utterances, num_processes, decode_kwargs)
        else:
            outputs = [self.decode(utterance, **decode_kwargs) for utterance in utterances]
        return CharacterLMDecoderOutput(**{name: [output[name] for output in outputs] for name in outputs[0]})


# The processor that forked decoding processes use: a KenLM model cannot be pickled, a forked process inherits it.
FORKED_PROCESSOR = None


def decode_in_processes(processor, utterances, num_processes: int, decode_kwargs: dict) -> list:
    """[`TOTCAKTProcessorWithLM.decode`] of each utterance in `num_processes` forked processes, in order."""
    import multiprocessing

    global FORKED_PROCESSOR
    FORKED_PROCESSOR = processor
    try:
        with multiprocessing.get_context("fork").Pool(num_processes) as pool:
            return pool.starmap(decode_forked, [(utterance, decode_kwargs) for utterance in utterances])
    finally:
        FORKED_PROCESSOR = None


def decode_forked(logits: np.ndarray, decode_kwargs: dict):
    return FORKED_PROCESSOR.decode(logits, **decode_kwargs)


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
