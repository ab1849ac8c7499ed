"""Offline synthetic Mandarin speech corpus: Chinese sentences -> toneful pinyin -> espeak-ng speech.

Pipeline (``synthesize_corpus``):

1. Han-only clauses of the ``text_sources`` (:mod:`modeling_tot_cakt.demo.text_sources`; Debian's
   ``fortunes-zh`` by default), kept when
   they have ``min_chars``-``max_chars`` characters, all among the ``vocab_size`` most frequent
   characters.
2. Train/dev/test split **by sentence** (no transcript in two splits): after a seeded shuffle,
   train takes its sentences first, then test and dev take sentences whose characters all occur
   in train, so every held-out character can be learned.
3. Each sentence becomes pinyin with tone digits (pypinyin) and is spoken by espeak-ng's
   ``cmn-latn-pinyin`` voice (the plain ``cmn`` voice reads tone digits as English numbers).
   Train sentences get ``renditions_per_train_sentence`` renditions with train voice variants;
   dev/test get one rendition with held-out variants, so evaluation is on unseen voices. With
   ``seen_voices_test``, the test sentences are spoken once more by train voice variants
   (``test_seen_voices``): the same held-out text heard in known voices, so that a recogniser's
   errors of hearing (the voice) and of language (the text) separate. Speed,
   pitch and the level of added white noise (SNR) are drawn per utterance.
4. Audio is resampled from espeak's 22.05 kHz to ``sample_rate`` (soxr) and written as 16-bit
   mono WAV; ``{split}.jsonl`` manifests and a ``corpus.json`` summary go next to it.

espeak-ng is driven through its C library (``libespeak-ng``, shipped with the ``espeak-ng``
package) rather than its command line: the library reports synthesis events (a word event where
each syllable starts, a word-end phoneme event where it ends), measured on the very samples
written, and needs no process per utterance. Each manifest line carries these times as
``char_times``. The library gets the command line's settings (voice, ``-s``, ``-p``, end pause).

Determinism: libespeak-ng keeps hidden state between utterances (pitch-flutter phase, gain
control, noise generator), so the samples of an utterance depend on what the process spoke
before. Utterances are therefore rendered in fixed blocks of ``RENDER_BLOCK_SIZE``, each block in
a fresh process forked from one whose engine has never spoken. The first utterance of a block is
sample-for-sample what ``espeak-ng`` on the command line gives; the others differ only in that
hidden state. With everything else drawn from the seed, the same settings give byte-identical
WAVs and manifests, whatever ``num_workers`` is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import math
import multiprocessing
import random
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile
import soxr
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from ..training.error_analysis import dictionary_readings
from ..training.transcripts import normalize_transcript
from .build_cache import lines_digest, read_complete_report, settings_hash
from .text_sources import (
    INSTALL_HINT,
    char_frequencies,
    exclude_heldout,
    has_pinyin,
    load_named_clauses,
    restrict_to_frequent_chars,
    to_pinyin,
)

ESPEAK_VOICE = "cmn-latn-pinyin"
"""espeak-ng voice that reads toneful pinyin (``ni3 hao3``) as Mandarin."""

SPLITS = ("train", "dev", "test")
HELDOUT_SPLITS = ("dev", "test")
SEEN_VOICES_SPLIT = "test_seen_voices"
"""The optional second test track: the test sentences spoken by train voices (``seen_voices_test``)."""
TEST_TRACKS = ("test", SEEN_VOICES_SPLIT)
"""The test tracks a corpus can have: held-out voices, then train voices."""
CORPUS_SUMMARY_FILE = "corpus.json"
# 2: each utterance rendered from a freshly seeded rand(), as the espeak-ng command line renders it.
FORMAT_VERSION = 2
"""Bumped whenever the output for given settings changes, so old caches are rebuilt."""

RENDER_BLOCK_SIZE = 32
"""Utterances spoken in sequence by one fresh process (the output depends on it)."""

CHAR_TIMES_DESCRIPTION = (
    "char_times[k] = [start, end] in seconds of the k-th character's syllable, from libespeak-ng "
    "synthesis events of this very rendering: start = the syllable's word event, end = its "
    "word-end phoneme event (1 ms resolution). The first syllable starts at 0 (espeak-ng's "
    "leading silence lasts a few ms); the end pause after the last syllable belongs to no character."
)

# libespeak-ng API constants (espeak-ng/speak_lib.h).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_EVENT_PHONEME = 7
_PARAMETER_RATE = 1
_PARAMETER_PITCH = 3
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000
_EE_OK = 0
_WORD_END_PHONEME = b"_|"


class _EspeakEventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _EspeakEvent(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EspeakEventId),
    ]


_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_EspeakEvent)
)


@dataclass
class Rendering:
    """One utterance as espeak-ng speaks it.

    Attributes:
        samples: ``(T,)`` int16 mono samples at ``sample_rate``.
        sample_rate: espeak-ng's output rate (22050 Hz).
        syllable_times: one ``(start, end)`` pair in seconds per syllable, in order.
    """

    samples: np.ndarray
    sample_rate: int
    syllable_times: list[tuple[float, float]]


class EspeakEngine:
    """libespeak-ng in synchronous mode with word and phoneme events.

    The library is process-global and keeps state between utterances (see the module
    docstring): for reproducible samples, render a fixed sequence of utterances in a process
    whose engine has not rendered before (:attr:`has_rendered` is False).

    Use :func:`load_espeak`, which makes one engine per library and process: the library's
    state is global, so a second engine on it would take the first one's callback.

    Args:
        location: the shared library, as :func:`find_espeak_library` gives it.

    Raises:
        FileNotFoundError: the library cannot be loaded or lacks the ``cmn-latn-pinyin`` voice.
    """

    def __init__(self, location: str):
        try:
            self._lib = ctypes.CDLL(location)
        except OSError as error:
            raise FileNotFoundError(
                f"Cannot load libespeak-ng from {location!r} ({error}); {INSTALL_HINT}."
            ) from error
        self._declare_signatures()
        self._libc = ctypes.CDLL(None)  # the C library this process runs, for srand
        self.sample_rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, _INITIALIZE_PHONEME_EVENTS)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (returned {self.sample_rate}); is espeak-ng-data installed?")
        data_path = ctypes.c_char_p()
        self.version = self._lib.espeak_Info(ctypes.byref(data_path)).decode()
        self.data_path = Path(data_path.value.decode())
        self._samples: list[np.ndarray] = []
        self._events: list[tuple[int, int, int, bytes]] = []
        self._callback = _SynthCallback(self._collect)  # kept referenced while the library holds it
        self._lib.espeak_SetSynthCallback(self._callback)
        self._select_voice(ESPEAK_VOICE)
        self.has_rendered = False

    def _declare_signatures(self) -> None:
        lib = self._lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Info.argtypes = [ctypes.POINTER(ctypes.c_char_p)]
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.POINTER(ctypes.c_uint),
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.argtypes = []
        lib.espeak_Synchronize.restype = ctypes.c_int

    def _collect(self, wav, num_samples, events) -> int:
        if num_samples > 0:
            self._samples.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        index = 0
        while events[index].type != _EVENT_LIST_TERMINATED:
            event = events[index]
            phoneme = event.id.string if event.type == _EVENT_PHONEME else b""
            self._events.append((event.type, event.text_position, event.audio_position, phoneme))
            index += 1
        return 0  # 0 = go on synthesising

    def _select_voice(self, name: str) -> None:
        if self._lib.espeak_SetVoiceByName(name.encode()) != _EE_OK:
            raise FileNotFoundError(f"espeak-ng has no voice {name!r}; {INSTALL_HINT}.")

    def variants(self) -> list[str]:
        """Names of the installed voice variants (``m1``, ``f2``, ...), sorted."""
        return sorted(path.name for path in (self.data_path / "voices" / "!v").iterdir())

    def render(self, syllables: Sequence[str], variant: str, speed: int, pitch: int) -> Rendering:
        """Speak toneful pinyin syllables with ``cmn-latn-pinyin+variant``.

        Args:
            syllables: e.g. ``["ni2", "hao3"]``; spoken as one sentence.
            variant: voice variant name (see :meth:`variants`).
            speed: words per minute (espeak-ng ``-s``, 80-450).
            pitch: 0-99 (espeak-ng ``-p``).

        Returns:
            The samples and one ``(start, end)`` time per syllable.
        """
        self._select_voice(f"{ESPEAK_VOICE}+{variant}")
        self._lib.espeak_SetParameter(_PARAMETER_RATE, speed, 0)
        self._lib.espeak_SetParameter(_PARAMETER_PITCH, pitch, 0)
        self._samples, self._events = [], []
        self.has_rendered = True
        text = " ".join(syllables).encode()
        # espeak-ng draws from the C library's rand(): seed it as a fresh espeak-ng process starts, so that an
        # utterance sounds the same whatever this process (or the one it was forked from) drew before.
        self._libc.srand(1)
        status = self._lib.espeak_Synth(text, len(text) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8 | _ENDPAUSE, None, None)
        if status != _EE_OK or self._lib.espeak_Synchronize() != _EE_OK:
            raise RuntimeError(f"espeak-ng failed (status {status}) on {text.decode()!r}.")
        samples = np.concatenate(self._samples) if self._samples else np.zeros(0, dtype=np.int16)
        return Rendering(samples, self.sample_rate, self._syllable_times(syllables))

    def _syllable_times(self, syllables: Sequence[str]) -> list[tuple[float, float]]:
        # Text positions are 1-based character offsets; syllable k starts after k separators.
        offsets, position = [], 1
        for syllable in syllables:
            offsets.append(position)
            position += len(syllable) + 1
        starts: dict[int, int] = {}
        ends: dict[int, int] = {}
        for kind, text_position, milliseconds, phoneme in self._events:
            if kind == _EVENT_WORD:
                starts.setdefault(text_position, milliseconds)
            elif kind == _EVENT_PHONEME and phoneme == _WORD_END_PHONEME:
                ends[text_position] = milliseconds
        missing = [
            s for s, offset in zip(syllables, offsets, strict=True) if offset not in starts or offset not in ends
        ]
        if missing:
            raise RuntimeError(
                f"espeak-ng reported no word start/end for syllables {missing} of {' '.join(syllables)!r}."
            )
        return [(starts[offset] / 1000.0, ends[offset] / 1000.0) for offset in offsets]


@functools.cache
def find_espeak_library(library: str = "espeak-ng") -> str:
    """Where libespeak-ng is: ``library`` itself if it is a path, else ``ctypes.util.find_library(library)``.

    Raises:
        FileNotFoundError: no such library is installed.
    """
    location = library if "/" in library else ctypes.util.find_library(library)
    if location is None:
        raise FileNotFoundError(
            f"The espeak-ng speech synthesiser library ({library!r}) is not installed; {INSTALL_HINT}."
        )
    return location


def load_espeak(library: str = "espeak-ng") -> EspeakEngine:
    """This process's :class:`EspeakEngine` for ``library`` (a name or a path), made on first use."""
    return _engine_at(find_espeak_library(library))


@functools.cache
def _engine_at(location: str) -> EspeakEngine:
    return EspeakEngine(location)


@dataclass
class SynthesisConfig:
    """Settings of a synthetic corpus. Everything except ``output_dir`` and ``num_workers``
    determines the output (and its cache key)."""

    output_dir: str = field(metadata={"help": "Folder for the WAVs, the {split}.jsonl manifests and corpus.json."})
    num_sentences: int = field(default=3000, metadata={"help": "Distinct sentences over all splits."})
    seed: int = field(default=0, metadata={"help": "Seed for sentence choice, split, voices and noise."})
    min_chars: int = field(default=4, metadata={"help": "Shortest sentence, in characters."})
    max_chars: int = field(default=12, metadata={"help": "Longest sentence, in characters."})
    vocab_size: int = field(
        default=500,
        metadata={"help": "Keep sentences whose characters are all among the K most frequent (0 = no limit)."},
    )
    dev_fraction: float = field(default=0.05, metadata={"help": "Share of the sentences held out for dev."})
    test_fraction: float = field(default=0.1, metadata={"help": "Share of the sentences held out for test."})
    renditions_per_train_sentence: int = field(
        default=2, metadata={"help": "Utterances per train sentence (dev/test get one)."}
    )
    train_variants: list[str] = field(
        default_factory=lambda: ["m1", "m2", "m3", "m4", "m5", "m6", "f1", "f2", "f3"],
        metadata={"help": "espeak-ng voice variants for train utterances."},
    )
    heldout_variants: list[str] = field(
        default_factory=lambda: ["m7", "m8", "f4", "f5"],
        metadata={"help": "espeak-ng voice variants for dev/test utterances (unseen in train)."},
    )
    speed_min: int = field(default=140, metadata={"help": "Slowest speaking rate, words per minute (espeak-ng -s)."})
    speed_max: int = field(default=200, metadata={"help": "Fastest speaking rate, words per minute."})
    pitch_min: int = field(default=30, metadata={"help": "Lowest pitch setting, 0-99 (espeak-ng -p)."})
    pitch_max: int = field(default=70, metadata={"help": "Highest pitch setting, 0-99."})
    snr_db_min: float = field(
        default=20.0, metadata={"help": "Lowest signal-to-noise ratio of the added white noise, dB."}
    )
    snr_db_max: float = field(
        default=40.0, metadata={"help": "Highest SNR, dB (set both high, e.g. 90, for clean audio)."}
    )
    sample_rate: int = field(default=16000, metadata={"help": "Output sample rate, Hz."})
    text_sources: list[str] = field(
        default_factory=lambda: ["fortunes-zh"],
        metadata={
            "help": "Text sources the sentences are drawn from (names in modeling_tot_cakt.demo.text_sources."
            "TEXT_SOURCES), in this order before the seeded shuffle."
        },
    )
    fortunes_dir: str | None = field(
        default=None, metadata={"help": "Folder of the fortunes-zh files (default: Debian's)."}
    )
    espeak_library: str = field(default="espeak-ng", metadata={"help": "libespeak-ng name or path."})
    num_workers: int = field(default=2, metadata={"help": "Synthesis processes."})
    seen_voices_test: bool = field(
        default=False,
        metadata={
            "help": f"Also speak every test sentence by a train voice variant, as a second test track "
            f"({SEEN_VOICES_SPLIT}.jsonl): held-out text in known voices."
        },
    )
    exclude_corpus_dir: str | None = field(
        default=None,
        metadata={
            "help": "A corpus whose dev/test sentences this one must not speak: clauses containing one or "
            "contained in one are left out (for pretraining corpora)."
        },
    )

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that is out of range."""
        checks = [
            (self.num_sentences >= 1, "num_sentences must be >= 1"),
            (1 <= self.min_chars <= self.max_chars, "need 1 <= min_chars <= max_chars"),
            (self.vocab_size >= 0, "vocab_size must be >= 0"),
            (
                self.dev_fraction >= 0
                and self.test_fraction >= 0
                and round(self.dev_fraction * self.num_sentences) + round(self.test_fraction * self.num_sentences)
                < self.num_sentences,
                "dev_fraction and test_fraction must be >= 0 and leave train sentences",
            ),
            (self.renditions_per_train_sentence >= 1, "renditions_per_train_sentence must be >= 1"),
            (
                bool(self.train_variants) and bool(self.heldout_variants),
                "train_variants and heldout_variants must not be empty",
            ),
            (80 <= self.speed_min <= self.speed_max <= 450, "need 80 <= speed_min <= speed_max <= 450"),
            (0 <= self.pitch_min <= self.pitch_max <= 99, "need 0 <= pitch_min <= pitch_max <= 99"),
            (self.snr_db_min <= self.snr_db_max, "need snr_db_min <= snr_db_max"),
            (self.sample_rate > 0, "sample_rate must be positive"),
            (self.num_workers >= 1, "num_workers must be >= 1"),
            (bool(self.text_sources), "text_sources must name at least one source"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Invalid synthesis setting: {message} (got {self}).")

    def output_settings(self) -> dict:
        """The settings that determine the output (all but ``output_dir``, ``num_workers`` and where the
        excluded sentences were read: the cache key holds the sentences themselves). ``seen_voices_test``
        is left out when off, so corpora made before it existed keep their cache key."""
        settings = asdict(self)
        del settings["output_dir"], settings["num_workers"], settings["exclude_corpus_dir"]
        if not self.seen_voices_test:
            del settings["seen_voices_test"]
        return settings

    def splits(self) -> tuple[str, ...]:
        """The splits this corpus has: :data:`SPLITS`, then the seen-voices test track when asked for."""
        return SPLITS + ((SEEN_VOICES_SPLIT,) if self.seen_voices_test else ())


@dataclass
class HomophoneStats:
    """How many characters share their spoken syllable (toneful pinyin) with another character.

    Attributes:
        tokens: character occurrences examined.
        tokens_with_homophone: those whose syllable is also a reading of another vocabulary character.
        types: distinct characters examined.
        types_with_homophone: those with a homophone for at least one of their occurrences.
    """

    tokens: int
    tokens_with_homophone: int
    types: int
    types_with_homophone: int


def char_readings(items: Iterable[tuple[str, Sequence[str]]]) -> dict[str, set[str]]:
    """Readings of each character: the set of syllables it is spoken as.

    Args:
        items: ``(sentence, syllables)`` pairs with one syllable per character.
    """
    readings: dict[str, set[str]] = {}
    for sentence, syllables in items:
        for char, syllable in zip(sentence, syllables, strict=True):
            readings.setdefault(char, set()).add(syllable)
    return readings


def homophone_stats(
    items: Iterable[tuple[str, Sequence[str]]], vocabulary_readings: Mapping[str, set[str]]
) -> HomophoneStats:
    """Count the characters of ``items`` that have a homophone in the vocabulary.

    An occurrence of character ``c`` spoken as syllable ``s`` has a homophone when another
    vocabulary character ``c' != c`` has ``s`` among its readings; tones count (``ma1`` and
    ``ma3`` differ).

    Args:
        items: ``(sentence, syllables)`` pairs, e.g. the test transcripts with their pinyin.
        vocabulary_readings: readings of every vocabulary character (see :func:`char_readings`).

    Returns:
        Token and type counts.
    """
    chars_by_syllable: dict[str, set[str]] = {}
    for char, syllables in vocabulary_readings.items():
        for syllable in syllables:
            chars_by_syllable.setdefault(syllable, set()).add(char)
    tokens = tokens_with_homophone = 0
    types: set[str] = set()
    types_with_homophone: set[str] = set()
    for sentence, syllables in items:
        for char, syllable in zip(sentence, syllables, strict=True):
            tokens += 1
            types.add(char)
            if chars_by_syllable.get(syllable, set()) - {char}:
                tokens_with_homophone += 1
                types_with_homophone.add(char)
    return HomophoneStats(tokens, tokens_with_homophone, len(types), len(types_with_homophone))


def track_stats(spoken: Mapping[str, Sequence[tuple[str, Sequence[str]]]]) -> dict[str, dict]:
    """What a recogniser trained on the train split can and cannot tell apart on each test track.

    The inventory is the characters of the train transcripts (all that a CTC model trained on them
    can write), each with the readings by which the error split counts a substitution as a homophone
    (:func:`~modeling_tot_cakt.training.error_analysis.split_errors`): pypinyin's dictionary readings plus
    the syllables the corpus speaks it as. A test character has a homophone when another inventory
    character has its spoken syllable among its readings (:func:`homophone_stats`); it is out of
    vocabulary (OOV) when it is not in the inventory, so that CTC has no output for it.

    Args:
        spoken: split -> ``(sentence, syllables)`` per utterance; needs ``train``, reads the test tracks
            (:data:`TEST_TRACKS`) it has.

    Returns:
        Track -> :class:`HomophoneStats` fields plus ``homophone_share`` (of the tokens), ``oov_tokens``
        and ``oov_share``.
    """
    spoken_readings = char_readings(item for items in spoken.values() for item in items)
    train_chars = {char for sentence, _ in spoken["train"] for char in sentence}
    inventory = {char: dictionary_readings(char) | spoken_readings[char] for char in train_chars}
    stats = {}
    for track in (track for track in TEST_TRACKS if track in spoken):
        counts = homophone_stats(spoken[track], inventory)
        oov = sum(char not in inventory for sentence, _ in spoken[track] for char in sentence)
        stats[track] = {
            **asdict(counts),
            "homophone_share": round(counts.tokens_with_homophone / max(counts.tokens, 1), 4),
            "oov_tokens": oov,
            "oov_share": round(oov / max(counts.tokens, 1), 4),
        }
    return stats


def select_sentences(
    clauses: Sequence[str], *, min_chars: int, max_chars: int, vocab_size: int
) -> tuple[list[str], dict[str, int]]:
    """The clauses fit for the corpus: length within bounds, frequent characters, speakable.

    Args:
        clauses: unique Han-only clauses (see :func:`~modeling_tot_cakt.demo.text_sources.load_han_clauses`).
        min_chars, max_chars: length bounds in characters.
        vocab_size: keep clauses within the K most frequent characters (counted over the clauses
            of the right length); 0 = no limit.

    Returns:
        The kept clauses in source order, and how many were left after each filter.
    """
    in_length = [clause for clause in clauses if min_chars <= len(clause) <= max_chars]
    in_vocab = restrict_to_frequent_chars(in_length, vocab_size) if vocab_size else in_length
    speakable = [sentence for sentence in in_vocab if has_pinyin(sentence)]
    counts = {
        "han_clauses": len(clauses),
        "in_length": len(in_length),
        "in_vocab": len(in_vocab),
        "speakable": len(speakable),
    }
    return speakable, counts


def split_by_sentence(
    pool: Sequence[str], *, num_train: int, num_dev: int, num_test: int, seed: int
) -> dict[str, list[str]]:
    """Draw disjoint train/dev/test sentence sets whose held-out characters all occur in train.

    After a seeded shuffle of ``pool``, train takes the first ``num_train`` sentences; test and
    then dev take the next sentences whose characters all occur in train (others are left out).

    Args:
        pool: distinct candidate sentences.
        num_train, num_dev, num_test: sentences per split.
        seed: shuffle seed.

    Returns:
        ``{"train": [...], "dev": [...], "test": [...]}``, each in drawing order.

    Raises:
        ValueError: the pool has duplicates or too few sentences for these sizes.
    """
    if len(set(pool)) != len(pool):
        raise ValueError("split_by_sentence needs distinct sentences.")
    if num_train + num_dev + num_test > len(pool):
        raise ValueError(
            f"Only {len(pool)} sentences pass the filters, {num_train + num_dev + num_test} were asked for: "
            "lower num_sentences or widen min_chars/max_chars/vocab_size."
        )
    shuffled = list(pool)
    random.Random(seed).shuffle(shuffled)
    splits = {"train": shuffled[:num_train], "dev": [], "test": []}
    train_chars = {char for sentence in splits["train"] for char in sentence}
    for sentence in shuffled[num_train:]:
        target = "test" if len(splits["test"]) < num_test else "dev" if len(splits["dev"]) < num_dev else None
        if target is None:
            break
        if set(sentence) <= train_chars:
            splits[target].append(sentence)
    if len(splits["test"]) < num_test or len(splits["dev"]) < num_dev:
        raise ValueError(
            f"Only {len(splits['test'])}/{num_test} test and {len(splits['dev'])}/{num_dev} dev sentences have all "
            "their characters in the train sentences: use more sentences or a smaller vocab_size."
        )
    return splits


@dataclass
class UtteranceJob:
    """Everything needed to render and store one utterance (picklable, for the rendering processes)."""

    utterance_id: str
    split: str
    sentence_id: str
    text: str
    syllables: list[str]
    variant: str
    speed: int
    pitch: int
    snr_db: float
    noise_seed: tuple[int, int]
    audio: str  # path relative to the output folder
    output_dir: str
    sample_rate: int
    espeak_library: str


def _spoken_sentences(
    splits: Mapping[str, Sequence[str]], config: SynthesisConfig
) -> list[tuple[str, str, str, list[str], int]]:
    """``(split, sentence_id, text, voice variants, renditions)`` of every sentence, in rendering order.

    The seen-voices track comes last, its sentences keeping their test ids: the utterances of the other
    splits, and so every draw for them, are the same with the track as without it.
    """
    rows, sentence_ids = [], {}
    for split in SPLITS:
        variants = config.train_variants if split == "train" else config.heldout_variants
        renditions = config.renditions_per_train_sentence if split == "train" else 1
        for text in splits[split]:
            sentence_ids[text] = f"s{len(sentence_ids):05d}"
            rows.append((split, sentence_ids[text], text, variants, renditions))
    if config.seen_voices_test:
        rows += [(SEEN_VOICES_SPLIT, sentence_ids[text], text, config.train_variants, 1) for text in splits["test"]]
    return rows


def plan_utterances(splits: Mapping[str, Sequence[str]], config: SynthesisConfig) -> list[UtteranceJob]:
    """Draw voice, speed, pitch and SNR for every utterance, in a fixed order from the seed."""
    rng = random.Random(f"{config.seed}/utterances")  # a stream apart from the sentence shuffle
    jobs: list[UtteranceJob] = []
    for split, sentence_id, text, variants, renditions in _spoken_sentences(splits, config):
        syllables = to_pinyin(text)
        for rendition in range(renditions):
            utterance_id = f"{split}_{sentence_id}_r{rendition}"
            jobs.append(
                UtteranceJob(
                    utterance_id=utterance_id,
                    split=split,
                    sentence_id=sentence_id,
                    text=text,
                    syllables=syllables,
                    variant=rng.choice(variants),
                    speed=rng.randint(config.speed_min, config.speed_max),
                    pitch=rng.randint(config.pitch_min, config.pitch_max),
                    snr_db=round(rng.uniform(config.snr_db_min, config.snr_db_max), 1),
                    noise_seed=(config.seed, len(jobs)),
                    audio=f"audio/{split}/{utterance_id}.wav",
                    output_dir=config.output_dir,
                    sample_rate=config.sample_rate,
                    espeak_library=config.espeak_library,
                )
            )
    return jobs


def add_white_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """``audio + n`` with Gaussian ``n`` whose power is the mean power of ``audio`` over ``10^(snr_db/10)``."""
    signal_power = float(np.mean(audio.astype(np.float64) ** 2))
    noise = rng.standard_normal(audio.shape[0]) * math.sqrt(signal_power / 10.0 ** (snr_db / 10.0))
    return (audio + noise).astype(np.float32)


def render_utterance(engine: EspeakEngine, job: UtteranceJob) -> dict:
    """Render, resample, add noise and write one utterance; return its manifest record."""
    rendering = engine.render(job.syllables, job.variant, job.speed, job.pitch)
    audio = soxr.resample(rendering.samples.astype(np.float32) / 32768.0, rendering.sample_rate, job.sample_rate)
    audio = add_white_noise(audio, job.snr_db, np.random.default_rng(job.noise_seed))
    path = Path(job.output_dir) / job.audio
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, np.clip(audio, -1.0, 32767 / 32768), job.sample_rate, subtype="PCM_16")
    return {
        "id": job.utterance_id,
        "audio": job.audio,
        "text": job.text,
        "pinyin": " ".join(job.syllables),
        "sentence_id": job.sentence_id,
        "voice": f"{ESPEAK_VOICE}+{job.variant}",
        "speed": job.speed,
        "pitch": job.pitch,
        "snr_db": job.snr_db,
        "duration": round(audio.shape[0] / job.sample_rate, 4),
        "char_times": [[round(start, 3), round(end, 3)] for start, end in rendering.syllable_times],
    }


def render_block(jobs: Sequence[UtteranceJob]) -> list[dict]:
    """Render ``jobs`` in order with this process's engine (run in a fresh process)."""
    engine = load_espeak(jobs[0].espeak_library)
    return [render_utterance(engine, job) for job in jobs]


def _render_all(jobs: Sequence[UtteranceJob], engine: EspeakEngine, num_workers: int) -> list[dict]:
    """Manifest records of ``jobs``, in order, rendered block by block in fresh processes.

    ``maxtasksperchild=1`` with ``chunksize=1`` gives every block its own process, forked from
    this one so that it inherits the loaded, never-used engine.
    """
    if engine.has_rendered:
        raise RuntimeError(
            "libespeak-ng has already rendered audio in this process, so processes forked from it would not "
            "reproduce the corpus; synthesise corpora from a process that does not call EspeakEngine.render()."
        )
    blocks = [jobs[start : start + RENDER_BLOCK_SIZE] for start in range(0, len(jobs), RENDER_BLOCK_SIZE)]
    records: list[dict] = []
    with (
        multiprocessing.get_context("fork").Pool(num_workers, maxtasksperchild=1) as pool,
        tqdm(total=len(jobs), desc="synthesising", unit="utt") as progress,
    ):
        for block_records in pool.imap(render_block, blocks, chunksize=1):
            records.extend(block_records)
            progress.update(len(block_records))
    return records


@dataclass
class CorpusSummary:
    """What :func:`synthesize_corpus` made (the content of ``corpus.json`` plus where it is).

    Attributes:
        output_dir: the corpus folder.
        manifests: split -> path of its JSON-lines manifest.
        info: the parsed ``corpus.json``.
        reused: True when an existing complete corpus with the same settings was kept.
    """

    output_dir: Path
    manifests: dict[str, Path]
    info: dict
    reused: bool

    @property
    def num_utterances(self) -> dict[str, int]:
        return {split: part["utterances"] for split, part in self.info["splits"].items()}

    @property
    def num_sentences(self) -> dict[str, int]:
        return {split: part["sentences"] for split, part in self.info["splits"].items()}

    @property
    def test_tracks(self) -> tuple[str, ...]:
        """The corpus' test tracks (:data:`TEST_TRACKS`): ``test``, then ``test_seen_voices`` if it has one."""
        return tuple(track for track in TEST_TRACKS if track in self.info["splits"])

    @property
    def vocabulary(self) -> list[str]:
        """Characters of the corpus, most frequent first."""
        return list(self.info["vocabulary"])

    @property
    def homophones(self) -> HomophoneStats:
        """Homophone counts over the test transcripts."""
        return HomophoneStats(**self.info["homophones_test"])


def read_manifest(path: str | Path) -> list[dict]:
    """Records of a ``{split}.jsonl`` manifest, with ``audio`` resolved to an absolute path."""
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            try:
                record = json.loads(line)
                record["audio"] = str((path.parent / record["audio"]).resolve())
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(
                    f"{path}:{line_number}: not a manifest record with an 'audio' field ({error})."
                ) from error
            records.append(record)
    return records


def corpus_splits(corpus_dir: str | Path) -> tuple[str, ...]:
    """The splits of the corpus in ``corpus_dir``: :data:`SPLITS`, then the seen-voices test track if it
    has one (a corpus rewrites or removes every manifest when it is made, so one that is there is its own)."""
    seen = (Path(corpus_dir) / f"{SEEN_VOICES_SPLIT}.jsonl").is_file()
    return SPLITS + ((SEEN_VOICES_SPLIT,) if seen else ())


def heldout_sentences(corpus_dir: str | Path | None = None, exclude_file: str | Path | None = None) -> list[str]:
    """Normalised sentences to keep out of training: dev/test transcripts and lines of a file.

    Returns:
        Distinct non-empty sentences after :func:`~modeling_tot_cakt.training.transcripts.normalize_transcript`, sorted.

    Raises:
        FileNotFoundError: a manifest or the file is missing.
    """
    texts: list[str] = []
    if corpus_dir is not None:
        for split in HELDOUT_SPLITS:
            manifest = Path(corpus_dir) / f"{split}.jsonl"
            if not manifest.is_file():
                raise FileNotFoundError(
                    f"No {manifest}: corpus_dir must be a corpus made by modeling_tot_cakt.demo.synthesis."
                )
            texts.extend(record["text"] for record in read_manifest(manifest))
    if exclude_file is not None:
        texts.extend(Path(exclude_file).read_text(encoding="utf-8").splitlines())
    return sorted({sentence for sentence in map(normalize_transcript, texts) if sentence})


def corpus_settings_hash(config: SynthesisConfig, engine_version: str, excluded: Sequence[str] = ()) -> str:
    """Cache key: hash of the output-determining settings, the espeak-ng version, the format and
    the excluded sentences (when there are any)."""
    key = {"settings": config.output_settings(), "espeak_ng": engine_version, "format_version": FORMAT_VERSION}
    if excluded:
        key["excluded_sha256"] = lines_digest(excluded)
    return settings_hash(key)


def _load_complete_corpus(output_dir: Path, expected_hash: str) -> CorpusSummary | None:
    """The corpus in ``output_dir`` if it is complete and was made with ``expected_hash``."""
    info = read_complete_report(output_dir, CORPUS_SUMMARY_FILE, expected_hash)
    if info is None:
        return None
    manifests = {split: output_dir / f"{split}.jsonl" for split in info["splits"]}
    for split, manifest in manifests.items():
        if not manifest.is_file():
            return None
        records = read_manifest(manifest)
        if len(records) != info["splits"][split]["utterances"] or not all(Path(r["audio"]).is_file() for r in records):
            return None
    return CorpusSummary(output_dir, manifests, info, reused=True)


def _remove_previous_output(output_dir: Path) -> None:
    """Delete what an earlier (stale or partial) run wrote, and nothing else."""
    (output_dir / CORPUS_SUMMARY_FILE).unlink(missing_ok=True)
    for split in (*SPLITS, SEEN_VOICES_SPLIT):
        (output_dir / f"{split}.jsonl").unlink(missing_ok=True)
    shutil.rmtree(output_dir / "audio", ignore_errors=True)


def _check_variants(config: SynthesisConfig, engine: EspeakEngine) -> None:
    installed = set(engine.variants())
    unknown = sorted(set(config.train_variants + config.heldout_variants) - installed)
    if unknown:
        raise ValueError(f"Unknown espeak-ng voice variants {unknown}; installed: {' '.join(sorted(installed))}.")
    shared = sorted(set(config.train_variants) & set(config.heldout_variants))
    if shared:
        raise ValueError(
            f"Voice variants {shared} are in both train_variants and heldout_variants; held-out voices must be unseen."
        )


@dataclass
class CorpusPlan:
    """What a corpus holds, known from the text alone: its sentences and utterances before any audio.

    Attributes:
        jobs: every utterance to render, in order (:func:`plan_utterances`).
        text_info: the part of ``corpus.json`` that the text decides (see :meth:`text_summary`).
        source_files: the text files read.
    """

    jobs: list[UtteranceJob]
    text_info: dict
    source_files: list[Path]


def plan_corpus(config: SynthesisConfig, excluded: Sequence[str] = ()) -> CorpusPlan:
    """Choose the sentences of every split and draw their utterances, without synthesising anything.

    Args:
        config: the corpus' settings.
        excluded: sentences the corpus must not speak (see ``exclude_corpus_dir``).

    Raises:
        FileNotFoundError: a text source is not installed.
        ValueError: too few sentences for the settings.
    """
    source_clauses, source_files = load_named_clauses(config.text_sources, config.fortunes_dir)
    clauses, num_excluded = exclude_heldout(source_clauses, excluded)
    pool, filter_counts = select_sentences(
        clauses,
        min_chars=config.min_chars,
        max_chars=config.max_chars,
        vocab_size=config.vocab_size,
    )
    num_test = round(config.test_fraction * config.num_sentences)
    num_dev = round(config.dev_fraction * config.num_sentences)
    splits = split_by_sentence(
        pool, num_train=config.num_sentences - num_dev - num_test, num_dev=num_dev, num_test=num_test, seed=config.seed
    )
    jobs = plan_utterances(splits, config)
    spoken: dict[str, list[tuple[str, list[str]]]] = {split: [] for split in config.splits()}
    for job in jobs:
        spoken[job.split].append((job.text, job.syllables))
    sentence_pinyin = {job.text: job.syllables for job in jobs}
    readings = char_readings(sentence_pinyin.items())
    text_info = {
        "sentence_filter_counts": {"excluded_overlapping_clauses": num_excluded, **filter_counts},
        "excluded_sentences": len(excluded),
        "splits": {
            split: {"sentences": len({text for text, _ in items}), "utterances": len(items)}
            for split, items in spoken.items()
        },
        "vocabulary_size": len(readings),
        "vocabulary": "".join(char for char, _ in char_frequencies(sentence_pinyin.keys())),
        "train_vocabulary_size": len({char for text, _ in spoken["train"] for char in text}),
        "homophones_test": asdict(homophone_stats(spoken["test"], readings)),
        "test_tracks": track_stats(spoken),
    }
    return CorpusPlan(jobs, text_info, source_files)


def synthesize_corpus(config: SynthesisConfig, reuse_only: bool = False) -> CorpusSummary | None:
    """Build (or reuse) a synthetic Mandarin corpus; see the module docstring.

    Output in ``config.output_dir``: ``audio/{split}/*.wav`` (16-bit mono), ``{split}.jsonl``
    (one record per utterance: ``id``, ``audio`` relative to the manifest, ``text``, ``pinyin``,
    ``sentence_id``, ``voice``, ``speed``, ``pitch``, ``snr_db``, ``duration`` in seconds,
    ``char_times``) and ``corpus.json`` (settings, hash, counts, vocabulary, homophone counts, and per
    test track the share of characters with a homophone and out of vocabulary: :func:`track_stats`).

    A complete corpus made with the same settings is reused; a stale or partial one is replaced, or with
    ``reuse_only`` left as it is (the result is then None: nothing is built).

    Raises:
        FileNotFoundError: espeak-ng or a text source is not installed.
        ValueError: invalid settings, or too few sentences for them.
    """
    config.validate()
    engine = load_espeak(config.espeak_library)
    _check_variants(config, engine)
    output_dir = Path(config.output_dir)
    excluded = heldout_sentences(config.exclude_corpus_dir) if config.exclude_corpus_dir else []
    key = corpus_settings_hash(config, engine.version, excluded)
    cached = _load_complete_corpus(output_dir, key)
    if cached is not None or reuse_only:
        return cached
    plan = plan_corpus(config, excluded)
    _remove_previous_output(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    records = _render_all(plan.jobs, engine, config.num_workers)
    records_by_split: dict[str, list[dict]] = {split: [] for split in config.splits()}
    for job, record in zip(plan.jobs, records, strict=True):
        records_by_split[job.split].append(record)
    manifests = {split: output_dir / f"{split}.jsonl" for split in records_by_split}
    for split, manifest in manifests.items():
        lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records_by_split[split]]
        manifest.write_text("".join(lines), encoding="utf-8")

    text_info = plan.text_info
    for split, split_records in records_by_split.items():
        text_info["splits"][split]["hours"] = round(sum(record["duration"] for record in split_records) / 3600, 4)
    info = {
        "format_version": FORMAT_VERSION,
        "settings_hash": key,
        "settings": config.output_settings(),
        "espeak_ng_version": engine.version,
        "voice": ESPEAK_VOICE,
        "sample_rate": config.sample_rate,
        "source_files": [str(path) for path in plan.source_files],
        **text_info,
        "char_times": CHAR_TIMES_DESCRIPTION,
    }
    (output_dir / CORPUS_SUMMARY_FILE).write_text(
        json.dumps(info, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    return CorpusSummary(output_dir, manifests, info, reused=False)


def format_test_tracks(info: dict) -> list[str]:
    """One line per test track of a ``corpus.json`` (or :attr:`CorpusPlan.text_info`): homophone and OOV shares."""
    return [
        f"  {track}: {stats['homophone_share']:.3f} of {stats['tokens']} characters have a homophone in the train "
        f"inventory, {stats['oov_share']:.3f} ({stats['oov_tokens']}) are out of it"
        for track, stats in info.get("test_tracks", {}).items()
    ]


def main(args: Sequence[str] | None = None) -> CorpusSummary:
    """Command line: ``python -m modeling_tot_cakt.demo.synthesis --output_dir DIR [settings]``."""
    (config,) = HfArgumentParser(SynthesisConfig).parse_args_into_dataclasses(args)
    start = time.perf_counter()
    summary = synthesize_corpus(config)
    seconds = time.perf_counter() - start
    total = sum(summary.num_utterances.values())
    verb = "Reused" if summary.reused else "Synthesised"
    print(
        f"{verb} {total} utterances in {summary.output_dir} "
        f"({seconds:.1f} s, {1000 * seconds / max(total, 1):.1f} ms/utterance)."
    )
    for split, part in summary.info["splits"].items():
        print(
            f"  {split}: {part['sentences']} sentences, {part['utterances']} utterances, {part['hours'] * 60:.1f} min"
        )
    stats = summary.homophones
    print(
        f"  vocabulary: {summary.info['vocabulary_size']} characters; test characters with a homophone: "
        f"{stats.tokens_with_homophone}/{stats.tokens} tokens, {stats.types_with_homophone}/{stats.types} types"
    )
    print("\n".join(format_test_tracks(summary.info)))
    return summary


if __name__ == "__main__":
    main()
