import numpy as np
import pytest
import torch
from tiny_models import TINY_WAV2VEC2_BERT, make_model, make_processor
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


def ids(processor, text):
    return processor.tokenizer.convert_tokens_to_ids(list(text))


def test_audio_and_labels_are_padded(processor):
    features = examples(processor, ["你好", "中国人大"], [800, 1200])
    batch = DataCollatorCTCWithTeacher(processor)(features)
    assert set(batch) == {"input_values", "attention_mask", "labels"}
    assert batch["input_values"].shape == (2, 1200)
    assert batch["attention_mask"].sum(-1).tolist() == [800, 1200]
    # The audio is copied as is (no second normalisation) and padded with zeros; the mask marks it.
    torch.testing.assert_close(batch["input_values"][0, :800], torch.from_numpy(features[0]["input_values"]))
    torch.testing.assert_close(batch["input_values"][1], torch.from_numpy(features[1]["input_values"]))
    assert not batch["input_values"][0, 800:].any()
    assert batch["attention_mask"].tolist() == [[1] * 800 + [0] * 400, [1] * 1200]
    ni, hao = processor.tokenizer.convert_tokens_to_ids(["你", "好"])
    assert batch["labels"].tolist()[0] == [ni, hao, -100, -100]
    assert batch["labels"].tolist() == [[*ids(processor, "你好"), -100, -100], ids(processor, "中国人大")]


def test_hand_made_batch_is_collated_exactly(processor):
    features = [
        {"input_values": np.array([0.5, -1.0, 2.0], np.float32), "labels": [3, 4], "text": "你好"},
        {"input_values": np.array([1.5, 0.25], np.float32), "labels": [5, 6, 7], "text": "中国人"},
    ]
    batch = DataCollatorCTCWithTeacher(processor)(features)
    assert batch["input_values"].tolist() == [[0.5, -1.0, 2.0], [1.5, 0.25, 0.0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[3, 4, -100], [5, 6, 7]]


def test_log_mel_features_are_padded_frame_by_frame(tmp_path):
    processor = make_processor(tmp_path, make_model(TINY_WAV2VEC2_BERT, alignment="none"))
    features = [
        {"input_features": np.full((3, 160), 1.5, np.float32), "labels": [3, 4], "text": "你好"},
        {"input_features": np.full((5, 160), -2.0, np.float32), "labels": [5], "text": "中"},
    ]
    batch = DataCollatorCTCWithTeacher(processor)(features)
    assert set(batch) == {"input_features", "attention_mask", "labels"}
    assert batch["input_features"].shape == (2, 5, 160)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert (batch["input_features"][0, :3] == 1.5).all() and (batch["input_features"][1] == -2.0).all()
    # SeamlessM4TFeatureExtractor pads log-mel frames with its padding_value (1.0); the mask hides them.
    assert (batch["input_features"][0, 3:] == processor.feature_extractor.padding_value).all()
    assert batch["labels"].tolist() == [[3, 4], [5, -100]]


def test_pad_to_multiple_of(processor):
    collator = DataCollatorCTCWithTeacher(processor, pad_to_multiple_of=512, pad_to_multiple_of_labels=8)
    batch = collator(examples(processor, ["你好", "中国人"], [800, 700]))
    assert batch["input_values"].shape == (2, 1024) and batch["labels"].shape == (2, 8)
    assert batch["attention_mask"].sum(-1).tolist() == [800, 700] and not batch["input_values"][:, 800:].any()
    assert batch["labels"].tolist() == [
        [*ids(processor, "你好"), *[-100] * 6],
        [*ids(processor, "中国人"), *[-100] * 5],
    ]


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
    """A collated batch gives the model exactly what each utterance gives it alone: every loss of the padded
    batch is the mean of the single-utterance losses (padding, labels and teacher tokens all line up)."""
    torch.manual_seed(0)
    # A fixed number of Sinkhorn iterations, so the batch and the single utterances iterate alike.
    model = make_model(teacher_dir=tiny_teacher, tot_tol=0.0, tot_max_iter=30).eval()
    model.attach_teacher()
    collator = DataCollatorCTCWithTeacher(processor, teacher_tokenizer=AutoTokenizer.from_pretrained(tiny_teacher))
    features = examples(processor, ["你好", "中国人大"], [8000, 12000])
    with torch.no_grad():
        together = model(**collator(features))
        alone = [model(**collator([feature])) for feature in features]
    for name in ("loss", "ctc_loss", "ot_loss", "align_loss"):
        expected = torch.stack([getattr(output, name) for output in alone]).mean()
        torch.testing.assert_close(getattr(together, name), expected, rtol=1e-5, atol=1e-6, msg=name)


def test_pad_token_features_with_an_empty_sequence():
    features, mask = pad_token_features([torch.ones(3, 2), torch.ones(0, 2)])
    assert features.shape == (2, 3, 2) and mask.tolist() == [[True] * 3, [False] * 3]
