import logging
import os
import shutil

import pytest
import torch
from datasets import Dataset
from safetensors import safe_open
from safetensors.torch import save_file
from test_train_hf import train_hf
from tiny_models import make_model
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertModel, RobertaConfig

from modeling_tot_cakt import TOTCAKTConfig
from modeling_tot_cakt.training.collator import pad_token_features
from modeling_tot_cakt.training.teacher_features import (
    InvalidTeacherFeaturesError,
    TeacherFeatureCache,
    count_truncated_transcripts,
    precompute_teacher_features,
    teacher_feature_layout,
    teacher_fingerprint,
    teacher_max_length,
    tokenize_for_teacher,
)


@pytest.fixture()
def teacher(tiny_teacher):
    return AutoModel.from_pretrained(tiny_teacher), AutoTokenizer.from_pretrained(tiny_teacher)


def test_fingerprint_tracks_weights_config_tokenizer_and_layout(teacher, tiny_teacher, tmp_path):
    model, tokenizer = teacher
    base = teacher_fingerprint(model, tokenizer, str(tiny_teacher))
    # The checkpoint has its masked-LM head and no pooler (as the demo's teacher): each base-model load draws a new
    # pooler, which no token feature reads, so the key stays.
    with safe_open(tiny_teacher / "model.safetensors", "pt") as weights:
        saved = weights.keys()
    assert saved and not any("pooler" in key for key in saved)
    assert base == teacher_fingerprint(AutoModel.from_pretrained(tiny_teacher), tokenizer, str(tiny_teacher))

    assert teacher_fingerprint(model, tokenizer, "elsewhere") != base
    assert teacher_fingerprint(model, tokenizer, str(tiny_teacher), {"strip_special_tokens": False}) != base
    changed = BertModel(model.config)  # same config, other weights
    assert teacher_fingerprint(changed, tokenizer, str(tiny_teacher)) != base
    with torch.no_grad():
        nudged = AutoModel.from_pretrained(tiny_teacher)
        nudged.encoder.layer[0].output.dense.bias[0] += 1e-6
    assert teacher_fingerprint(nudged, tokenizer, str(tiny_teacher)) != base
    other_config = AutoModel.from_pretrained(tiny_teacher, hidden_dropout_prob=0.5)
    assert teacher_fingerprint(other_config, tokenizer, str(tiny_teacher)) != base
    more_tokens = AutoTokenizer.from_pretrained(tiny_teacher)
    more_tokens.add_tokens(["猫"])
    assert teacher_fingerprint(model, more_tokens, str(tiny_teacher)) != base
    cased = AutoTokenizer.from_pretrained(tiny_teacher, do_lower_case=False)
    assert teacher_fingerprint(model, cased, str(tiny_teacher)) != base
    # The tokenizer's limit cuts long transcripts, so it shapes their features too.
    shorter = AutoTokenizer.from_pretrained(tiny_teacher, model_max_length=8)
    assert teacher_fingerprint(model, shorter, str(tiny_teacher)) != base


def test_feature_layout_names_the_teacher_layer_only_when_it_is_not_the_last():
    # The last layer keeps the key that caches written before the setting existed carry.
    assert teacher_feature_layout(TOTCAKTConfig()) == {"strip_special_tokens": True}
    assert teacher_feature_layout(TOTCAKTConfig(teacher_layer=2, teacher_strip_special_tokens=False)) == {
        "strip_special_tokens": False,
        "teacher_layer": 2,
    }


def test_cache_keys_and_round_trip(tmp_path):
    cache = TeacherFeatureCache(tmp_path, "a" * 64)
    other_teacher = TeacherFeatureCache(tmp_path, "b" * 64)
    assert cache.key("你好") != cache.key("你们") and cache.key("你好") != other_teacher.key("你好")
    features = torch.randn(2, 5)
    cache.save("你好", features)
    assert "你好" in cache and "你好" not in other_teacher and "你们" not in cache
    torch.testing.assert_close(cache.load("你好"), features)
    with pytest.raises(KeyError, match="No cached teacher features for transcript '你们'"):
        cache.load("你们")
    assert not list(tmp_path.rglob("*.tmp"))


def test_stale_file_is_refused(tmp_path):
    cache = TeacherFeatureCache(tmp_path, "a" * 64)
    cache.save("你好", torch.randn(2, 5))
    os.makedirs(os.path.dirname(cache.path("你们")), exist_ok=True)
    shutil.copy(cache.path("你好"), cache.path("你们"))  # a file under the wrong key
    with pytest.raises(ValueError, match="another transcript or teacher"):
        cache.load("你们")


def test_precomputed_features_equal_the_teachers_and_train_the_same(teacher, tiny_teacher, tmp_path):
    model = make_model(teacher_dir=tiny_teacher).eval()
    teacher_model, tokenizer = teacher
    model.attach_teacher(teacher_model)
    cache = TeacherFeatureCache(tmp_path, teacher_fingerprint(teacher_model, tokenizer, str(tiny_teacher)))
    texts = ["你好", "中国人大", "你好", ""]
    assert precompute_teacher_features(model, tokenizer, texts, cache, batch_size=1) == 2
    assert precompute_teacher_features(model, tokenizer, texts, cache) == 0  # everything cached

    encoded = tokenizer(["你好", "中国人大"], padding=True, return_tensors="pt")
    expected, mask = model.teacher_token_features(encoded["input_ids"], encoded["attention_mask"])
    cached, cached_mask = pad_token_features([cache.load("你好"), cache.load("中国人大")])
    assert cache.load("你好").shape == (2, 24)  # [CLS]/[SEP] dropped
    tokens = cached.shape[1]
    assert not mask[:, tokens:].any()  # the model's mask keeps a slot for the dropped [SEP]
    torch.testing.assert_close(cached, (expected * mask[..., None])[:, :tokens])
    assert torch.equal(cached_mask, mask[:, :tokens])

    audio = torch.randn(2, 8000)
    labels = torch.tensor([[3, 4, -100, -100], [5, 6, 7, 8]])
    on_the_fly = model(
        audio, labels=labels, teacher_input_ids=encoded["input_ids"], teacher_attention_mask=encoded["attention_mask"]
    )
    from_cache = model(audio, labels=labels, teacher_hidden_states=cached, teacher_token_mask=cached_mask)
    torch.testing.assert_close(from_cache.loss, on_the_fly.loss)
    torch.testing.assert_close(from_cache.align_loss, on_the_fly.align_loss)


def corrupt_truncated(path: str) -> None:
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])


def rewrite(path: str, features: torch.Tensor) -> None:
    """Replace the features of a cache file, keeping its text and fingerprint metadata."""
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    save_file({"features": features}, path, metadata=metadata)


CORRUPTIONS = {
    "truncated file": (corrupt_truncated, "is not a readable safetensors file"),
    "wrong width": (lambda path: rewrite(path, torch.randn(2, 5)), r"of shape \(2, 5\) instead of \(2, 24\)"),
    "extra tokens": (
        lambda path: rewrite(path, torch.randn(3, 24)),
        "holds 3 token features but the transcript has 2",
    ),
    "zero tokens": (lambda path: rewrite(path, torch.randn(0, 24)), "holds 0 token features but the transcript has 2"),
    "int64": (lambda path: rewrite(path, torch.ones(2, 24, dtype=torch.int64)), "holds torch.int64 features"),
    "NaN": (lambda path: rewrite(path, torch.full((2, 24), float("nan"))), "holds NaN or infinite features"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_or_inconsistent_cache_files_are_named_and_recomputed(
    teacher, tiny_teacher, tmp_path, caplog, corruption
):
    model = make_model(teacher_dir=tiny_teacher).eval()
    teacher_model, tokenizer = teacher
    model.attach_teacher(teacher_model)
    fingerprint = teacher_fingerprint(teacher_model, tokenizer, str(tiny_teacher))
    cache = TeacherFeatureCache(tmp_path, fingerprint, hidden_size=24)
    assert precompute_teacher_features(model, tokenizer, ["你好", "中国人大"], cache) == 2
    good = cache.load("你好").clone()
    damage, message = CORRUPTIONS[corruption]
    damage(cache.path("你好"))

    with pytest.raises(InvalidTeacherFeaturesError, match=message) as error:
        cache.load("你好", num_tokens=2)
    assert cache.path("你好") in str(error.value)
    with caplog.at_level(logging.WARNING, logger="modeling_tot_cakt.training.teacher_features"):
        assert precompute_teacher_features(model, tokenizer, ["你好", "中国人大"], cache) == 1
    assert f"Recomputing a cached teacher feature file: {cache.path('你好')}" in caplog.text
    torch.testing.assert_close(cache.load("你好", num_tokens=2), good)


def test_a_teacher_giving_nan_features_is_refused(teacher, tiny_teacher, tmp_path):
    model = make_model(teacher_dir=tiny_teacher).eval()
    teacher_model, tokenizer = teacher
    with torch.no_grad():
        teacher_model.encoder.layer[0].output.dense.bias.fill_(float("nan"))
    model.attach_teacher(teacher_model)
    cache = TeacherFeatureCache(tmp_path, "c" * 64, hidden_size=24)
    with pytest.raises(ValueError, match="gives NaN or infinite features for the transcript '你好'"):
        precompute_teacher_features(model, tokenizer, ["你好"], cache)
    assert "你好" not in cache


def test_teacher_max_length_is_the_position_table_whatever_the_tokenizer_says(tiny_teacher):
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    config = AutoConfig.from_pretrained(tiny_teacher, max_position_embeddings=16)
    tokenizer.model_max_length = int(1e30)  # a tokenizer saved without model_max_length
    assert teacher_max_length(config, tokenizer) == 16
    tokenizer.model_max_length = 8
    assert teacher_max_length(config, tokenizer) == 8
    roberta = RobertaConfig(max_position_embeddings=514, pad_token_id=1)  # positions start after the padding id
    tokenizer.model_max_length = int(1e30)
    assert teacher_max_length(roberta, tokenizer) == 512
    encoded = tokenize_for_teacher(tokenizer, ["你好中国" * 5], 16)
    assert len(encoded["input_ids"][0]) == 16 and encoded["input_ids"][0][-1] == tokenizer.sep_token_id
    assert count_truncated_transcripts(tokenizer, ["你好中国" * 5, "你好", "你好中国" * 4], 16) == 2


@pytest.mark.parametrize(
    "layout",
    [{"teacher_layer": 0}, {"teacher_strip_special_tokens": False}, {"teacher_target": "masked_states"}],
    ids=["embeddings", "with-cls-sep", "masked-states"],
)
def test_train_hf_keys_its_feature_cache_by_the_models_feature_layout(tiny_teacher, tmp_path, layout):
    """train_hf.py's cache of a model that reads another teacher layer (or keeps [CLS]/[SEP]) is another cache:
    same teacher and transcripts, other features."""

    def cache_for(**config):
        model = make_model(teacher_dir=tiny_teacher, alignment="tot", **config)
        model_args = train_hf.ModelArguments()
        method_args = train_hf.TOTCAKTArguments(cache_teacher_features=True, teacher_cache_dir=str(tmp_path / "cache"))
        training_args = train_hf.TOTCAKTTrainingArguments(
            output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none"
        )
        texts = Dataset.from_dict({"text": ["你好", "中国人大"]})
        teacher = train_hf.prepare_teacher(model, model_args, method_args, training_args, {"train": texts}, False)
        return teacher.cache

    default, other = cache_for(), cache_for(**layout)
    assert other.fingerprint != default.fingerprint and other.directory != default.directory
    assert not torch.equal(default.load("你好"), other.load("你好")[: default.load("你好").shape[0]])
