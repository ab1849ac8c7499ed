"""Tests of the synthetic Mandarin corpus (modeling_tot_cakt.demo.synthesis, modeling_tot_cakt.demo.text_sources)."""

from __future__ import annotations

import ctypes
import io
import json
import multiprocessing
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile

from modeling_tot_cakt.demo.synthesis import (
    RENDER_BLOCK_SIZE,
    SEEN_VOICES_SPLIT,
    SPLITS,
    SynthesisConfig,
    char_readings,
    corpus_settings_hash,
    corpus_splits,
    heldout_sentences,
    homophone_stats,
    load_espeak,
    plan_utterances,
    read_manifest,
    split_by_sentence,
    synthesize_corpus,
    track_stats,
)
from modeling_tot_cakt.demo.text_sources import (
    load_han_clauses,
    restrict_to_frequent_chars,
    split_fortune_clauses,
    to_pinyin,
)

TINY = dict(num_sentences=20, vocab_size=300, renditions_per_train_sentence=2, seed=3)
TINY_UTTERANCES = 17 * 2 + 1 + 2  # train 17 sentences x 2 renditions, dev 1, test 2: two render blocks


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """The same tiny corpus built twice, with 2 and with 1 worker process."""
    first = synthesize_corpus(SynthesisConfig(output_dir=str(tmp_path_factory.mktemp("a")), num_workers=2, **TINY))
    second = synthesize_corpus(SynthesisConfig(output_dir=str(tmp_path_factory.mktemp("b")), num_workers=1, **TINY))
    return first, second


@pytest.fixture(scope="module")
def seen_voices_corpus(tmp_path_factory):
    """The tiny corpus with the second test track."""
    folder = tmp_path_factory.mktemp("seen")
    return synthesize_corpus(SynthesisConfig(output_dir=str(folder), num_workers=2, seen_voices_test=True, **TINY))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_same_seed_gives_byte_identical_corpus(corpora):
    first, second = corpora
    files_first, files_second = _files(first.output_dir), _files(second.output_dir)
    assert files_first.keys() == files_second.keys()
    assert sum(name.endswith(".wav") for name in files_first) == sum(first.num_utterances.values()) == TINY_UTTERANCES
    assert TINY_UTTERANCES > RENDER_BLOCK_SIZE
    differing = [name for name in files_first if files_first[name] != files_second[name]]
    assert differing == []


def test_splits_are_disjoint_by_sentence_and_heldout_chars_occur_in_train(corpora):
    summary = corpora[0]
    texts = {split: {record["text"] for record in read_manifest(summary.manifests[split])} for split in SPLITS}
    assert texts["train"].isdisjoint(texts["dev"]) and texts["train"].isdisjoint(texts["test"])
    assert texts["dev"].isdisjoint(texts["test"])
    assert (
        {split: len(texts[split]) for split in SPLITS} == summary.num_sentences == {"train": 17, "dev": 1, "test": 2}
    )
    train_chars = set("".join(texts["train"]))
    assert set("".join(texts["dev"] | texts["test"])) <= train_chars
    assert summary.info["vocabulary_size"] == len(set("".join(texts["train"] | texts["dev"] | texts["test"])))


def test_audio_is_16khz_mono_with_plausible_duration_and_char_times(corpora):
    summary = corpora[0]
    voices = {}
    for split in SPLITS:
        records = read_manifest(summary.manifests[split])
        voices[split] = {record["voice"] for record in records}
        for record in records:
            audio, rate = soundfile.read(record["audio"], dtype="float32")
            info = soundfile.info(record["audio"])
            assert rate == 16000 and info.channels == 1 and info.subtype == "PCM_16"
            duration = len(audio) / rate
            assert duration == pytest.approx(record["duration"], abs=1e-3)
            syllables = record["pinyin"].split()
            assert len(syllables) == len(record["text"]) == len(record["char_times"])
            # espeak speaks roughly 0.1-0.5 s per syllable at 140-200 words per minute.
            assert 0.1 * len(syllables) < duration < 0.5 * len(syllables) + 0.6
            assert np.sqrt(np.mean(audio**2)) > 0.01
            starts, ends = np.array(record["char_times"]).T
            assert np.all(starts < ends) and np.all(ends[:-1] <= starts[1:]) and ends[-1] <= duration
    assert voices["train"].isdisjoint(voices["dev"] | voices["test"])


def test_rerun_reuses_and_changed_or_partial_output_is_rebuilt(corpora, tmp_path):
    folder = tmp_path / "corpus"
    shutil.copytree(corpora[0].output_dir, folder)
    config = SynthesisConfig(output_dir=str(folder), **TINY)
    before = _files(folder)
    assert synthesize_corpus(config).reused
    assert _files(folder) == before

    next(folder.glob("audio/train/*.wav")).unlink()  # a partial corpus is made again
    rebuilt = synthesize_corpus(config)
    assert not rebuilt.reused and _files(folder) == before

    changed = synthesize_corpus(replace(config, seed=4))
    assert not changed.reused and changed.info["settings_hash"] != rebuilt.info["settings_hash"]
    listed = {Path(record["audio"]) for split in SPLITS for record in read_manifest(changed.manifests[split])}
    assert set(folder.rglob("*.wav")) == listed  # nothing stale is left behind


def _render_in_fresh_process(arguments):
    syllables, variant, speed, pitch = arguments
    rendering = load_espeak().render(syllables, variant, speed, pitch)
    return rendering.samples, rendering.sample_rate, rendering.syllable_times


@pytest.mark.parametrize("parent_drew_from_rand", [False, True])
def test_library_rendering_matches_espeak_command_line(parent_drew_from_rand):
    """Also when the process it is forked from has drawn from the C library's rand() (espeak-ng draws from it;
    onnxruntime's quantiser, run earlier in the same test process, once changed every rendering this way)."""
    syllables, variant, speed, pitch = ["wo3", "men5", "dou1", "shi4", "hao3", "peng2", "you3"], "f2", 180, 40
    if parent_drew_from_rand:
        libc = ctypes.CDLL(None)
        for _ in range(7):
            libc.rand()
    load_espeak()  # forked below from this never-rendering engine, like a corpus block
    with multiprocessing.get_context("fork").Pool(1) as pool:
        samples, rate, times = pool.apply(_render_in_fresh_process, ((syllables, variant, speed, pitch),))
    command = [
        "espeak-ng",
        "-v",
        f"cmn-latn-pinyin+{variant}",
        "-s",
        str(speed),
        "-p",
        str(pitch),
        "--stdout",
        " ".join(syllables),
    ]
    reference, reference_rate = soundfile.read(
        io.BytesIO(subprocess.run(command, capture_output=True, check=True).stdout), dtype="int16"
    )
    assert rate == reference_rate == 22050
    np.testing.assert_array_equal(samples, reference)
    assert len(times) == len(syllables) and times[0][0] == 0.0
    assert all(end == next_start for (_, end), (next_start, _) in zip(times[:-1], times[1:], strict=True))
    assert times[-1][1] < len(samples) / rate - 0.1  # the end pause is not part of the last syllable


def test_homophone_stats_on_hand_made_example():
    vocabulary = [
        ("他她它", ["ta1", "ta1", "ta1"]),
        ("妈马", ["ma1", "ma3"]),
        ("长", ["zhang3"]),
        ("长大", ["zhang3", "da4"]),
        ("很长", ["hen3", "chang2"]),
    ]
    readings = char_readings(vocabulary)
    assert readings["长"] == {"zhang3", "chang2"}
    test = [("他妈长", ["ta1", "ma1", "chang2"]), ("她大", ["ta1", "da4"])]
    stats = homophone_stats(test, readings)
    # 他 and 她 share ta1 with each other (and 它); 妈 ma1 differs from 马 ma3; 长 and 大 have no homophone.
    assert (stats.tokens, stats.tokens_with_homophone, stats.types, stats.types_with_homophone) == (5, 2, 5, 2)


def test_split_keeps_heldout_chars_in_train_and_reports_shortage():
    pool = ["甲乙", "乙甲", "甲甲", "乙乙", "甲乙甲", "丙丁"]
    for seed in range(10):
        splits = split_by_sentence(pool, num_train=4, num_dev=0, num_test=1, seed=seed)
        assert len(splits["train"]) == 4 and len(splits["test"]) == 1 and splits["dev"] == []
        assert set(splits["test"][0]) <= set("".join(splits["train"]))  # never the uncovered 丙丁
        assert not set(splits["train"]) & set(splits["test"])
    with pytest.raises(ValueError, match="test and .* dev sentences have all their characters"):
        split_by_sentence(["甲乙", "丙丁", "戊己"], num_train=1, num_dev=1, num_test=1, seed=0)
    with pytest.raises(ValueError, match="Only 3 sentences pass the filters, 4 were asked for"):
        split_by_sentence(["甲乙", "丙丁", "戊己"], num_train=2, num_dev=1, num_test=1, seed=0)


def test_missing_espeak_or_fortunes_says_what_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install espeak-ng"):
        synthesize_corpus(
            SynthesisConfig(output_dir=str(tmp_path / "x"), espeak_library="espeak-ng-not-installed", **TINY)
        )
    with pytest.raises(FileNotFoundError, match="apt-get install espeak-ng fortunes-zh"):
        synthesize_corpus(SynthesisConfig(output_dir=str(tmp_path / "x"), fortunes_dir=str(tmp_path), **TINY))


def test_bad_voice_variants_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="Unknown espeak-ng voice variants"):
        synthesize_corpus(SynthesisConfig(output_dir=str(tmp_path), train_variants=["m1", "nonesuch"], **TINY))
    with pytest.raises(ValueError, match="in both train_variants and heldout_variants"):
        synthesize_corpus(SynthesisConfig(output_dir=str(tmp_path), heldout_variants=["m1"], **TINY))


def test_fortune_clauses_join_wrapped_lines_and_cut_at_titles_and_punctuation(tmp_path):
    raw = (
        "\x1b[32m《静夜思》\x1b[m\n\x1b[33m作者：李白\x1b[m\n床前明月光，疑是地上霜。\n%\n"
        "在 Debian 这种项目中，很难避免遇到意见不\n和的人。\n\n请保持礼貌\n%\n"
    )
    assert list(split_fortune_clauses(raw)) == [
        "静夜思",
        "作者",
        "李白",
        "床前明月光",
        "疑是地上霜",
        "在 Debian 这种项目中",
        "很难避免遇到意见不和的人",
        "请保持礼貌",
    ]
    (tmp_path / "f").write_text(raw + "床前明月光！", encoding="utf-8")
    assert load_han_clauses([tmp_path / "f"]) == [
        "静夜思",
        "作者",
        "李白",
        "床前明月光",
        "疑是地上霜",
        "很难避免遇到意见不和的人",
        "请保持礼貌",
    ]


def test_pinyin_has_tone_digits_neutral_five_and_v_for_u_umlaut():
    assert to_pinyin("我们的女儿") == ["wo3", "men5", "de5", "nv3", "er2"]
    assert to_pinyin("不是") == ["bu2", "shi4"]  # 不 before a fourth tone is spoken bu2
    with pytest.raises(ValueError, match="No toneful pinyin"):
        to_pinyin("好a")


def test_restrict_to_frequent_chars_keeps_sentences_within_the_top_k():
    sentences = ["天天", "天地", "地人", "鬼"]
    assert restrict_to_frequent_chars(sentences, 2) == ["天天", "天地"]


def test_corpus_json_records_settings_and_counts(corpora):
    info = json.loads((corpora[0].output_dir / "corpus.json").read_text(encoding="utf-8"))
    assert info["settings"]["seed"] == TINY["seed"] and "output_dir" not in info["settings"]
    assert info["splits"]["train"]["utterances"] == 34 and info["splits"]["test"]["utterances"] == 2
    assert set(info["homophones_test"]) == {"tokens", "tokens_with_homophone", "types", "types_with_homophone"}
    assert info["homophones_test"]["tokens"] == sum(
        len(r["text"]) for r in read_manifest(corpora[0].manifests["test"])
    )


def train_only_config(output_dir, num_sentences: int, **settings) -> SynthesisConfig:
    """Every sentence of at least 4 characters, one rendition each, all in train."""
    return SynthesisConfig(
        output_dir=str(output_dir),
        num_sentences=num_sentences,
        vocab_size=0,
        min_chars=4,
        dev_fraction=0.0,
        test_fraction=0.0,
        renditions_per_train_sentence=1,
        num_workers=1,
        **settings,
    )


def test_a_pretraining_corpus_never_speaks_a_heldout_sentence(tmp_path, monkeypatch):
    """exclude_corpus_dir keeps another corpus' dev/test sentences (and clauses holding them) out."""
    from modeling_tot_cakt.demo import synthesis

    heldout = tmp_path / "characters"
    heldout.mkdir()
    for split, text in (("dev", "春眠不觉晓"), ("test", "处处闻啼鸟。")):
        record = {"audio": f"audio/{split}/0.wav", "text": text}
        (heldout / f"{split}.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    kept = ["夜来风雨声", "花落知多少", "白日依山尽", "黄河入海流", "欲穷千里目", "更上一层楼"]
    clauses = ["春眠不觉晓", *kept[:3], "处处闻啼鸟", "春眠不觉晓处处", *kept[3:]]
    monkeypatch.setattr(synthesis, "load_named_clauses", lambda names, fortunes_dir: (clauses, []))
    config = train_only_config(tmp_path / "pretraining", 6, exclude_corpus_dir=str(heldout))
    corpus = synthesize_corpus(config)
    assert sorted(record["text"] for record in read_manifest(corpus.manifests["train"])) == sorted(kept)
    assert corpus.info["sentence_filter_counts"]["excluded_overlapping_clauses"] == 3
    assert corpus.info["excluded_sentences"] == 2
    # Other held-out sentences make another corpus: the cache key holds them.
    (heldout / "dev.jsonl").write_text(json.dumps({"audio": "a.wav", "text": "夜来风雨声"}) + "\n", encoding="utf-8")
    rebuilt = synthesize_corpus(config)
    texts = {record["text"] for record in read_manifest(rebuilt.manifests["train"])}
    assert not rebuilt.reused and "夜来风雨声" not in texts and len(texts) == 6


def test_sentences_are_drawn_from_every_named_text_source(tmp_path, monkeypatch):
    """text_sources reads each named source (here a fortune folder and a review file), each clause once."""
    from modeling_tot_cakt.demo.text_sources import TEXT_SOURCES, TextSource, split_text_clauses

    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    (fortunes / "chinese").write_text("白日依山尽，黄河入海流。\n%\n欲穷千里目，更上一层楼。\n%\n", encoding="utf-8")
    for name in ("tang300", "song100"):
        (fortunes / name).write_text("", encoding="utf-8")
    reviews = tmp_path / "reviews.txt"
    reviews.write_text("夜来风雨声，花落知多少。\n白日依山尽，春眠不觉晓。\n", encoding="utf-8")
    monkeypatch.setitem(
        TEXT_SOURCES, "reviews", TextSource("reviews", "pip install x", "MIT", lambda: [reviews], split_text_clauses)
    )
    config = train_only_config(
        tmp_path / "corpus", 7, text_sources=["fortunes-zh", "reviews"], fortunes_dir=str(fortunes)
    )
    corpus = synthesize_corpus(config)
    texts = sorted(record["text"] for record in read_manifest(corpus.manifests["train"]))
    expected = ["白日依山尽", "黄河入海流", "欲穷千里目", "更上一层楼", "夜来风雨声", "花落知多少", "春眠不觉晓"]
    assert texts == sorted(expected)
    assert corpus.info["source_files"] == [str(fortunes / name) for name in ("chinese", "tang300", "song100")] + [
        str(reviews)
    ]
    assert corpus.info["settings"]["text_sources"] == ["fortunes-zh", "reviews"]
    with pytest.raises(ValueError, match="text_sources must name at least one source"):
        synthesize_corpus(replace(config, text_sources=[]))


def test_seen_voices_track_speaks_the_test_sentences_in_train_voices(corpora, seen_voices_corpus):
    config = SynthesisConfig(output_dir="", **TINY)
    records = {
        split: read_manifest(seen_voices_corpus.manifests[split])
        for split in corpus_splits(seen_voices_corpus.output_dir)
    }
    assert list(records) == [*SPLITS, SEEN_VOICES_SPLIT] and seen_voices_corpus.test_tracks == (
        "test",
        SEEN_VOICES_SPLIT,
    )
    seen, test = records[SEEN_VOICES_SPLIT], records["test"]
    assert [(r["text"], r["pinyin"], r["sentence_id"]) for r in seen] == [
        (r["text"], r["pinyin"], r["sentence_id"]) for r in test
    ]
    assert {r["text"] for r in seen}.isdisjoint(r["text"] for r in records["train"])
    voice = "cmn-latn-pinyin+{}".format
    assert {r["voice"] for r in seen} <= {voice(variant) for variant in config.train_variants}
    assert {r["voice"] for r in test} <= {voice(variant) for variant in config.heldout_variants}
    assert seen_voices_corpus.num_utterances == {"train": 34, "dev": 1, "test": 2, SEEN_VOICES_SPLIT: 2}
    tracks = seen_voices_corpus.info["test_tracks"]
    assert tracks["test"] == tracks[SEEN_VOICES_SPLIT] and tracks["test"]["tokens"] == sum(
        len(r["text"]) for r in test
    )
    # The track is appended: train, dev and test are the corpus made without it, byte for byte; the
    # teacher's held-out sentences are the same too.
    default = corpora[0]
    assert corpus_splits(default.output_dir) == SPLITS and default.test_tracks == ("test",)
    without_track = {
        name: data
        for name, data in _files(seen_voices_corpus.output_dir).items()
        if SEEN_VOICES_SPLIT not in name and name != "corpus.json"
    }
    assert without_track == {name: data for name, data in _files(default.output_dir).items() if name != "corpus.json"}
    assert heldout_sentences(seen_voices_corpus.output_dir) == heldout_sentences(default.output_dir)


def test_a_corpus_without_the_seen_voices_track_keeps_its_cache_key_and_draws():
    # The key of format version 2 (format 1, before the track existed, gave c0f98928c43981f7): the track's
    # setting, left at its default, changes neither the key nor the draws.
    config = SynthesisConfig(output_dir="x", **TINY)
    assert corpus_settings_hash(config, "1.51") == "3c71745e9c3b49ac"
    assert corpus_settings_hash(replace(config, seen_voices_test=True), "1.51") != "3c71745e9c3b49ac"
    splits = {"train": ["天地", "地人"], "dev": ["人天"], "test": ["天人地"]}
    jobs = plan_utterances(splits, SynthesisConfig(output_dir="x", seed=5))
    assert [(job.utterance_id, job.variant, job.speed, job.pitch, job.snr_db, job.noise_seed) for job in jobs] == [
        ("train_s00000_r0", "m1", 170, 63, 35.2, (5, 0)),
        ("train_s00000_r1", "m3", 184, 69, 26.0, (5, 1)),
        ("train_s00001_r0", "m2", 155, 57, 30.7, (5, 2)),
        ("train_s00001_r1", "f2", 188, 38, 39.7, (5, 3)),
        ("dev_s00002_r0", "f5", 172, 68, 31.7, (5, 4)),
        ("test_s00003_r0", "f4", 181, 40, 37.5, (5, 5)),
    ]
    with_track = plan_utterances(splits, SynthesisConfig(output_dir="x", seed=5, seen_voices_test=True))
    assert with_track[:-1] == jobs and with_track[-1].utterance_id == f"{SEEN_VOICES_SPLIT}_s00003_r0"


def test_track_stats_count_homophones_in_the_train_inventory_and_oov_characters():
    spoken = {
        "train": [("他好", ["ta1", "hao3"]), ("她大", ["ta1", "da4"])],
        "dev": [("号", ["hao4"])],
        "test": [("他号大", ["ta1", "hao4", "da4"])],
    }
    stats = track_stats(spoken)
    # 他 ta1: 她 is spoken ta1. 号 hao4 is not in the train transcripts (out of vocabulary), and 好, spoken
    # hao3 here, reads hao4 in pypinyin's dictionary: a homophone an error split would count. 大 da4: none.
    assert stats == {
        "test": {
            "tokens": 3,
            "tokens_with_homophone": 2,
            "types": 3,
            "types_with_homophone": 2,
            "homophone_share": 0.6667,
            "oov_tokens": 1,
            "oov_share": 0.3333,
        }
    }
    spoken[SEEN_VOICES_SPLIT] = [("大她", ["da4", "ta1"])]
    assert track_stats(spoken)[SEEN_VOICES_SPLIT]["tokens_with_homophone"] == 1  # 她 has 他, 大 nothing
