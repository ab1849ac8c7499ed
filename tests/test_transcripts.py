import pytest
from hypothesis import given
from hypothesis import strategies as st

from modeling_tot_cakt.training.transcripts import is_han, normalize_transcript


def test_full_width_forms_become_half_width():
    assert normalize_transcript("ＡＢＣ１２３", do_lower_case=False) == "ABC123"


def test_punctuation_and_whitespace_are_dropped():
    assert normalize_transcript("今天，天气 很好！\t「真的」？……") == "今天天气很好真的"


def test_aishell_word_spacing_is_removed():
    assert normalize_transcript("而 对 楼市 成交 抑制 作用 最 大 的 限 购") == "而对楼市成交抑制作用最大的限购"


@pytest.mark.parametrize("lower, expected", [(True, "我用iphone14拍照"), (False, "我用IPHONE14拍照")])
def test_latin_letters_get_one_case(lower, expected):
    assert normalize_transcript("我用 iPhone 14 拍照。", do_lower_case=lower) == expected
    assert normalize_transcript("我用 IPHONE 14 拍照。", do_lower_case=lower) == expected


def test_compatibility_ideographs_and_symbols():
    # U+F900 is a CJK compatibility ideograph that NFKC maps to the unified 豈; emoji and % are dropped.
    assert normalize_transcript("\uf900 50%🙂") == "豈50"


def test_nothing_left_gives_empty_string():
    assert normalize_transcript("，。！？  ...") == ""


def test_non_string_is_rejected():
    with pytest.raises(TypeError, match="must be a str"):
        normalize_transcript(None)


def test_is_han():
    assert is_han("中") and is_han("\U00020000")  # CJK extension B
    assert not is_han("a") and not is_han("，") and not is_han("あ")


@given(st.text())
def test_normalisation_is_idempotent_and_keeps_only_allowed_characters(text):
    once = normalize_transcript(text)
    assert normalize_transcript(once) == once
    assert all(is_han(c) or c.isascii() and c.isalnum() for c in once)
    assert once == once.lower()
