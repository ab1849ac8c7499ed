import json

import pytest
from tiny_models import TINY_WAV2VEC2_BERT
from transformers import AutoConfig, HubertConfig, Wav2Vec2BertConfig, Wav2Vec2Config

from modeling_tot_cakt import TOTCAKTConfig
from modeling_tot_cakt.configuration_tot_cakt import alignment_modes_reading


def test_defaults_are_the_tot_cakt_method():
    config = TOTCAKTConfig()
    assert isinstance(config.encoder_config, Wav2Vec2Config)
    assert config.alignment == "tot" and config.teacher_name_or_path == "bert-base-chinese"
    assert config.teacher_hidden_size == 768 and config.tot_grad == "envelope"
    assert config.inputs_to_logits_ratio == 320 and config.uses_teacher


def test_round_trip_keeps_nested_encoder(tmp_path):
    config = TOTCAKTConfig(
        encoder_config={"model_type": "hubert", "hidden_size": 48, "num_attention_heads": 4},
        vocab_size=100,
        alignment="ot",
        tot_sigma=None,
        tot_lambda1=0.0,
    )
    config.save_pretrained(tmp_path)
    for loaded in (TOTCAKTConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert isinstance(loaded.encoder_config, HubertConfig)
        assert loaded.encoder_config.hidden_size == 48
        assert loaded.alignment == "ot" and loaded.tot_sigma is None and loaded.vocab_size == 100


def test_log_mel_encoder_with_frame_rate_reduction():
    config = TOTCAKTConfig(encoder_config=dict(TINY_WAV2VEC2_BERT))
    assert isinstance(config.encoder_config, Wav2Vec2BertConfig)
    assert config.inputs_to_logits_ratio == 640  # 10 ms hop x stride 2 x adapter stride 2
    assert config.hidden_size == 32


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("alignment", "kl", "alignment must be one of"),
        ("tot_lambda1", -1.0, "tot_lambda1 must be a finite float >= 0"),
        ("tot_lambda2", 0.0, "tot_lambda2 must be a finite float > 0"),
        ("tot_lambda2", float("nan"), "tot_lambda2"),
        ("tot_sigma", 0.0, "tot_sigma must be None"),
        ("tot_sigma", "wide", "tot_sigma"),
        ("uot_tau", 0.0, "uot_tau must be a finite float > 0"),
        ("uot_tau", None, "uot_tau"),
        ("gmot_alpha", 1.5, r"gmot_alpha must be in \[0, 1\]"),
        ("gmot_alpha", float("nan"), "gmot_alpha"),
        ("gmot_max_outer", 0, "gmot_max_outer must be an int >= 1"),
        ("tot_max_iter", 0, "tot_max_iter must be an int >= 1"),
        ("tot_tol", -1e-3, "tot_tol"),
        ("tot_grad", "implicit", "tot_grad must be one of"),
        ("vocab_size", 1, "vocab_size must be an int >= 2"),
        ("pad_token_id", 40, "pad_token_id must be an int in"),
        ("ctc_loss_reduction", "none", "ctc_loss_reduction"),
        ("ot_loss_weight", -0.5, "ot_loss_weight"),
        ("align_loss_weight", float("inf"), "align_loss_weight"),
        ("adapter_num_layers", 0, "adapter_num_layers"),
        ("ctc_input", "teacher", r"ctc_input must be one of \('encoder', 'adapter'\), got 'teacher'"),
        ("adapter_type", "conv", r"adapter_type must be one of \('mlp', 'linear'\), got 'conv'"),
        ("adapter_dropout", 1.0, "adapter_dropout must be in"),
        ("teacher_target", "logits", r"teacher_target must be one of \('states', 'masked_states'\), got 'logits'"),
        ("kd_loss_weight", -0.1, "kd_loss_weight must be a finite float >= 0"),
        ("kd_top_k", 0, "kd_top_k must be an int >= 1"),
        ("teacher_hidden_size", 0, "teacher_hidden_size"),
        ("encoder_config", {"hidden_size": 8}, "model_type"),
        ("encoder_config", {"model_type": "bert"}, "encoder_config.model_type must be one of"),
    ],
)
def test_invalid_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        TOTCAKTConfig(**{field: value})


def test_configs_compare_by_their_values():
    assert TOTCAKTConfig(vocab_size=10) != TOTCAKTConfig(vocab_size=20)
    assert TOTCAKTConfig(tot_lambda2=0.2) != TOTCAKTConfig(tot_lambda2=0.3)
    assert TOTCAKTConfig(encoder_config={"model_type": "hubert"}) != TOTCAKTConfig()
    assert TOTCAKTConfig(vocab_size=10) == TOTCAKTConfig(vocab_size=10)


@pytest.mark.parametrize("encoder, field", [(None, "hidden_size"), (TINY_WAV2VEC2_BERT, "output_hidden_size")])
def test_hidden_size_can_be_passed_and_lives_in_the_encoder_config(encoder, field, tmp_path):
    encoder = dict(encoder or {"model_type": "wav2vec2", "num_attention_heads": 2})
    config = TOTCAKTConfig(encoder_config=encoder, hidden_size=64)
    assert config.hidden_size == 64 and getattr(config.encoder_config, field) == 64
    config.hidden_size = 48
    assert getattr(config.encoder_config, field) == 48
    config.save_pretrained(tmp_path)
    # Written as a key, as transformers' configurations write it, and read back into the encoder configuration.
    assert json.loads((tmp_path / "config.json").read_text())["hidden_size"] == 48
    loaded = TOTCAKTConfig.from_pretrained(tmp_path)
    assert loaded.hidden_size == 48 and getattr(loaded.encoder_config, field) == 48


def test_ctc_input_and_adapter_type_default_to_the_encoder_and_the_mlp_and_round_trip(tmp_path):
    config = TOTCAKTConfig()
    assert (config.ctc_input, config.adapter_type) == ("encoder", "mlp")
    assert config.has_adapter and config.ctc_input_size == config.hidden_size == 768
    TOTCAKTConfig(
        alignment="none", ctc_input="adapter", adapter_type="linear", teacher_hidden_size=24
    ).save_pretrained(tmp_path)
    loaded = TOTCAKTConfig.from_pretrained(tmp_path)
    assert (loaded.ctc_input, loaded.adapter_type) == ("adapter", "linear")
    # The CTC-only baseline has no adapter unless its head reads one; the head then reads the teacher's size.
    assert loaded.has_adapter and loaded.ctc_input_size == 24
    assert not TOTCAKTConfig(alignment="none").has_adapter


def test_teacher_layer_defaults_to_the_last_and_round_trips(tmp_path):
    assert TOTCAKTConfig().teacher_layer == -1
    TOTCAKTConfig(teacher_layer=2).save_pretrained(tmp_path)
    assert TOTCAKTConfig.from_pretrained(tmp_path).teacher_layer == 2
    with pytest.raises(ValueError, match="teacher_layer must be an int"):
        TOTCAKTConfig(teacher_layer=1.5)


def test_grad_modes_are_the_solvers():
    from modeling_tot_cakt import configuration_tot_cakt, tot

    assert configuration_tot_cakt.GRAD_MODES is tot.GRAD_MODES


@pytest.mark.parametrize(
    "alignment, ordered, unbalanced, graph, own_fields",
    [
        ("tot", True, False, False, {"tot_lambda1", "tot_sigma"}),
        ("ot", False, False, False, set()),
        ("uot", False, True, False, {"uot_tau"}),
        ("tot_uot", True, True, False, {"tot_lambda1", "tot_sigma", "uot_tau"}),
        ("gmot", False, False, True, {"gmot_alpha", "gmot_max_outer"}),
        ("tot_gmot", True, False, True, {"tot_lambda1", "tot_sigma", "gmot_alpha", "gmot_max_outer"}),
    ],
)
def test_the_configuration_says_what_each_alignment_is_and_which_fields_it_reads(
    alignment, ordered, unbalanced, graph, own_fields
):
    config = TOTCAKTConfig(alignment=alignment)
    kinds = (config.alignment_is_ordered, config.alignment_is_unbalanced, config.alignment_is_graph_matching)
    assert kinds == (ordered, unbalanced, graph)
    shared = {"tot_lambda2", "tot_max_iter", "tot_tol", "tot_grad", "ot_loss_weight", "align_loss_weight"}
    shared |= {"kd_loss_weight", "kd_top_k", "teacher_target", "align_layer"}  # what is aligned, distilled
    assert set(config.alignment_fields) == shared | own_fields


def test_the_ctc_only_baseline_reads_no_alignment_field():
    config = TOTCAKTConfig(alignment="none")
    assert not (config.alignment_is_ordered or config.alignment_is_unbalanced or config.alignment_is_graph_matching)
    assert config.alignment_fields == ()
    assert alignment_modes_reading("uot_tau") == ("uot", "tot_uot")
    assert alignment_modes_reading("tot_sigma") == ("tot", "tot_uot", "tot_gmot")
    assert alignment_modes_reading("tot_lambda2") == ("tot", "ot", "uot", "tot_uot", "gmot", "tot_gmot")
