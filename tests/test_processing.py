import json

import numpy as np
import pytest
import soundfile as sf
from tiny_models import CHARACTERS, TINY_WAV2VEC2_BERT, write_vocab
from transformers import AutoProcessor, Wav2Vec2BertProcessor, Wav2Vec2Processor

from modeling_tot_cakt import create_processor, create_tokenizer
from modeling_tot_cakt.configuration_tot_cakt import TOTCAKTConfig
from modeling_tot_cakt.processing_tot_cakt import (
    as_float_waveform,
    create_feature_extractor,
    vocabulary_from_characters,
)


def test_character_tokenizer_round_trip(tmp_path):
    tokenizer = create_tokenizer(write_vocab(tmp_path))
    assert len(tokenizer) == len(CHARACTERS) + 3 and tokenizer.pad_token_id == 0
    ni, hao = tokenizer.convert_tokens_to_ids(["你", "好"])
    assert tokenizer("你好").input_ids == [ni, hao]
    assert tokenizer.decode([ni, ni, 0, ni, hao, hao]) == "你你好"  # CTC collapse around the blank
    assert tokenizer.decode([ni, ni, hao], group_tokens=False) == "你你好"  # labels are never collapsed
    assert tokenizer.decode(tokenizer("好人猫").input_ids) == "好人[UNK]"


def test_vocabulary_layout():
    vocab = vocabulary_from_characters("好你好 |")
    assert vocab == {"[PAD]": 0, "[UNK]": 1, "|": 2, "你": 3, "好": 4}


def test_vocab_without_blank_is_rejected(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"[UNK]": 0, "|": 1, "你": 2}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"no '\[PAD\]' entry"):
        create_tokenizer(path)


@pytest.mark.parametrize(
    "encoder, cls, key",
    [(None, Wav2Vec2Processor, "input_values"), (TINY_WAV2VEC2_BERT, Wav2Vec2BertProcessor, "input_features")],
)
def test_processor_matches_encoder_and_reloads_with_auto(tmp_path, encoder, cls, key):
    config = TOTCAKTConfig(encoder_config=dict(encoder) if encoder else None)
    processor = create_processor(write_vocab(tmp_path), encoder_config=config.encoder_config)
    assert isinstance(processor, cls)
    processor.save_pretrained(tmp_path / "proc")
    reloaded = AutoProcessor.from_pretrained(tmp_path / "proc")
    assert isinstance(reloaded, cls)
    audio = [np.zeros(16000, dtype=np.float32), np.zeros(8000, dtype=np.float32)]
    features = reloaded(audio=audio, sampling_rate=16000, return_tensors="pt", padding=True)
    assert (
        key in features
        and features["attention_mask"].sum(1).tolist()[0] > features["attention_mask"].sum(1).tolist()[1]
    )
    assert reloaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()


@pytest.mark.parametrize("stride", [2, 4])
def test_log_mel_stride_follows_encoder_projection(stride):
    config = TOTCAKTConfig(encoder_config={**TINY_WAV2VEC2_BERT, "feature_projection_input_dim": 80 * stride})
    extractor = create_feature_extractor(config.encoder_config)
    features = extractor(np.zeros(16000, dtype=np.float32), sampling_rate=16000, return_tensors="pt")["input_features"]
    assert features.shape[-1] == 80 * stride
    # One encoder frame per `inputs_to_logits_ratio` samples (before the adapter's own reduction).
    assert abs(features.shape[1] - 16000 / (160 * stride)) <= 1
    assert config.inputs_to_logits_ratio == 160 * stride * 2  # the tiny encoder's adapter halves once more


def test_log_mel_projection_must_be_whole_frames():
    config = TOTCAKTConfig(encoder_config={**TINY_WAV2VEC2_BERT, "feature_projection_input_dim": 100})
    with pytest.raises(ValueError, match="multiple of 80"):
        create_feature_extractor(config.encoder_config)


@pytest.mark.parametrize(("subtype", "dtype"), [("PCM_16", "int16"), ("PCM_32", "int32")])
def test_integer_pcm_is_scaled_as_soundfile_scales_it(tmp_path, subtype, dtype):
    rng = np.random.default_rng(0)
    sf.write(tmp_path / "a.wav", 0.8 * rng.uniform(-1, 1, 4000), 16000, subtype=subtype)
    integers, _ = sf.read(tmp_path / "a.wav", dtype=dtype)
    floats, _ = sf.read(tmp_path / "a.wav", dtype="float32")
    scaled = as_float_waveform(integers)
    assert scaled.dtype == np.float32
    np.testing.assert_array_equal(scaled, floats)
    # What the feature extractors then make of it equals what they make of the float samples.
    for encoder in (None, TINY_WAV2VEC2_BERT):
        extractor = create_feature_extractor(dict(encoder) if encoder else None)
        name = extractor.model_input_names[0]
        np.testing.assert_array_equal(
            extractor(scaled, sampling_rate=16000)[name][0], extractor(floats, sampling_rate=16000)[name][0]
        )


def test_unsigned_8_bit_and_float_samples():
    np.testing.assert_array_equal(as_float_waveform(np.array([0, 128, 255], dtype=np.uint8)), [-1, 0, 127 / 128])
    np.testing.assert_array_equal(as_float_waveform(np.array([-128, 64], dtype=np.int8)), [-1, 0.5])
    assert as_float_waveform(np.array([0.25, -0.5])).dtype == np.float32
    with pytest.raises(ValueError, match="integer PCM or floating point, got an array of bool"):
        as_float_waveform(np.array([True, False]))
