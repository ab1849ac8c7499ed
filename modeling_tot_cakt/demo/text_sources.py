"""Chinese sentence source and cleaning for the synthetic Mandarin corpus and the offline teacher.

The text comes from Debian's ``fortunes-zh`` package (modern quotes plus Tang and Song poems,
about 2 MB), read at run time so that no third-party text lives in this repository. Fortune
files are lists of entries separated by ``%`` lines; entries wrap long lines in the middle of
sentences and colour titles and authors with ANSI escape sequences.

Cleaning produces *clauses*: runs of text between punctuation marks that consist of Han
characters only (anything holding Latin letters, digits, spaces or symbols is dropped, never
cut up, so every clause is a real span of the source).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from pypinyin import Style, lazy_pinyin

from ..training.transcripts import is_han

FORTUNES_ZH_DIR = Path("/usr/share/games/fortunes")
"""Where Debian's ``fortunes-zh`` installs its files."""

FORTUNES_ZH_FILES = ("chinese", "tang300", "song100")
"""The UTF-8 fortune files of ``fortunes-zh``: modern sayings, 300 Tang poems, 100 Song poems."""

INSTALL_HINT = "install it with `apt-get install espeak-ng fortunes-zh` (Debian/Ubuntu)"

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ENTRY_SEPARATOR = re.compile(r"^%$", flags=re.MULTILINE)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_TONE3_SYLLABLE = re.compile(r"^[a-z]+[1-5]$")


def fortunes_zh_paths(directory: str | Path | None = None) -> list[Path]:
    """Paths of the ``fortunes-zh`` text files.

    Args:
        directory: folder holding the files; ``None`` means Debian's install location.

    Returns:
        The existing files among :data:`FORTUNES_ZH_FILES`, in that order.

    Raises:
        FileNotFoundError: none of the files is there (the package is not installed).
    """
    folder = Path(directory) if directory is not None else FORTUNES_ZH_DIR
    paths = [folder / name for name in FORTUNES_ZH_FILES if (folder / name).is_file()]
    if not paths:
        raise FileNotFoundError(
            f"No fortunes-zh text found in {folder} (looked for {', '.join(FORTUNES_ZH_FILES)}); "
            f"{INSTALL_HINT}, or pass the folder that holds these files."
        )
    return paths


def is_han_sentence(text: str) -> bool:
    """Whether ``text`` is non-empty and made of Han characters only."""
    return bool(text) and all(is_han(char) for char in text)


def split_fortune_clauses(raw: str) -> Iterator[str]:
    """Split the text of one fortune file into clauses, in file order.

    Entries are separated by ``%`` lines. Inside an entry, escape sequences and blank lines end a
    clause (they separate titles, authors and paragraphs), single line breaks are joined (they
    wrap sentences), and every Unicode punctuation mark ends a clause.

    Args:
        raw: the whole file as text.

    Yields:
        Clauses stripped of surrounding whitespace, possibly holding non-Han characters.
    """
    for entry in _ENTRY_SEPARATOR.split(raw):
        entry = _ANSI_ESCAPE.sub("\n\n", entry)
        for paragraph in _PARAGRAPH_BREAK.split(entry):
            clause: list[str] = []
            for char in paragraph.replace("\n", "") + "\n":
                if char == "\n" or unicodedata.category(char).startswith("P"):
                    text = "".join(clause).strip()
                    if text:
                        yield text
                    clause = []
                else:
                    clause.append(char)


def load_han_clauses(paths: Sequence[str | Path] | None = None) -> list[str]:
    """Unique Han-only clauses of the given fortune files, in order of first appearance.

    Args:
        paths: fortune files; ``None`` reads the installed ``fortunes-zh`` files.

    Returns:
        Clauses (after NFKC normalisation, which folds compatibility forms) holding Han
        characters only, each once.
    """
    files = fortunes_zh_paths() if paths is None else [Path(path) for path in paths]
    clauses: dict[str, None] = {}
    for path in files:
        for clause in split_fortune_clauses(path.read_text(encoding="utf-8")):
            clause = unicodedata.normalize("NFKC", clause)
            if is_han_sentence(clause):
                clauses.setdefault(clause)
    return list(clauses)


def char_frequencies(sentences: Iterable[str]) -> list[tuple[str, int]]:
    """Character counts over ``sentences``, most frequent first (ties by code point)."""
    counts = Counter(char for sentence in sentences for char in sentence)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def restrict_to_frequent_chars(sentences: Sequence[str], vocab_size: int) -> list[str]:
    """Keep the sentences whose characters all lie among the ``vocab_size`` most frequent ones.

    Frequencies are counted over ``sentences`` themselves, so the kept set uses at most
    ``vocab_size`` distinct characters.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be at least 1, got {vocab_size}.")
    inventory = {char for char, _ in char_frequencies(sentences)[:vocab_size]}
    return [sentence for sentence in sentences if set(sentence) <= inventory]


def to_pinyin(sentence: str) -> list[str]:
    """Toneful pinyin of a Han sentence, one syllable per character, as it is spoken.

    Uses pypinyin's phrase dictionary (so polyphonic characters get their reading in context),
    ``Style.TONE3`` (tone digit after the syllable, ``ü`` written ``v``), neutral tone as ``5``
    (espeak-ng's ``cmn-latn-pinyin`` voice reads a bare syllable as first tone) and tone sandhi
    (不/一 and third-tone pairs), so the syllables are the ones a speaker says.

    Args:
        sentence: Han characters only.

    Returns:
        ``len(sentence)`` syllables such as ``["ni2", "hao3"]``.

    Raises:
        ValueError: a character has no toneful reading in pypinyin's dictionary.
    """
    syllables = lazy_pinyin(sentence, style=Style.TONE3, neutral_tone_with_five=True, tone_sandhi=True)
    if len(syllables) != len(sentence):
        raise ValueError(
            f"pypinyin returned {len(syllables)} syllables for the {len(sentence)} characters of {sentence!r}."
        )
    for char, syllable in zip(sentence, syllables, strict=True):
        if not _TONE3_SYLLABLE.match(syllable):
            raise ValueError(f"No toneful pinyin for {char!r} in {sentence!r} (pypinyin gave {syllable!r}).")
    return syllables


def has_pinyin(sentence: str) -> bool:
    """Whether every character of ``sentence`` has a toneful reading (see :func:`to_pinyin`)."""
    try:
        to_pinyin(sentence)
    except ValueError:
        return False
    return True
