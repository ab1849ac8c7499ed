import json

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny_models import CHARACTERS, TINY_WAV2VEC2_BERT, write_vocab
from transformers import (
    AutoFeatureExtractor,
    AutoProcessor,
    SeamlessM4TFeatureExtractor,
    Wav2Vec2BertProcessor,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Processor,
)

from modeling_tot_cakt import create_processor, create_tokenizer
from modeling_tot_cakt.configuration_tot_cakt import TOTCAKTConfig
from modeling_tot_cakt.feature_extraction_tot_cakt import (
    TOTCAKTFeatureExtractor,
    TOTCAKTLogMelFeatureExtractor,
    as_float_waveform,
)
from modeling_tot_cakt.processing_tot_cakt import create_feature_extractor, vocabulary_from_characters


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
    "encoder, cls, extractor_cls, key",
    [
        (None, Wav2Vec2Processor, TOTCAKTFeatureExtractor, "input_values"),
        (TINY_WAV2VEC2_BERT, Wav2Vec2BertProcessor, TOTCAKTLogMelFeatureExtractor, "input_features"),
    ],
)
def test_processor_matches_encoder_and_reloads_with_auto(tmp_path, encoder, cls, extractor_cls, key):
    config = TOTCAKTConfig(encoder_config=dict(encoder) if encoder else None)
    processor = create_processor(write_vocab(tmp_path), encoder_config=config.encoder_config)
    assert isinstance(processor, cls) and type(processor.feature_extractor) is extractor_cls
    processor.save_pretrained(tmp_path / "proc")
    saved = json.loads((tmp_path / "proc" / "processor_config.json").read_text())["feature_extractor"]
    assert saved["auto_map"] == {"AutoFeatureExtractor": f"feature_extraction_tot_cakt.{extractor_cls.__name__}"}
    assert (tmp_path / "proc" / "feature_extraction_tot_cakt.py").is_file()
    # With the package imported the Auto classes find the extractor by its saved name, without remote code.
    reloaded = AutoProcessor.from_pretrained(tmp_path / "proc")
    assert isinstance(reloaded, cls) and type(reloaded.feature_extractor) is extractor_cls
    assert type(AutoFeatureExtractor.from_pretrained(tmp_path / "proc")) is extractor_cls
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


# Integer PCM and the float samples it stands for, written out (not through as_float_waveform).
def pcm_and_float(dtype: str, shape, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    floats = 0.8 * np.random.default_rng(seed).uniform(-1, 1, shape)
    if dtype == "uint8":
        integers = np.round(floats * 127 + 128).astype(np.uint8)
        return integers, ((integers.astype(np.float32) - 128) / 128).astype(np.float32)
    full_scale = {"int8": 2**7, "int16": 2**15, "int32": 2**31}[dtype]
    integers = np.round(floats * (full_scale - 1)).astype(dtype)
    return integers, (integers.astype(np.float64) / full_scale).astype(np.float32)


def assert_same_features(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert np.asarray(actual[name]).dtype == np.asarray(expected[name]).dtype, name
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


@pytest.mark.parametrize("dtype", ["int16", "int32", "uint8", "int8"])
@pytest.mark.parametrize("encoder", [None, TINY_WAV2VEC2_BERT], ids=["waveform", "log-mel"])
def test_integer_pcm_gives_the_features_of_its_float_samples(encoder, dtype, tmp_path):
    """One array, a list of arrays of different lengths, a batched 2-D array and a torch tensor of integer PCM give
    the features of the float32 samples `x / full scale` (`(x - 128) / 128` for uint8), through the feature
    extractor and the processor; stock transformers overflowed (log-mel, int16), wrapped (int32) or kept the scale."""
    extractor = create_feature_extractor(dict(encoder) if encoder else None)
    one, one_float = pcm_and_float(dtype, 4000)
    batch, batch_float = pcm_and_float(dtype, (2, 3200), seed=1)
    calls = [
        (one, one_float, {}),
        ([one, batch[0]], [one_float, batch_float[0]], {"padding": True}),
        (batch, batch_float, {}),
        (torch.from_numpy(one), one_float, {}),
    ]
    if dtype == "uint8":  # torch has no uint8 audio convention to test: only numpy's
        calls.pop()
    for integers, floats, options in calls:
        assert_same_features(
            extractor(integers, sampling_rate=16000, **options), extractor(floats, sampling_rate=16000, **options)
        )
    processor = create_processor(write_vocab(tmp_path), encoder_config=dict(encoder) if encoder else None)
    as_int = processor(audio=[one, batch[1]], sampling_rate=16000, return_tensors="pt", padding=True)
    as_float = processor(audio=[one_float, batch_float[1]], sampling_rate=16000, return_tensors="pt", padding=True)
    assert_same_features(as_int, as_float)


@pytest.mark.parametrize(
    "encoder, stock_cls",
    [(None, Wav2Vec2FeatureExtractor), (TINY_WAV2VEC2_BERT, SeamlessM4TFeatureExtractor)],
    ids=["waveform", "log-mel"],
)
def test_float_input_gives_the_stock_features_bit_for_bit(encoder, stock_cls):
    extractor = create_feature_extractor(dict(encoder) if encoder else None)
    assert isinstance(extractor, stock_cls) and type(extractor) is not stock_cls
    settings = {name: value for name, value in extractor.to_dict().items() if name != "feature_extractor_type"}
    stock = stock_cls(**settings)
    rng = np.random.default_rng(0)
    one = rng.uniform(-0.5, 0.5, 4000).astype(np.float32)
    other = rng.uniform(-0.5, 0.5, 2500)  # float64
    calls = [
        ((one,), {}),
        ((other,), {}),
        (([one, other],), {"padding": True}),
        (((one, one[:3000]),), {"padding": "longest", "return_tensors": "np"}),
        ((np.stack([one, one[::-1]]),), {}),
        ((one.tolist(),), {}),
        ((torch.from_numpy(one),), {}) if encoder else ((one,), {"return_tensors": "pt"}),
        ((), {"raw_speech": one}),
    ]
    for args, options in calls:
        assert_same_features(
            extractor(*args, sampling_rate=16000, **options), stock(*args, sampling_rate=16000, **options)
        )


@pytest.mark.parametrize("encoder", [None, TINY_WAV2VEC2_BERT], ids=["waveform", "log-mel"])
def test_float_audio_far_beyond_full_scale_gives_the_features_of_the_same_audio(encoder):
    """Audio scaled by 1e20, 1e34 or 1e38 gives the features of the same audio in [-1, 1], the normalisation being
    blind to scale. transformers' extractors overflow float32 there: the raw-waveform one's variance (all-zero
    features from about 1e17), the log-mel one's 16-bit scaling and spectrum (NaN from about 1e31). Measured here:
    within 3e-6 (waveform) and 8e-5 (log-mel) of the features of the unscaled clip, whose values have unit variance.
    The other clip of the batch keeps its features bit for bit."""
    extractor = create_feature_extractor(dict(encoder) if encoder else None)
    name = extractor.model_input_names[0]
    clip = np.random.default_rng(0).uniform(-0.5, 0.5, 16000).astype(np.float32)
    other = clip[:6000][::-1]
    reference = extractor([clip, other], sampling_rate=16000, padding=True, return_tensors="np")[name]
    for scale in (1e20, 1e34, 1e38):
        loud = extractor([clip * np.float32(scale), other], sampling_rate=16000, padding=True, return_tensors="np")
        np.testing.assert_allclose(loud[name][0], reference[0], rtol=0, atol=1e-4, err_msg=str(scale))
        np.testing.assert_array_equal(loud[name][1], reference[1])
