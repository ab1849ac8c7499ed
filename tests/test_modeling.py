import copy
import itertools
import logging
import math
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import (
    CHARACTERS,
    TEACHER_HIDDEN,
    TINY_HUBERT,
    TINY_WAV2VEC2,
    TINY_WAV2VEC2_BERT,
    TINY_WAVLM,
    make_model,
    make_processor,
    make_teacher,
)
from transformers import (
    AutoModel,
    AutoModelForCTC,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    Wav2Vec2Model,
    pipeline,
)

from modeling_tot_cakt import TOTCAKTConfig, TOTCAKTForCTC, TOTCAKTModel, load_teacher
from modeling_tot_cakt.training import trainer


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
        keys = set(weights.keys())
    # Exactly the model's own weights, under the base model's prefix: nothing of the attached teacher.
    assert keys == set(model.state_dict())
    assert {key.split(".")[0] for key in keys} == {"tot_cakt", "lm_head"}
    assert any(key.startswith("tot_cakt.adapter.") for key in keys)
    for loader in (TOTCAKTForCTC, AutoModelForCTC):
        reloaded = loader.from_pretrained(tmp_path / "saved").eval()
        assert reloaded.teacher is None
        with torch.no_grad():
            torch.testing.assert_close(
                model(**batch["inputs"]).logits, reloaded(**batch["inputs"]).logits, rtol=0, atol=0
            )


@pytest.mark.parametrize("adapter_type", ["mlp", "linear"])
def test_ctc_head_can_read_the_adapted_features(adapter_type, tmp_path):
    """With ctc_input="adapter" the logits are the head applied to the adapter's output, and the CTC loss alone
    trains the adapter. The teacher's size is the encoder's here, so a head reading the encoder would run too."""
    torch.manual_seed(0)
    model = make_model(ctc_input="adapter", adapter_type=adapter_type, teacher_hidden_size=32).eval()
    batch = batch_for(model, tmp_path)
    with torch.no_grad():
        frames = model.tot_cakt(**batch["inputs"]).last_hidden_state
        logits = model(**batch["inputs"]).logits
    # The padding frames past each clip's end are a certain blank (tests/test_batch_independence.py).
    mask = batch["inputs"]["attention_mask"]
    head = model.blank_padding_frames(model.lm_head(model.adapter(frames)), mask)
    torch.testing.assert_close(logits, head, rtol=0, atol=0)
    assert (logits - model.blank_padding_frames(model.lm_head(frames), mask)).abs().max() > 0.1
    model.train()
    model(**batch["inputs"], labels=batch["labels"]).loss.backward()
    assert model.adapter.layers[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("alignment", ["tot", "none"])
def test_saved_adapted_model_ships_the_adapter_and_no_teacher(alignment, teacher_dir, tmp_path):
    """A model whose head reads the adapter saves the adapter (also as a CTC-only baseline, which has no teacher)
    and nothing of the teacher, and reloads and runs once the teacher is gone."""
    teacher = shutil.copytree(teacher_dir, tmp_path / "teacher")
    model = make_model(alignment=alignment, teacher_dir=teacher, ctc_input="adapter").eval()
    model.attach_teacher()
    batch = batch_for(model, tmp_path)
    model.save_pretrained(tmp_path / "saved")
    shutil.rmtree(teacher)
    shapes = {key: tuple(value.shape) for key, value in load_file(tmp_path / "saved" / "model.safetensors").items()}
    assert set(shapes) == set(model.state_dict())
    assert {".".join(key.split(".")[:2]) for key in shapes} == {
        "tot_cakt.encoder",
        "tot_cakt.adapter",
        "lm_head.weight",
        "lm_head.bias",
    }
    assert shapes["lm_head.weight"] == (len(CHARACTERS) + 3, TEACHER_HIDDEN)
    with torch.no_grad():
        expected = model(**batch["inputs"]).logits
        for loader in (TOTCAKTForCTC, AutoModelForCTC):
            reloaded, info = loader.from_pretrained(tmp_path / "saved", output_loading_info=True)
            assert not info["missing_keys"] and not info["unexpected_keys"] and reloaded.teacher is None
            torch.testing.assert_close(reloaded.eval()(**batch["inputs"]).logits, expected, rtol=0, atol=0)


def test_linear_adapter_is_one_projection():
    adapter = make_model(adapter_type="linear").adapter
    assert [name for name, _ in adapter.named_parameters()] == ["layers.0.weight", "layers.0.bias"]
    weight, bias = adapter.layers[0].weight, adapter.layers[0].bias
    assert weight.shape == (TEACHER_HIDDEN, 32)
    frames = torch.randn(2, 5, 32)
    torch.testing.assert_close(adapter(frames), frames @ weight.T + bias)


def save_with_legacy_names(model, folder):
    """Save `model`, then rename its weights as folders were written before the base model existed."""
    model.save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    save_file({key.removeprefix("tot_cakt."): value for key, value in weights.items()}, folder / "model.safetensors")
    return set(load_file(folder / "model.safetensors"))


def test_folders_with_legacy_weight_names_still_load(tmp_path):
    model = make_model().eval()
    with torch.no_grad():
        model.lm_head.bias.normal_()  # a head that differs from a fresh one
    keys = save_with_legacy_names(model, tmp_path / "legacy")
    assert {key.split(".")[0] for key in keys} == {"encoder", "adapter", "lm_head"}
    audio = torch.randn(2, 8000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(audio)
        for loader in (TOTCAKTForCTC, AutoModelForCTC):
            reloaded, info = loader.from_pretrained(tmp_path / "legacy", output_loading_info=True)
            assert not info["missing_keys"] and not info["unexpected_keys"]
            torch.testing.assert_close(reloaded.eval()(audio).logits, expected.logits, rtol=0, atol=0)
        for loader in (TOTCAKTModel, AutoModel):
            base, info = loader.from_pretrained(tmp_path / "legacy", output_loading_info=True)
            assert not info["missing_keys"] and info["unexpected_keys"] == {"lm_head.weight", "lm_head.bias"}
            features = base.eval()(audio).last_hidden_state
            torch.testing.assert_close(features, model.tot_cakt(audio).last_hidden_state, rtol=0, atol=0)


def test_plain_encoder_checkpoint_is_refused_not_left_random(tmp_path):
    model = make_model(alignment="none")
    Wav2Vec2Model(model.config.encoder_config).save_pretrained(tmp_path / "w2v")
    ctc_config = copy.deepcopy(model.config.encoder_config)
    ctc_config.vocab_size = model.config.vocab_size
    Wav2Vec2ForCTC(ctc_config).save_pretrained(tmp_path / "w2v-ctc")  # weights under "wav2vec2."
    for folder, loader in itertools.product(("w2v", "w2v-ctc"), (TOTCAKTForCTC, TOTCAKTModel)):
        with pytest.raises(ValueError, match=r"checkpoint of the acoustic encoder alone.*from_encoder_pretrained"):
            loader.from_pretrained(tmp_path / folder, config=model.config)
    # A base-model folder is a valid start for the CTC model: only the head is new.
    model.tot_cakt.save_pretrained(tmp_path / "base")
    reloaded, info = TOTCAKTForCTC.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert info["missing_keys"] == {"lm_head.weight", "lm_head.bias"}


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
    # A given configuration (here of a 768-wide default encoder) takes the checkpoint's encoder and its size.
    config = TOTCAKTConfig(vocab_size=15, ctc_input="adapter", teacher_hidden_size=TEACHER_HIDDEN)
    model = TOTCAKTForCTC.from_encoder_pretrained(str(tmp_path / "w2v"), config)
    assert model.config.hidden_size == 32 and model.adapter.layers[0].normalized_shape == (32,)


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


def test_a_teacher_named_by_a_path_of_another_machine_or_by_a_folder_name_asks_for_the_teacher(
    teacher_dir, tmp_path, monkeypatch
):
    """A saved config names the teacher as training was given it (a path on the training machine; the Hub copy a
    folder name, or --hub_teacher_id): inference never needs it, and attach_teacher() without one that loads says to
    pass the teacher itself or name its Hub id or a folder; attach_teacher(teacher) still works."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no Hub look-up of the folder name
    model = make_model(teacher_dir=teacher_dir).eval()
    clip = torch.randn(1, 4000)
    for name in ("/home/trainer/models/tiny_teacher", teacher_dir.name):
        model.config.teacher_name_or_path = name
        model.save_pretrained(tmp_path / "saved")
        elsewhere = TOTCAKTForCTC.from_pretrained(tmp_path / "saved").eval()
        with torch.no_grad():
            torch.testing.assert_close(elsewhere(clip).logits, model(clip).logits)
        with pytest.raises(ValueError, match=f"teacher_name_or_path='{name}'") as error:
            elsewhere.attach_teacher()
        assert "Pass the teacher itself (`model.attach_teacher(teacher)`)" in str(error.value)
        assert "a Hub id (with network access) or a local folder" in str(error.value)
        assert ("is a path: a saved model names its teacher as its training run was given it" in str(error.value)) == (
            name.startswith("/")
        )
        teacher, _ = load_teacher(str(teacher_dir))
        assert elsewhere.attach_teacher(teacher) is teacher and elsewhere.teacher is teacher


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
    config = make_model(alignment="none").config
    base = AutoModel.from_config(config)
    assert type(base) is TOTCAKTModel and base.adapter is None
    assert isinstance(base.encoder, Wav2Vec2Model) and base.main_input_name == "input_values"
    assert type(AutoModelForCTC.from_config(config)) is TOTCAKTForCTC
    with pytest.raises(ValueError, match='alignment="none"'):
        base(torch.randn(1, 4000), output_adapted_features=True)
    w2v_bert = AutoModel.from_config(make_model(TINY_WAV2VEC2_BERT, alignment="none").config)
    assert type(w2v_bert) is TOTCAKTModel and w2v_bert.main_input_name == "input_features"


@pytest.mark.parametrize("encoder", [TINY_WAV2VEC2, TINY_WAV2VEC2_BERT], ids=["wav2vec2", "w2v-bert"])
def test_base_model_features_are_the_ctc_models_encoder_features(encoder, teacher_dir, tmp_path):
    model = make_model(encoder, teacher_dir=teacher_dir, final_dropout=0.2).eval()
    assert model.base_model is model.tot_cakt and model.encoder is model.tot_cakt.encoder
    model.save_pretrained(tmp_path / "saved")
    base = AutoModel.from_pretrained(tmp_path / "saved").eval()
    assert type(base) is TOTCAKTModel
    inputs = batch_for(model, tmp_path)["inputs"]
    with torch.no_grad():
        out = base(**inputs, output_adapted_features=True, output_hidden_states=True)
        # The CTC model's encoder path (its clip-aware normalisations given the clip lengths).
        encoder_out = model.tot_cakt(**inputs, output_hidden_states=True)
        logits = model(**inputs).logits
    torch.testing.assert_close(out.last_hidden_state, encoder_out.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(out.adapted_features, model.adapter(encoder_out.last_hidden_state), rtol=0, atol=0)
    assert len(out.hidden_states) == len(encoder_out.hidden_states) == 2  # embeddings + 1 layer
    # The CTC head is a linear map of those features (dropout is off in eval mode).
    head = model.blank_padding_frames(model.lm_head(out.last_hidden_state), inputs["attention_mask"])
    torch.testing.assert_close(logits, head, rtol=0, atol=0)


def test_output_flags_of_the_config_are_honoured():
    model = make_model(output_hidden_states=True, output_attentions=True).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(torch.randn(1, 8000))
        plain = model(torch.randn(1, 8000), output_hidden_states=False, output_attentions=False)
    assert len(out.hidden_states) == 2 and out.hidden_states[-1].shape == (1, out.logits.shape[1], 32)
    assert len(out.attentions) == 1 and out.attentions[0].shape[:2] == (1, 2)
    assert plain.hidden_states is None and plain.attentions is None


def test_unknown_forward_arguments_are_refused():
    model = make_model().eval()
    with pytest.raises(TypeError, match="unexpected keyword argument 'lables'"):
        model(torch.randn(1, 8000), lables=torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="unexpected keyword argument 'output_atentions'"):
        model.tot_cakt(torch.randn(1, 8000), output_atentions=True)


@pytest.mark.parametrize("layer", [0, 1, -2])
def test_teacher_layer_chooses_the_hidden_states_aligned_to(layer, teacher_dir, tmp_path):
    model = make_model(teacher_dir=teacher_dir, teacher_layer=layer)
    model.attach_teacher()
    batch = batch_for(model, tmp_path)
    features, mask = model.teacher_token_features(batch["teacher_input_ids"], batch["teacher_attention_mask"])
    full = model.teacher(
        input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"], output_hidden_states=True
    )
    assert mask.sum(1).tolist() == [4, 3]
    torch.testing.assert_close(features[0, :4], full.hidden_states[layer][0, 1:5])
    # The 1-layer teacher's layer 0 is its embedding output, not its last layer.
    assert (layer in (0, -2)) != torch.allclose(features[0, :4], full.last_hidden_state[0, 1:5])


def test_teacher_layer_out_of_range_is_refused_at_attach(teacher_dir):
    for layer in (2, -3):
        with pytest.raises(ValueError, match=f"teacher_layer is {layer} but the teacher has 1 layers"):
            make_model(teacher_dir=teacher_dir, teacher_layer=layer).attach_teacher()


def test_one_teacher_loading_path_and_message(teacher_dir, tmp_path):
    """`attach_teacher` and the training stack load teachers through the same function, with one message."""
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(teacher_dir, no_tokenizer, ignore=shutil.ignore_patterns("vocab.txt", "tokenizer*"))
    message = "has 5 tokens but the teacher's embedding table has 17: the folder's tokenizer files"
    with pytest.raises(ValueError, match=message):
        make_model(teacher_dir=no_tokenizer).attach_teacher()
    with pytest.raises(ValueError, match=message):
        trainer.load_teacher(str(no_tokenizer))
    assert trainer.load_teacher is load_teacher
    teacher, tokenizer = load_teacher(str(teacher_dir))
    assert len(tokenizer) == teacher.config.vocab_size == 17


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


def test_integer_pcm_through_the_processor_gives_the_float_logits(tmp_path):
    model = make_model(alignment="none").eval()
    processor = make_processor(tmp_path, model)
    samples = (torch.randn(4000) * 3000).to(torch.int16).numpy()
    as_int = processor(audio=[samples], sampling_rate=16000, return_tensors="pt")
    as_float = processor(audio=[samples.astype("float32") / 32768], sampling_rate=16000, return_tensors="pt")
    assert as_int.input_values.dtype == torch.float32  # the package's extractor scales integer PCM first
    torch.testing.assert_close(as_int.input_values, as_float.input_values, atol=0, rtol=0)
    # A stock Wav2Vec2FeatureExtractor (saved by earlier versions) returns float64 features for integer PCM, its
    # normalisation having removed the scale; the model casts them to its dtype.
    stock = Wav2Vec2FeatureExtractor(
        **{k: v for k, v in processor.feature_extractor.to_dict().items() if "type" not in k}
    )
    as_stock = stock([samples], sampling_rate=16000, return_tensors="pt")
    assert as_stock.input_values.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(model(**as_stock).logits, model(**as_float).logits, atol=1e-4, rtol=1e-4)


def test_long_inputs_warn_about_attention_memory_and_chunking(monkeypatch, caplog):
    import modeling_tot_cakt.modeling_tot_cakt as modeling

    model = make_model(alignment="none").eval()
    frames = int(model.encoder._get_feat_extract_output_lengths(torch.tensor(4000)))
    monkeypatch.setattr(modeling, "LONG_INPUT_FRAMES", frames)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        model(torch.randn(1, 4000))
        assert "chunk_length_s" not in caplog.text  # exactly at the limit
        model(torch.randn(1, 4400))
    heads = model.config.encoder_config.num_attention_heads
    longer = int(model.encoder._get_feat_extract_output_lengths(torch.tensor(4400)))
    assert f"An input of {longer} encoder frames: self-attention needs {heads} x {longer}^2" in caplog.text
    assert "chunk_length_s" in caplog.text


def test_solver_diagnostics_are_the_returned_plans_and_an_unconverged_plan_warns(teacher_dir, tmp_path, caplog):
    def run(**solver):
        torch.manual_seed(0)
        model = make_model(TINY_WAV2VEC2, "tot", teacher_dir, **solver)
        model.attach_teacher()
        batch = batch_for(model, tmp_path)
        with caplog.at_level(logging.WARNING), torch.no_grad():
            return model(
                **batch["inputs"],
                labels=batch["labels"],
                teacher_input_ids=batch["teacher_input_ids"],
                teacher_attention_mask=batch["teacher_attention_mask"],
                output_coupling=True,
            )

    def marginal_error(coupling):  # L1 error of both marginals, from the plan itself
        rows, columns = (coupling.sum(2) > 0).sum(1, keepdim=True), (coupling.sum(1) > 0).sum(1, keepdim=True)
        row_error = (coupling.sum(2) - (coupling.sum(2) > 0) / rows).abs().sum(1)
        return (row_error + (coupling.sum(1) - (coupling.sum(1) > 0) / columns).abs().sum(1)).max()

    converged = run()
    assert converged.solver_marginal_error < 1e-4
    torch.testing.assert_close(converged.solver_marginal_error, marginal_error(converged.coupling), atol=1e-6, rtol=0)
    assert "did not converge" not in caplog.text

    cut_short = run(tot_max_iter=2)
    assert cut_short.solver_iterations.item() == 2.0
    assert cut_short.solver_marginal_error > 1e-4
    torch.testing.assert_close(cut_short.solver_marginal_error, marginal_error(cut_short.coupling), atol=1e-6, rtol=0)
    assert "The transport plan did not converge in tot_max_iter=2 iterations" in caplog.text
    assert "Raise tot_max_iter" in caplog.text and "mass" not in caplog.text


def test_an_unbalanced_plan_whose_mass_runs_away_is_blamed_on_the_order_reward(teacher_dir, tmp_path, caplog):
    torch.manual_seed(0)
    model = make_model(TINY_WAV2VEC2, "tot_uot", teacher_dir, tot_lambda1=50.0, uot_tau=1.0)
    model.attach_teacher()
    batch = batch_for(model, tmp_path)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        model(
            **batch["inputs"],
            labels=batch["labels"],
            teacher_input_ids=batch["teacher_input_ids"],
            teacher_attention_mask=batch["teacher_attention_mask"],
        )
    assert "The transport plan did not converge" in caplog.text
    assert re.search(r"The largest plan's mass is \d\.\d+e\+\d\d \(1 when balanced\)", caplog.text)
    assert "Lower tot_lambda1 or raise uot_tau; else raise tot_max_iter" in caplog.text


def test_a_diverged_step_gives_nan_alignment_losses_not_an_error(teacher_dir, tmp_path):
    """NaN features mid-training (a float16 overflow) must reach the loss as NaN, which the trainer's loss
    scaling skips; the solver itself refuses a NaN cost, so the model hands it a finite stand-in."""
    torch.manual_seed(0)
    model = make_model(TINY_WAV2VEC2, "tot", teacher_dir)
    model.attach_teacher()
    batch = batch_for(model, tmp_path)
    with torch.no_grad():
        next(model.tot_cakt.adapter.parameters()).fill_(math.nan)
        out = model(
            **batch["inputs"],
            labels=batch["labels"],
            teacher_input_ids=batch["teacher_input_ids"],
            teacher_attention_mask=batch["teacher_attention_mask"],
        )
    assert torch.isnan(out.ot_loss) and torch.isnan(out.align_loss) and torch.isnan(out.loss)
    assert torch.isfinite(out.ctc_loss)


def test_the_frozen_teacher_makes_its_targets_in_eval_mode(teacher_dir, tmp_path):
    """Dropout is off in the teacher whatever mode it was handed over in and whatever mode the student is put in
    (the Trainer calls model.train()): its token features are those of the teacher in eval mode, every time."""
    teacher = AutoModel.from_pretrained(teacher_dir, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    teacher.train()  # as a teacher built or fine-tuned in the same process may be
    batch = batch_for(make_model(TINY_WAV2VEC2, "tot", teacher_dir), tmp_path)
    ids, mask = batch["teacher_input_ids"], batch["teacher_attention_mask"]
    with torch.no_grad():
        reference = copy.deepcopy(teacher).eval()(input_ids=ids, attention_mask=mask).last_hidden_state[:, 1:]
    model = make_model(TINY_WAV2VEC2, "tot", teacher_dir)
    model.attach_teacher(teacher)
    model.train()
    for _ in range(2):
        features, token_mask = model.teacher_token_features(ids, mask)
        torch.testing.assert_close(features * token_mask[..., None], reference * token_mask[..., None])
    assert not model.teacher.training


def test_non_finite_logits_at_inference_are_named_with_their_cause(tmp_path):
    """NaN logits decode to an empty transcript (the issue's model read every clip as silence). At inference (no
    labels, gradients off) the model refuses them, naming the batch items, how many values, and a weight that holds
    NaN or, with finite weights, the overflow; the pipeline passes the error on. A forward with labels (training:
    the loss is NaN and the Trainer skips the update) or with gradients on returns them as they are."""
    torch.manual_seed(0)
    model = make_model(alignment="none").eval()
    processor = make_processor(tmp_path, model)
    batch = batch_for(model, tmp_path)
    frames = model(**batch["inputs"]).logits.shape[1]
    with torch.no_grad():
        model.lm_head.weight[3] = 3e38  # finite, but every frame's logit for id 3 overflows
    with pytest.raises(ValueError) as error, torch.inference_mode():
        model(**batch["inputs"])
    assert str(error.value) == (
        f"The CTC logits of batch items [0, 1] hold NaN or infinite values ({2 * frames} of {2 * frames * 15}), which "
        "would decode to an empty or wrong transcript: the weights are finite (the largest, in lm_head.weight, of "
        "magnitude 3e+38), so the computation overflowed in torch.float32: check the input (float audio lies in "
        "[-1, 1]) and where the weights come from."
    )
    with torch.no_grad():
        model.lm_head.weight[3] = 0.0
        model.lm_head.weight[5, 7] = float("nan")  # one NaN weight: every frame's logit for id 5 is NaN
    asr = pipeline(
        "automatic-speech-recognition",
        model=model,
        tokenizer=processor.tokenizer,
        feature_extractor=processor.feature_extractor,
    )
    clip = torch.randn(16000, generator=torch.Generator().manual_seed(1)).numpy()
    with pytest.raises(ValueError, match=r"the weight lm_head\.weight holds NaN or infinite values: it was changed"):
        asr({"raw": clip, "sampling_rate": 16000})
    with torch.no_grad():
        assert torch.isnan(model(**batch["inputs"], labels=batch["labels"]).loss)
    logits = model(**batch["inputs"]).logits  # with gradients on, unchecked: NaN on every clip's own frames
    assert torch.isnan(logits[..., 5][model.frame_mask(logits.shape[1], batch["inputs"]["attention_mask"])]).all()


@pytest.mark.parametrize("ctc_input", ["encoder", "adapter"])
def test_the_adapter_reads_the_encoder_output_after_dropout(ctc_input, tmp_path):
    """The adapter (whose output the alignment and, with ctc_input="adapter", the CTC head read) takes the encoder's
    frames after final_dropout, as the CTC head on the encoder does: in training mode with final_dropout=0.5, each
    value of its input is the encoder's doubled or zero, about half of them zero."""
    torch.manual_seed(0)
    model = make_model(alignment="tot", ctc_input=ctc_input, final_dropout=0.5).train()
    seen = {}
    model.tot_cakt.register_forward_hook(lambda module, args, output: seen.update(encoder=output.last_hidden_state))
    model.adapter.register_forward_hook(lambda module, args, output: seen.update(adapter=args[0]))
    model.lm_head.register_forward_hook(lambda module, args, output: seen.update(head=args[0]))
    batch = batch_for(model, tmp_path)
    model(**batch["inputs"], labels=batch["labels"], teacher_hidden_states=torch.randn(2, 4, TEACHER_HIDDEN))
    encoder, adapter = seen["encoder"], seen["adapter"]
    kept = adapter != 0
    assert 0.4 < kept.float().mean() < 0.6
    torch.testing.assert_close(adapter[kept], 2 * encoder[kept])
    if ctc_input == "encoder":  # one dropout mask for the head and the adapter
        assert torch.equal(seen["head"], adapter)


def test_the_non_convergence_warning_fires_when_any_sample_of_the_batch_did_not_converge(
    teacher_dir, tmp_path, caplog, monkeypatch
):
    """One sample whose plan did not converge is enough for the warning, whichever it is; the largest marginal
    error of the batch is reported. The solver's per-sample verdict is set by hand around the real solver."""
    import modeling_tot_cakt.modeling_tot_cakt as modeling

    solve = modeling.tot_sinkhorn

    def run(converged: list[bool], errors: list[float]) -> str:
        def verdict(*args, **kwargs):
            coupling, solver = solve(*args, **kwargs)
            return coupling, {
                **solver,
                "converged": torch.tensor(converged),
                "marginal_error": torch.tensor(errors),
            }

        monkeypatch.setattr(modeling, "tot_sinkhorn", verdict)
        logging.Logger.warning_once.cache_clear()  # transformers' warning_once: once per message and process
        model = make_model(TINY_WAV2VEC2, "tot", teacher_dir, tot_max_iter=7)
        model.attach_teacher()
        batch = batch_for(model, tmp_path)
        caplog.clear()
        with caplog.at_level(logging.WARNING), torch.no_grad():
            model(
                **batch["inputs"],
                labels=batch["labels"],
                teacher_input_ids=batch["teacher_input_ids"],
                teacher_attention_mask=batch["teacher_attention_mask"],
            )
        return caplog.text

    assert "did not converge" not in run([True, True], [1e-6, 2e-6])
    for converged, errors, largest in (
        ([True, False], [1e-6, 0.25], "2.50e-01"),
        ([False, True], [0.125, 1e-6], "1.25e-01"),
    ):
        text = run(converged, errors)
        assert f"did not converge in tot_max_iter=7 iterations (largest marginal error {largest}" in text, text
