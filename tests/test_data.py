import json
import logging
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from conftest import SAMPLING_RATE, synthesize
from datasets import Audio, Dataset, Features, IterableDataset, Value
from tiny_models import TINY_WAV2VEC2_BERT, write_vocab

from modeling_tot_cakt import create_processor
from modeling_tot_cakt.training.data import (
    ManifestError,
    build_vocabulary,
    count_out_of_vocabulary,
    dataset_texts,
    featurize_split,
    load_aishell_split,
    load_manifest,
    load_speech_split,
    normalize_split,
)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return create_processor(write_vocab(tmp_path_factory.mktemp("vocab")))


def test_audiofolder_and_manifests_hold_the_same_utterances(speech_corpus, tmp_path):
    folder = load_speech_split("train", dataset_name=str(speech_corpus.root), cache_dir=str(tmp_path))
    manifest = load_speech_split("ignored", manifest=str(speech_corpus.train_manifest), cache_dir=str(tmp_path))
    jsonl = load_manifest(str(speech_corpus.eval_manifest), cache_dir=str(tmp_path))
    assert folder.column_names == manifest.column_names == jsonl.column_names == ["audio", "text"]
    assert folder["text"] == manifest["text"] == speech_corpus.train_texts
    assert jsonl["text"] == speech_corpus.eval_texts
    # Relative manifest paths are resolved against the manifest's folder.
    assert folder["audio"] == manifest["audio"]
    assert all(os.path.isabs(path) and os.path.isfile(path) for path in manifest["audio"])


def test_split_concatenation(speech_corpus, tmp_path):
    both = load_speech_split("train+test", dataset_name=str(speech_corpus.root), cache_dir=str(tmp_path))
    assert both["text"] == speech_corpus.train_texts + speech_corpus.eval_texts
    with pytest.raises(ValueError, match=r"No folder for split 'dev'.*\['test', 'train'\]"):
        load_speech_split("dev", dataset_name=str(speech_corpus.root), cache_dir=str(tmp_path))


def test_aishell_layout(aishell_corpus, tmp_path, caplog):
    root = str(aishell_corpus.root)
    with caplog.at_level(logging.WARNING, logger="modeling_tot_cakt.training.data"):
        train = load_aishell_split(root, "train", cache_dir=str(tmp_path))
    assert "1 wav files have no transcript" in caplog.text
    assert len(train) == 6  # 2 speakers x 3, the untranscribed wav left out
    dev = load_speech_split("validation", aishell_dir=root, cache_dir=str(tmp_path))  # "validation" is AISHELL's dev
    test = load_aishell_split(root, "test", cache_dir=str(tmp_path))
    for split in (train, dev, test):
        for path, text in zip(split["audio"], split["text"]):
            assert text == aishell_corpus.transcripts[os.path.basename(path)[:-4]]
    assert {os.path.basename(os.path.dirname(path)) for path in dev["audio"]} == {"S0724"}
    normalized = normalize_split(test, "test")
    assert all(" " not in text and len(text) >= 2 for text in normalized["text"])


def test_an_aishell_utterance_listed_twice_is_named_with_its_lines(aishell_corpus, tmp_path, caplog):
    """Two texts for one recording: which is right cannot be told, so the file, the id and both lines are named
    (the later line used to replace the earlier one without a word). The same text twice loses nothing: a warning."""
    root = tmp_path / "data_aishell"
    shutil.copytree(aishell_corpus.root, root)
    transcript = root / "transcript" / "aishell_transcript_v0.8.txt"
    lines = transcript.read_text(encoding="utf-8").splitlines()
    first_id, first_text = lines[0].split(maxsplit=1)
    second_id, second_text = lines[1].split(maxsplit=1)
    repeated = [*lines, f"{second_id} {second_text}"]
    transcript.write_text("\n".join(repeated) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="modeling_tot_cakt.training.data"):
        train = load_aishell_split(str(root), "train", cache_dir=str(tmp_path / "cache"))
    assert f"{transcript} lists 1 utterance id(s) more than once with the same text ({second_id} on lines 2, " in (
        caplog.text
    )
    assert sorted(train["text"]) == sorted(
        text for utt_id, text in aishell_corpus.transcripts.items() if "S000" in utt_id
    )
    transcript.write_text("\n".join([*repeated, f"{first_id} 你 好"]) + "\n", encoding="utf-8")
    with pytest.raises(ManifestError) as refused:
        load_aishell_split(str(root), "train", cache_dir=str(tmp_path / "cache"))
    assert str(refused.value) == (
        f"The transcript file {transcript} lists 1 utterance id(s) more than once with different texts: {first_id} "
        f"on lines 1, {len(lines) + 2} ({first_text} / 你 好). Which text belongs to the recording cannot be told: "
        "keep the line that matches each <utt_id>.wav and delete the others."
    )


def test_aishell_wrong_layout(tmp_path):
    with pytest.raises(ValueError, match="not an AISHELL-1 folder"):
        load_aishell_split(str(tmp_path), "train")


def test_hub_style_parquet_with_audio_feature(tmp_path):
    """A Hub dataset ships parquet files whose audio column is an `Audio` feature; rows must arrive
    undecoded (bytes + path) for soundfile, in map-style and streaming mode."""
    wav = tmp_path / "x.wav"
    sf.write(wav, synthesize("你好", np.random.default_rng(0)), SAMPLING_RATE)
    features = Features({"speech": Audio(), "sentence": Value("string"), "speaker": Value("string")})
    table = pa.table(
        {
            "speech": pa.array([{"bytes": wav.read_bytes(), "path": "x.wav"}], type=Audio().pa_type),
            "sentence": ["你好！"],
            "speaker": ["s1"],
        }
    ).replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features.to_dict()}})})
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "train-00000.parquet")
    kwargs = dict(
        dataset_name=str(tmp_path / "data"),
        audio_column_name="speech",
        text_column_name="sentence",
        cache_dir=str(tmp_path / "cache"),
    )
    loaded = load_speech_split("train", **kwargs)
    streamed = load_speech_split("train", streaming=True, **kwargs)
    for row in (loaded[0], next(iter(streamed))):
        assert set(row) == {"audio", "text"} and row["text"] == "你好！"
        assert row["audio"]["bytes"] == wav.read_bytes()


def test_save_to_disk_folder(tmp_path):
    Dataset.from_dict({"audio": ["/a.wav"], "text": ["好"]}).save_to_disk(str(tmp_path / "saved"))
    assert load_speech_split("train", dataset_name=str(tmp_path / "saved"))["text"] == ["好"]


def test_manifest_errors(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,sentence\na.wav,你好\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"has no column 'audio' \(set --audio_column_name\)"):
        load_manifest(str(manifest))
    with pytest.raises(ValueError, match="Unsupported manifest"):
        load_manifest(str(tmp_path / "m.txt"))
    with pytest.raises(ValueError, match="Manifest not found"):
        load_manifest(str(tmp_path / "missing.csv"))


def test_bad_rows_are_skipped_and_counted(bad_rows_manifest, tmp_path, processor, caplog):
    dataset = normalize_split(load_manifest(str(bad_rows_manifest), cache_dir=str(tmp_path)), "train")
    with caplog.at_level(logging.WARNING, logger="modeling_tot_cakt.training.data"):
        prepared = featurize_split(
            dataset, "train", feature_extractor=processor.feature_extractor, tokenizer=processor.tokenizer
        )
    assert prepared["text"] == ["你好"]
    assert set(prepared.column_names) == {"input_values", "labels", "input_length", "text"}
    message = caplog.text
    assert "train: skipped 5 of 6 rows" in message
    for reason in ("3 unreadable audio", "1 empty transcript", "1 transcript empty after normalisation"):
        assert reason in message
    assert "missing.wav" in message and "corrupt.wav" in message


def test_bad_rows_are_skipped_when_streaming(bad_rows_manifest, processor, caplog):
    stream = load_manifest(str(bad_rows_manifest), streaming=True)
    prepared = featurize_split(
        normalize_split(stream, "train"),
        "train",
        feature_extractor=processor.feature_extractor,
        tokenizer=processor.tokenizer,
    )
    assert isinstance(prepared, IterableDataset)
    with caplog.at_level(logging.WARNING, logger="modeling_tot_cakt.training.data"):
        rows = list(prepared)
    assert [row["text"] for row in rows] == ["你好"]
    assert caplog.text.count("skipping a row") == 5


def test_featurised_rows(speech_corpus, processor, tmp_path):
    raw = normalize_split(load_manifest(str(speech_corpus.eval_manifest), cache_dir=str(tmp_path)), "eval", num_proc=2)
    prepared = featurize_split(
        raw, "eval", feature_extractor=processor.feature_extractor, tokenizer=processor.tokenizer, num_proc=2
    )
    first = prepared.with_format("numpy")[0]
    samples = len(sf.read(speech_corpus.root / "test" / "utt000.wav")[0])
    assert first["input_length"] == len(first["input_values"]) == samples
    assert abs(first["input_values"].mean()) < 1e-3 and first["input_values"].std() == pytest.approx(1, abs=1e-2)
    assert processor.tokenizer.decode(first["labels"], group_tokens=False) == speech_corpus.eval_texts[0]


def test_duration_limits(speech_corpus, processor, tmp_path):
    raw = normalize_split(load_manifest(str(speech_corpus.eval_manifest), cache_dir=str(tmp_path)), "eval")
    lengths = sorted(len(sf.read(path)[0]) for path in raw["audio"])
    prepared = featurize_split(
        raw,
        "eval",
        feature_extractor=processor.feature_extractor,
        tokenizer=processor.tokenizer,
        min_input_length=lengths[0],
        max_input_length=lengths[-1],
    )
    assert sorted(prepared["input_length"]) == [n for n in lengths if lengths[0] < n < lengths[-1]]


def test_log_mel_features(speech_corpus, tmp_path):
    processor = create_processor(write_vocab(tmp_path), encoder_config=dict(TINY_WAV2VEC2_BERT))
    raw = normalize_split(load_manifest(str(speech_corpus.eval_manifest), cache_dir=str(tmp_path)), "eval")
    prepared = featurize_split(
        raw, "eval", feature_extractor=processor.feature_extractor, tokenizer=processor.tokenizer
    )
    features = np.asarray(prepared[0]["input_features"])
    assert features.ndim == 2 and features.shape[1] == 160


def test_vocabulary_and_out_of_vocabulary_report():
    vocab = build_vocabulary(["你好", "好中", ""])
    assert vocab == {"[PAD]": 0, "[UNK]": 1, "|": 2, "中": 3, "你": 4, "好": 5}
    report = count_out_of_vocabulary(["你好猫", "狗狗中"], vocab)
    assert (report.oov_tokens, report.total_tokens, report.oov_types) == (3, 6, ["狗", "猫"])
    assert "3 of 6 characters (50.00%) are out of vocabulary, 2 distinct" in str(report)


def test_dataset_texts_streams_only_text(speech_corpus):
    stream = load_manifest(str(speech_corpus.eval_manifest), streaming=True)
    assert list(dataset_texts(stream)) == speech_corpus.eval_texts


def test_numeric_transcripts_in_a_json_manifest(tmp_path):
    (tmp_path / "m.jsonl").write_text(
        '{"audio": "a.wav", "text": 110}\n{"audio": "b.wav", "text": "你好"}\n', encoding="utf-8"
    )
    for streaming in (False, True):
        manifest = load_manifest(str(tmp_path / "m.jsonl"), streaming=streaming, cache_dir=str(tmp_path))
        dataset = normalize_split(manifest, "x")
        assert [row["text"] for row in dataset] == ["110", "你好"]


def test_audio_folder_without_metadata_explains_the_torchcodec_limit(tmp_path):
    sf.write(tmp_path / "a.wav", synthesize("你好", np.random.default_rng(0)), SAMPLING_RATE)
    with pytest.raises(ValueError, match="needs torchcodec .* CSV/JSONL manifest"):
        load_speech_split("train", dataset_name=str(tmp_path), cache_dir=str(tmp_path / "cache"))


# ------------------------------------------------------------------------- manifests read with a schema
def write_manifest(tmp_path, name: str, content: str) -> str:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    "value, described",
    [
        ("true", "the boolean true"),
        ("1.5", "the number 1.5"),
        ("NaN", "the number NaN"),
        ("null", "null"),
        ('{"zh": "中"}', "a JSON object"),
        ('["中"]', "a JSON array"),
    ],
)
def test_a_json_transcript_that_is_not_a_string_names_file_row_and_column(tmp_path, value, described):
    path = write_manifest(
        tmp_path, "m.jsonl", f'{{"audio": "a.wav", "text": "中国"}}\n\n{{"audio": "b.wav", "text": {value}}}\n'
    )
    for streaming in (False, True):
        with pytest.raises(ValueError, match=rf"m\.jsonl, row 2 \(line 3\): column 'text' holds {described}, but"):
            load_manifest(path, streaming=streaming, cache_dir=str(tmp_path / "cache"))


def test_json_transcripts_are_read_verbatim_next_to_integers(tmp_path):
    # An integer is read as the digits it is written with; no other row is re-interpreted.
    # U+2028 and U+0085 are allowed inside a JSON string, and a CRLF line end is a line end.
    rows = '{"audio": "a.wav", "text": "中\u2028国\u0085"}\r\n{"audio": "b.wav", "text": 2024}\n'
    path = write_manifest(tmp_path, "m.jsonl", rows)
    assert load_manifest(path, cache_dir=str(tmp_path / "cache"))["text"] == ["中\u2028国\u0085", "2024"]
    array = write_manifest(tmp_path, "m.json", '[{"audio": "a.wav", "text": "二〇二四"}, {"audio": null, "text": 7}]')
    dataset = load_manifest(array, cache_dir=str(tmp_path / "cache"))
    assert dataset["text"] == ["二〇二四", "7"] and dataset["audio"] == [str(tmp_path / "a.wav"), None]
    for content, message in [
        ('{"audio": "a.wav", "text": "x"}\n{"audio": "a.wav"}\n', r"row 2 \(line 2\) has no 'text' field"),
        ('{"audio": "a.wav", "text": "x", "text": "y"}\n', r"row 1 \(line 1\) .*\['text'\] appear more than once"),
        ('{"audio": "a.wav", "text": "x"}\n{"audio": "b.wav", \n', r"row 2 \(line 2\) is not a valid JSON object"),
        ('["a.wav", "x"]\n', r"bad\.jsonl, row 1 is the string 'a.wav', not a JSON object"),
        ('[1, 2]\n{"audio": "a.wav", "text": "x"}\n', r"bad\.jsonl is not valid JSON"),
        ('{"audio": 3, "text": "x"}\n', r"row 1 \(line 1\): column 'audio' holds .* must be a JSON string"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_manifest(write_manifest(tmp_path, "bad.jsonl", content), cache_dir=str(tmp_path / "cache"))


def test_a_tsv_transcript_starting_with_a_quote_stays_one_row(tmp_path):
    path = write_manifest(tmp_path, "m.tsv", 'audio\ttext\na.wav\t"你好\nb.wav\t中国"\nc.wav\t"引号"里\n')
    dataset = load_manifest(path, cache_dir=str(tmp_path / "cache"))
    assert dataset["text"] == ['"你好', '中国"', '"引号"里']
    assert dataset["audio"] == [str(tmp_path / name) for name in ("a.wav", "b.wav", "c.wav")]
    with pytest.raises(ValueError, match=r"m2\.tsv, row 2 \(line 3\): 3 cells where the header has 2 .*one tab"):
        load_manifest(write_manifest(tmp_path, "m2.tsv", "audio\ttext\na.wav\t好\nb.wav\t你\t好\n"))


def test_a_csv_row_with_the_wrong_number_of_cells_names_file_and_row(tmp_path):
    # A byte-order mark and CRLF line ends are read as nothing and as line ends.
    # Cells that a type-guessing reader would turn into numbers, NaN or booleans stay the text they are.
    content = (
        '\ufeffaudio,text\r\na.wav,"你好,中国"\r\n\r\nb.wav,"他说""好"""\r\nc.wav,0110\r\nd.wav,NA\r\ne.wav,True\r\n'
    )
    good = write_manifest(tmp_path, "good.csv", content)
    texts = ["你好,中国", '他说"好"', "0110", "NA", "True"]
    assert load_manifest(good, cache_dir=str(tmp_path / "cache"))["text"] == texts
    for content, message in [
        ("audio,text\na.wav,好\nb.wav,你,好\n", r"bad\.csv, row 2 \(line 3\): 3 cells where the header has 2"),
        ("audio,text,speaker\na.wav,好\n", r"bad\.csv, row 1 \(line 2\): 2 cells where the header has 3"),
        ('audio,text\na.wav,"你好\nb.wav,中国\n', r"bad\.csv, row 1 \(line 2\): unexpected end of data; quote"),
        ('audio,text\na.wav,"你"好\n', r"bad\.csv, row 1 \(line 2\): ',' expected after '\"'"),
        ("audio,text,text\na.wav,好,好\n", r"bad\.csv has 2 columns named 'text'"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_manifest(write_manifest(tmp_path, "bad.csv", content))


def test_an_error_from_datasets_while_storing_a_manifest_names_it(tmp_path, monkeypatch):
    path = write_manifest(tmp_path, "m.csv", "audio,text\na.wav,好\n")

    def failing(*args, **kwargs):
        raise pa.ArrowInvalid("offset overflow")

    monkeypatch.setattr(Dataset, "from_generator", failing)
    with pytest.raises(ValueError, match=r"Manifest .*m\.csv could not be stored as a dataset: offset overflow"):
        load_manifest(path, cache_dir=str(tmp_path / "cache"))


def test_what_normalisation_removes_is_counted_and_logged(tmp_path, caplog):
    path = write_manifest(tmp_path, "m.csv", "audio,text\na.wav,二〇二四年 好！\nb.wav,中国\nc.wav,你 好 ！\n")
    with caplog.at_level(logging.INFO, logger="modeling_tot_cakt.training.data"):
        dataset = normalize_split(load_manifest(path, cache_dir=str(tmp_path / "cache")), "train")
    assert dataset["text"] == ["二〇二四年好", "中国", "你好"]
    assert "removed_characters" not in dataset.column_names
    assert (
        "train: normalisation removed 5 characters from 2 of 3 transcripts: ' ' U+0020 x3, '!' U+0021 x2."
        in caplog.text
    )


# --------------------------------------------------------------------------- clips that are bad rows
def test_absurd_clips_are_skipped_counted_and_named(speech_corpus, tmp_path, caplog):
    processor = create_processor(write_vocab(tmp_path), encoder_config=dict(TINY_WAV2VEC2_BERT))
    good = speech_corpus.root / "test" / "utt000.wav"
    clip, rate = sf.read(good, dtype="float32")
    sf.write(tmp_path / "huge.wav", clip * 1e30, rate, subtype="FLOAT")
    sf.write(tmp_path / "rate.wav", clip, rate, subtype="PCM_16")
    wav = (tmp_path / "rate.wav").read_bytes()
    (tmp_path / "rate.wav").write_bytes(wav[:24] + (1).to_bytes(4, "little") + wav[28:])  # 1 Hz
    # 480 samples make one stacked log-mel frame, which the extractor normalises to NaN.
    sf.write(tmp_path / "one_frame.wav", clip[:480], rate)
    rows = [(good, "你好"), ("huge.wav", "你好"), ("rate.wav", "你好"), ("one_frame.wav", "你好")]
    path = write_manifest(tmp_path, "m.csv", "audio,text\n" + "".join(f"{a},{t}\n" for a, t in rows))
    raw = normalize_split(load_manifest(path, cache_dir=str(tmp_path / "cache")), "train")
    with caplog.at_level(logging.WARNING, logger="modeling_tot_cakt.training.data"):
        prepared = featurize_split(
            raw, "train", feature_extractor=processor.feature_extractor, tokenizer=processor.tokenizer
        )
    assert len(prepared) == 1 and np.isfinite(np.asarray(prepared[0]["input_features"])).all()
    assert "train: skipped 3 of 4 rows (2 unreadable audio, 1 non-finite features)" in caplog.text
    assert "huge.wav has samples of magnitude" in caplog.text
    assert "rate.wav claims a sampling rate of 1 Hz" in caplog.text
    assert "one_frame.wav: the feature extractor gives NaN or Inf" in caplog.text


# ------------------------------------------------------------------------ caches that follow the files
def test_a_wav_fixed_or_replaced_in_place_is_featurised_again(speech_corpus, processor, tmp_path, caplog):
    good, other = speech_corpus.root / "test" / "utt000.wav", speech_corpus.root / "test" / "utt001.wav"
    (tmp_path / "a.wav").write_bytes(b"not a wav file at all")  # fixed later
    shutil.copy(good, tmp_path / "b.wav")  # replaced later by another clip of the same size
    path = write_manifest(tmp_path, "m.csv", "audio,text\na.wav,你好\nb.wav,中国\n")
    raw = normalize_split(load_manifest(path, cache_dir=str(tmp_path / "cache")), "train")

    def prepare():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="modeling_tot_cakt.training"):
            return featurize_split(
                raw, "train", feature_extractor=processor.feature_extractor, tokenizer=processor.tokenizer
            )

    first = prepare()
    assert first["text"] == ["中国"] and "1 unreadable audio" in caplog.text
    assert prepare().cache_files == first.cache_files and "changed" not in caplog.text  # nothing changed: cached

    shutil.copy(other, tmp_path / "a.wav")
    fixed = prepare()
    assert fixed["text"] == ["你好", "中国"] and "unreadable" not in caplog.text
    assert (
        f"train: 1 audio files changed (size or modification time) since the split was last prepared: {tmp_path / 'a.wav'}."
        in caplog.text
    )
    assert "it is decoded and featurised again" in caplog.text

    clip, rate = sf.read(good, dtype="int16")
    sf.write(tmp_path / "b.wav", -clip, rate, subtype="PCM_16")  # the same size, other samples
    os.utime(tmp_path / "b.wav", ns=(1, 1))
    replaced = prepare().with_format("numpy")
    assert (
        f"changed (size or modification time) since the split was last prepared: {tmp_path / 'b.wav'}." in caplog.text
    )
    np.testing.assert_allclose(replaced[1]["input_values"], -fixed.with_format("numpy")[1]["input_values"], atol=1e-3)


def test_an_error_from_datasets_reading_a_data_folder_names_it(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"audio": "a.wav", "text": "x"}\n{"audio": "b.wav", \n')
    with pytest.raises(ValueError, match=r"datasets could not read '.*data' \(split 'train'\): JSON parse error"):
        load_speech_split("train", dataset_name=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
