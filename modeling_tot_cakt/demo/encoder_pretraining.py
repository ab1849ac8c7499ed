"""Offline stand-in for a pretrained wav2vec 2.0 encoder: CTC pretraining on toned pinyin syllables.

The paper fine-tunes an encoder that was pretrained on far more speech than the transcribed set.
Without network access no such checkpoint can be downloaded, so this module makes one:

1. a synthetic corpus (:mod:`modeling_tot_cakt.demo.synthesis`) of sentences with *no* character
   limit, disjoint from the character-level corpus' dev and test sentences (``exclude_corpus_dir``);
2. its transcripts rewritten as *syllable transcripts*: each toned syllable (``ni3``, from pypinyin,
   the very syllable the synthesiser spoke) becomes one symbol, so any sentence can be spoken and
   the labels need no character inventory. The symbol of a syllable is a Han character read that way
   (:func:`syllable_symbols`), so ``train_hf.py`` trains on them unchanged and its CER *is* the
   syllable error rate;
3. ``train_hf.py`` with CTC only on those transcripts;
4. the trained encoder alone saved as a Hugging Face model folder (``config.json``,
   ``model.safetensors``, ``preprocessor_config.json``): ``AutoModel.from_pretrained`` loads it, and
   ``train_hf.py --encoder_name_or_path <folder>`` starts a character-level model from it exactly as
   from ``facebook/wav2vec2-base``.

One syllable per character keeps the label rate of the character-level task (the demo's 120 ms
frames leave no room for the two or three labels per syllable of initials/finals/tones).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from .build_cache import read_complete_report
from .synthesis import SPLITS, read_manifest

ENCODER_REPORT_FILE = "encoder_report.json"
ENCODER_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def syllable_symbols(syllable_sequences: Iterable[Sequence[str]], spoken_chars: Iterable[Sequence[str]]) -> dict:
    """One distinct Han character per toned syllable, to write syllable transcripts with.

    Syllables are taken in order of frequency (ties alphabetically); each gets the most frequent
    character spoken as it that no more frequent syllable took already. A syllable whose characters
    are all taken (a polyphonic character read two ways) gets the next unused code point of the CJK
    Extension A block (U+3400...), which no corpus sentence uses.

    Args:
        syllable_sequences: the toned syllables of each sentence (``["ni3", "hao3"]``).
        spoken_chars: the sentences themselves, one character per syllable.

    Returns:
        ``{syllable: symbol}``, one-to-one.
    """
    syllable_counts: Counter = Counter()
    char_counts: dict[str, Counter] = {}
    for syllables, chars in zip(syllable_sequences, spoken_chars, strict=True):
        for syllable, char in zip(syllables, chars, strict=True):
            syllable_counts[syllable] += 1
            char_counts.setdefault(syllable, Counter())[char] += 1
    symbols: dict[str, str] = {}
    taken: set[str] = set()
    spare = 0x3400
    for syllable, _ in sorted(syllable_counts.items(), key=lambda item: (-item[1], item[0])):
        ranked = sorted(char_counts[syllable].items(), key=lambda item: (-item[1], item[0]))
        symbol = next((char for char, _ in ranked if char not in taken), None)
        if symbol is None:
            while chr(spare) in taken:
                spare += 1
            symbol = chr(spare)
        symbols[syllable] = symbol
        taken.add(symbol)
    return symbols


def write_syllable_manifests(corpus_dir: str | Path, output_dir: str | Path) -> dict[str, str]:
    """Copies of a corpus' manifests whose ``text`` is the syllable transcript (see the module docstring).

    The original transcript is kept as ``characters``; ``audio`` is made absolute so that the
    manifests can live elsewhere. The symbols are chosen over all splits: a relabelling that reads
    only the synthesiser's pinyin, never the audio.

    Returns:
        ``{syllable: symbol}`` (also written to ``syllable_symbols.json``).
    """
    corpus_dir, output_dir = Path(corpus_dir), Path(output_dir)
    records = {split: read_manifest(corpus_dir / f"{split}.jsonl") for split in SPLITS}
    ordered = records["train"] + records["dev"] + records["test"]
    symbols = syllable_symbols([r["pinyin"].split() for r in ordered], [r["text"] for r in ordered])
    output_dir.mkdir(parents=True, exist_ok=True)
    for split, split_records in records.items():
        lines = []
        for record in split_records:
            transcript = "".join(symbols[syllable] for syllable in record["pinyin"].split())
            lines.append(json.dumps({**record, "text": transcript, "characters": record["text"]}, ensure_ascii=False))
        (output_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (output_dir / "syllable_symbols.json").write_text(
        json.dumps(symbols, ensure_ascii=False, indent=0) + "\n", encoding="utf-8"
    )
    return symbols


def export_encoder(model_dir: str | Path, encoder_dir: str | Path) -> dict:
    """Save the encoder of a trained TOT-CAKT CTC model as a plain pretrained-encoder folder.

    The folder holds what ``AutoModel.from_pretrained`` needs (the encoder's own ``config.json``,
    e.g. ``model_type: wav2vec2-bert``, and ``model.safetensors``) and the feature extractor's
    ``preprocessor_config.json``; the CTC head, the vocabulary and the adapter stay behind.

    Returns:
        ``{"model_type", "parameters"}`` of the saved encoder.
    """
    from transformers import AutoFeatureExtractor

    from ..modeling_tot_cakt import TOTCAKTForCTC

    model = TOTCAKTForCTC.from_pretrained(model_dir)
    encoder_dir = Path(encoder_dir)
    model.encoder.save_pretrained(encoder_dir)
    AutoFeatureExtractor.from_pretrained(model_dir).save_pretrained(encoder_dir)
    return {"model_type": model.encoder.config.model_type, "parameters": model.encoder.num_parameters()}


def load_complete_encoder(encoder_dir: str | Path, settings_hash: str) -> dict | None:
    """The report of the encoder folder if it is complete and was built with ``settings_hash``."""
    return read_complete_report(encoder_dir, ENCODER_REPORT_FILE, settings_hash, ENCODER_FILES)
