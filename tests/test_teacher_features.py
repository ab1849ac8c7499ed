import os
import shutil

import pytest
import torch
from tiny_models import make_model
from transformers import AutoModel, AutoTokenizer, BertModel

from modeling_tot_cakt.training.collator import pad_token_features
from modeling_tot_cakt.training.teacher_features import (
    TeacherFeatureCache,
    precompute_teacher_features,
    teacher_fingerprint,
)


@pytest.fixture()
def teacher(tiny_teacher):
    return AutoModel.from_pretrained(tiny_teacher), AutoTokenizer.from_pretrained(tiny_teacher)


def test_fingerprint_tracks_weights_config_tokenizer_and_layout(teacher, tiny_teacher, tmp_path):
    model, tokenizer = teacher
    base = teacher_fingerprint(model, tokenizer, str(tiny_teacher))
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
