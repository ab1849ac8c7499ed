#!/usr/bin/env python
"""How well TOT and plain-OT couplings find the true frame-character alignment.

The synthetic corpus knows when every character is spoken (``char_times`` in its manifests, from
espeak-ng's synthesis events). For every test utterance and every trained model given, this
computes, on the model's adapted frames against the teacher's token features:

- the TOT coupling (the model's ``tot_lambda1``, ``tot_lambda2``, ``tot_sigma``),
- the plain entropic OT coupling (``lambda1 = 0``, no prior: the OT-CAKT solver),
- the prior-only coupling (TOT with a zero cost: where the temporal prior and order reward alone
  put the mass, i.e. what the features add is the difference to it),
- the uniform coupling (every frame with every character: what knowing nothing scores),

and the expected distance between a character's frames under the coupling and the centre of
its syllable, ``mean_j sum_i T_ij / nu_j |t_i - c_j|`` in seconds
(:func:`modeling_tot_cakt.demo.run_demo.alignment_error_seconds`).

Models: ``--models DIR ...``; by default the quality benchmark's OT-CAKT and TOT-CAKT models of
every seed, or the demo's model (``outputs/demo/quick/model``) where there are none. Writes
``docs/results/alignment.json``, ``docs/results/alignment.png`` (per-utterance errors) and, for the
last TOT-trained model, heat maps of both couplings for the ``--examples`` longest test utterances
(``docs/results/alignment_example_<k>.png``).

    python benchmarks/bench_alignment.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from benchmarks.common import save_figure
from modeling_tot_cakt.demo import run_demo as demo
from modeling_tot_cakt.demo.synthesis import read_manifest
from modeling_tot_cakt.tot import tot_sinkhorn
from modeling_tot_cakt.training.audio import load_audio

ROOT = Path(__file__).resolve().parents[1]
QUALITY_RUNS = ROOT / "outputs" / "bench_quality" / "quality"


def default_models() -> list[Path]:
    """The quality benchmark's OT-CAKT and TOT-CAKT models (every seed), else the demo's model."""
    bench = sorted(QUALITY_RUNS.glob("ot-seed*/model")) + sorted(QUALITY_RUNS.glob("tot-seed*/model"))
    models = bench or [ROOT / "outputs" / "demo" / "quick" / "model"]
    return [path for path in models if (path / "model.safetensors").is_file()]


COUPLINGS = ("tot", "ot", "prior_only", "uniform")


def prior_only_coupling(models: demo.AlignmentModels, frames: int, tokens: int) -> np.ndarray:
    """TOT coupling of a zero cost ``(frames, tokens)``: the temporal prior and order reward alone."""
    config = models.model.config
    coupling = tot_sinkhorn(
        torch.zeros(1, frames, tokens),
        lambda1=config.tot_lambda1,
        lambda2=config.tot_lambda2,
        sigma=config.tot_sigma,
        max_iter=config.tot_max_iter,
        tol=config.tot_tol,
    )
    return coupling[0].numpy()


def measure_model(model_dir: Path, records: list[dict]) -> dict:
    """Alignment errors (seconds) of the three couplings of every record, for one trained model."""
    teacher_dir = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["teacher_name_or_path"]
    models = demo.AlignmentModels(model_dir, teacher_dir)
    rate = models.processor.feature_extractor.sampling_rate
    errors = {name: [] for name in COUPLINGS}
    for record in records:
        couplings = models.couplings(load_audio(record["audio"], rate), record["text"])
        prior = prior_only_coupling(models, *couplings.tot.shape)
        uniform = np.full(couplings.tot.shape, 1.0 / couplings.tot.size)
        for name, coupling in zip(COUPLINGS, (couplings.tot, couplings.plain, prior, uniform)):
            errors[name].append(demo.alignment_error_seconds(coupling, couplings.frame_seconds, record["char_times"]))
    config = models.model.config
    return {
        "model_dir": str(model_dir),
        "trained_alignment": config.alignment,
        "tot_lambda1": config.tot_lambda1,
        "tot_lambda2": config.tot_lambda2,
        "tot_sigma": config.tot_sigma,
        "frame_seconds": models.frame_seconds,
        "utterances": len(records),
        "mean_error_seconds": {name: float(np.mean(values)) for name, values in errors.items()},
        "median_error_seconds": {name: float(np.median(values)) for name, values in errors.items()},
        "tot_better_than_ot_fraction": float(np.mean(np.array(errors["tot"]) < np.array(errors["ot"]))),
        "per_utterance_seconds": {name: [round(value, 4) for value in values] for name, values in errors.items()},
    }


def plot_examples(model_dir: Path, records: list[dict], count: int, folder: Path) -> list[str]:
    """TOT and plain-OT coupling heat maps of the ``count`` longest utterances; returns the PNG paths."""
    teacher_dir = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["teacher_name_or_path"]
    models = demo.AlignmentModels(model_dir, teacher_dir)
    rate = models.processor.feature_extractor.sampling_rate
    longest = sorted(records, key=lambda record: (-len(record["text"]), record["id"]))[:count]
    paths = []
    for index, record in enumerate(longest):
        path = folder / f"alignment_example_{index}.png"
        demo.plot_couplings(models.couplings(load_audio(record["audio"], rate), record["text"]), record, path)
        paths.append(str(path))
    return paths


def plot(results: list[dict], path: Path) -> None:
    """Box plots of the per-utterance alignment errors: one group per model, one box per coupling."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(2.5 + 2.6 * len(results), 4.5))
    width = 0.2
    for index, name in enumerate(COUPLINGS):
        positions = [group + (index - 1.5) * width for group in range(len(results))]
        boxes = axis.boxplot(
            [np.array(result["per_utterance_seconds"][name]) * 1000 for result in results],
            positions=positions,
            widths=width * 0.9,
            patch_artist=True,
            showfliers=False,
        )
        for box in boxes["boxes"]:
            box.set_facecolor(f"C{index}")
        axis.plot([], [], color=f"C{index}", linewidth=8, label=name.replace("_", " "))
    axis.set_xticks(
        range(len(results)),
        [
            f"{Path(result['model_dir']).parent.name}/{Path(result['model_dir']).name}\n(trained: {result['trained_alignment']})"
            for result in results
        ],
        fontsize=8,
    )
    axis.set_ylabel("mean |t_frame - t_char centre| under the coupling (ms)")
    axis.set_title("Distance of the coupling mass from the true alignment (test set)")
    axis.grid(axis="y", alpha=0.3)
    axis.legend()
    save_figure(figure, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", type=Path, help="Trained model folders (default: see the module docstring)."
    )
    parser.add_argument("--corpus_dir", type=Path, help="Corpus with test.jsonl (default: the demo's quick corpus).")
    parser.add_argument("--max_utterances", type=int, default=None, help="Use only the first N test utterances.")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "results" / "alignment.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "results" / "alignment.png")
    parser.add_argument("--examples", type=int, default=3, help="Coupling heat maps of the N longest test utterances.")
    args = parser.parse_args(argv)

    models = args.models or default_models()
    if not models:
        raise SystemExit(
            "No trained model found: run `make demo` or benchmarks/bench_quality.py first, or pass --models."
        )
    corpus_dir = args.corpus_dir or ROOT / "outputs" / "demo" / "quick" / "corpus"
    records = read_manifest(corpus_dir / "test.jsonl")[: args.max_utterances]
    results = []
    for model_dir in models:
        results.append(measure_model(Path(model_dir), records))
        means = results[-1]["mean_error_seconds"]
        print(
            f"{model_dir}: " + ", ".join(f"{name} {value * 1000:.0f} ms" for name, value in means.items()), flush=True
        )
    tot_models = [result["model_dir"] for result in results if result["trained_alignment"] == "tot"]
    examples = (
        plot_examples(Path(tot_models[-1]), records, args.examples, args.plot.parent)
        if tot_models and args.examples
        else []
    )
    report = {"corpus_dir": str(corpus_dir), "utterances": len(records), "models": results, "example_plots": examples}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(results, args.plot)
    return report


if __name__ == "__main__":
    main()
