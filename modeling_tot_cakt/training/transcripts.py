"""Mandarin transcript normalisation shared by training labels and evaluation references.

The character-level CTC vocabulary and the character error rate only make sense when every
transcript goes through the same normalisation: full-width forms are folded to half-width (NFKC),
what is not spoken (punctuation, symbols, whitespace, combining marks, controls) is dropped, and
letters get a single case so that `A` and `a` are not two vocabulary entries.

What is kept is decided by Unicode category, not by a list of scripts: every letter and every number
(`L*`, `N*`) survives, so the Han ideographs of every block, `〇` (U+3007, as in 二〇二四年, a letter
number), the Hangzhou numerals, `々`, Latin letters with or without diacritics and digits all reach the
labels and the references. Han blocks are also matched by code point, so an ideograph of a block newer
than Python's Unicode tables (extension H, I, J) is kept too. What is dropped can be counted with
[`split_transcript`].
"""

from __future__ import annotations

import unicodedata

# The Han ideograph blocks (unified ideographs, extensions A-J, compatibility ideographs and their
# supplement), by code point: `unicodedata` knows only the blocks of the Python's Unicode version
# (3.11 has 14.0: no extension H, I or J), so a name or category test would drop newer ideographs.
HAN_RANGES = (
    (0x3400, 0x4DBF),  # extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    (0x20000, 0x2A6DF),  # extension B
    (0x2A700, 0x2B73F),  # extension C
    (0x2B740, 0x2B81F),  # extension D
    (0x2B820, 0x2CEAF),  # extension E
    (0x2CEB0, 0x2EBEF),  # extension F
    (0x2EBF0, 0x2EE5F),  # extension I
    (0x2F800, 0x2FA1F),  # CJK Compatibility Ideographs Supplement
    (0x30000, 0x3134F),  # extension G
    (0x31350, 0x323AF),  # extension H
    (0x323B0, 0x3347F),  # extension J
)

# Unicode general categories that are spoken: letters (Lu Ll Lt Lm Lo) and numbers (Nd Nl No).
_KEPT_CATEGORY_PREFIXES = ("L", "N")


def is_han(char: str) -> bool:
    """Whether `char` (a single character) is a Han ideograph (in a Han block, assigned or not yet known)."""
    code = ord(char)
    return any(first <= code <= last for first, last in HAN_RANGES)


def is_kept(char: str) -> bool:
    """Whether normalisation keeps `char`: a Han ideograph, or any letter or number."""
    return is_han(char) or unicodedata.category(char).startswith(_KEPT_CATEGORY_PREFIXES)


def _one_case(text: str, do_lower_case: bool) -> str:
    # Case mapping can leave a character that is not NFKC-normal (the Kelvin sign's lower case) or a
    # combining mark (İ lower-cases to i + U+0307): normalise again so the result is a fixed point.
    return unicodedata.normalize("NFKC", text.lower() if do_lower_case else text.upper())


def split_transcript(text: str, do_lower_case: bool = True) -> tuple[str, str]:
    """
    Normalise a transcript and say what was removed.

    Returns:
        `(kept, removed)`: the normalised transcript (see [`normalize_transcript`]) and the characters that
        normalisation dropped, in order (after NFKC: `"５０％"` drops `"%"`, not `"％"`).
    """
    if not isinstance(text, str):
        raise TypeError(f"A transcript must be a str, got {type(text).__name__}: {text!r}.")
    folded = _one_case(unicodedata.normalize("NFKC", text), do_lower_case)
    kept = "".join(char for char in folded if is_kept(char))
    removed = "".join(char for char in folded if not is_kept(char))
    # Dropping a character can let its neighbours compose (Hangul jamo around a space); settle that.
    return unicodedata.normalize("NFKC", kept), removed


def normalize_transcript(text: str, do_lower_case: bool = True) -> str:
    """
    Normalise a Mandarin transcript to the character sequence the recogniser is trained on.

    Steps: NFKC (full-width letters and digits, circled and parenthesised numbers, compatibility ideographs
    become their canonical half-width / unified forms), then one case for letters (lower with
    `do_lower_case=True`, else upper), then keep only Han ideographs, letters and numbers: punctuation,
    symbols, whitespace, combining marks and controls are dropped.

    Args:
        text (`str`): raw transcript, e.g. `"今天 天气，很好！ＯＫ 二〇二四"`.
        do_lower_case (`bool`): lower-case (default) or upper-case letters.

    Returns:
        `str`: the normalised transcript, e.g. `"今天天气很好ok二〇二四"`; empty when nothing is left.
    """
    return split_transcript(text, do_lower_case)[0]


__all__ = ["HAN_RANGES", "is_han", "is_kept", "normalize_transcript", "split_transcript"]
