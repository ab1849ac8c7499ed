"""Mandarin transcript normalisation shared by training labels and evaluation references.

The character-level CTC vocabulary and the character error rate only make sense when every
transcript goes through the same normalisation: full-width forms are folded to half-width (NFKC),
punctuation and whitespace are dropped (they have no acoustic realisation), and Latin letters get a
single case so that `A` and `a` are not two vocabulary entries.
"""

from __future__ import annotations

import unicodedata

# Unicode names of the Han ideograph blocks (unified ideographs, extensions A-J, compatibility
# ideographs and their supplement). Matching on the name prefix covers every block without a
# hand-maintained list of code-point ranges.
_HAN_NAME_PREFIXES = ("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH")


def is_han(char: str) -> bool:
    """Whether `char` (a single character) is a Han ideograph."""
    return unicodedata.name(char, "").startswith(_HAN_NAME_PREFIXES)


def _is_kept(char: str) -> bool:
    return is_han(char) or ("a" <= char <= "z") or ("A" <= char <= "Z") or ("0" <= char <= "9")


def normalize_transcript(text: str, do_lower_case: bool = True) -> str:
    """
    Normalise a Mandarin transcript to the character sequence the recogniser is trained on.

    Steps: NFKC (full-width letters, digits and compatibility ideographs become their canonical
    half-width / unified forms), then keep only Han characters, ASCII letters and digits (all
    punctuation, symbols and whitespace are dropped), then lower-case letters (`do_lower_case=True`)
    or upper-case them (`do_lower_case=False`).

    Args:
        text (`str`): raw transcript, e.g. `"今天 天气，很好！ＯＫ"`.
        do_lower_case (`bool`): lower-case (default) or upper-case Latin letters.

    Returns:
        `str`: the normalised transcript, e.g. `"今天天气很好ok"`; empty when nothing is left.
    """
    if not isinstance(text, str):
        raise TypeError(f"A transcript must be a str, got {type(text).__name__}: {text!r}.")
    kept = "".join(char for char in unicodedata.normalize("NFKC", text) if _is_kept(char))
    return kept.lower() if do_lower_case else kept.upper()


__all__ = ["is_han", "normalize_transcript"]
