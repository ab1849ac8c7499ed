import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modeling_tot_cakt.training.transcripts import is_han, is_kept, normalize_transcript, split_transcript


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
    assert all(is_kept(c) for c in once)
    assert once == once.lower()
    assert not any(is_kept(c) for c in split_transcript(text)[1])


# One ideograph at each end of every Han block (some are beyond Python 3.11's Unicode 14 tables:
# extension C's U+2B739, extensions H and I), and the compatibility ideographs, which NFKC maps to
# their unified twins (U+F900 -> U+8C48) or keeps (U+FA0E has no decomposition).
HAN_BLOCK_ENDS = {
    "URO": "\u4e00\u9fff",
    "A": "\u3400\u4dbf",
    "B": "\U00020000\U0002a6df",
    "C": "\U0002a700\U0002b739",
    "D": "\U0002b740\U0002b81d",
    "E": "\U0002b820\U0002cea1",
    "F": "\U0002ceb0\U0002ebe0",
    "G": "\U00030000\U0003134a",
    "H": "\U00031350\U000323af",
    "I": "\U0002ebf0\U0002ee5d",
    "compatibility": "\uf900\ufa0e\ufad9",
    "compatibility supplement": "\U0002f800\U0002fa1d",
}


@pytest.mark.parametrize("block", HAN_BLOCK_ENDS)
def test_every_han_block_survives(block):
    text = HAN_BLOCK_ENDS[block]
    expected = unicodedata.normalize("NFKC", text)
    assert normalize_transcript(f"“{text}”。") == expected and len(expected) == len(text)
    assert all(is_han(char) for char in expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("二〇二四年十月", "二〇二四年十月"),  # U+3007 IDEOGRAPHIC NUMBER ZERO
        ("〡〢〩〸〹〺", "〡〢〩十卄卅"),  # Hangzhou numerals; NFKC maps the ideographic tens to 十卄卅
        ("人々", "人々"),  # ideographic iteration mark
        ("２０２４年１０月１日", "2024年10月1日"),  # full-width digits
        ("㈠㊀①⑩", "一一110"),  # parenthesised and circled numbers
        ("㋀㏠㍘", "1月1日0点"),  # telegraph symbols for months, days and hours
        ("Ⅻ点", "xii点"),  # Roman numeral
        ("ㄅㄆ注音", "ㄅㄆ注音"),  # bopomofo
        ("lǜ sè 绿色", "lǜsè绿色"),  # pinyin with tone marks
    ],
)
def test_the_characters_of_numbers_and_dates_survive(text, expected):
    assert normalize_transcript(text) == expected


def test_what_normalisation_removes_is_returned():
    # NFKC runs first: the full-width comma and exclamation mark are removed as "," and "!".
    assert split_transcript("今天，天气 很好！50%\u200b") == ("今天天气很好50", ", !%\u200b")
    assert split_transcript("中\ufe00国") == ("中国", "\ufe00")  # a variation selector
