"""What reaches the encoder of the teacher's knowledge: the gradient norms and knowledge share logged at logging
steps, the masked-position targets (`teacher_target="masked_states"`), and the distillation of the teacher's
masked-LM predictions through the transport plan (`kd_loss_weight`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors import safe_open
from tiny_models import CHARACTERS, TEACHER_HIDDEN, make_model, make_processor, make_teacher
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel, BertTokenizer

from modeling_tot_cakt import TOTCAKTForCTC
from modeling_tot_cakt.modeling_tot_cakt import (
    ctc_token_targets,
    load_teacher,
    plan_distillation_loss,
    teacher_vocabulary_map,
)
from modeling_tot_cakt.training.collator import DataCollatorCTCWithTeacher
from modeling_tot_cakt.training.teacher_features import (
    TeacherFeatureCache,
    precompute_teacher_features,
    teacher_feature_layout,
)
from modeling_tot_cakt.training.trainer import TOTCAKTTrainer, TOTCAKTTrainingArguments

TEXTS = ("你好中国", "大学生")


@pytest.fixture(scope="module")
def mlm_teacher(tmp_path_factory) -> Path:
    """A 2-layer BERT saved with its masked-LM head over the test characters and one character ("猫") that the CTC
    vocabulary lacks."""
    directory = tmp_path_factory.mktemp("mlm_teacher")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CHARACTERS, "猫"]
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    BertTokenizer(str(directory / "vocab.txt")).save_pretrained(directory)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokens), hidden_size=TEACHER_HIDDEN, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32,
    )  # fmt: skip
    BertForMaskedLM(config).save_pretrained(directory)
    return directory


def batch_for(model, processor, tokenizer, texts=TEXTS, seconds=(0.5, 0.4)):
    rng = np.random.default_rng(0)
    audio = [rng.standard_normal(int(16000 * s)).astype(np.float32) * 0.3 for s in seconds]
    features = processor.feature_extractor(audio, sampling_rate=16000, padding=True, return_tensors="pt")
    labels = processor.tokenizer(list(texts), padding=True, return_tensors="pt")
    teacher = tokenizer(list(texts), padding=True, return_tensors="pt")
    return dict(
        input_values=features["input_values"],
        attention_mask=features["attention_mask"],
        labels=labels["input_ids"].masked_fill(labels["attention_mask"].ne(1), -100),
        teacher_input_ids=teacher["input_ids"],
        teacher_attention_mask=teacher["attention_mask"],
    )


# ------------------------------------------------------------------------------------------ distillation loss
def test_plan_distillation_loss_on_a_hand_made_example():
    """Three valid frames and a padded one; three tokens of which the third has no target. Blank is 0."""
    coupling = torch.tensor(
        [[[0.4, 0.1, 0.0], [0.0, 0.5, 0.2], [0.0, 0.0, 0.3], [0.2, 0.0, 0.0]]]
    )  # frame 2 reaches only the token without a target; frame 3 is padding
    token_targets = torch.tensor([[[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])
    logits = torch.log(torch.tensor([[[2.0, 1, 2, 1], [1, 1, 1, 2], [1, 5, 1, 1], [1, 1, 9, 1]]]))
    frame_mask = torch.tensor([[True, True, True, False]])
    logits.requires_grad_(True)
    loss = plan_distillation_loss(coupling, logits, frame_mask, token_targets, blank=0)

    # Frame 0: target (0.4 t0 + 0.1 t1) / 0.5 = (0.4, 0.4, 0.2) over symbols 1..3; posterior (2, 1, 2, 1) / 6, so
    # p(blank) = 1/3 and the non-blank posterior (1, 2, 1) / 4. Frame 1: target t1 (token 2 has none), posterior
    # (1, 1, 1, 2) / 5, p(blank) = 0.2, non-blank (1, 1, 2) / 4.
    kl_0 = 0.4 * math.log(0.4 / 0.25) + 0.4 * math.log(0.4 / 0.5) + 0.2 * math.log(0.2 / 0.25)
    kl_1 = math.log(1 / 0.5)
    weight_0, weight_1 = 1 - 1 / 3, 1 - 0.2
    expected = (weight_0 * kl_0 + weight_1 * kl_1) / (weight_0 + weight_1)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # The blank posterior is never moved, and frames without a target (2) or valid frame (3) get no gradient.
    assert torch.all(logits.grad[..., 0] == 0)
    assert torch.all(logits.grad[0, 2:] == 0)


def test_teacher_predictions_map_into_the_ctc_vocabulary_and_renormalise(mlm_teacher, tmp_path):
    model = make_model()
    processor = make_processor(tmp_path, model)
    tokenizer = AutoTokenizer.from_pretrained(mlm_teacher)
    mapping = teacher_vocabulary_map(tokenizer, processor.tokenizer, len(tokenizer))
    ctc = processor.tokenizer.get_vocab()
    teacher = tokenizer.get_vocab()
    assert {int(mapping[teacher[c]]) for c in CHARACTERS} == {ctc[c] for c in CHARACTERS}
    assert all(int(mapping[teacher[token]]) == -1 for token in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "猫"))
    # Top-3 at one position: 你 0.5, 猫 0.3 (no CTC id: dropped), 好 0.1; and a padded position (-1).
    ids = torch.tensor([[[teacher["你"], teacher["猫"], teacher["好"]], [-1, -1, -1]]])
    probs = torch.tensor([[[0.5, 0.3, 0.1], [0.0, 0.0, 0.0]]])
    targets = ctc_token_targets(ids, probs, mapping, len(ctc))
    expected = torch.zeros(2, len(ctc))
    expected[0, ctc["你"]], expected[0, ctc["好"]] = 0.5 / 0.6, 0.1 / 0.6
    torch.testing.assert_close(targets[0], expected)


def test_distillation_reaches_the_encoder_and_is_the_plans_loss(mlm_teacher, tmp_path):
    model = make_model(kd_loss_weight=2.0, ctc_loss_weight=0.0, ot_loss_weight=0.0, align_loss_weight=0.0)
    model.eval()  # no dropout: the recomputation below sees the same numbers
    processor = make_processor(tmp_path, model)
    teacher, tokenizer = load_teacher(str(mlm_teacher), masked_lm=True)
    model.attach_teacher(teacher, tokenizer, ctc_tokenizer=processor.tokenizer)
    batch = batch_for(model, processor, tokenizer)
    output = model(**batch, output_coupling=True)
    output.loss.backward()
    encoder_gradients = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert encoder_gradients and sum(float(g.abs().sum()) for g in encoder_gradients) > 0

    ids, probs, token_mask = model.teacher_predictions(batch["teacher_input_ids"], batch["teacher_attention_mask"])
    mapping = teacher_vocabulary_map(tokenizer, processor.tokenizer, teacher.config.vocab_size)
    targets = ctc_token_targets(ids, probs, mapping, model.config.vocab_size)
    frame_mask = model.frame_mask(output.logits.shape[1], batch["attention_mask"])
    expected = plan_distillation_loss(output.coupling, output.logits, frame_mask, targets, blank=0)
    torch.testing.assert_close(output.kd_loss, expected)
    torch.testing.assert_close(output.loss, 2.0 * expected)
    # The predictions are the masked-LM head's at each position with that position masked.
    masked = batch["teacher_input_ids"][1].clone()
    masked[2] = tokenizer.mask_token_id
    direct = torch.softmax(teacher(masked[None], attention_mask=batch["teacher_attention_mask"][1][None]).logits, -1)
    top = direct[0, 2].topk(model.config.kd_top_k)
    torch.testing.assert_close(probs[1, 1], top.values)
    assert torch.equal(ids[1, 1], top.indices)


def test_the_distillation_does_not_move_the_plan(mlm_teacher, tmp_path):
    """Even with the plan differentiable (`tot_grad="autodiff"`), `kd_loss` reaches the adapter, which only shapes
    the plan, with no gradient: the plan says where the predictions go, it is not fitted to them."""
    weights = dict(kd_loss_weight=1.0, ctc_loss_weight=0.0, ot_loss_weight=0.0, align_loss_weight=0.0)
    model = make_model(tot_grad="autodiff", **weights)
    processor = make_processor(tmp_path, model)
    teacher, tokenizer = load_teacher(str(mlm_teacher), masked_lm=True)
    model.attach_teacher(teacher, tokenizer, ctc_tokenizer=processor.tokenizer)
    model(**batch_for(model, processor, tokenizer)).loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.adapter.parameters())
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_a_saved_distilling_model_holds_no_teacher_tensors(mlm_teacher, tmp_path):
    model = make_model(kd_loss_weight=1.0)
    processor = make_processor(tmp_path, model)
    teacher, tokenizer = load_teacher(str(mlm_teacher), masked_lm=True)
    model.attach_teacher(teacher, tokenizer, ctc_tokenizer=processor.tokenizer)
    model.save_pretrained(tmp_path / "saved")
    with safe_open(tmp_path / "saved" / "model.safetensors", framework="pt") as handle:
        saved = set(handle.keys())
    assert saved == set(make_model(kd_loss_weight=1.0).state_dict())
    loaded = TOTCAKTForCTC.from_pretrained(tmp_path / "saved").eval()
    assert loaded.teacher is None
    audio = torch.randn(1, 8000)
    torch.testing.assert_close(loaded(audio).logits, model.eval()(audio).logits)


def test_distillation_needs_the_heads_and_tokenizers_it_reads(mlm_teacher, tmp_path):
    model = make_model(kd_loss_weight=1.0)
    processor = make_processor(tmp_path, model)
    with pytest.raises(ValueError, match=r"has no masked-LM head.*train_hf.py --kd_loss_weight 0"):
        load_teacher(str(make_teacher(tmp_path / "headless", masked_lm=False)), masked_lm=True)
    plain, tokenizer = load_teacher(str(mlm_teacher))
    with pytest.raises(ValueError, match="without its masked-LM head"):
        model.attach_teacher(plain, tokenizer, ctc_tokenizer=processor.tokenizer)
    teacher, tokenizer = load_teacher(str(mlm_teacher), masked_lm=True)
    with pytest.raises(ValueError, match="ctc_tokenizer=processor.tokenizer"):
        model.attach_teacher(teacher, tokenizer)
    with pytest.raises(ValueError, match=r"attach the teacher with its tokenizer"):
        model.attach_teacher(teacher)


# ----------------------------------------------------------------------------------- masked-position targets
@pytest.mark.parametrize("layer", [-1, 1])
def test_masked_states_are_each_positions_state_with_that_position_masked(layer, tiny_teacher):
    model = make_model(teacher_target="masked_states", teacher_layer=layer)
    teacher = BertModel.from_pretrained(tiny_teacher).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    model.attach_teacher(teacher, tokenizer)
    encoded = tokenizer(list(TEXTS), padding=True, return_tensors="pt")
    features, mask = model.teacher_token_features(encoded["input_ids"], encoded["attention_mask"])
    assert mask.tolist() == [[True] * 4 + [False], [True] * 3 + [False] * 2]
    for row, text in enumerate(TEXTS):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        for position in range(1, len(text) + 1):  # after [CLS]
            masked = ids.clone()
            masked[0, position] = tokenizer.mask_token_id
            states = teacher(masked, output_hidden_states=True).hidden_states[layer]
            torch.testing.assert_close(features[row, position - 1], states[0, position], atol=1e-5, rtol=1e-5)
    plain = make_model(teacher_layer=layer)
    plain.attach_teacher(teacher)
    unmasked, _ = plain.teacher_token_features(encoded["input_ids"], encoded["attention_mask"])
    assert not torch.allclose(unmasked[mask], features[mask], atol=1e-3)


def test_the_cache_keeps_each_target_kind_apart(tiny_teacher, mlm_teacher, tmp_path):
    default = teacher_feature_layout(make_model().config)
    assert default == {"strip_special_tokens": True}  # caches written before these options keep their key
    assert teacher_feature_layout(make_model(teacher_target="masked_states").config) == {
        **default,
        "teacher_target": "masked_states",
    }
    assert teacher_feature_layout(make_model(kd_loss_weight=0.5, kd_top_k=3).config) == {**default, "kd_top_k": 3}
    # A cache filled for the distillation holds the predictions the model computes, and the collator reads them.
    model = make_model(kd_loss_weight=0.5, kd_top_k=3, teacher_target="masked_states")
    processor = make_processor(tmp_path, model)
    teacher, tokenizer = load_teacher(str(mlm_teacher), masked_lm=True)
    model.attach_teacher(teacher, tokenizer, ctc_tokenizer=processor.tokenizer)
    cache = TeacherFeatureCache(tmp_path / "cache", "f" * 64, hidden_size=TEACHER_HIDDEN)
    assert precompute_teacher_features(model, tokenizer, TEXTS, cache) == 2
    encoded = tokenizer(list(TEXTS), padding=True, return_tensors="pt")
    features, mask = model.teacher_token_features(encoded["input_ids"], encoded["attention_mask"])
    ids, probs, _ = model.teacher_predictions(encoded["input_ids"], encoded["attention_mask"])
    rows = [{"input_values": np.zeros(4000, np.float32), "labels": [3], "text": text} for text in TEXTS]
    batch = DataCollatorCTCWithTeacher(processor, teacher_cache=cache, teacher_predictions=True)(rows)
    width = batch["teacher_hidden_states"].shape[1]  # the longest transcript's tokens ([SEP]'s column dropped)
    features, mask, ids, probs = features[:, :width], mask[:, :width], ids[:, :width], probs[:, :width]
    torch.testing.assert_close(batch["teacher_hidden_states"][mask], features[mask])
    assert torch.equal(batch["teacher_prediction_ids"], torch.where(mask[..., None], ids, -1))
    torch.testing.assert_close(batch["teacher_prediction_probs"], probs * mask[..., None])


# --------------------------------------------------------------------------------------- knowledge share
def test_gradient_norms_and_knowledge_share_are_those_on_the_encoder_output(mlm_teacher, tmp_path):
    model = make_model(ot_loss_weight=0.5, align_loss_weight=2.0, kd_loss_weight=3.0, ctc_loss_weight=1.5).eval()
    processor = make_processor(tmp_path, model)
    teacher, tokenizer = load_teacher(str(mlm_teacher), masked_lm=True)
    model.attach_teacher(teacher, tokenizer, ctc_tokenizer=processor.tokenizer)
    captured = []
    model.encoder.register_forward_hook(lambda module, args, output: captured.append(output.last_hidden_state))
    output = model(**batch_for(model, processor, tokenizer), output_loss_gradient_norms=True)
    (states,) = captured

    def gradient(*terms):
        return torch.autograd.grad(sum(terms), states, retain_graph=True)[0]

    ctc = gradient(1.5 * output.ctc_loss)
    ot, align, kd = gradient(0.5 * output.ot_loss), gradient(2.0 * output.align_loss), gradient(3.0 * output.kd_loss)
    torch.testing.assert_close(output.grad_norm_ctc, ctc.norm())
    torch.testing.assert_close(output.grad_norm_ot, ot.norm())
    torch.testing.assert_close(output.grad_norm_align, align.norm())
    torch.testing.assert_close(output.grad_norm_kd, kd.norm())
    torch.testing.assert_close(output.knowledge_share, (ot + align + kd).norm() / ctc.norm())
    assert model(**batch_for(model, processor, tokenizer)).knowledge_share is None  # only when asked


def train_steps(model, processor, tokenizer, output_dir, log_knowledge_share: bool, steps: int = 3):
    rng = np.random.default_rng(0)
    rows = [
        {
            "input_values": rng.standard_normal(6000).astype(np.float32) * 0.3,
            "labels": processor.tokenizer(text).input_ids,
            "input_length": 6000,
            "text": text,
        }
        for text in TEXTS * 2
    ]
    args = TOTCAKTTrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=2, logging_steps=2,
        report_to="none", use_cpu=True, remove_unused_columns=False, save_strategy="no", learning_rate=1e-2,
        seed=0, log_knowledge_share=log_knowledge_share, train_sampling_strategy="random",
    )  # fmt: skip
    trainer = TOTCAKTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=DataCollatorCTCWithTeacher(processor, teacher_tokenizer=tokenizer),
    )
    trainer.measured = []  # whether each training forward measured the gradient norms
    model.register_forward_pre_hook(
        lambda module, args, kwargs: trainer.measured.append(kwargs.get("output_loss_gradient_norms", False)),
        with_kwargs=True,
    )
    trainer.train()
    return trainer


def test_logging_the_knowledge_share_leaves_training_unchanged(mlm_teacher, tmp_path):
    """Three steps (dropout on) with and without the measurement: identical weights; the share is logged at the
    logging step only (step 2) and is the mean over that step's batch."""
    runs = {}
    for flag in (False, True):
        torch.manual_seed(0)
        model = make_model(kd_loss_weight=1.0, adapter_dropout=0.2, final_dropout=0.1)
        processor = make_processor(tmp_path, model)
        teacher, tokenizer = load_teacher(str(mlm_teacher), masked_lm=True)
        model.attach_teacher(teacher, tokenizer, ctc_tokenizer=processor.tokenizer)
        runs[flag] = train_steps(model, processor, tokenizer, tmp_path / str(flag), log_knowledge_share=flag)
    weights = {flag: trainer.model.state_dict() for flag, trainer in runs.items()}
    assert all(torch.equal(weights[False][name], weights[True][name]) for name in weights[False])
    logged = [entry for entry in runs[True].state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [2]
    assert runs[True].measured == [False, True, False] and runs[False].measured == [False] * 3
    names = ("grad_norm_ctc", "grad_norm_ot", "grad_norm_align", "grad_norm_kd", "knowledge_share")
    assert all(entry[name] > 0 for entry in logged for name in names)
    silent = [entry for entry in runs[False].state.log_history if "loss" in entry]
    assert not any(name in entry for entry in silent for name in names)


# ------------------------------------------------------------------------------------------ align_layer
def test_an_inner_align_layer_feeds_the_adapter_and_carries_the_measurement(tiny_teacher, tmp_path):
    """With `align_layer=0` the adapter maps the encoder's embedding output (not the states the CTC head reads),
    and the gradient norms are taken there; the hidden states are returned only when asked."""
    model = make_model(align_layer=0, teacher_dir=tiny_teacher).eval()
    processor = make_processor(tmp_path, model)
    teacher, tokenizer = load_teacher(str(tiny_teacher))
    model.attach_teacher(teacher)
    adapter_inputs, encoder_outputs = [], []
    model.adapter.register_forward_hook(lambda module, args, output: adapter_inputs.append(args[0]))
    model.encoder.register_forward_hook(lambda module, args, output: encoder_outputs.append(output))
    batch = batch_for(model, processor, tokenizer)
    output = model(**batch, output_loss_gradient_norms=True)
    (states,) = encoder_outputs
    assert adapter_inputs[0] is states.hidden_states[0] and output.hidden_states is None
    ctc = torch.autograd.grad(
        model.config.ctc_loss_weight * output.ctc_loss, states.hidden_states[0], retain_graph=True
    )
    knowledge = model.config.ot_loss_weight * output.ot_loss + model.config.align_loss_weight * output.align_loss
    (knowledge,) = torch.autograd.grad(knowledge, states.hidden_states[0], retain_graph=True)
    torch.testing.assert_close(output.grad_norm_ctc, ctc[0].norm())
    torch.testing.assert_close(output.knowledge_share, knowledge.norm() / ctc[0].norm())
    # The CTC head still reads the encoder's output.
    head = model.blank_padding_frames(model.lm_head(states.last_hidden_state), batch["attention_mask"])
    torch.testing.assert_close(output.logits, head)
    assert model(**batch, output_hidden_states=True).hidden_states is not None


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"align_layer": 2}, r"align_layer must be an int from -2 to 1 \(the encoder has 1 layers"),
        ({"align_layer": 0, "ctc_input": "adapter"}, r'align_layer must be -1 with ctc_input="adapter", got 0'),
    ],
)
def test_an_align_layer_the_model_cannot_align_is_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        make_model(**settings)
