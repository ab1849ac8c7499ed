"""Homophone substitutions vs other errors (modeling_tot_cakt.training.error_analysis)."""

import pytest

from modeling_tot_cakt.training.error_analysis import split_errors


def test_split_on_a_hand_made_example():
    references = ["他是好人", "她是人"]
    syllables = [["ta1", "shi4", "hao3", "ren2"], ["ta1", "shi4", "ren2"]]
    # 他 -> 她 (read ta1: homophone), 是 -> 时 (shi2: another tone, not a homophone), 人 deleted;
    # 她 -> 他 and 是 -> 事 (shi4) homophones, 们 inserted.
    hypotheses = ["她时好", "他事人们"]
    split = split_errors(references, hypotheses, syllables)
    assert (split.homophone_substitutions, split.other_substitutions, split.deletions, split.insertions) == (
        3,
        1,
        1,
        1,
    )
    rates = split.as_dict()
    assert rates["reference_chars"] == 7 and rates["errors"] == 6
    assert rates["cer"] == pytest.approx(6 / 7)
    assert rates["homophone_cer"] == pytest.approx(3 / 7) and rates["other_cer"] == pytest.approx(3 / 7)
    # 是 -> 时 is the one other substitution, and a near miss in tone (shi4 spoken, shi2 written).
    assert split.tone_substitutions == 1 and rates["tone_cer"] == pytest.approx(1 / 7)


def test_tone_substitutions_need_the_same_syllable():
    # 他 (ta1) -> 大 (da4): another syllable; 好 (hao3) -> 号 (hao4): the syllable in another tone;
    # 人 (ren2) -> 认 (ren4) too; 是 (shi4) -> 事 (shi4) a homophone, counted as such and not as a tone error.
    split = split_errors(["他好人是"], ["大号认事"], [["ta1", "hao3", "ren2", "shi4"]])
    assert (split.homophone_substitutions, split.other_substitutions, split.tone_substitutions) == (1, 3, 2)


def test_corpus_readings_add_sandhi_forms():
    # 不 before a fourth tone is spoken bu2; 步 is bu4 in pypinyin's dictionary, so no homophone of it,
    # unless the corpus' readings (here made up) say 步 was spoken bu2 somewhere.
    split = split_errors(["不要"], ["步要"], [["bu2", "yao4"]])
    assert split.homophone_substitutions == 0 and split.other_substitutions == 1
    split = split_errors(["不要"], ["步要"], [["bu2", "yao4"]], readings={"步": {"bu2"}})
    assert split.homophone_substitutions == 1


def test_syllables_must_match_the_reference():
    with pytest.raises(ValueError, match="2 syllables for the 3 characters"):
        split_errors(["他是人"], ["他是人"], [["ta1", "shi4"]])
