import logging

import pytest
import torch
from safetensors import safe_open
from tiny_models import (
    CHARACTERS,
    TINY_HUBERT,
    TINY_WAV2VEC2,
    TINY_WAV2VEC2_BERT,
    TINY_WAVLM,
    make_model,
    make_processor,
    make_teacher,
)
from transformers import AutoModel, AutoModelForCTC, BertModel, Wav2Vec2Model

from modeling_tot_cakt import TOTCAKTConfig, TOTCAKTForCTC


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher"))


def batch_for(model, tmp_path, texts=("你好中国", "大学生")):
    """Processor-made inputs, CTC labels and teacher token ids for two utterances of different length."""
    from transformers import AutoTokenizer

    processor = make_processor(tmp_path, model)
    rng = torch.Generator().manual_seed(0)
    audio = [torch.randn(16000, generator=rng).numpy(), torch.randn(11000, generator=rng).numpy()]
    inputs = processor(audio=audio, sampling_rate=16000, return_tensors="pt", padding=True)
    labels = processor.tokenizer(list(texts), padding=True, return_tensors="pt")
    label_ids = labels.input_ids.masked_fill(labels.attention_mask == 0, -100)
    batch = dict(inputs=dict(inputs), labels=label_ids)
    if model.config.teacher_name_or_path != "bert-base-chinese":
        teacher = AutoTokenizer.from_pretrained(model.config.teacher_name_or_path)(
            list(texts), padding=True, return_tensors="pt"
        )
        batch.update(teacher_input_ids=teacher.input_ids, teacher_attention_mask=teacher.attention_mask)
    return batch


@pytest.mark.parametrize("alignment", ["tot", "ot", "none"])
@pytest.mark.parametrize(
    "encoder",
    [TINY_WAV2VEC2, TINY_HUBERT, TINY_WAVLM, TINY_WAV2VEC2_BERT],
    ids=["wav2vec2", "hubert", "wavlm", "w2v-bert"],
)
def test_forward_backward_each_mode_and_encoder(encoder, alignment, teacher_dir, tmp_path):
    torch.manual_seed(0)
    model = make_model(encoder, alignment, teacher_dir)
    model.attach_teacher()
    batch = batch_for(model, tmp_path)
    out = model(
        **batch["inputs"],
        labels=batch["labels"],
        teacher_input_ids=batch["teacher_input_ids"],
        teacher_attention_mask=batch["teacher_attention_mask"],
    )
    assert out.logits.shape[0] == 2 and out.logits.shape[-1] == len(CHARACTERS) + 3
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.lm_head.weight.grad is not None
    encoder_grads = [p.grad for p in model.encoder.parameters() if p.requires_grad and p.grad is not None]
    assert encoder_grads and all(torch.isfinite(g).all() for g in encoder_grads)
    if alignment == "none":
        assert model.adapter is None and out.ot_loss is None and out.align_loss is None
        assert torch.allclose(out.loss, out.ctc_loss)
    else:
        assert torch.isfinite(out.ot_loss) and torch.isfinite(out.align_loss)
        expected = out.ctc_loss + 0.1 * out.ot_loss + 0.3 * out.align_loss
        assert torch.allclose(out.loss, expected)
        assert model.adapter.layers[-1].weight.grad.abs().sum() > 0


def test_teacher_features_strip_special_tokens(teacher_dir, tmp_path):
    model = make_model(teacher_dir=teacher_dir)
    model.attach_teacher()
    batch = batch_for(model, tmp_path)
    features, mask = model.teacher_token_features(batch["teacher_input_ids"], batch["teacher_attention_mask"])
    assert mask.sum(1).tolist() == [4, 3]  # characters only, no [CLS]/[SEP]
    full = model.teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"])
    torch.testing.assert_close(features[0, :4], full.last_hidden_state[0, 1:5])


def test_precomputed_teacher_features_match_ids(teacher_dir, tmp_path):
    torch.manual_seed(0)
    model = make_model(teacher_dir=teacher_dir).eval()
    model.attach_teacher()
    batch = batch_for(model, tmp_path)
    from_ids = model(
        **batch["inputs"],
        labels=batch["labels"],
        teacher_input_ids=batch["teacher_input_ids"],
        teacher_attention_mask=batch["teacher_attention_mask"],
        output_coupling=True,
    )
    features, mask = model.teacher_token_features(batch["teacher_input_ids"], batch["teacher_attention_mask"])
    assert model.detach_teacher() is not None and model.teacher is None  # precomputed features need no teacher
    cached = model(
        **batch["inputs"],
        labels=batch["labels"],
        teacher_hidden_states=features,
        teacher_token_mask=mask,
        output_coupling=True,
    )
    torch.testing.assert_close(from_ids.loss, cached.loss)
    torch.testing.assert_close(from_ids.coupling, cached.coupling)
    # The coupling is a transport plan between valid frames and valid tokens.
    coupling = cached.coupling
    assert coupling.shape[2] == mask.shape[1]
    assert torch.all(coupling[~mask[:, None, :].expand_as(coupling)] == 0)
    torch.testing.assert_close(coupling.sum((1, 2)), torch.ones(2), atol=1e-3, rtol=0)


def test_inference_needs_no_teacher_or_text(tmp_path):
    model = make_model().eval()
    batch = batch_for(model, tmp_path)
    out = model(**batch["inputs"])
    assert out.loss is None and out.ot_loss is None and model.teacher is None


def test_save_load_round_trip_identical_logits_and_no_teacher_weights(teacher_dir, tmp_path):
    model = make_model(teacher_dir=teacher_dir).eval()
    model.attach_teacher()
    batch = batch_for(model, tmp_path)
    model.save_pretrained(tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    assert keys and not any("teacher" in k or k.startswith("embeddings.") for k in keys)
    assert any(k.startswith("adapter.") for k in keys) and any(k.startswith("encoder.") for k in keys)
    teacher_params = sum(p.numel() for p in BertModel.from_pretrained(teacher_dir).parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in make_model(teacher_dir=teacher_dir).parameters()
    )
    assert teacher_params > 0
    for loader in (TOTCAKTForCTC, AutoModelForCTC):
        reloaded = loader.from_pretrained(tmp_path / "saved").eval()
        assert reloaded.teacher is None
        with torch.no_grad():
            torch.testing.assert_close(
                model(**batch["inputs"]).logits, reloaded(**batch["inputs"]).logits, rtol=0, atol=0
            )


def test_encoder_from_pretrained_checkpoint(tmp_path):
    encoder = Wav2Vec2Model(TOTCAKTConfig(encoder_config=dict(TINY_WAV2VEC2)).encoder_config)
    encoder.save_pretrained(tmp_path / "w2v")
    model = TOTCAKTForCTC.from_encoder_pretrained(
        str(tmp_path / "w2v"), vocab_size=15, alignment="none", encoder_kwargs={"mask_time_prob": 0.2}
    )
    assert model.config.encoder_config.mask_time_prob == 0.2
    for name, tensor in encoder.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[name], tensor)
    with pytest.raises(ValueError, match="acoustic encoder"):
        TOTCAKTForCTC.from_encoder_pretrained(str(tmp_path / "missing"), vocab_size=15)


def test_teacher_errors_are_clear(teacher_dir, tmp_path):
    model = make_model(teacher_dir=tmp_path / "no-such-teacher")
    with pytest.raises(ValueError, match="teacher_name_or_path"):
        model.attach_teacher()
    model = make_model(teacher_dir=teacher_dir)
    model.config.teacher_hidden_size = 48
    with pytest.raises(ValueError, match="teacher_hidden_size"):
        model.attach_teacher()
    model = make_model(teacher_dir=teacher_dir)
    batch = batch_for(make_model(teacher_dir=teacher_dir), tmp_path)
    with pytest.raises(ValueError, match="attach_teacher"):
        model(**batch["inputs"], labels=batch["labels"], teacher_input_ids=batch["teacher_input_ids"])
    with pytest.raises(ValueError, match="teacher_hidden_states must have shape"):
        model(**batch["inputs"], labels=batch["labels"], teacher_hidden_states=torch.zeros(2, 4, 7))
    with pytest.raises(ValueError, match="teacher_token_mask"):
        model(
            **batch["inputs"],
            labels=batch["labels"],
            teacher_hidden_states=torch.zeros(2, 4, 24),
            teacher_token_mask=torch.ones(2, 5, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="vocab_size"):
        model(**batch["inputs"], labels=torch.full((2, 3), 99))


def test_ctc_infeasible_warns_and_stays_finite(teacher_dir, caplog, tmp_path):
    model = make_model(teacher_dir=teacher_dir)
    model.attach_teacher()
    processor = make_processor(tmp_path, model)
    inputs = processor(audio=[torch.randn(300).numpy()], sampling_rate=16000, return_tensors="pt")
    text = "你好中国人大学生天上地下你好中国人大学生"
    labels = processor.tokenizer([text], return_tensors="pt").input_ids
    from transformers import AutoTokenizer

    teacher = AutoTokenizer.from_pretrained(teacher_dir)([text], return_tensors="pt")
    with caplog.at_level(logging.WARNING):
        out = model(
            **inputs, labels=labels, teacher_input_ids=teacher.input_ids, teacher_attention_mask=teacher.attention_mask
        )
    assert out.logits.shape[1] < labels.shape[1]
    assert out.ctc_loss.item() == 0.0 and torch.isfinite(out.ot_loss) and torch.isfinite(out.loss)
    assert "more label tokens than encoder frames" in caplog.text


def test_gradient_checkpointing_and_feature_encoder_freezing(teacher_dir, tmp_path):
    model = make_model(teacher_dir=teacher_dir).train()
    model.attach_teacher()
    model.activation_checkpointing_enable()
    model.freeze_feature_encoder()
    batch = batch_for(model, tmp_path)
    out = model(
        **batch["inputs"],
        labels=batch["labels"],
        teacher_input_ids=batch["teacher_input_ids"],
        teacher_attention_mask=batch["teacher_attention_mask"],
    )
    out.loss.backward()
    assert all(p.grad is None for p in model.encoder.feature_extractor.parameters())
    assert model.encoder.encoder.layers[0].attention.k_proj.weight.grad is not None
    w2v_bert = make_model(TINY_WAV2VEC2_BERT)
    with pytest.raises(ValueError, match="no convolutional feature encoder"):
        w2v_bert.freeze_feature_encoder()


def test_auto_model_resolves_teacher_free_base(tmp_path):
    model = make_model()
    assert isinstance(AutoModel.from_config(model.config.encoder_config), Wav2Vec2Model)
    assert model.main_input_name == "input_values"
    assert make_model(TINY_WAV2VEC2_BERT).main_input_name == "input_features"


def test_bad_audio_inputs_are_rejected_clearly():
    model = make_model().eval()
    with pytest.raises(ValueError, match="shorter than the wav2vec2 encoder's receptive field"):
        model(torch.randn(1, 20))
    short = torch.randn(2, 4000)
    mask = torch.ones(2, 4000, dtype=torch.long)
    mask[1, 12:] = 0
    with pytest.raises(ValueError, match="12 samples"):
        model(short, attention_mask=mask)
    broken = torch.randn(2, 4000)
    broken[1, 7] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf values \(batch items \[1\]\)"):
        model(broken)
