#!/usr/bin/env python
"""Recognition quality of CTC-only, OT-CAKT and TOT-CAKT on the embedded synthetic corpus.

The comparison of the paper (arXiv 2409.02239, Table 1) at the scale of this repository: the same
encoder, data, optimiser, schedule and number of steps, trained by ``train_hf.py`` with
``--alignment none``, ``ot`` and ``tot``, several seeds each. Corpus, teacher and training
arguments come from a demo preset (:mod:`modeling_tot_cakt.demo`), so the benchmark measures what
``make demo`` trains.

Reported (``--output``, default ``docs/results/quality.json``): dev and test CER per run and as
mean +- std per method, the test errors of every run split into homophone substitutions and other
errors (:mod:`modeling_tot_cakt.training.error_analysis`), the paired differences TOT-CAKT - CTC-only and
TOT-CAKT - OT-CAKT over the seeds run by both methods with 95 % t-intervals, the dev-CER-vs-step
curve of every run (periodic evaluation during training), and for each method the steps it needs
to reach the CER that CTC-only reaches at the end (``--target_cer`` overrides). ``--plot`` (default ``docs/results/quality_curves.png``) draws
the curves. The JSON is rewritten after every finished run, so an interrupted benchmark leaves
its finished runs; a rerun reuses runs trained to completion with the same arguments.

Presets: ``quality`` (the quick demo's corpus and teacher, from scratch, 3,000 steps, five seeds, two
runs at a time on one thread each), ``transfer``
(a user's fine-tune: the same corpus, teacher, steps and seeds, fine-tuned from the ``transfer`` demo
preset's syllable-pretrained encoder), ``knowledge`` (the ``knowledge`` demo preset: 2,000 characters, so that
most test characters have a homophone the model can write, 4,400 training utterances, two test tracks -- the test
sentences on held-out voices and again on the training voices --, 1,000-step fine-tunes of an encoder pretrained
on toned syllables of other sentences, five seeds, and the ablations: CTC-only, OT-CAKT, TOT-CAKT, TOT-CAKT with
the CTC head on the adapter (MLP and linear), TOT-CAKT with an untrained teacher, and the alignment family's UOT
and GM-OT; ``--methods`` adds the knowledge-dose variants: 20 times the default OT and alignment weights, the same
with masked-position targets, and the distillation of the teacher's masked-LM predictions through the plan, each with
an untrained twin, and the distillation from a deeper teacher, 4 x 256, pretrained on the same text when first needed,
with its own untrained twin)
and ``full`` (the demo's ``full`` preset, longer, one run at a time; for a GPU). A corpus with the second test
track (``test_seen_voices``) has it scored like ``test``: ``test_seen_voices_cer`` and its error split per run,
per method and in the paired differences (greedily and, with ``--lm``, with the language model).
``--override KEY=VALUE`` changes a training argument for all runs (e.g. ``max_train_samples=1388``
for a quarter of the training transcripts, ``align_loss_weight=1.0``, ``teacher_layer=1``),
``--demo_preset`` takes another demo preset (e.g. one with another teacher), and ``--label`` keeps such
a variant's runs apart. ``--report_only`` trains and decodes nothing: it reports the runs already finished, e.g.
after methods were run by separate invocations.

    python benchmarks/bench_quality.py --preset quality
    python benchmarks/bench_quality.py --preset transfer --output docs/results/quality_transfer.json
    python benchmarks/bench_quality.py --preset knowledge --lm --output docs/results/knowledge.json \
        --plot docs/results/knowledge_curves.png
    make bench-knowledge-dose   # the dose variants and their per-seed untrained twins (docs/RESULTS.md)
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from benchmarks.common import save_figure
from modeling_tot_cakt.demo import run_demo as demo
from modeling_tot_cakt.demo.synthesis import TEST_TRACKS, corpus_splits

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "none": "CTC only",
    "ot": "OT-CAKT",
    "tot": "TOT-CAKT",
    "tot_adapter": "TOT-CAKT, CTC head on the adapter",
    "tot_linear_adapter": "TOT-CAKT, CTC head on a linear adapter",
    "tot_untrained": "TOT-CAKT, untrained teacher",
    "uot": "UOT-CAKT",
    "gmot": "GM-OT-CAKT",
    "tot_dose": "TOT-CAKT, 20x loss weights",
    "tot_dose_untrained": "TOT-CAKT, 20x loss weights, untrained teacher",
    "tot_masked": "TOT-CAKT, masked-position targets, 20x loss weights",
    "tot_masked_untrained": "TOT-CAKT, masked-position targets, 20x loss weights, untrained teacher",
    "tot_kd": "TOT-CAKT + distillation through the plan",
    "tot_kd_untrained": "TOT-CAKT + distillation through the plan, untrained teacher",
    "tot_kd_deep": "TOT-CAKT + distillation through the plan, 4 x 256 teacher",
    "tot_kd_deep_untrained": "TOT-CAKT + distillation through the plan, 4 x 256 teacher, untrained",
    "tot_kd_light": "TOT-CAKT + distillation through the plan, weight 0.1",
    "tot_kd_faint": "TOT-CAKT + distillation through the plan, weight 0.03",
}
"""The compared methods: a key (``--methods``, the run folders) and its name in the report."""

DOSE = {"ot_loss_weight": 2.0, "align_loss_weight": 6.0}
"""The knowledge-dose variants' loss weights: 20 times the defaults (0.1 and 0.3), which put about 1 % of CTC's
gradient on the encoder's output (docs/RESULTS.md, "The knowledge share")."""

DEEP_TEACHER = {
    "num_layers": 4,
    "hidden_size": 256,
    "num_attention_heads": 4,
    "max_steps": 6000,
    "learning_rate": 5e-4,
    "warmup_ratio": 0.1,
}
"""The deeper teacher (``<demo preset>/teacher_deep``): these settings over the preset's teacher section, so the same
text sources, vocabulary and held-out sentences; a lower peak learning rate than the 2 x 128 teacher's 1e-3, at which
a 3 x 192 teacher stayed on the masked-LM frequency plateau (docs/RESULTS.md, "The teacher")."""

VARIANTS = {
    "tot_adapter": ({"alignment": "tot", "ctc_input": "adapter"}, "trained"),
    "tot_linear_adapter": ({"alignment": "tot", "ctc_input": "adapter", "adapter_type": "linear"}, "trained"),
    "tot_untrained": ({"alignment": "tot"}, "untrained"),
    **{
        f"{name}{twin}": (settings, "untrained" if twin else "trained")
        for name, settings in (
            ("tot_dose", {"alignment": "tot", **DOSE}),
            ("tot_masked", {"alignment": "tot", **DOSE, "teacher_target": "masked_states"}),
            ("tot_kd", {"alignment": "tot", "kd_loss_weight": 0.3}),
        )
        for twin in ("", "_untrained")
    },
    "tot_kd_deep": ({"alignment": "tot", "kd_loss_weight": 0.3}, "deep"),
    "tot_kd_deep_untrained": ({"alignment": "tot", "kd_loss_weight": 0.3}, "deep_untrained"),
    "tot_kd_light": ({"alignment": "tot", "kd_loss_weight": 0.1}, "trained"),
    "tot_kd_faint": ({"alignment": "tot", "kd_loss_weight": 0.03}, "trained"),
}
"""Methods that are not an ``--alignment`` alone: their ``train_hf.py`` settings and teacher (``"trained"``, the
preset's; ``"deep"``, the :data:`DEEP_TEACHER`; ``"untrained"`` / ``"deep_untrained"``, the same architecture and
vocabulary randomly initialised, drawn anew for each seed). Every ``<name>_untrained`` is ``<name>``'s twin: the same
settings with that seed's untrained teacher."""

COMPARISONS = (
    ("tot", "none"),
    ("tot", "ot"),
    ("ot", "none"),
    ("tot_adapter", "none"),
    ("tot_adapter", "tot"),
    ("tot_linear_adapter", "none"),
    ("tot_linear_adapter", "tot"),
    ("tot_untrained", "none"),
    ("tot", "tot_untrained"),
    ("uot", "none"),
    ("uot", "tot"),
    ("gmot", "none"),
    ("gmot", "tot"),
    *(
        pair
        for name in ("tot_dose", "tot_masked", "tot_kd")
        for pair in (
            (name, "none"),
            (name, f"{name}_untrained"),
            (f"{name}_untrained", "none"),
            (name, "tot"),
        )
    ),
    ("tot_kd_deep", "none"),
    ("tot_kd_deep", "tot_kd_deep_untrained"),
    ("tot_kd_deep_untrained", "none"),
    ("tot_kd_deep", "tot_kd"),
    ("tot_kd_light", "none"),
    ("tot_kd_faint", "none"),
    ("tot_kd", "tot_kd_light"),
)
"""The paired differences reported (method, baseline), each where either side has runs."""


def method_settings(method: str) -> tuple[dict, str]:
    """``(train_hf.py settings, teacher kind)`` of `method`."""
    return VARIANTS.get(method, ({"alignment": method}, "trained"))


def method_of(run: dict) -> str:
    """The method key of a run record (records written before variants existed name only their alignment)."""
    return run.get("method", run["alignment"])


def untrained_teacher(trained: Path, target: Path, seed: int = 0) -> Path:
    """A randomly initialised copy of the teacher in `trained` (same configuration and tokenizer), drawn with `seed`
    and saved in `target` (reused when there) with its masked-LM head, so that the targets that need the teacher's
    predictions have a twin too: the ablation that tells knowledge from a per-character target."""
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    torch.manual_seed(seed)
    model = AutoModelForMaskedLM.from_config(AutoConfig.from_pretrained(trained))
    target.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(trained).save_pretrained(target)
    model.save_pretrained(target)
    return target


def deep_teacher(stages: demo.DemoStages, build: bool = True):
    """Pretrain (or reuse) the :data:`DEEP_TEACHER` in ``<demo preset>/teacher_deep``, holding out the corpus' dev/test
    sentences like the preset's teacher; with ``build=False`` only reuse it (None when absent)."""
    from modeling_tot_cakt.demo.teacher_pretraining import TeacherConfig, build_teacher

    if not build and stages.corpus(build=False) is None:  # its held-out sentences are the corpus'
        return None
    config = TeacherConfig(
        output_dir=str(stages.paths.root / "teacher_deep"),
        corpus_dir=str(stages.paths.corpus),
        **{**stages.preset.teacher, **DEEP_TEACHER},
    )
    return build_teacher(config, reuse_only=not build)


def teacher_record(teacher) -> dict | None:
    """A teacher's entry in the report: its folder, held-out masked accuracy and homophone choice."""
    return teacher and {
        "dir": str(teacher.output_dir),
        "heldout_masked_token_accuracy": teacher.report["heldout_masked_token_accuracy"],
        "homophone_choice": teacher.report.get("homophone_choice"),
    }


def run_teachers(stages: demo.DemoStages, jobs: list[tuple[str, int]], build: bool = True) -> tuple[dict, object]:
    """The teacher folder of each ``(teacher kind, seed)`` that the ``(method, seed)`` `jobs` need (None: the
    preset's own teacher), and the deep teacher's summary (None when no job needs it). Each seed's untrained teacher
    is its own draw (seeded by the run's seed), shared by that seed's twins. With ``build=False`` nothing is made and
    the folders are not resolved (an empty dict)."""
    kinds = {(method_settings(method)[1], seed) for method, seed in jobs}
    deep = deep_teacher(stages, build) if any(kind.startswith("deep") for kind, _ in kinds) else None
    trained = {"trained": None, "deep": deep and Path(deep.output_dir)}
    copied = {"untrained": stages.paths.teacher, "deep_untrained": trained["deep"]}  # what a twin's teacher copies
    teachers = {
        (kind, seed): (
            untrained_teacher(copied[kind], stages.paths.root / f"teacher_{kind}-seed{seed}", seed=seed)
            if kind in copied
            else trained[kind]
        )
        for kind, seed in sorted(kinds)
        if build
    }
    return teachers, deep


@dataclass
class BenchPreset:
    """A quality benchmark configuration.

    Attributes:
        demo_preset: the demo preset whose corpus, teacher and training arguments are used.
        train_overrides: ``train_hf.py`` arguments changed for the benchmark (steps, evaluation).
        seeds: training seeds per method.
        methods: the methods run by default (keys of :data:`METHODS`).
        parallel: runs at a time.
        threads_per_run: ``OMP_NUM_THREADS`` of each run (None: torch's default).
        score_in_process: score dev and test by greedy decoding in this process
            (:func:`~modeling_tot_cakt.demo.run_demo.error_split_stage`) instead of two evaluation runs
            of ``train_hf.py``: the same CER, without two script start-ups per run (short runs).
    """

    demo_preset: str
    train_overrides: dict = field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = ("none", "ot", "tot")
    parallel: int = 1
    threads_per_run: int | None = None
    score_in_process: bool = False


PRESETS = {
    # The quick demo's corpus, teacher and model, trained 3,000 steps (the demo trains 7,000) for each
    # method and five paired seeds, two runs at a time on one thread each: about 6 minutes per run on an
    # otherwise idle 2-core machine, an hour in all.
    "quality": BenchPreset(
        demo_preset="quick",
        train_overrides={"disable_tqdm": True, "max_steps": 3000},
        seeds=(0, 1, 2, 3, 4),
        parallel=2,
        threads_per_run=1,
    ),
    # A user's fine-tune of a pretrained encoder: the transfer demo preset (the quality preset's corpus, teacher and 3,000 steps,
    # from a syllable-pretrained encoder), five seeds paired across the methods, two runs at a time on one
    # thread each.
    "transfer": BenchPreset(
        demo_preset="transfer",
        train_overrides={"disable_tqdm": True},
        seeds=(0, 1, 2, 3, 4),
        parallel=2,
        threads_per_run=1,
        score_in_process=True,
    ),
    # The knowledge testbed: the knowledge demo preset (its own corpus with two test tracks, teacher and
    # syllable-pretrained encoder; 1,000-step fine-tunes), the ablations with five paired seeds, two runs at a
    # time on one thread each, every test track scored in process.
    "knowledge": BenchPreset(
        demo_preset="knowledge",
        train_overrides={"disable_tqdm": True},
        seeds=(0, 1, 2, 3, 4),
        methods=("none", "ot", "tot", "tot_adapter", "tot_linear_adapter", "tot_untrained", "uot", "gmot"),
        parallel=2,
        threads_per_run=1,
        score_in_process=True,
    ),
    # The full demo's training (12,000 steps, best dev checkpoint kept), one run at a time: for a GPU.
    "full": BenchPreset(
        demo_preset="full",
        train_overrides={"disable_tqdm": True},
        parallel=1,
    ),
}


def test_tracks(corpus_dir: Path) -> tuple[str, ...]:
    """The corpus' test tracks: ``test`` (held-out voices), then ``test_seen_voices`` if it has one."""
    return tuple(split for split in corpus_splits(corpus_dir) if split in TEST_TRACKS)


def track_scores(errors: dict[str, dict]) -> dict:
    """A run's record entries of its test tracks' error splits (track -> split): ``<track>_errors``, and
    ``<track>_cer`` for the tracks after ``test`` (whose CER the run records as ``test_cer``)."""
    scores = {f"{track}_errors": split for track, split in errors.items()}
    scores.update({f"{track}_cer": split["cer"] for track, split in errors.items() if track != "test"})
    return scores


def greedy_scores(stages: demo.DemoStages) -> dict:
    """:func:`track_scores` of every test track of the run's corpus, decoded greedily."""
    return track_scores({track: stages.error_split(track) for track in test_tracks(stages.paths.corpus)})


def lm_decoding(stages: demo.DemoStages, arpa: str) -> dict:
    """A run's dev and test tracks decoded with the character language model (weights chosen on dev)."""
    tracks = test_tracks(stages.paths.corpus)
    decoding = stages.decode_with_language_model(arpa, tracks)
    return {
        "weights": {name: decoding["weights"][name] for name in ("alpha", "beta", "beam_width")},
        "dev_cer": decoding["dev"]["lm"]["cer"],
        "test_cer": decoding["test"]["lm"]["cer"],
        **track_scores({track: decoding[track]["lm"] for track in tracks}),
        "speed": decoding["speed"],
    }


def run_once(
    stages: demo.DemoStages,
    threads: int | None,
    score_in_process: bool = False,
    rescore: bool = False,
    language_model: str | None = None,
    method: str | None = None,
) -> dict:
    """Train and evaluate one run, the stages of :meth:`~modeling_tot_cakt.demo.run_demo.DemoStages.for_run` (or
    reuse a completed one: its record as it is, or with its test error split decoded again by the current code when
    ``rescore``); with `language_model` (an ARPA file) its dev and test are also decoded with it (``result["lm"]``).
    `method` (a key of :data:`METHODS`; default: the alignment) names the run in its record. Returns its result
    record."""
    result_file = stages.paths.root / "result.json"
    environment = {"OMP_NUM_THREADS": str(threads)} if threads else None
    start = time.perf_counter()
    reused = stages.train(echo=False, environment=environment)
    if reused and result_file.is_file():
        result = json.loads(result_file.read_text(encoding="utf-8"))
        result.setdefault("method", method or result["alignment"])
        if rescore:
            result.update(greedy_scores(stages))
        if language_model and (rescore or "lm" not in result):
            result["lm"] = lm_decoding(stages, language_model)
        result_file.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return result
    train_seconds = time.perf_counter() - start
    scores = greedy_scores(stages)
    if score_in_process:
        evaluation = {"dev": stages.error_split("dev"), "test": scores["test_errors"]}
    else:
        evaluation = stages.evaluate(echo=False, environment=environment)
    summary = stages.training_summary()
    train = stages.preset.train
    result = {
        "method": method or train["alignment"],
        "alignment": train["alignment"],
        "seed": train["seed"],
        "dev_cer": evaluation["dev"]["cer"],
        "test_cer": evaluation["test"]["cer"],
        "steps": summary["steps"],
        "train_runtime_seconds": summary["train_runtime_seconds"],
        "wall_seconds": round(time.perf_counter() - start, 1),
        "train_wall_seconds": round(train_seconds, 1),
        "dev_cer_by_step": summary["dev_cer_by_step"],
        **knowledge_share_record(summary),
        **scores,
        "model_dir": str(stages.paths.model),
    }
    if language_model:
        result["lm"] = lm_decoding(stages, language_model)
    result_file.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def knowledge_share_record(summary: dict) -> dict:
    """A run's record entries of the gradient norms its training logged on the encoder's output
    (``gradient_norms_by_step``) and its ``knowledge_share``, the mean of the shares logged (None when it logged
    none: CTC-only, or a run trained before the share was logged)."""
    logged = summary["gradient_norms_by_step"]
    shares = [entry["knowledge_share"] for entry in logged if "knowledge_share" in entry]
    return {"knowledge_share": float(np.mean(shares)) if shares else None, "gradient_norms_by_step": logged}


def steps_to_reach(curve: list[list[float]], target: float) -> int | None:
    """First evaluated step whose dev CER is at most ``target`` (None if never)."""
    return next((int(step) for step, cer in curve if cer <= target), None)


def _mean_std(values: list[float]) -> dict:
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def paired_difference(runs: list[dict], method: str, baseline: str, metric: str = "test_cer") -> dict | None:
    """Mean of ``metric`` of ``method`` minus ``baseline`` over the seeds both ran, with a 95 % CI.

    The interval is Student's t on the per-seed differences: ``mean +- t_{0.975, n-1} * sd / sqrt(n)``.

    Returns:
        ``{"mean", "ci95": [low, high], "n", "per_seed"}``; None with fewer than two common seeds.
    """
    values = {
        name: {run["seed"]: run[metric] for run in runs if method_of(run) == name} for name in (method, baseline)
    }
    seeds = sorted(set(values[method]) & set(values[baseline]))
    if len(seeds) < 2:
        return None
    differences = np.array([values[method][seed] - values[baseline][seed] for seed in seeds])
    mean, half = float(differences.mean()), 0.0
    if differences.std(ddof=1) > 0:
        half = float(stats.t.ppf(0.975, len(seeds) - 1) * differences.std(ddof=1) / np.sqrt(len(seeds)))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": len(seeds), "per_seed": differences.tolist()}


ERROR_METRICS = ("homophone_cer", "other_cer", "tone_cer")
TRACK_METRICS = tuple(
    f"{track}_{name}" for track in TEST_TRACKS for name in (("cer",) if track != "test" else ()) + ERROR_METRICS
)
"""The per-track scores of a run beyond its ``test_cer``: ``test_homophone_cer``, ..., ``test_seen_voices_cer``, ..."""


def flat_errors(record: dict) -> dict:
    """The error splits of `record` (a run, or its decoding with the LM) as top-level ``<track>_<metric>`` values."""
    return {
        f"{track}_{name}": record[f"{track}_errors"][name]
        for track in TEST_TRACKS
        if f"{track}_errors" in record
        for name in ERROR_METRICS
        if name in record[f"{track}_errors"]
    }


def with_lm_decoded_runs(runs: list[dict]) -> list[dict]:
    """`runs` with their test tracks' error splits as top-level ``<track>_<metric>`` values, plus, for each run
    decoded with the language model, a record of that decoding as method ``<alignment>+lm`` (same seed): what
    :func:`paired_difference` pairs, e.g. ``none+lm`` against ``none``."""
    flat = []
    for run in runs:
        flat.append({**run, **flat_errors(run)})
        if "lm" in run:
            lm = run["lm"]
            flat.append(
                {
                    "alignment": run["alignment"],
                    "method": f"{method_of(run)}+lm",
                    "seed": run["seed"],
                    **flat_errors(lm),
                    **lm,
                }
            )
    return flat


def common_metrics(runs: list[dict], candidates: tuple[str, ...]) -> list[str]:
    """The `candidates` that every one of `runs` has (a corpus without a second test track has no scores of it)."""
    return [metric for metric in candidates if runs and all(metric in run for run in runs)]


def summarise(runs: list[dict], target_cer: float | None) -> dict:
    """Per-method dev/test CER mean +- std (and of every test track's error split), mean curves, steps to reach
    the target CER, and paired differences between the methods and between the LM and greedy decodings.

    The default target is the mean final dev CER of CTC-only: how many steps each method needs
    to get where the baseline ends.
    """
    by_method = {method: [run for run in runs if method_of(run) == method] for method in METHODS}
    if target_cer is None and by_method["none"]:
        target_cer = float(np.mean([run["dev_cer"] for run in by_method["none"]]))
    summary = {"target_dev_cer": target_cer, "methods": {}}
    flat = with_lm_decoded_runs(runs)
    for method, method_runs in by_method.items():
        if not method_runs:
            continue
        reached = [steps_to_reach(run["dev_cer_by_step"], target_cer) for run in method_runs] if target_cer else []
        summary["methods"][method] = {
            "name": METHODS[method],
            "dev_cer": _mean_std([run["dev_cer"] for run in method_runs]),
            "test_cer": _mean_std([run["test_cer"] for run in method_runs]),
            "steps_to_target": reached,
            "runs_reaching_target": sum(step is not None for step in reached),
        }
        flat_runs = [run for run in flat if method_of(run) == method]
        for metric in common_metrics(flat_runs, TRACK_METRICS):
            summary["methods"][method][metric] = _mean_std([run[metric] for run in flat_runs])
        shares = [run["knowledge_share"] for run in method_runs if run.get("knowledge_share") is not None]
        if shares:
            summary["methods"][method]["knowledge_share"] = _mean_std(shares)
    summary["paired_differences"] = {
        f"{METHODS[method]} - {METHODS[baseline]}": {
            metric: paired_difference(flat, method, baseline, metric)
            for metric in common_metrics(
                [run for run in flat if method_of(run) in (method, baseline)],
                ("test_cer", "dev_cer", *TRACK_METRICS),
            )
        }
        for method, baseline in COMPARISONS
        if by_method[method] and by_method[baseline]
    }
    decoded = sorted({method_of(run) for run in runs if "lm" in run})
    for method in decoded:
        lm_runs = [run for run in flat if method_of(run) == f"{method}+lm"]
        metrics = common_metrics(lm_runs, ("test_cer", "dev_cer", *TRACK_METRICS))
        summary["methods"][method]["with_lm"] = {
            metric: _mean_std([run[metric] for run in lm_runs]) for metric in metrics
        }
        # The positive control: the same models, decoded with the LM instead of greedily.
        summary["paired_differences"][f"{METHODS[method]} with LM - greedy"] = {
            metric: paired_difference(flat, f"{method}+lm", method, metric) for metric in metrics
        }
        # Whether a method's gain survives the LM: both decoded with it, paired by seed.
        if method != "none" and "none" in decoded:
            both = [run for run in flat if method_of(run) in (f"{method}+lm", "none+lm")]
            summary["paired_differences"][f"{METHODS[method]} with LM - {METHODS['none']} with LM"] = {
                metric: paired_difference(flat, f"{method}+lm", "none+lm", metric)
                for metric in common_metrics(both, ("test_cer", "dev_cer", *TRACK_METRICS))
            }
    summary["control_share"] = control_share(summary)
    return summary


def control_share(summary: dict) -> dict:
    """How much of the positive control's homophone gain each method reaches, per test track: the mean paired
    change of homophone substitutions of the method against CTC-only, divided by that of CTC-only decoded with the
    LM against greedy (1: as much as the LM, 0: none, negative: more homophone substitutions than CTC-only)."""
    control = summary["paired_differences"].get(f"{METHODS['none']} with LM - greedy", {})
    shares = {}
    for method in METHODS:
        difference = summary["paired_differences"].get(f"{METHODS[method]} - {METHODS['none']}", {})
        for track in TEST_TRACKS:
            metric = f"{track}_homophone_cer"
            gain, reached = control.get(metric), difference.get(metric)
            if gain and reached and gain["mean"] != 0:
                shares.setdefault(method, {})[track] = reached["mean"] / gain["mean"]
    return shares


def plot_curves(runs: list[dict], summary: dict, path: Path) -> None:
    """Dev CER against training step: every run thin, the mean per method thick."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(7, 4.5))
    for index, method in enumerate(METHODS):
        method_runs = [run for run in runs if method_of(run) == method and run["dev_cer_by_step"]]
        if not method_runs:
            continue
        colour = pyplot.get_cmap("tab20")(index % 20)  # one colour per method (the default cycle has 10)
        for run in method_runs:
            steps, cers = zip(*run["dev_cer_by_step"])
            axis.plot(steps, cers, color=colour, alpha=0.3, linewidth=0.8)
        length = min(len(run["dev_cer_by_step"]) for run in method_runs)
        steps = [step for step, _ in method_runs[0]["dev_cer_by_step"][:length]]
        mean = np.mean([[cer for _, cer in run["dev_cer_by_step"][:length]] for run in method_runs], axis=0)
        axis.plot(steps, mean, color=colour, linewidth=2, label=f"{METHODS[method]} (n={len(method_runs)})")
    if summary.get("target_dev_cer") is not None:
        axis.axhline(summary["target_dev_cer"], color="grey", linestyle=":", label="final CTC-only dev CER")
    axis.set_xlabel("training step")
    axis.set_ylabel("dev CER")
    axis.set_ylim(0, 1.05)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="upper right")
    save_figure(figure, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quality")
    parser.add_argument(
        "--demo_work_dir",
        default=str(ROOT / "outputs" / "demo"),
        help="The demo's --work_dir: its corpus, teacher and caches are used (and made if missing).",
    )
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "bench_quality"), help="Folder for the runs.")
    parser.add_argument("--output", default=str(ROOT / "docs" / "results" / "quality.json"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "results" / "quality_curves.png"))
    parser.add_argument(
        "--demo_preset", help="Use this demo preset (a name or a YAML file) instead of the benchmark preset's own."
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="Override the preset's seeds.")
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), help="The methods to run (default: the preset's)."
    )
    parser.add_argument("--max_steps", type=int, help="Override the preset's number of steps.")
    parser.add_argument("--target_cer", type=float, help="Dev CER for steps_to_target (default: CTC-only's final).")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Change a train_hf.py argument of every run (VALUE is read as YAML); repeatable.",
    )
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="Decode the test set of runs already finished again (the error split of the current code).",
    )
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="Train and decode nothing: report the runs already finished (e.g. while or after other invocations run).",
    )
    parser.add_argument(
        "--lm",
        action="store_true",
        help="Decode every run's dev and test also with the character n-gram LM of the teacher's text (weights on dev).",
    )
    parser.add_argument(
        "--label", default="default", help="Name of this variant; its runs go to <work_dir>/<preset>/<label>."
    )
    args = parser.parse_args(argv)

    bench = PRESETS[args.preset]
    if bench.threads_per_run:
        import torch

        torch.set_num_threads(bench.threads_per_run)  # in-process scoring, like the runs themselves
    stages = demo.DemoStages.create(args.demo_work_dir, demo.load_preset(args.demo_preset or bench.demo_preset))
    preset, build = stages.preset, not args.report_only  # a report trains and builds nothing
    overrides = dict(bench.train_overrides)
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    for item in args.override:
        key, separator, value = item.partition("=")
        if not separator or not key:
            parser.error(f"--override takes KEY=VALUE, got {item!r}.")
        overrides[key] = yaml.safe_load(value)
    runs_dir = Path(args.work_dir).resolve() / args.preset / args.label
    if build:
        stages.paths.root.mkdir(parents=True, exist_ok=True)
    corpus, teacher, encoder = stages.corpus(build), stages.teacher(build), stages.encoder(build)
    language_model = stages.language_model()["arpa"] if args.lm and build else None
    methods = args.methods or list(bench.methods)
    jobs = [(method, seed) for seed in (args.seeds or bench.seeds) for method in methods]
    teachers, deep = run_teachers(stages, jobs, build)
    runs: list[dict] = []
    lock = threading.Lock()
    output, plot = Path(args.output), Path(args.plot)
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def record(report_complete: bool) -> dict:
        summary = summarise(runs, args.target_cer)
        report = {
            "preset": args.preset,
            "demo_preset": str(args.demo_preset or bench.demo_preset),
            "train_arguments": {**preset.train, **overrides},
            "parallel_runs": bench.parallel,
            "threads_per_run": bench.threads_per_run,
            "corpus": corpus
            and {
                "dir": str(stages.paths.corpus),
                "utterances": corpus.num_utterances,
                "vocabulary_size": corpus.info["vocabulary_size"],
                "test_tracks": corpus.info.get("test_tracks"),
            },
            "label": args.label,
            "teacher": teacher_record(teacher),
            **({"deep_teacher": teacher_record(deep)} if deep else {}),
            "pretrained_encoder": encoder,
            "complete": report_complete,
            "runs_planned": len(jobs),
            "wall_seconds": round(time.perf_counter() - started, 1),
            "summary": summary,
            "runs": sorted(runs, key=lambda run: (method_of(run), run["seed"])),
        }
        output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if runs:
            plot_curves(runs, summary, plot)
        return report

    def job(method: str, seed: int) -> None:
        if args.report_only:
            result_file = runs_dir / f"{method}-seed{seed}" / "result.json"
            if not result_file.is_file():
                print(f"{METHODS[method]} seed {seed}: not finished, left out", flush=True)
                return
            result = json.loads(result_file.read_text(encoding="utf-8"))
            with lock:
                runs.append({**result, "method": result.get("method", method)})
                record(report_complete=False)
            return
        settings, teacher_kind = method_settings(method)
        run_stages = stages.for_run(
            runs_dir / f"{method}-seed{seed}",
            train={**preset.train, **overrides, **settings, "seed": seed},
            teacher=teachers.get((teacher_kind, seed)),
        )
        result = run_once(
            run_stages,
            bench.threads_per_run,
            bench.score_in_process,
            rescore=args.rescore,
            language_model=language_model,
            method=method,
        )
        with lock:
            runs.append(result)
            record(report_complete=False)
            print(
                f"{METHODS[method]} seed {seed}: dev CER {result['dev_cer']:.4f}, test CER {result['test_cer']:.4f} "
                f"({result['wall_seconds']:.0f} s)",
                flush=True,
            )

    with ThreadPoolExecutor(max_workers=bench.parallel) as pool:
        for future in [pool.submit(job, method, seed) for method, seed in jobs]:
            future.result()
    report = record(report_complete=len(runs) == len(jobs))
    for method in report["summary"]["methods"].values():
        dev, test = method["dev_cer"], method["test_cer"]
        target = report["summary"]["target_dev_cer"]
        print(
            f"{method['name']:9s} dev CER {dev['mean']:.4f} +- {dev['std']:.4f}   test CER {test['mean']:.4f} +- "
            f"{test['std']:.4f}"
            + (f"   steps to dev CER {target:.4f}: {method['steps_to_target']}" if target is not None else "")
        )
        for track in TEST_TRACKS:
            if f"{track}_homophone_cer" in method:
                print(
                    f"{'':9s} {track} errors: homophone substitutions {method[f'{track}_homophone_cer']['mean']:.4f}, "
                    f"other {method[f'{track}_other_cer']['mean']:.4f}"
                )
    for name, metrics in report["summary"]["paired_differences"].items():
        for metric in ("test_cer", "test_homophone_cer", "test_seen_voices_cer", "test_seen_voices_homophone_cer"):
            difference = metrics.get(metric)
            if difference is not None:
                print(
                    f"{name}: {metric} {difference['mean']:+.4f}, 95 % CI [{difference['ci95'][0]:+.4f}, "
                    f"{difference['ci95'][1]:+.4f}] (n = {difference['n']} paired seeds)"
                )
    return report


if __name__ == "__main__":
    main()
