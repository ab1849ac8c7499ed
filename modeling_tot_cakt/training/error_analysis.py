"""Character errors split into homophone substitutions and all others.

Acoustics cannot tell two characters read as the same toned syllable apart; context can. A
recogniser's errors therefore split into *homophone substitutions* (the hypothesis character can be
read as the syllable the reference character was spoken as: the synthesiser's pinyin in the
manifest) and everything else (other substitutions, deletions, insertions). Knowledge transferred
from a language model should lower the first kind most. Among the other substitutions, those by a
character readable as the spoken syllable in another tone (``shi4`` heard as ``shi2``) are counted
too (``tone_substitutions``): a near miss of the acoustics rather than of the context.

The alignment of hypothesis and reference is the Levenshtein edit script of ``rapidfuzz`` (one
minimal script; the edit count equals the one the CER metric counts).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from pypinyin import Style, pinyin
from rapidfuzz.distance import Levenshtein


@functools.cache
def dictionary_readings(char: str) -> frozenset[str]:
    """Every toned reading pypinyin's dictionary gives ``char`` (``TONE3``, neutral tone ``5``)."""
    readings = pinyin(char, style=Style.TONE3, heteronym=True, neutral_tone_with_five=True)[0]
    return frozenset(readings)


def spoken_syllables(text: str) -> list[str]:
    """The toned syllable pypinyin reads each character of `text` as, in context (``TONE3``, neutral tone ``5``);
    a character that is not Han stands for itself. For transcripts without the speaker's own pinyin."""
    return [item[0] for item in pinyin(text, style=Style.TONE3, neutral_tone_with_five=True, errors=list)]


def _toneless(syllable: str) -> str:
    """``shi4`` -> ``shi``."""
    return syllable.rstrip("012345")


@dataclass
class ErrorSplit:
    """Character errors of a set of transcripts, by kind (counts; rates divide by ``reference_chars``).

    Attributes:
        reference_chars: characters in the references.
        homophone_substitutions: substitutions by a character readable as the spoken syllable.
        other_substitutions, deletions, insertions: the remaining edits.
        tone_substitutions: those of the other substitutions whose character is readable as the spoken
            syllable in another tone (a part of ``other_substitutions``, not an extra kind).
    """

    reference_chars: int
    homophone_substitutions: int
    other_substitutions: int
    deletions: int
    insertions: int
    tone_substitutions: int = 0

    @property
    def errors(self) -> int:
        return self.homophone_substitutions + self.other_substitutions + self.deletions + self.insertions

    def as_dict(self) -> dict:
        """The counts plus ``cer``, ``homophone_cer`` and ``other_cer`` (which sum to ``cer``) and ``tone_cer``
        (the part of ``other_cer`` made by tone substitutions)."""
        total = max(self.reference_chars, 1)
        return {
            **asdict(self),
            "errors": self.errors,
            "cer": self.errors / total,
            "homophone_cer": self.homophone_substitutions / total,
            "other_cer": (self.errors - self.homophone_substitutions) / total,
            "tone_cer": self.tone_substitutions / total,
        }


def split_errors(
    references: Sequence[str],
    hypotheses: Sequence[str],
    reference_syllables: Sequence[Sequence[str]],
    readings: Mapping[str, set[str]] | None = None,
) -> ErrorSplit:
    """Count the edits between each hypothesis and its reference, homophone substitutions apart.

    Args:
        references: normalised reference transcripts.
        hypotheses: the recogniser's transcripts, same order.
        reference_syllables: the toned syllable each reference character was spoken as.
        readings: extra readings per character (e.g. the corpus' own, which include tone sandhi such
            as ``bu2`` for 不), added to pypinyin's dictionary readings.

    Returns:
        The counts over all transcripts.
    """
    readings = readings or {}
    counts = {"replace": 0, "delete": 0, "insert": 0}
    homophones = tones = 0
    for reference, hypothesis, syllables in zip(references, hypotheses, reference_syllables, strict=True):
        if len(syllables) != len(reference):
            raise ValueError(f"{len(syllables)} syllables for the {len(reference)} characters of {reference!r}.")
        for operation, source, destination in Levenshtein.editops(reference, hypothesis):
            counts[operation] += 1
            if operation == "replace":
                char = hypothesis[destination]
                char_readings = dictionary_readings(char) | readings.get(char, set())
                if syllables[source] in char_readings:
                    homophones += 1
                else:
                    tones += _toneless(syllables[source]) in {_toneless(reading) for reading in char_readings}
    return ErrorSplit(
        reference_chars=sum(map(len, references)),
        homophone_substitutions=homophones,
        other_substitutions=counts["replace"] - homophones,
        deletions=counts["delete"],
        insertions=counts["insert"],
        tone_substitutions=tones,
    )
