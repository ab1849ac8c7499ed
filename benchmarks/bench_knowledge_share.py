#!/usr/bin/env python
"""What measuring the knowledge share costs a training step, where it is measured.

The Trainer logs, at logging steps, the norm of the gradient that each weighted loss term puts on the encoder
and ``knowledge_share = ||grad (w_ot L_ot + w_align L_align + w_kd L_kd)|| / ||grad w_ctc L_ctc||``. Two places
to take the gradient, timed here on one training step (forward and backward) of the knowledge preset's model
shapes (its 4 x 144 Wav2Vec2-BERT encoder read from ``demo_knowledge.yaml``, 120 ms frames, the MLP adapter of
width 256 into a 128-wide teacher, 1,768 CTC symbols, 16 utterances of 2-3 s with 6-10 tokens, the default loss
weights, precomputed teacher features):

- ``plain``            the step without any measurement;
- ``encoder output``   the model's own measurement (``output_loss_gradient_norms=True``): one
  ``torch.autograd.grad`` per loss term on the encoder's output states, through the heads and the adapter only;
- ``encoder weights``  the alternative: one ``torch.autograd.grad`` per loss term on all the encoder's
  parameters, i.e. a backward pass through the whole encoder per term.

Weights and inputs are random (the cost depends on the shapes; the Sinkhorn solve on the features, so both
contenders see the same batch); the shares both measurements give on it are reported too, for orientation only.
Timing follows ``benchmarks/common.py`` (warm-up, interleaved rounds, median).

    OMP_NUM_THREADS=1 python benchmarks/bench_knowledge_share.py --repeats 20
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from benchmarks.common import environment, round_robin, summary
from modeling_tot_cakt import TOTCAKTConfig, TOTCAKTForCTC

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "modeling_tot_cakt" / "demo" / "recipes" / "demo_knowledge.yaml"
TERMS = ("ctc", "ot", "align")


def knowledge_model(vocab_size: int = 1768, teacher_hidden: int = 128) -> TOTCAKTForCTC:
    """The knowledge preset's fine-tuned model, randomly initialised."""
    recipe = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    encoder = json.loads(recipe["encoder"]["train"]["encoder_config"])
    config = TOTCAKTConfig(
        encoder_config=encoder,
        vocab_size=vocab_size,
        teacher_hidden_size=teacher_hidden,
        adapter_hidden_size=recipe["train"]["adapter_hidden_size"],
    )
    return TOTCAKTForCTC(config).train()


def random_batch(model: TOTCAKTForCTC, batch: int = 16, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    frames = torch.randint(17, 26, (batch,), generator=generator)  # 2-3 s at 120 ms
    tokens = torch.randint(6, 11, (batch,), generator=generator)
    width = model.config.encoder_config.feature_projection_input_dim
    features = torch.randn(batch, int(frames.max()), width, generator=generator)
    attention_mask = (torch.arange(int(frames.max()))[None] < frames[:, None]).long()
    token_mask = torch.arange(int(tokens.max()))[None] < tokens[:, None]
    labels = torch.randint(3, model.config.vocab_size, token_mask.shape, generator=generator).masked_fill(
        ~token_mask, -100
    )
    return dict(
        input_features=features,
        attention_mask=attention_mask,
        labels=labels,
        teacher_hidden_states=torch.randn(batch, int(tokens.max()), model.config.teacher_hidden_size),
        teacher_token_mask=token_mask,
    )


def share_on_encoder_weights(model: TOTCAKTForCTC, output) -> dict:
    """The same norms and share with the gradient taken on all the encoder's parameters."""
    parameters = [parameter for parameter in model.encoder.parameters() if parameter.requires_grad]
    gradients = {}
    for name in TERMS:
        term = getattr(model.config, f"{name}_loss_weight") * getattr(output, f"{name}_loss")
        grads = torch.autograd.grad(term, parameters, retain_graph=True, allow_unused=True)
        gradients[name] = torch.cat(
            [g.flatten() if g is not None else p.new_zeros(p.numel()) for g, p in zip(grads, parameters)]
        )
    norms = {f"grad_norm_{name}": float(g.norm()) for name, g in gradients.items()}
    norms["knowledge_share"] = float((gradients["ot"] + gradients["align"]).norm() / gradients["ctc"].norm())
    return norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None, help="Write the results as JSON here.")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = knowledge_model()
    batch = random_batch(model)
    device = torch.device("cpu")

    def plain():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()

    def encoder_output():
        model.zero_grad(set_to_none=True)
        output = model(**batch, output_loss_gradient_norms=True)
        output.loss.backward()
        return {
            name: float(getattr(output, name))
            for name in ("grad_norm_ctc", "grad_norm_ot", "grad_norm_align", "knowledge_share")
        }

    def encoder_weights():
        model.zero_grad(set_to_none=True)
        output = model(**batch)
        norms = share_on_encoder_weights(model, output)
        output.loss.backward()
        return norms

    calls = {"plain": plain, "encoder output": encoder_output, "encoder weights": encoder_weights}
    timings = round_robin(calls, args.repeats, device, measure_memory=False)
    results = {name: summary(timings.wall[name]) | {"cpu": summary(timings.cpu[name])} for name in calls}
    base = results["plain"]["cpu"]["median_s"]
    for name in calls:
        results[name]["cpu_ratio_to_plain"] = results[name]["cpu"]["median_s"] / base
    results["encoder output"]["norms"] = timings.results["encoder output"]
    results["encoder weights"]["norms"] = timings.results["encoder weights"]
    for name, result in results.items():
        norms = result.get("norms", {})
        share = f", knowledge_share {norms['knowledge_share']:.4f}" if norms else ""
        print(
            f"{name:16s} median {result['median_s'] * 1e3:7.1f} ms wall, {result['cpu']['median_s'] * 1e3:7.1f} ms CPU "
            f"({result['cpu_ratio_to_plain']:.3f} x plain){share}"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        meta = environment(device, torch.get_num_threads()) | {"repeats": args.repeats}
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
