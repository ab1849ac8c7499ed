"""transformers' own common model and configuration tests (`ModelTesterMixin`, `ConfigTester`, from the
sdist of the installed transformers version; see `transformers_common`), run on `TOTCAKTModel` and
`TOTCAKTForCTC` over a tiny wav2vec2 and a tiny Wav2Vec2-BERT encoder, with the CTC head on the encoder's frames
and (over wav2vec2) on the adapted features.

Every skip mirrors one of transformers' own `Wav2Vec2ModelTest` / `Wav2Vec2BertModelTest` skips, with its
reason; export and fullgraph compilation, which the sdist's common tests do not cover, are tested here.
"""

from __future__ import annotations

import math
import unittest

import pytest
import torch
from tiny_models import TINY_WAV2VEC2, TINY_WAV2VEC2_BERT
from transformers_common import import_common_tests

from modeling_tot_cakt import TOTCAKTConfig, TOTCAKTForCTC, TOTCAKTModel

modeling_common, configuration_common = import_common_tests()
ModelTesterMixin, ConfigTester = modeling_common.ModelTesterMixin, configuration_common.ConfigTester
floats_tensor, random_attention_mask = modeling_common.floats_tensor, modeling_common.random_attention_mask

TEACHER_HIDDEN = 24


class TOTCAKTModelTester:
    """Configurations and inputs for the common tests, as transformers' `Wav2Vec2ModelTester` makes them."""

    def __init__(self, parent, encoder: dict, batch_size: int = 3, seq_length: int = 1024, **config_kwargs):
        self.parent = parent
        self.encoder = dict(encoder)
        self.config_kwargs = config_kwargs
        self.batch_size = batch_size
        self.is_training = False
        self.hidden_size = encoder["hidden_size"]
        self.num_hidden_layers = encoder["num_hidden_layers"]
        self.num_attention_heads = encoder["num_attention_heads"]
        self.vocab_size = 15
        self.log_mel = encoder["model_type"] == "wav2vec2-bert"
        if self.log_mel:  # frames of stacked log-mel features; the encoder halves the rate twice
            self.seq_length = seq_length // 16
            self.encoder_seq_length = self.seq_length
        else:
            self.seq_length = seq_length
            frames = seq_length
            for kernel, stride in zip(encoder["conv_kernel"], encoder["conv_stride"]):
                frames = (frames - (kernel - 1)) / stride
            self.encoder_seq_length = int(math.ceil(frames))

    def get_config(self) -> TOTCAKTConfig:
        return TOTCAKTConfig(
            encoder_config=dict(self.encoder),
            vocab_size=self.vocab_size,
            teacher_name_or_path="tiny-teacher",
            teacher_hidden_size=TEACHER_HIDDEN,
            adapter_hidden_size=16,
            **self.config_kwargs,
        )

    def prepare_config_and_inputs(self):
        if self.log_mel:
            inputs = floats_tensor([self.batch_size, self.seq_length, self.encoder["feature_projection_input_dim"]])
        else:
            inputs = floats_tensor([self.batch_size, self.seq_length], scale=1.0)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), inputs, attention_mask

    def prepare_config_and_inputs_for_common(self):
        config, inputs, attention_mask = self.prepare_config_and_inputs()
        name = "input_features" if self.log_mel else "input_values"
        return config, {name: inputs, "attention_mask": attention_mask}


class TOTCAKTCommonTests(ModelTesterMixin):
    """
    The common tests, with exactly the skips of transformers' own `Wav2Vec2ModelTest`
    (`tests/models/wav2vec2/test_modeling_wav2vec2.py`) and `Wav2Vec2BertModelTest`, which skip the same five
    tests for the same reasons (the input is audio, not token ids; there are no token embeddings; no
    feed-forward chunking). The stock tests' overrides of `test_retain_grad_hidden_states_attentions` and
    `test_initialization` are not needed: the common versions pass as they are. The remaining skips come
    from the common tests themselves (GPU, Flash Attention, DeepSpeed, MoE, RoPE, training testers, ...):
    run through this same tester, the stock `Wav2Vec2ForCTC`/`Wav2Vec2Model` and `Wav2Vec2BertForCTC`/
    `Wav2Vec2BertModel` skip them too, and also the composite-configuration tests that run here.
    """

    all_model_classes = (TOTCAKTForCTC, TOTCAKTModel)
    _is_composite = True  # the encoder has its own sub-configuration (`encoder_config`)
    encoder: dict = {}
    config_kwargs: dict = {}

    def setUp(self):
        self.model_tester = TOTCAKTModelTester(self, self.encoder, **self.config_kwargs)
        # transformers' own call, as in `Wav2Vec2ModelTest`: `hidden_size` must round-trip as a key of the JSON.
        self.config_tester = ConfigTester(self, config_class=TOTCAKTConfig, hidden_size=37)

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="Model has no input_embeds")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="Model has input_values instead of input_ids")
    def test_forward_signature(self):
        pass

    @unittest.skip(reason="Model has no token embeddings")
    def test_resize_tokens_embeddings(self):
        pass

    @unittest.skip(reason="Model has no input_embeds")
    def test_model_get_set_embeddings(self):
        pass

    @unittest.skip(reason="Feed forward chunking is not implemented")
    def test_feed_forward_chunking(self):
        pass


class TOTCAKTWav2Vec2ConformanceTest(TOTCAKTCommonTests, unittest.TestCase):
    encoder = TINY_WAV2VEC2


class TOTCAKTWav2Vec2BertConformanceTest(TOTCAKTCommonTests, unittest.TestCase):
    encoder = TINY_WAV2VEC2_BERT


class TOTCAKTAdapterHeadConformanceTest(TOTCAKTCommonTests, unittest.TestCase):
    """The CTC head on the adapted features, the adapter then being part of the saved model."""

    encoder = TINY_WAV2VEC2
    config_kwargs = {"ctc_input": "adapter"}


@pytest.mark.parametrize(
    "encoder, shape, config_kwargs",
    [
        (TINY_WAV2VEC2, (2, 4000), {}),
        (TINY_WAV2VEC2_BERT, (2, 40, 160), {}),
        (TINY_WAV2VEC2, (2, 4000), {"ctc_input": "adapter"}),
    ],
    ids=["wav2vec2", "w2v-bert", "adapter-head"],
)
def test_export_and_fullgraph_compile_match_eager(encoder, shape, config_kwargs):
    """Inference traces as one graph, as for the stock models: no graph break under `torch.compile`, and
    `torch.compile(fullgraph=True)` and `torch.export` give the eager logits. (The `"eager"` compile backend:
    graph capture, where data-dependent branches fail, is what is tested, not code generation.)"""
    torch.manual_seed(0)
    model = TOTCAKTForCTC(TOTCAKTModelTester(None, encoder, **config_kwargs).get_config()).eval()
    attention_mask = torch.ones(shape[:2], dtype=torch.long)
    attention_mask[1, shape[1] // 2 :] = 0
    inputs = {model.main_input_name: torch.randn(shape), "attention_mask": attention_mask}
    with torch.no_grad():
        expected = model(**inputs).logits
        torch._dynamo.reset()
        assert torch._dynamo.explain(model)(**inputs).graph_break_count == 0
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(**inputs).logits, expected)
        exported = torch.export.export(model, (), kwargs=inputs)
        torch.testing.assert_close(exported.module()(**inputs).logits, expected)
