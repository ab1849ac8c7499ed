#!/usr/bin/env python
"""What the checks for non-finite weights and logits cost.

`from_pretrained` refuses a saved model whose weights hold NaN or infinite values
(`non_finite_weights_problem`, one min/max pass over the weights), and `TOTCAKTForCTC.forward` refuses NaN or
infinite logits at inference (`check_logits`, one reduction and one host sync). For a model of the demo's size
(the `demo_full` recipe's Wav2Vec2-BERT 4 x 144 encoder, 403 symbols) and one of wav2vec2-base's architecture
(12 x 768, 4,336 symbols), this times with the interleaved protocol of `benchmarks/common.py`:

1. `from_pretrained` of the saved model with the weights check and with it replaced by a no-op;
2. the weights check alone on the loaded model;
3. a forward pass on a 5 s clip (batch 1, `torch.inference_mode`) with the logits check and without it.

Usage::

    python benchmarks/bench_finite_checks.py --repeats 15 --out docs/results/finite_checks.json
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import environment, round_robin, write_json  # noqa: E402
from modeling_tot_cakt import TOTCAKTConfig, TOTCAKTForCTC  # noqa: E402
from modeling_tot_cakt import modeling_tot_cakt as modeling  # noqa: E402

DEMO_ENCODER = dict(
    model_type="wav2vec2-bert",
    hidden_size=144,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=576,
    output_hidden_size=144,
    conv_depthwise_kernel_size=15,
    feature_projection_input_dim=960,
    layerdrop=0.0,
)
MODELS = {"demo": (DEMO_ENCODER, 403), "wav2vec2-base": (dict(model_type="wav2vec2"), 4336)}
CLIP_SECONDS = 5


def clip_input(model: TOTCAKTForCTC) -> torch.Tensor:
    """A random input of `CLIP_SECONDS` in the encoder's own form: samples, or stacked 10 ms log-mel frames."""
    generator = torch.Generator().manual_seed(0)
    if model.config.encoder_config.model_type == "wav2vec2-bert":
        width = model.config.encoder_config.feature_projection_input_dim
        return torch.randn(1, CLIP_SECONDS * 100 * 80 // width, width, generator=generator)
    return torch.randn(1, CLIP_SECONDS * 16000, generator=generator)


def bench(name: str, repeats: int, device: torch.device) -> dict:
    encoder, vocab_size = MODELS[name]
    config = TOTCAKTConfig(encoder_config=encoder, vocab_size=vocab_size, alignment="none")
    folder = tempfile.mkdtemp()
    TOTCAKTForCTC(config).save_pretrained(folder)
    check, check_logits = modeling.non_finite_weights_problem, TOTCAKTForCTC.check_logits

    def use_checks(variant: str) -> None:
        modeling.non_finite_weights_problem = check if variant.endswith("with check") else (lambda *args: None)
        TOTCAKTForCTC.check_logits = check_logits if variant.endswith("with check") else (lambda *args: None)

    loads = round_robin(
        {f"load {variant}": lambda: TOTCAKTForCTC.from_pretrained(folder) for variant in ("with check", "without")},
        repeats,
        torch.device("cpu"),
        setup=lambda variant: use_checks(variant),
        measure_memory=False,
    )
    use_checks("with check")
    model = TOTCAKTForCTC.from_pretrained(folder).to(device).eval()
    inputs = clip_input(model).to(device)

    def forward():
        with torch.inference_mode():
            return model(inputs).logits

    forwards = round_robin(
        {f"forward {variant}": forward for variant in ("with check", "without")},
        repeats,
        device,
        setup=lambda variant: use_checks(variant),
        measure_memory=False,
    )
    alone = round_robin(
        {"weights check alone": lambda: check(model, folder, {})}, repeats, device, measure_memory=False
    )
    use_checks("with check")
    wall = {**loads.wall, **forwards.wall, **alone.wall}
    return {
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "median_ms": {key: round(statistics.median(times) * 1000, 2) for key, times in wall.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/results/finite_checks.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {name: bench(name, args.repeats, device) for name in MODELS}
    for name, result in results.items():
        print(f"{name} ({result['parameters'] / 1e6:.1f} M parameters): {result['median_ms']}")
    write_json(args.out, environment(device, args.threads), results)


if __name__ == "__main__":
    main()
