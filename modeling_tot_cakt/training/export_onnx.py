"""Export a saved TOT-CAKT CTC model to ONNX for onnxruntime, in float32 and, optionally, dynamic int8.

The exported graph is the inference model only (encoder + CTC head; no teacher, no alignment head): inputs
``input_values`` (raw waveform, ``(batch, samples)``) or ``input_features`` (stacked log-mel frames, ``(batch,
frames, feature_projection_input_dim)``) and ``attention_mask``, both with dynamic batch and time axes; outputs
``logits`` ``(batch, frames, vocab)`` and ``frame_lengths`` ``(batch,)``, the number of valid output frames of
each clip, so that padding frames of a batch can be cut off without the model's code.

1. :func:`export_onnx` traces the model with ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` then
   onnxscript). The older TorchScript exporter is not used: it records the frame counts derived from the
   attention mask of the example batch as constants, so another batch gets wrong logits (measured up to 0.2
   off on the tiny models). The encoder runs with transformers' eager attention while it is traced: with
   SDPA, Wav2Vec2-BERT's relative position bias leaves a reshape that ``torch.export`` records as a view,
   which its ONNX decomposition then rejects. Eager attention computes the same function with plain matrix
   products and a softmax.
2. :func:`check_export` runs the file with onnxruntime on a padded batch and compares it with the torch model.
3. :func:`quantize_int8` quantises it with onnxruntime's dynamic quantisation (``quantize_dynamic``: int8
   weights of MatMul/Gemm, activations quantised per call; convolutions stay float32). onnxruntime's, not torch's:
   the int8 model then runs where the float one does, and torch's quantised tensors are deprecated.
4. :func:`save_onnx_folder` writes ``model.onnx`` (and ``model_int8.onnx``) with the configuration and the
   processor, so that ``AutoProcessor.from_pretrained`` on the folder gives the features and the decoder.

Command line::

    python -m modeling_tot_cakt.training.export_onnx --model outputs/model --out outputs/model-onnx --int8
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

ONNX_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
OUTPUT_NAMES = ("logits", "frame_lengths")
# Largest |difference| of float32 logits between onnxruntime and torch that check_export accepts: both compute
# in float32, in a different order of operations (measured below 1e-6 on the tiny test models).
FLOAT_TOLERANCE = 1e-4
SAMPLING_RATE = 16000


class CTCInferenceGraph(torch.nn.Module):
    """What the ONNX file computes: the model's CTC logits and each clip's number of valid output frames."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(inputs, attention_mask=attention_mask).logits
        return logits, self.model.frame_mask(logits.shape[1], attention_mask).sum(-1)


def example_inputs(model, seconds: Sequence[float] = (1.0, 0.6), seed: int = 0) -> dict[str, torch.Tensor]:
    """
    A padded batch of noise clips of `seconds` shaped as the model's processor gives them (raw waveform, or
    log-mel frames of 10 ms stacked by `feature_projection_input_dim / 80`): ``{main_input_name, "attention_mask"}``.
    """
    generator = torch.Generator().manual_seed(seed)
    encoder_config = model.config.encoder_config
    if model.main_input_name == "input_features":
        width = encoder_config.feature_projection_input_dim
        lengths = [max(2, round(100 * s / (width // 80))) for s in seconds]
        shape = (len(seconds), max(lengths), width)
    else:
        lengths = [round(SAMPLING_RATE * s) for s in seconds]
        shape = (len(seconds), max(lengths))
    attention_mask = (torch.arange(shape[1])[None, :] < torch.tensor(lengths)[:, None]).long()
    inputs = torch.randn(shape, generator=generator)
    inputs = inputs * attention_mask.view(*attention_mask.shape, *([1] * (len(shape) - 2)))
    return {model.main_input_name: inputs, "attention_mask": attention_mask}


def export_onnx(model, path: str | os.PathLike, inputs: dict[str, torch.Tensor] | None = None) -> Path:
    """
    Write `model`'s inference graph ([`CTCInferenceGraph`]) to the ONNX file `path`, traced on `inputs` (default
    [`example_inputs`]) with dynamic batch and time axes. The model is put in eval mode; its encoder's attention
    implementation is restored afterwards.
    """
    model.eval()
    inputs = example_inputs(model) if inputs is None else inputs
    name = model.main_input_name
    batch, time = torch.export.Dim("batch"), torch.export.Dim("time")
    dynamic_shapes = ({0: batch, 1: time}, {0: batch, 1: time})  # the input and its mask
    attention = model.encoder.config._attn_implementation
    model.encoder.set_attn_implementation("eager")  # see the module docstring
    try:
        program = torch.onnx.export(
            CTCInferenceGraph(model),
            (inputs[name], inputs["attention_mask"]),
            input_names=[name, "attention_mask"],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=dynamic_shapes,
            dynamo=True,
            verbose=False,
        )
    finally:
        model.encoder.set_attn_implementation(attention)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(path)
    return path


def quantize_int8(onnx_path: str | os.PathLike, int8_path: str | os.PathLike) -> Path:
    """Dynamic int8 quantisation of the ONNX file `onnx_path` (onnxruntime's ``quantize_dynamic``) to `int8_path`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Matrix products only: onnxruntime's ConvInteger is slower than its float convolution (measured on a
    # wav2vec2-base export, 1 thread: quantising the convolutions too made the model slower than float32).
    quantize_dynamic(onnx_path, int8_path, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    return Path(int8_path)


def inference_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session on `path`, with `threads` intra-op threads (onnxruntime's default if None)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, inputs: dict) -> tuple[np.ndarray, np.ndarray]:
    """
    `(logits, frame_lengths)` of an exported model for the processor's output `inputs` (numpy arrays or torch
    tensors; ``attention_mask`` is required), each input cast to the type the graph declares.
    """
    feeds = {}
    for declared in session.get_inputs():
        if declared.name not in inputs:
            raise ValueError(
                f"The ONNX model takes {declared.name!r}, missing from the inputs ({', '.join(inputs)}): pass the "
                "processor's output with return_attention_mask=True."
            )
        value = inputs[declared.name]
        value = value.numpy(force=True) if isinstance(value, torch.Tensor) else np.asarray(value)
        feeds[declared.name] = value.astype(np.int64 if "int64" in declared.type else np.float32, copy=False)
    logits, frame_lengths = session.run(list(OUTPUT_NAMES), feeds)
    return logits, frame_lengths


def check_export(model, session, inputs: dict[str, torch.Tensor], tolerance: float = FLOAT_TOLERANCE) -> float:
    """
    The largest |difference| between the logits of `session` (an exported `model`) and of `model` on the valid
    frames of `inputs`; raises ValueError if it exceeds `tolerance` or if the frame counts differ.
    """
    with torch.no_grad():
        expected = model(**inputs).logits
    lengths = model.frame_mask(expected.shape[1], inputs["attention_mask"]).sum(-1).tolist()
    logits, frame_lengths = run_onnx(session, inputs)
    if frame_lengths.tolist() != lengths or logits.shape != tuple(expected.shape):
        raise ValueError(
            f"The ONNX model gives {logits.shape} logits with {frame_lengths.tolist()} valid frames, torch "
            f"{tuple(expected.shape)} with {lengths}: the export is broken; report it with the model's config.json."
        )
    difference = max(
        float(np.abs(logits[i, :n] - expected[i, :n].numpy()).max(initial=0.0)) for i, n in enumerate(lengths)
    )
    if difference > tolerance:
        raise ValueError(
            f"The ONNX model's logits differ from torch's by up to {difference:.3g} (tolerance {tolerance:g}) on "
            "valid frames: the export is wrong; report it with the model's config.json."
        )
    return difference


def save_onnx_folder(model_dir: str | os.PathLike, out_dir: str | os.PathLike, int8: bool = False) -> dict:
    """
    Export the model saved in `model_dir` to `out_dir`: ``model.onnx`` (checked against torch with
    [`check_export`]), with `int8` also ``model_int8.onnx``, and the configuration and the processor (feature
    extractor, tokenizer, and the language model if the folder has one). Returns a summary (file sizes, the
    float model's measured difference to torch).
    """
    from transformers import AutoProcessor

    from ..modeling_tot_cakt import TOTCAKTForCTC

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} has no config.json: --model takes a saved TOT-CAKT model folder (train_hf.py's output)."
        )
    model = TOTCAKTForCTC.from_pretrained(model_dir).eval()
    onnx_path = export_onnx(model, out_dir / ONNX_FILE)
    difference = check_export(model, inference_session(onnx_path), example_inputs(model, seconds=(0.8, 1.5)))
    model.config.save_pretrained(out_dir)
    AutoProcessor.from_pretrained(model_dir).save_pretrained(out_dir)
    summary = {"onnx": str(onnx_path), "bytes": onnx_path.stat().st_size, "max_abs_diff_to_torch": difference}
    if int8:
        int8_path = quantize_int8(onnx_path, out_dir / INT8_FILE)
        summary.update(int8=str(int8_path), int8_bytes=int8_path.stat().st_size)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A saved TOT-CAKT model folder (train_hf.py's output).")
    parser.add_argument("--out", required=True, help="The folder to write model.onnx and the processor files to.")
    parser.add_argument("--int8", action="store_true", help="Also write model_int8.onnx (dynamic int8).")
    args = parser.parse_args(argv)
    print(json.dumps(save_onnx_folder(args.model, args.out, int8=args.int8), indent=2))


if __name__ == "__main__":
    main()
