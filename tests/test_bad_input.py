"""Bad input that the other test files do not cover (docs/BAD_INPUT.md lists every case and its test):
sample formats, truncated files, clips too short for the encoder (in training and in the pipeline),
out-of-vocabulary characters, broken teachers and data sources."""

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import SAMPLING_RATE, synthesize
from safetensors.torch import load_file
from test_train_hf import common_args, run_training
from tiny_models import TINY_WAV2VEC2, TINY_WAV2VEC2_BERT, make_model, make_processor, save_emitting_model
from transformers import AutoTokenizer, BertConfig, BertModel, pipeline

from modeling_tot_cakt.processing_tot_cakt import create_feature_extractor
from modeling_tot_cakt.training.audio import AudioDecodingError, load_audio
from modeling_tot_cakt.training.data import EmptySplitError, load_aishell_split, load_manifest, load_speech_split
from modeling_tot_cakt.training.trainer import build_model, load_teacher, shortest_usable_input


def tone(seconds: float = 0.5, rate: int = SAMPLING_RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return 0.5 * np.sin(2 * np.pi * 440 * t)


# ------------------------------------------------------------------------------------------ audio files
@pytest.mark.parametrize(
    "subtype, quantisation",
    [
        ("PCM_U8", 1 / 128),
        ("PCM_16", 1 / 2**15),
        ("PCM_24", 1 / 2**23),
        ("PCM_32", 1e-7),
        ("FLOAT", 1e-7),
        ("DOUBLE", 1e-7),
    ],
)
def test_wav_sample_formats_decode_to_the_same_float32_waveform(subtype, quantisation, tmp_path):
    path = tmp_path / f"{subtype}.wav"
    sf.write(path, tone(), SAMPLING_RATE, subtype=subtype)
    assert sf.info(path).subtype == subtype
    waveform = load_audio(path, SAMPLING_RATE)
    assert waveform.dtype == np.float32 and waveform.shape == (8000,)
    # Unsigned 8-bit samples are centred on 128: they must come back centred on 0, like the others.
    np.testing.assert_allclose(waveform, tone(), rtol=0, atol=quantisation)
    assert abs(waveform.mean()) < quantisation


def test_truncated_files(tmp_path):
    whole = tmp_path / "whole.wav"
    sf.write(whole, tone(), SAMPLING_RATE, subtype="PCM_16")
    data = whole.read_bytes()
    inside_header, inside_data = tmp_path / "header.wav", tmp_path / "data.wav"
    inside_header.write_bytes(data[:20])
    inside_data.write_bytes(data[:1044])  # the 44-byte header and 500 of 8000 samples
    with pytest.raises(AudioDecodingError, match="Cannot decode audio .*header.wav"):
        load_audio(inside_header, SAMPLING_RATE)
    # libsndfile reads a WAV cut inside its samples up to the cut, as any player does.
    np.testing.assert_allclose(load_audio(inside_data, SAMPLING_RATE), tone()[:500], atol=1 / 2**15)
    flac = tmp_path / "cut.flac"
    sf.write(flac, tone(), SAMPLING_RATE)
    flac.write_bytes(flac.read_bytes()[: len(flac.read_bytes()) // 2])
    with pytest.raises(AudioDecodingError, match="Cannot decode audio .*cut.flac"):
        load_audio(flac, SAMPLING_RATE)


# ------------------------------------------------------------------------------------ clips too short
# The feature extractors normalise a degenerate clip with a division by zero, and numpy says so.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("encoder", [TINY_WAV2VEC2, TINY_WAV2VEC2_BERT], ids=["waveform", "log-mel"])
def test_shortest_usable_input_is_where_the_model_starts_to_work(encoder):
    model = make_model(encoder, alignment="none").eval()
    feature_extractor = create_feature_extractor(model.config.encoder_config)
    shortest = shortest_usable_input(model, feature_extractor)
    if encoder is TINY_WAV2VEC2:
        assert shortest == 10 + (8 - 1) * 5  # the receptive field of convolutions with kernels (10, 8), strides (5, 4)
    clip = tone(1.0)
    inputs = feature_extractor(clip[:shortest], sampling_rate=SAMPLING_RATE, return_tensors="pt")
    with torch.no_grad():
        logits = model(inputs[model.main_input_name], attention_mask=inputs["attention_mask"]).logits
    assert logits.shape[1] == 1 and torch.isfinite(logits).all()  # exactly one frame at the threshold
    with pytest.raises(ValueError, match="receptive field|NaN or Inf"):
        inputs = feature_extractor(clip[: shortest - 1], sampling_rate=SAMPLING_RATE, return_tensors="pt")
        model(inputs[model.main_input_name], attention_mask=inputs["attention_mask"])


def test_an_encoder_that_needs_more_than_a_second_is_refused():
    model = make_model({**TINY_WAV2VEC2, "conv_kernel": (20000, 8)}, alignment="none")
    with pytest.raises(ValueError, match="A 1 s clip gives the wav2vec2 encoder no output frame"):
        shortest_usable_input(model, create_feature_extractor(model.config.encoder_config))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_pipeline_gives_the_models_message_for_short_empty_and_non_finite_clips(tmp_path):
    model = make_model(alignment="none").eval()
    make_processor(tmp_path, model).save_pretrained(tmp_path / "saved")
    model.save_pretrained(tmp_path / "saved")
    asr = pipeline("automatic-speech-recognition", model=str(tmp_path / "saved"))
    assert isinstance(asr({"raw": tone(0.5).astype(np.float32), "sampling_rate": SAMPLING_RATE})["text"], str)
    for samples in (20, 0):
        with pytest.raises(ValueError, match=f"An input of {samples} samples is shorter than the wav2vec2 encoder"):
            asr({"raw": tone(0.5).astype(np.float32)[:samples], "sampling_rate": SAMPLING_RATE})
    broken = tone(0.5).astype(np.float32)
    broken[100] = np.inf
    with pytest.raises(ValueError, match="input_values contains NaN or Inf values"):
        asr({"raw": broken, "sampling_rate": SAMPLING_RATE})


# ------------------------------------------------------------------------------------ integer PCM
@pytest.mark.parametrize("encoder", [TINY_WAV2VEC2, TINY_WAV2VEC2_BERT], ids=["wav2vec2", "wav2vec2-bert"])
def test_integer_pcm_through_the_pipeline_gives_the_float_transcript(tmp_path, encoder):
    """int16 / int32 / uint8 arrays given to pipeline(...) are read as their float samples (x / 2**15, x / 2**31,
    (x - 128) / 2**7): the same model input, bit for bit, and the same transcript, whole and in chunks."""
    torch.manual_seed(0)
    model = make_model(encoder, alignment="none").eval()
    with torch.no_grad():  # an untrained model that emits characters, not only blanks
        model.lm_head.bias.copy_(torch.linspace(-1, 1, model.config.vocab_size))
        model.lm_head.bias[0] = -5
    make_processor(tmp_path, model).save_pretrained(tmp_path / "saved")
    model.save_pretrained(tmp_path / "saved")
    asr = pipeline("automatic-speech-recognition", model=str(tmp_path / "saved"))
    signal = np.clip(0.3 * np.random.default_rng(0).standard_normal(int(1.5 * SAMPLING_RATE)), -0.99, 0.99)
    formats = {
        "int16": (np.round(signal * 2**15).astype(np.int16), lambda x: x.astype(np.float32) / 2**15),
        "int32": (np.round(signal * 2**31).astype(np.int32), lambda x: (x / 2**31).astype(np.float32)),
        "uint8": (np.round(signal * 127 + 128).astype(np.uint8), lambda x: (x.astype(np.float32) - 128) / 2**7),
    }
    key = model.main_input_name
    for dtype, (integers, to_float) in formats.items():
        floats = to_float(integers)
        model_input = next(asr.preprocess({"raw": integers, "sampling_rate": SAMPLING_RATE}))[key]
        expected_input = next(asr.preprocess({"raw": floats, "sampling_rate": SAMPLING_RATE}))[key]
        assert model_input.dtype == torch.float32, dtype
        torch.testing.assert_close(model_input, expected_input, atol=0, rtol=0, msg=dtype)
        for chunking in ({}, {"chunk_length_s": 0.5, "stride_length_s": 0.1}):
            expected = asr({"raw": floats, "sampling_rate": SAMPLING_RATE}, **chunking)["text"]
            assert expected and asr({"raw": integers, "sampling_rate": SAMPLING_RATE}, **chunking)["text"] == expected


@pytest.mark.parametrize("encoder", [TINY_WAV2VEC2, TINY_WAV2VEC2_BERT], ids=["wav2vec2", "wav2vec2-bert"])
def test_float_audio_scaled_by_1e20_through_the_pipeline_gives_the_transcript_of_the_audio(tmp_path, encoder):
    """An in-memory float array scaled by 1e20 used to become all-zero features and a transcript of silence: it is
    transcribed as the audio it is, whole and in chunks."""
    torch.manual_seed(0)
    model = make_model(encoder, alignment="none").eval()
    _, folder = save_emitting_model(model, tmp_path)
    asr = pipeline("automatic-speech-recognition", model=str(folder))
    signal = (0.3 * np.random.default_rng(0).standard_normal(int(1.5 * SAMPLING_RATE))).astype(np.float32)
    for chunking in ({}, {"chunk_length_s": 0.5, "stride_length_s": 0.1}):
        expected = asr({"raw": signal, "sampling_rate": SAMPLING_RATE}, **chunking)["text"]
        loud = asr({"raw": signal * np.float32(1e20), "sampling_rate": SAMPLING_RATE}, **chunking)["text"]
        assert expected and loud == expected


# ------------------------------------------------------------------------------------ a training run
def write_bad_corpus(directory: Path) -> tuple[Path, Path]:
    """A training manifest whose good rows come in every sample format, rate and channel layout, plus a
    clip too short for the encoder, a NaN clip, a punctuation-only transcript and a row without audio;
    and an evaluation manifest whose transcripts hold a character the training transcripts lack."""
    rng = np.random.default_rng(3)
    good = [
        ("u8.wav", "你好", SAMPLING_RATE, "PCM_U8"),
        ("s24.wav", "中国", SAMPLING_RATE, "PCM_24"),
        ("f32.wav", "你中", SAMPLING_RATE, "FLOAT"),
        ("f64.wav", "好国", SAMPLING_RATE, "DOUBLE"),
        ("mono8k.wav", "中你", 8000, "PCM_16"),
    ]
    for name, text, rate, subtype in good:
        sf.write(directory / name, synthesize(text, rng, rate), rate, subtype=subtype)
    stereo = synthesize("国好", rng, 44100)
    sf.write(directory / "stereo44k.flac", np.stack([stereo, 0.5 * stereo], axis=1), 44100)
    sf.write(directory / "short.wav", synthesize("你", rng)[:100], SAMPLING_RATE)
    broken = synthesize("好", rng)
    broken[50] = np.nan
    sf.write(directory / "nan.wav", broken, SAMPLING_RATE, subtype="FLOAT")
    rows = [(name, text) for name, text, _, _ in good] + [
        ("stereo44k.flac", "国好"),
        ("short.wav", "你"),
        ("nan.wav", "好"),
        ("u8.wav", "！？"),
        ("", "中国"),
    ]
    train, evaluation = directory / "train.csv", directory / "eval.csv"
    with open(train, "w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows([("audio", "text"), *rows])
    with open(evaluation, "w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows([("audio", "text"), ("f32.wav", "你猫"), ("s24.wav", "中国")])
    return train, evaluation


def test_training_skips_and_counts_bad_rows_and_reports_out_of_vocabulary_characters(tiny_teacher, tmp_path, caplog):
    train, evaluation = write_bad_corpus(tmp_path)
    with caplog.at_level(logging.INFO):
        results = run_training(
            *common_args(tmp_path / "out", tiny_teacher, tmp_path / "cache"),
            "--train_manifest",
            train,
            "--eval_manifest",
            evaluation,
            "--do_train",
            "--do_eval",
            "--max_steps",
            2,
            "--per_device_train_batch_size",
            3,
        )
    assert "train: skipped 4 of 10 rows" in caplog.text
    for reason in (
        "1 audio too short",
        "1 unreadable audio",
        "1 transcript empty after normalisation",
        "1 missing audio",
    ):
        assert reason in caplog.text
    assert "short.wav: 100 samples" in caplog.text and "nan.wav contains NaN" in caplog.text
    assert "no audio path or bytes in the row of transcript '中国'" in caplog.text
    (oov,) = [record for record in caplog.records if record.getMessage().startswith("eval transcripts:")]
    assert oov.levelno == logging.WARNING
    assert "1 of 4 characters (25.00%) are out of vocabulary, 1 distinct: 猫" in oov.getMessage()
    assert np.isfinite(results["eval"]["eval_loss"]) and results["eval"]["eval_samples"] == 2
    # The unknown character is trained on as [UNK], and scored as a character nothing can match.
    vocab = json.loads((tmp_path / "out" / "vocab.json").read_text(encoding="utf-8"))
    assert "猫" not in vocab
    tokenizer = make_processor(tmp_path, make_model()).tokenizer
    assert tokenizer("你猫").input_ids == [tokenizer.convert_tokens_to_ids("你"), tokenizer.unk_token_id]


# ------------------------------------------------------------------------------------ teachers, config
def test_missing_or_broken_teacher_folders_are_named(tiny_teacher, tmp_path):
    with pytest.raises(ValueError, match="teacher_name_or_path='.*no-such-teacher'"):
        build_model(
            vocab_size=15, pad_token_id=0, config_overrides={"teacher_name_or_path": str(tmp_path / "no-such-teacher")}
        )
    no_tokenizer, no_weights = tmp_path / "no_tokenizer", tmp_path / "no_weights"
    shutil.copytree(tiny_teacher, no_tokenizer, ignore=shutil.ignore_patterns("vocab.txt", "tokenizer*"))
    shutil.copytree(tiny_teacher, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ValueError, match="has 5 tokens but the teacher's embedding table has 17: the folder's"):
        load_teacher(str(no_tokenizer))
    with pytest.raises(ValueError, match="Could not load the teacher language model from .*no_weights"):
        load_teacher(str(no_weights))
    teacher, tokenizer = load_teacher(str(tiny_teacher))
    assert len(tokenizer) == teacher.config.vocab_size


@pytest.mark.parametrize(
    "saved", [{}, {"alignment": "none", "ctc_input": "adapter"}], ids=["tot", "ctc-only-with-adapter-head"]
)
def test_continuing_with_a_teacher_of_another_hidden_size_is_refused(saved, tiny_teacher, tmp_path):
    """Also for a CTC-only model whose head reads an adapter: the adapter it saved maps to its teacher size."""
    make_model(teacher_dir=tiny_teacher, **saved).save_pretrained(tmp_path / "saved")
    wider = tmp_path / "wider_teacher"
    shutil.copytree(tiny_teacher, wider)
    BertModel(BertConfig.from_pretrained(tiny_teacher, hidden_size=48)).save_pretrained(wider)
    with pytest.raises(ValueError, match="has hidden size 48, but the adapter of .*saved maps to 24"):
        build_model(
            vocab_size=15,
            pad_token_id=0,
            model_name_or_path=str(tmp_path / "saved"),
            config_overrides={"teacher_name_or_path": str(wider), "alignment": "tot"},
        )


def test_invalid_method_arguments_name_the_field():
    with pytest.raises(ValueError, match=r"TOTCAKTConfig.tot_lambda2 must be a finite float > 0, got 0.0"):
        build_model(
            vocab_size=15,
            pad_token_id=0,
            encoder_config=dict(TINY_WAV2VEC2),
            config_overrides={"alignment": "none", "tot_lambda2": 0.0},
        )


# ------------------------------------------------------------------------------------ data sources
def test_streamed_json_manifest_without_the_audio_column(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"path": "a.wav", "text": "你好"}\n', encoding="utf-8")
    for streaming in (False, True):
        with pytest.raises(ValueError, match=r"m.jsonl has no column 'audio' \(set --audio_column_name\)"):
            load_manifest(str(tmp_path / "m.jsonl"), streaming=streaming, cache_dir=str(tmp_path / "cache"))


def test_audiofolder_split_without_metadata(speech_corpus, tmp_path):
    folder = tmp_path / "folder"
    shutil.copytree(speech_corpus.root / "train", folder / "train")
    (folder / "test").mkdir()
    shutil.copy(speech_corpus.root / "test" / "utt000.wav", folder / "test")
    with pytest.raises(ValueError, match="Split 'test' of the audiofolder .* has no metadata.csv or metadata.jsonl"):
        load_speech_split("test", dataset_name=str(folder), cache_dir=str(tmp_path / "cache"))


def test_aishell_folder_without_its_transcript_file(aishell_corpus, tmp_path):
    shutil.copytree(aishell_corpus.root / "wav", tmp_path / "data_aishell" / "wav")
    with pytest.raises(ValueError, match=r"not an AISHELL-1 folder: expected transcript/aishell_transcript_v0.8.txt"):
        load_aishell_split(str(tmp_path / "data_aishell"), "train")


# ------------------------------------------------------------------------------ empty splits, encodings
def test_a_split_left_empty_stops_the_run_before_training(speech_corpus, tmp_path):
    out = tmp_path / "out"
    wrong_paths = tmp_path / "eval.csv"
    wrong_paths.write_text(
        "audio,text\n" + "".join(f"elsewhere/utt{i}.wav,{text}\n" for i, text in enumerate(speech_corpus.eval_texts)),
        encoding="utf-8",
    )
    arguments = ["--output_dir", out, "--encoder_config", json.dumps(TINY_WAV2VEC2), "--alignment", "none"]
    arguments += ["--use_cpu", "--do_train", "--do_eval", "--max_steps", 2, "--report_to", "none"]
    with pytest.raises(EmptySplitError, match=r"The eval split has no usable row: all 6 rows were skipped \(6 unrea"):
        run_training(*arguments, "--train_manifest", speech_corpus.train_manifest, "--eval_manifest", wrong_paths)
    assert not list(out.glob("checkpoint-*")) and not (out / "trainer_state.json").exists()

    header_only = tmp_path / "train.csv"
    header_only.write_text("audio,text\n", encoding="utf-8")
    with pytest.raises(EmptySplitError, match=r"Manifest .*train\.csv lists no utterances"):
        run_training(*arguments, "--train_manifest", header_only, "--eval_manifest", speech_corpus.eval_manifest)
    with pytest.raises(EmptySplitError, match="The train split has no rows"):
        run_training(
            *arguments, "--dataset_name", speech_corpus.root, "--eval_split_name", "test", "--max_train_samples", 0
        )
    assert not (out / "trainer_state.json").exists()


def test_a_manifest_that_is_not_utf8_is_named(speech_corpus, tmp_path):
    gbk = tmp_path / "gbk.csv"
    gbk.write_bytes("audio,text\nutt.wav,你好\n".encode("gbk"))
    with pytest.raises(ValueError, match=r"Manifest .*gbk\.csv is not UTF-8 text \(byte 0xc4 at offset 19.*iconv"):
        load_manifest(str(gbk))
    transcript = tmp_path / "data_aishell" / "transcript" / "aishell_transcript_v0.8.txt"
    shutil.copytree(speech_corpus.root / "train", tmp_path / "data_aishell" / "wav" / "train" / "S0001")
    transcript.parent.mkdir(parents=True)
    transcript.write_bytes("utt000 你 好\n".encode("gbk"))
    with pytest.raises(ValueError, match="The transcript file .*aishell_transcript_v0.8.txt is not UTF-8 text"):
        load_aishell_split(str(tmp_path / "data_aishell"), "train")


# -------------------------------------------------------------------------- transcripts beyond the teacher
def short_memory_teacher(tiny_teacher: Path, directory: Path, positions: int = 16) -> Path:
    """The tiny teacher with a 16-position table, its tokenizer saved without model_max_length."""
    config = BertConfig.from_pretrained(tiny_teacher, max_position_embeddings=positions)
    BertModel(config).save_pretrained(directory)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_teacher / name).is_file():
            shutil.copy(tiny_teacher / name, directory / name)
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config.pop("model_max_length", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


@pytest.mark.parametrize("cached", [False, True], ids=["on-the-fly", "cached"])
def test_transcripts_longer_than_the_teachers_position_table_are_cut_to_it(tiny_teacher, tmp_path, caplog, cached):
    teacher = short_memory_teacher(tiny_teacher, tmp_path / "teacher")
    assert AutoTokenizer.from_pretrained(teacher).model_max_length > 10**20
    rng = np.random.default_rng(3)
    long_text = "你好中国" * 5  # 20 characters: 22 teacher tokens for 16 positions
    rows = [("long.wav", long_text), ("short.wav", "你好"), ("other.wav", "中国")]
    for name, text in rows:
        sf.write(tmp_path / name, synthesize(text, rng), SAMPLING_RATE)
    manifest = tmp_path / "train.csv"
    manifest.write_text("audio,text\n" + "".join(f"{name},{text}\n" for name, text in rows), encoding="utf-8")
    cache = tmp_path / "teacher_cache"
    with caplog.at_level(logging.WARNING):
        run_training(
            *common_args(tmp_path / "out", teacher, tmp_path / "cache"),
            "--train_manifest",
            manifest,
            "--do_train",
            "--max_steps",
            2,
            "--per_device_train_batch_size",
            3,
            *(["--cache_teacher_features", "--teacher_cache_dir", cache] if cached else []),
        )
    assert "train: 1 transcripts are longer than the teacher's 16 positions" in caplog.text
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    losses = [entry["align_loss"] for entry in state["log_history"] if "align_loss" in entry]
    assert state["global_step"] == 2 and len(losses) == 2 and all(np.isfinite(losses))
    if cached:
        sizes = sorted(load_file(path)["features"].shape[0] for path in cache.rglob("*.safetensors"))
        assert sizes == [2, 2, 14]  # [CLS] and [SEP] of the 16 positions are dropped


@pytest.mark.parametrize("encoder", [TINY_WAV2VEC2, TINY_WAV2VEC2_BERT], ids=["wav2vec2", "wav2vec2-bert"])
def test_long_clips_are_transcribed_in_chunks_by_the_pipeline(tmp_path, encoder):
    """The README's advice for long recordings: with chunk_length_s the model never sees more than one window."""
    model = make_model(encoder, alignment="none").eval()
    processor = make_processor(tmp_path, model)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    asr = pipeline("automatic-speech-recognition", model=str(tmp_path / "model"), trust_remote_code=True)
    forward, inputs = asr.model.forward, []

    def recording_forward(*args, **kwargs):
        inputs.append(kwargs.get("input_values", kwargs.get("input_features")).shape)
        return forward(*args, **kwargs)

    asr.model.forward = recording_forward
    clip = (0.1 * np.random.default_rng(0).standard_normal(60 * SAMPLING_RATE)).astype(np.float32)
    result = asr({"raw": clip, "sampling_rate": SAMPLING_RATE}, chunk_length_s=10, stride_length_s=2, batch_size=4)
    assert isinstance(result["text"], str)
    assert sum(shape[0] for shape in inputs) == 10  # 60 s in 10 s windows that overlap by 2 + 2 s
    window = 10 * SAMPLING_RATE
    assert all(shape[1] <= (window if encoder is TINY_WAV2VEC2 else window // 320 + 1) for shape in inputs)
