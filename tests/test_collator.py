import numpy as np
import pytest
import torch
from tiny_models import make_model, make_processor
from transformers import AutoTokenizer

from modeling_tot_cakt.training.collator import DataCollatorCTCWithTeacher, pad_token_features
from modeling_tot_cakt.training.teacher_features import TeacherFeatureCache


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return make_processor(tmp_path_factory.mktemp("vocab"), make_model(alignment="none"))


def examples(processor, texts, lengths):
    rng = np.random.default_rng(0)
    return [
        {
            "input_values": rng.standard_normal(n).astype(np.float32),
            "labels": processor.tokenizer(text).input_ids,
            "input_length": n,
            "text": text,
        }
        for text, n in zip(texts, lengths)
    ]


def test_audio_and_labels_are_padded(processor):
    batch = DataCollatorCTCWithTeacher(processor)(examples(processor, ["你好", "中国人大"], [800, 1200]))
    assert set(batch) == {"input_values", "attention_mask", "labels"}
    assert batch["input_values"].shape == (2, 1200)
    assert batch["attention_mask"].sum(-1).tolist() == [800, 1200]
    ni, hao = processor.tokenizer.convert_tokens_to_ids(["你", "好"])
    assert batch["labels"].tolist()[0] == [ni, hao, -100, -100]
    assert (batch["labels"][1] >= 0).all()


def test_pad_to_multiple_of(processor):
    collator = DataCollatorCTCWithTeacher(processor, pad_to_multiple_of=512, pad_to_multiple_of_labels=8)
    batch = collator(examples(processor, ["你好", "中国人"], [800, 700]))
    assert batch["input_values"].shape == (2, 1024) and batch["labels"].shape == (2, 8)


def test_teacher_tokens(processor, tiny_teacher):
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    batch = DataCollatorCTCWithTeacher(processor, teacher_tokenizer=tokenizer)(
        examples(processor, ["你好", "中国人大"], [800, 1200])
    )
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert batch["teacher_input_ids"].tolist() == [
        [cls, *tokenizer.convert_tokens_to_ids(list("你好")), sep, 0, 0],
        [cls, *tokenizer.convert_tokens_to_ids(list("中国人大")), sep],
    ]
    assert batch["teacher_attention_mask"].sum(-1).tolist() == [4, 6]


def test_cached_teacher_features(processor, tmp_path):
    cache = TeacherFeatureCache(tmp_path, "f" * 64)
    short, long = torch.randn(2, 24), torch.randn(4, 24)
    cache.save("你好", short)
    cache.save("中国人大", long)
    batch = DataCollatorCTCWithTeacher(processor, teacher_cache=cache)(
        examples(processor, ["你好", "中国人大"], [800, 1200])
    )
    assert batch["teacher_hidden_states"].shape == (2, 4, 24)
    assert batch["teacher_token_mask"].tolist() == [[True, True, False, False], [True] * 4]
    torch.testing.assert_close(batch["teacher_hidden_states"][0, :2], short)
    torch.testing.assert_close(batch["teacher_hidden_states"][1], long)
    assert not batch["teacher_hidden_states"][0, 2:].any()


def test_tokenizer_and_cache_are_exclusive(processor, tiny_teacher, tmp_path):
    with pytest.raises(ValueError, match="not both"):
        DataCollatorCTCWithTeacher(
            processor,
            teacher_tokenizer=AutoTokenizer.from_pretrained(tiny_teacher),
            teacher_cache=TeacherFeatureCache(tmp_path, "0" * 64),
        )


def test_batch_feeds_the_model(processor, tiny_teacher):
    model = make_model(teacher_dir=tiny_teacher)
    model.attach_teacher()
    collator = DataCollatorCTCWithTeacher(processor, teacher_tokenizer=AutoTokenizer.from_pretrained(tiny_teacher))
    output = model(**collator(examples(processor, ["你好", "中国人大"], [8000, 12000])))
    assert torch.isfinite(output.loss) and output.ot_loss is not None and output.align_loss is not None


def test_pad_token_features_with_an_empty_sequence():
    features, mask = pad_token_features([torch.ones(3, 2), torch.ones(0, 2)])
    assert features.shape == (2, 3, 2) and mask.tolist() == [[True] * 3, [False] * 3]
