"""ONNX export and dynamic int8 quantisation of the CTC model, run with onnxruntime against torch.

Tolerances (measured on the tiny models, logits of magnitude about 5 on a padded batch of 0.4 / 0.7 / 1 s):
- float: onnxruntime and torch both compute in float32, in another order; they differ by at most 4.8e-7 on valid
  frames for every encoder. The test allows 1e-4 (`FLOAT_TOLERANCE`), far below what a wrong graph gives: an
  export that ignores the attention mask is 0.041-0.051 off.
- int8: weights of MatMul/Gemm rounded to 8 bits, activations quantised per call (convolutions float): 0.0054-0.0068
  off, the arg-max symbol the same on 99.3-100 % of valid frames. The test allows 0.02 and 97 %. (Quantising the
  convolutions too gave 0.010-0.024 and 98.1-99.8 %.)
"""

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoProcessor

from modeling_tot_cakt import TOTCAKTForCTC
from modeling_tot_cakt.training import export_onnx
from modeling_tot_cakt.training.export_onnx import (
    FLOAT_TOLERANCE,
    INT8_FILE,
    ONNX_FILE,
    CTCInferenceGraph,
    check_export,
    example_inputs,
    inference_session,
    quantize_int8,
    run_onnx,
    save_onnx_folder,
)
from modeling_tot_cakt.training.language_model import greedy_transcripts
from tests.tiny_models import (
    TINY_HUBERT,
    TINY_WAV2VEC2,
    TINY_WAV2VEC2_BERT,
    TINY_WAVLM,
    make_model,
    save_emitting_model,
)

ENCODERS = {
    "wav2vec2": TINY_WAV2VEC2,
    "wav2vec2 group norm": {**TINY_WAV2VEC2, "feat_extract_norm": "group"},
    "hubert": TINY_HUBERT,
    "wavlm": TINY_WAVLM,
    "w2v-bert": TINY_WAV2VEC2_BERT,
}
INT8_TOLERANCE = 0.02
INT8_ARGMAX_AGREEMENT = 0.97
CLIP_SECONDS = (0.7, 1.3, 0.45)  # not the lengths the export traced


def chirp(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * (200 + 300 * seed + 300 * t) * t) + 0.01 * rng.standard_normal(t.shape)).astype(
        np.float32
    )


def padded_batch(processor, clips) -> dict:
    """Each clip featurised alone, then padded together (as the training collator and `feature_logits` do)."""
    extractor = processor.feature_extractor
    name = extractor.model_input_names[0]
    features = [extractor(clip, sampling_rate=16000)[name][0] for clip in clips]
    return extractor.pad([{name: f} for f in features], return_tensors="pt", return_attention_mask=True)


def valid_logits(logits, lengths) -> list[np.ndarray]:
    return [np.asarray(utterance[:n]) for utterance, n in zip(logits, lengths)]


@pytest.fixture(scope="module", params=list(ENCODERS))
def exported(request, tmp_path_factory):
    """A saved tiny model of each encoder family that emits characters, its processor, float and int8 sessions."""
    directory = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model = make_model(ENCODERS[request.param])
    processor, _ = save_emitting_model(model, directory)
    model.eval()
    onnx_path = export_onnx.export_onnx(model, directory / ONNX_FILE)
    int8_path = quantize_int8(onnx_path, directory / INT8_FILE)
    return model, processor, inference_session(onnx_path), inference_session(int8_path), int8_path


def torch_reference(model, inputs):
    with torch.no_grad():
        logits = model(**inputs).logits
    lengths = model.frame_mask(logits.shape[1], inputs["attention_mask"]).sum(-1).tolist()
    return valid_logits(logits.numpy(), lengths), lengths


def test_onnx_matches_torch_on_a_padded_batch(exported):
    """Three clips of other lengths than the traced ones, padded: the same frame counts, logits within 1e-4 on
    valid frames, the same greedy transcripts (which are not empty); batch 1 too."""
    model, processor, session, _, _ = exported
    inputs = padded_batch(processor, [chirp(s, seed) for seed, s in enumerate(CLIP_SECONDS)])
    expected, lengths = torch_reference(model, inputs)
    logits, frame_lengths = run_onnx(session, inputs)
    assert frame_lengths.tolist() == lengths
    assert len(set(lengths)) == 3
    ours = valid_logits(logits, frame_lengths)
    for got, want in zip(ours, expected):
        np.testing.assert_allclose(got, want, atol=FLOAT_TOLERANCE, rtol=0)
    transcripts = greedy_transcripts(processor.tokenizer, ours)
    assert transcripts == greedy_transcripts(processor.tokenizer, expected)
    assert all(transcripts)
    single = padded_batch(processor, [chirp(0.9, 7)])
    np.testing.assert_allclose(
        run_onnx(session, single)[0][0], torch_reference(model, single)[0][0], atol=FLOAT_TOLERANCE, rtol=0
    )


def test_onnx_reads_the_attention_mask(exported):
    """A clip's logits are the same alone and padded in a batch with a longer one: the export reads the mask."""
    _, processor, session, _, _ = exported
    short, long = chirp(0.5, 1), chirp(1.2, 2)
    alone, (n,) = run_onnx(session, padded_batch(processor, [short]))
    batched, lengths = run_onnx(session, padded_batch(processor, [long, short]))
    assert lengths[1] == n < lengths[0]
    np.testing.assert_allclose(batched[1, :n], alone[0], atol=FLOAT_TOLERANCE, rtol=0)


def test_int8_stays_close_to_the_float_model(exported):
    """Dynamic int8: the file's weight matrices are int8 (MatMulInteger, no float MatMul on a stored weight left),
    its convolutions float;
    logits within 0.02 of torch's on valid frames and the same arg-max symbol on at least 97 % of them."""
    model, processor, _, int8_session, int8_path = exported
    graph = onnx.load(int8_path).graph
    weights = {initializer.name for initializer in graph.initializer}
    assert any(node.op_type == "MatMulInteger" for node in graph.node)
    assert not [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    assert not [n.name for n in graph.node if n.op_type == "ConvInteger"]  # slower than float: see export_onnx
    inputs = padded_batch(processor, [chirp(s, seed) for seed, s in enumerate(CLIP_SECONDS)])
    expected, _ = torch_reference(model, inputs)
    logits, frame_lengths = run_onnx(int8_session, inputs)
    ours = valid_logits(logits, frame_lengths)
    assert max(np.abs(got - want).max() for got, want in zip(ours, expected)) <= INT8_TOLERANCE
    agreement = np.mean(np.concatenate([got.argmax(-1) == want.argmax(-1) for got, want in zip(ours, expected)]))
    assert agreement >= INT8_ARGMAX_AGREEMENT


def test_export_folder_command(tmp_path):
    """`python -m ...export_onnx --model DIR --out DIR --int8`: model.onnx, model_int8.onnx, the configuration and
    a processor that loads from the folder and whose features give the torch model's transcript through ONNX."""
    torch.manual_seed(1)
    _, folder = save_emitting_model(make_model(TINY_WAV2VEC2_BERT), tmp_path)
    out = tmp_path / "onnx"
    export_onnx.main(["--model", str(folder), "--out", str(out), "--int8"])
    assert {ONNX_FILE, INT8_FILE, "config.json", "vocab.json", "processor_config.json"} <= {
        p.name for p in out.iterdir()
    }
    processor = AutoProcessor.from_pretrained(out)
    model = TOTCAKTForCTC.from_pretrained(folder).eval()
    inputs = padded_batch(processor, [chirp(1.1, 3)])
    expected, _ = torch_reference(model, inputs)
    logits, lengths = run_onnx(inference_session(out / ONNX_FILE), inputs)
    assert greedy_transcripts(processor.tokenizer, valid_logits(logits, lengths)) == greedy_transcripts(
        processor.tokenizer, expected
    )


def test_a_graph_that_is_not_the_model_and_bad_input_are_named(tmp_path):
    """check_export names an export that ignores the attention mask, with the measured difference; inputs without
    the attention mask and a folder without a model get messages that say what to pass."""

    class IgnoresMask(CTCInferenceGraph):
        def forward(self, inputs, attention_mask):
            logits = self.model(inputs).logits
            return logits, self.model.frame_mask(logits.shape[1], attention_mask).sum(-1)

    torch.manual_seed(0)
    model = make_model(TINY_WAV2VEC2).eval()
    original = export_onnx.CTCInferenceGraph
    export_onnx.CTCInferenceGraph = IgnoresMask
    try:
        session = inference_session(export_onnx.export_onnx(model, tmp_path / ONNX_FILE))
    finally:
        export_onnx.CTCInferenceGraph = original
    with pytest.raises(ValueError, match=r"differ from torch's by up to 0\.0\d+ \(tolerance 0\.0001\)"):
        check_export(model, session, example_inputs(model, seconds=(0.8, 1.5)))
    with pytest.raises(
        ValueError, match="takes 'attention_mask', missing from the inputs.*return_attention_mask=True"
    ):
        run_onnx(session, {"input_values": np.zeros((1, 8000), np.float32)})
    with pytest.raises(FileNotFoundError, match="has no config.json: --model takes a saved TOT-CAKT model folder"):
        save_onnx_folder(tmp_path, tmp_path / "out")
