"""Syllable transcripts for the encoder's CTC pretraining (modeling_tot_cakt.demo.encoder_pretraining)."""

import json

from modeling_tot_cakt.demo.encoder_pretraining import syllable_symbols, write_syllable_manifests


def test_one_distinct_symbol_per_syllable_with_a_spare_for_polyphonic_collisions():
    sentences = ["的的的", "目的", "他是", "他的"]
    syllables = [["de5", "de5", "de5"], ["mu4", "di4"], ["ta1", "shi4"], ["ta1", "de5"]]
    symbols = syllable_symbols(syllables, sentences)
    # de5 (4 times) takes 的 first; di4's only character is then taken: it gets U+3400.
    assert symbols == {"de5": "的", "ta1": "他", "di4": "\u3400", "mu4": "目", "shi4": "是"}
    assert len(set(symbols.values())) == len(symbols)


def test_manifests_keep_audio_and_characters(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = {
        "train": [{"audio": "a/0.wav", "text": "他是", "pinyin": "ta1 shi4"}],
        "dev": [{"audio": "a/1.wav", "text": "她是", "pinyin": "ta1 shi4"}],
        "test": [{"audio": "a/2.wav", "text": "事", "pinyin": "shi4"}],
    }
    for split, records in rows.items():
        (corpus / f"{split}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
        )
    symbols = write_syllable_manifests(corpus, tmp_path / "units")
    dev = json.loads((tmp_path / "units" / "dev.jsonl").read_text(encoding="utf-8"))
    # 她 and 他 are both ta1: the syllable transcript cannot tell them apart, by design.
    assert dev["text"] == symbols["ta1"] + symbols["shi4"] == "他是"
    assert dev["characters"] == "她是" and dev["audio"] == str((corpus / "a/1.wav").resolve())
    assert json.loads((tmp_path / "units" / "syllable_symbols.json").read_text(encoding="utf-8")) == symbols
