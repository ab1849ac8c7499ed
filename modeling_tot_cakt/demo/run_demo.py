"""The whole offline TOT-CAKT job in one command (``make demo``).

``python -m modeling_tot_cakt.demo --preset quick --work_dir outputs/demo`` runs, in
``<work_dir>/<preset>/``:

1. ``corpus/``: a synthetic Mandarin speech corpus (:mod:`modeling_tot_cakt.demo.synthesis`);
2. ``teacher/``: a small character BERT pretrained offline, the stand-in for bert-base-chinese
   (:mod:`modeling_tot_cakt.demo.teacher_pretraining`);
2b. ``encoder/`` (presets with an ``encoder`` section): an acoustic encoder pretrained with CTC on toned
   pinyin syllables of a second synthetic corpus, the stand-in for a pretrained wav2vec 2.0
   (:mod:`modeling_tot_cakt.demo.encoder_pretraining`); training then starts from it;
3. ``model/``: TOT-CAKT trained by ``train_hf.py`` (run as a subprocess on an argument file, so
   the demo trains exactly as a user of the script does);
4. ``language_model/``: a character 4-gram model estimated by KenLM's ``lmplz`` on the teacher's text (dev/test
   sentences held out); dev and test are decoded greedily (the CER ``train_hf.py``'s evaluation reports) and
   with a beam search over the language model, whose weight and bonus are chosen on dev; the model folder
   gets the language model, so the pipeline decodes with it;
5. three test clips transcribed by ``pipeline("automatic-speech-recognition", trust_remote_code=True)``;
6. ``couplings.png``: the TOT coupling next to the plain-OT coupling of one test utterance, both
   computed by :func:`~modeling_tot_cakt.tot.tot_sinkhorn` on the trained model's adapted frames
   against the teacher's token features, with the synthesiser's syllable timings drawn over them;
7. ``demo_report.json``: CERs, timings per stage, corpus and teacher statistics.

Caching: the corpus and the teacher are rebuilt only when their settings change (their own caches).
Training is skipped when ``model/`` holds a model trained to completion with the very same
``train_hf.py`` arguments, unless ``--retrain`` is given; decoding, transcription and the plot
always run on the saved model. ``--time_budget_minutes`` (``make demo``: 20) stops training when its share of
the budget is spent (:func:`training_budget`). Featurised datasets and teacher features are cached in
``<work_dir>/cache`` and shared between presets.

A preset is a YAML file with the sections ``synthesis`` (:class:`SynthesisConfig` fields),
``teacher`` (:class:`TeacherConfig` fields), ``train`` (``train_hf.py`` arguments) and optionally
``encoder`` (``synthesis``: the pretraining corpus' :class:`SynthesisConfig` fields; ``train``: the
``train_hf.py`` arguments of the CTC pretraining). The demo adds
the paths (see :data:`DEMO_TRAIN_ARGS`) and writes the ``train`` section to ``train_args.yaml``,
which is what ``train_hf.py`` reads.

Other programs drive the stages through :class:`DemoStages` (with :func:`load_preset`), as
``benchmarks/bench_quality.py`` does; ``build=False`` only reuses what an earlier run left.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from ..tot import cosine_cost, tot_sinkhorn
from ..training.audio import load_audio
from ..training.error_analysis import split_errors
from ..training.language_model import decode_and_score, estimate_character_lm, greedy_transcripts, manifest_logits
from ..training.transcripts import normalize_transcript
from .build_cache import lines_digest, settings_hash
from .encoder_pretraining import ENCODER_REPORT_FILE, export_encoder, load_complete_encoder, write_syllable_manifests
from .synthesis import (
    SEEN_VOICES_SPLIT,
    SPLITS,
    CorpusSummary,
    SynthesisConfig,
    char_readings,
    corpus_splits,
    format_test_tracks,
    heldout_sentences,
    plan_corpus,
    read_manifest,
    synthesize_corpus,
)
from .teacher_pretraining import TeacherConfig, TeacherSummary, build_teacher, training_texts

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
PRESETS = ("quick", "full", "transfer", "knowledge")
PRESET_SECTIONS = ("synthesis", "teacher", "encoder", "train", "lm")
ENCODER_SECTIONS = ("synthesis", "train")
ENCODER_FORMAT_VERSION = 1
"""Bumped whenever what an encoder section builds changes, so old pretrained encoders are rebuilt."""
LM_DEFAULTS = {"order": 4, "beam_width": 32, "alphas": [0.0, 0.3, 0.6, 1.0, 1.5], "betas": [0.0, 1.5, 3.0]}
"""The ``lm`` section's settings: n-gram order, beam width, and the dev grid of LM weights and bonuses."""
DEMO_TRAIN_ARGS = (
    "output_dir",
    "train_manifest",
    "eval_manifest",
    "test_manifest",
    "teacher_name_or_path",
    "teacher_cache_dir",
    "cache_dir",
    "model_name_or_path",
    "encoder_name_or_path",
    "do_train",
    "do_eval",
    "do_predict",
    "overwrite_output_dir",
    "eval_split_name",
)
"""``train_hf.py`` arguments the demo sets itself (paths and stages); a preset must not give them."""
EVALUATION_ARGS_FROM_PRESET = (
    "per_device_eval_batch_size",
    "preprocessing_num_workers",
    "dataloader_num_workers",
    "use_cpu",
    "bf16",
    "fp16",
    "cache_teacher_features",
    "max_duration_in_seconds",
    "report_to",
    "disable_tqdm",
)
"""Arguments of the preset's ``train`` section that the evaluation-only run inherits."""
TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "train_hf.py"
DEMO_REPORT_FILE = "demo_report.json"
COUPLINGS_FILE = "couplings.png"
# The reference speed is a 2-core machine that trains the quick preset at about 8 steps/s. On it the stages after
# training took 25 s in all (the final save 11 s past the budget, decoding 11 s, pipeline and couplings 3 s):
# AFTER_TRAINING_SECONDS keeps 3.6 times that. REFERENCE_STAGE_SECONDS is an estimate of building the quick
# preset's corpus and teacher there (not measured on an idle machine: the teacher alone took 385 s with other
# jobs on both cores); a machine that builds them slower than this keeps proportionally more.
REFERENCE_STAGE_SECONDS = 300.0
AFTER_TRAINING_SECONDS = 90.0
MIN_TRAINING_SECONDS = 60.0
TRAINED_MARKER = "demo_train_args.yaml"
"""Written into ``model/`` after a complete training run: the arguments it was trained with."""


# ----------------------------------------------------------------------------------------- presets
@dataclass
class DemoPreset:
    """A demo configuration.

    Attributes:
        name: preset name (``quick``, ``full``) or the file's stem.
        source: the YAML file it was read from.
        synthesis: :class:`SynthesisConfig` fields (``output_dir`` excluded).
        teacher: :class:`TeacherConfig` fields (``output_dir`` and ``corpus_dir`` excluded).
        train: ``train_hf.py`` arguments (:data:`DEMO_TRAIN_ARGS` excluded).
        encoder: ``{"synthesis": ..., "train": ...}`` of the pretrained encoder; empty: train from scratch.
        lm: the character language model's settings (:data:`LM_DEFAULTS` fields).
    """

    name: str
    source: Path
    synthesis: dict = field(default_factory=dict)
    teacher: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    encoder: dict = field(default_factory=dict)
    lm: dict = field(default_factory=dict)

    def encoder_key(self) -> str:
        """Hash of what determines the pretrained encoder: its section and the character-level
        corpus' settings (whose dev/test sentences it must not speak)."""
        key = {"encoder": self.encoder, "synthesis": self.synthesis, "format_version": ENCODER_FORMAT_VERSION}
        return settings_hash(key)


def _field_names(config_class) -> set[str]:
    return {item.name for item in dataclasses.fields(config_class)}


def load_preset(name_or_path: str | os.PathLike) -> DemoPreset:
    """Read a preset: a name in :data:`PRESETS` (``recipes/demo_<name>.yaml``) or a YAML file path.

    Raises:
        ValueError: unknown preset, unknown section or field, or a field the demo sets itself.
    """
    path = Path(name_or_path)
    if str(name_or_path) in PRESETS:
        path = RECIPES_DIR / f"demo_{name_or_path}.yaml"
    elif not path.is_file():
        raise ValueError(f"Unknown demo preset {str(name_or_path)!r}: give one of {PRESETS} or a YAML file.")
    content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(content, dict) or set(content) - set(PRESET_SECTIONS):
        raise ValueError(f"{path}: a demo preset is a mapping with the sections {PRESET_SECTIONS}, got {content!r}.")
    allowed = {
        "synthesis": _field_names(SynthesisConfig) - {"output_dir"},
        "teacher": _field_names(TeacherConfig) - {"output_dir", "corpus_dir"},
    }
    for section, names in allowed.items():
        unknown = sorted(set(content.get(section) or {}) - names)
        if unknown:
            raise ValueError(f"{path}: unknown {section} settings {unknown}; allowed: {sorted(names)}.")
    unknown = sorted(set(content.get("lm") or {}) - set(LM_DEFAULTS))
    if unknown:
        raise ValueError(f"{path}: unknown lm settings {unknown}; allowed: {sorted(LM_DEFAULTS)}.")
    owned = sorted(set(content.get("train") or {}) & set(DEMO_TRAIN_ARGS))
    if owned:
        raise ValueError(f"{path}: the train section must not set {owned}; the demo sets these itself.")
    encoder = dict(content.get("encoder") or {})
    if encoder:
        if set(encoder) != set(ENCODER_SECTIONS):
            raise ValueError(f"{path}: the encoder section needs exactly the subsections {ENCODER_SECTIONS}.")
        unknown = sorted(set(encoder["synthesis"] or {}) - (_field_names(SynthesisConfig) - {"output_dir"}))
        if unknown:
            raise ValueError(f"{path}: unknown encoder synthesis settings {unknown}.")
        owned = sorted(set(encoder["train"] or {}) & set(DEMO_TRAIN_ARGS))
        if owned:
            raise ValueError(f"{path}: the encoder's train section must not set {owned}; the demo sets these itself.")
        if "encoder_config" in (content.get("train") or {}):
            raise ValueError(f"{path}: with an encoder section, training starts from it: drop train.encoder_config.")
    return DemoPreset(
        name=path.stem.removeprefix("demo_"),
        source=path,
        synthesis=dict(content.get("synthesis") or {}),
        teacher=dict(content.get("teacher") or {}),
        train=dict(content.get("train") or {}),
        encoder=encoder,
        lm=dict(content.get("lm") or {}),
    )


@dataclass
class DemoPaths:
    """Where a run keeps its files.

    Attributes:
        root: the run's folder (argument files, logs, report, plot).
        corpus, teacher: the corpus and teacher folders.
        model: ``train_hf.py``'s output folder (the trained model).
        cache: featurised datasets and teacher features, shared between runs.
        encoder_root: the pretrained encoder's corpus, training run and folders (default ``root/encoder``).
    """

    root: Path
    corpus: Path
    teacher: Path
    model: Path
    cache: Path
    encoder_root: Path | None = None

    def __post_init__(self):
        if self.encoder_root is None:
            self.encoder_root = self.root / "encoder"

    @classmethod
    def create(cls, work_dir: str | os.PathLike, preset: DemoPreset) -> DemoPaths:
        """The demo's layout: everything in ``<work_dir>/<preset>/``, the cache in ``<work_dir>/cache``."""
        root = Path(work_dir).resolve() / preset.name
        return cls(
            root=root,
            corpus=root / "corpus",
            teacher=root / "teacher",
            model=root / "model",
            cache=root.parent / "cache",
        )

    evaluation = property(lambda self: self.root / "evaluation")
    logs = property(lambda self: self.root / "logs")
    language_model_dir = property(lambda self: self.root / "language_model")
    report = property(lambda self: self.root / DEMO_REPORT_FILE)
    couplings_png = property(lambda self: self.root / COUPLINGS_FILE)


# ------------------------------------------------------------------------------------------ stages
def synthesize_stage(preset: DemoPreset, paths: DemoPaths, build: bool = True) -> CorpusSummary | None:
    """Make (or reuse) the preset's corpus in ``paths.corpus``; with ``build=False`` only reuse it (None if absent)."""
    return synthesize_corpus(SynthesisConfig(output_dir=str(paths.corpus), **preset.synthesis), reuse_only=not build)


def teacher_stage(preset: DemoPreset, paths: DemoPaths, build: bool = True) -> TeacherSummary | None:
    """Pretrain (or reuse) the teacher in ``paths.teacher``, holding out the corpus' dev/test sentences; with
    ``build=False`` only reuse it (None if it, or the corpus it depends on, is absent)."""
    if not build and synthesize_stage(preset, paths, build=False) is None:
        return None
    config = TeacherConfig(output_dir=str(paths.teacher), corpus_dir=str(paths.corpus), **preset.teacher)
    return build_teacher(config, reuse_only=not build)


def pretrained_encoder_dir(preset: DemoPreset, paths: DemoPaths) -> Path:
    """Where the preset's pretrained encoder lives: a folder per settings hash, so that a changed
    encoder section gives a new path, and with it new training arguments (the model is retrained)."""
    return paths.encoder_root / f"model-{preset.encoder_key()}"


def encoder_stage(preset: DemoPreset, paths: DemoPaths, build: bool = True, **script_options) -> dict | None:
    """Pretrain (or reuse) the preset's acoustic encoder; None for a preset without an encoder section, and with
    ``build=False`` (only reuse) None when it is not there.

    Synthesises the pretraining corpus (the character-level corpus' dev/test sentences excluded),
    writes its syllable transcripts, trains CTC on them with ``train_hf.py`` (``script_options``
    go to :func:`run_train_script`) and exports the encoder to :func:`pretrained_encoder_dir`.

    Returns:
        ``encoder_report.json``'s content (``reused`` tells whether it was built now).
    """
    if not preset.encoder:
        return None
    key, model_dir = preset.encoder_key(), pretrained_encoder_dir(preset, paths)
    report = load_complete_encoder(model_dir, key)
    if report is not None:
        return {**report, "reused": True}
    if not build:
        return None
    start = time.perf_counter()
    corpus = synthesize_corpus(
        SynthesisConfig(
            output_dir=str(paths.encoder_root / "corpus"),
            exclude_corpus_dir=str(paths.corpus),
            **preset.encoder["synthesis"],
        )
    )
    units = paths.encoder_root / "units"
    symbols = write_syllable_manifests(corpus.output_dir, units)
    ctc_dir = paths.encoder_root / "ctc"
    arguments = {
        **preset.encoder["train"],
        "alignment": "none",
        "output_dir": str(ctc_dir),
        "train_manifest": str(units / "train.jsonl"),
        "eval_manifest": str(units / "dev.jsonl"),
        "cache_dir": str(paths.cache / "datasets"),
        "do_train": True,
        "do_eval": True,
        "overwrite_output_dir": True,
    }
    run_train_script(
        arguments, paths.root / "encoder_args.yaml", paths.logs / "encoder_pretraining.log", **script_options
    )
    results = json.loads((ctc_dir / "eval_results.json").read_text(encoding="utf-8"))
    exported = export_encoder(ctc_dir, model_dir)
    summary = training_summary(ctc_dir)
    report = {
        "settings_hash": key,
        "format_version": ENCODER_FORMAT_VERSION,
        **exported,
        "syllables": len(symbols),
        "corpus": _corpus_stats(corpus),
        "excluded_sentences": corpus.info["excluded_sentences"],
        "dev_syllable_error_rate": results["eval_cer"],
        "dev_utterances": results["eval_samples"],
        "steps": summary["steps"],
        "dev_syllable_error_rate_by_step": summary["dev_cer_by_step"],
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    (model_dir / ENCODER_REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return {**report, "reused": False}


def training_arguments(preset: DemoPreset, paths: DemoPaths) -> dict:
    """The ``train_hf.py`` arguments of the training run: the preset's plus the demo's paths
    (and the pretrained encoder, for a preset with an encoder section)."""
    encoder = {"encoder_name_or_path": str(pretrained_encoder_dir(preset, paths))} if preset.encoder else {}
    return {
        **preset.train,
        **encoder,
        "output_dir": str(paths.model),
        "train_manifest": str(paths.corpus / "train.jsonl"),
        "eval_manifest": str(paths.corpus / "dev.jsonl"),
        "teacher_name_or_path": str(paths.teacher),
        "teacher_cache_dir": str(paths.cache / "teacher_features"),
        "cache_dir": str(paths.cache / "datasets"),
        "do_train": True,
        "do_eval": preset.train.get("eval_strategy", "no") != "no",
        "overwrite_output_dir": True,
    }


def evaluation_arguments(preset: DemoPreset, paths: DemoPaths, split: str) -> dict:
    """The ``train_hf.py`` arguments that score the saved model on one split (``dev`` or ``test``)."""
    return {
        **{name: preset.train[name] for name in EVALUATION_ARGS_FROM_PRESET if name in preset.train},
        "model_name_or_path": str(paths.model),
        "output_dir": str(paths.evaluation / split),
        "eval_manifest": str(paths.corpus / f"{split}.jsonl"),
        "eval_split_name": split,
        "teacher_name_or_path": str(paths.teacher),
        "teacher_cache_dir": str(paths.cache / "teacher_features"),
        "cache_dir": str(paths.cache / "datasets"),
        "do_eval": True,
    }


def run_train_script(
    arguments: dict, args_file: Path, log_file: Path, echo: bool = True, environment: dict | None = None
) -> None:
    """Write ``arguments`` to ``args_file`` and run ``python train_hf.py args_file``.

    The script's output goes to ``log_file`` and, with ``echo``, to the console too.
    ``environment`` adds variables to the script's environment (e.g. ``OMP_NUM_THREADS``).

    Raises:
        FileNotFoundError: ``train_hf.py`` is not next to the package (the package is not used from a clone).
        RuntimeError: the script failed; the message names the log.
    """
    if not TRAIN_SCRIPT.is_file():
        raise FileNotFoundError(
            f"{TRAIN_SCRIPT} not found: the demo runs train_hf.py from a clone of the repository "
            "(pip install -e . keeps the package next to it)."
        )
    args_file.parent.mkdir(parents=True, exist_ok=True)
    args_file.write_text(yaml.safe_dump(arguments, allow_unicode=True, sort_keys=True), encoding="utf-8")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with (
        log_file.open("wb") as log,
        subprocess.Popen(
            [sys.executable, str(TRAIN_SCRIPT), str(args_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=str(TRAIN_SCRIPT.parent),
            env={**os.environ, **(environment or {})},
        ) as process,
    ):
        # Chunks, not lines: progress bars end their updates with carriage returns.
        while chunk := process.stdout.read1(65536):
            log.write(chunk)
            if echo:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
    if process.returncode != 0:
        raise RuntimeError(f"train_hf.py {args_file} failed with exit status {process.returncode}; see {log_file}.")


def is_trained(paths: DemoPaths, arguments: dict) -> bool:
    """Whether ``paths.model`` holds a model whose training with ``arguments`` ran to completion."""
    marker = paths.model / TRAINED_MARKER
    if not (marker.is_file() and (paths.model / "model.safetensors").is_file()):
        return False
    return yaml.safe_load(marker.read_text(encoding="utf-8")) == arguments


def train_stage(
    preset: DemoPreset,
    paths: DemoPaths,
    retrain: bool = False,
    max_train_seconds: float | None = None,
    **script_options,
) -> bool:
    """Train with ``train_hf.py`` unless an identical completed run is there.

    ``max_train_seconds`` is the training's wall-clock budget (``train_hf.py --max_train_seconds``); a model
    trained to the end of its budget counts as trained with the preset's arguments. ``script_options`` go to
    :func:`run_train_script` (``echo``, ``environment``).

    Returns:
        True when the saved model was reused.
    """
    arguments = training_arguments(preset, paths)
    if not retrain and is_trained(paths, arguments):
        return True
    (paths.model / TRAINED_MARKER).unlink(missing_ok=True)
    budget = {} if max_train_seconds is None else {"max_train_seconds": round(max_train_seconds)}
    run_train_script(
        {**arguments, **budget}, paths.root / "train_args.yaml", paths.logs / "train.log", **script_options
    )
    (paths.model / TRAINED_MARKER).write_text(
        yaml.safe_dump(arguments, allow_unicode=True, sort_keys=True), encoding="utf-8"
    )
    return False


def evaluate_stage(preset: DemoPreset, paths: DemoPaths, **script_options) -> dict:
    """Score the saved model on dev and on test with ``train_hf.py``.

    One evaluation-only run per split, each scoring its split as the evaluation set;
    ``script_options`` go to :func:`run_train_script`.

    Returns:
        ``{split: {"cer", "utterances", "loss"}}`` for ``dev`` and ``test``.
    """
    metrics = {}
    for split in ("dev", "test"):
        arguments = evaluation_arguments(preset, paths, split)
        log_file = paths.logs / f"evaluation_{split}.log"
        run_train_script(arguments, paths.root / f"eval_{split}_args.yaml", log_file, **script_options)
        results = json.loads((paths.evaluation / split / "eval_results.json").read_text(encoding="utf-8"))
        metrics[split] = {
            "cer": results["eval_cer"],
            "utterances": results["eval_samples"],
            "loss": results["eval_loss"],
        }
    return metrics


def dev_cer_by_step(history: Sequence[dict]) -> list[tuple[int, float]]:
    """``(step, dev CER)`` of the periodic evaluations in a Trainer's ``log_history``.

    The evaluation after training is logged at the last step too; with ``load_best_model_at_end``
    it measures the best checkpoint, not the last, so the first value logged at a step is kept.
    """
    curve: dict[int, float] = {}
    for entry in history:
        if "eval_cer" in entry:
            curve.setdefault(entry["step"], entry["eval_cer"])
    return sorted(curve.items())


def training_summary(model_dir: Path) -> dict:
    """Steps, run time, final loss, the dev CER curve and the gradient norms on the encoder logged at logging steps
    (``gradient_norms_by_step``: ``grad_norm_*`` and ``knowledge_share`` with their ``step``) of the run saved in
    ``model_dir``."""
    from ..training.trainer import LOGGED_GRADIENT_NORMS

    state = json.loads((model_dir / "trainer_state.json").read_text(encoding="utf-8"))
    results = json.loads((model_dir / "train_results.json").read_text(encoding="utf-8"))
    history = state["log_history"]
    return {
        "steps": state["global_step"],
        "train_runtime_seconds": results.get("train_runtime"),
        "train_loss": results.get("train_loss"),
        "dev_cer_by_step": dev_cer_by_step(history),
        "last_logged_losses": next(
            (
                {key: entry[key] for key in ("loss", "ctc_loss", "ot_loss", "align_loss") if key in entry}
                for entry in reversed(history)
                if "loss" in entry
            ),
            {},
        ),
        "gradient_norms_by_step": [
            {"step": entry["step"], **{key: entry[key] for key in LOGGED_GRADIENT_NORMS if key in entry}}
            for entry in history
            if any(key in entry for key in LOGGED_GRADIENT_NORMS)
        ],
    }


# ---------------------------------------------------------------------------------- transcription
def character_error_rate(hypothesis: str, reference: str) -> float:
    """CER of one transcript with the package's metric (edit distance / reference length)."""
    from ..training.trainer import load_cer_metric

    return float(load_cer_metric().compute(predictions=[hypothesis], references=[reference]))


def transcribe_clips(model_dir: Path, records: Sequence[dict]) -> list[dict]:
    """Transcribe manifest records through the ASR pipeline with remote code, as a Hub user would.

    The audio is decoded with soundfile (no FFmpeg) and passed as ``{"raw", "sampling_rate"}``.

    Returns:
        One ``{"id", "reference", "hypothesis", "cer"}`` per record.
    """
    import soundfile
    from transformers import pipeline

    recogniser = pipeline("automatic-speech-recognition", model=str(model_dir), trust_remote_code=True)
    transcriptions = []
    for record in records:
        audio, rate = soundfile.read(record["audio"], dtype="float32")
        hypothesis = recogniser({"raw": audio, "sampling_rate": rate})["text"].replace(" ", "")
        transcriptions.append(
            {
                "id": record["id"],
                "reference": record["text"],
                "hypothesis": hypothesis,
                "cer": round(character_error_rate(hypothesis, record["text"]), 4),
            }
        )
    return transcriptions


def transcribe_manifest(model_dir: Path, records: Sequence[dict], batch_size: int = 32) -> list[str]:
    """Greedy CTC transcripts of manifest records with the saved model, in record order, without spaces.

    As in ``train_hf.py``'s evaluation, the frames of the padding are left out of the arg-max path and
    ``[UNK]`` counts as one character; each clip is featurised on its own, so that its transcript does not
    depend on its batch (:func:`~modeling_tot_cakt.training.language_model.manifest_logits`).
    """
    model, processor = load_model_and_processor(model_dir)
    logits = manifest_logits(model, processor, [record["audio"] for record in records], batch_size)
    return greedy_transcripts(processor.tokenizer, logits)


def load_model_and_processor(model_dir: Path):
    """The saved CTC model (in eval mode) and its processor."""
    from transformers import AutoProcessor

    from ..modeling_tot_cakt import TOTCAKTForCTC

    return TOTCAKTForCTC.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(model_dir)


def error_split_stage(paths: DemoPaths, split: str = "test") -> dict:
    """CER of the saved model on ``split``, split into homophone substitutions and other errors
    (:func:`~modeling_tot_cakt.training.error_analysis.split_errors`, with the corpus' own readings)."""
    records, readings = corpus_records_and_readings(paths)
    hypotheses = transcribe_manifest(paths.model, records[split])
    return {"split": split, **error_split(records[split], hypotheses, readings)}


def corpus_records_and_readings(paths: DemoPaths) -> tuple[dict[str, list[dict]], dict]:
    """The corpus' manifest records per split (its seen-voices test track too), and the readings its synthesiser
    gave each character."""
    records = {name: read_manifest(paths.corpus / f"{name}.jsonl") for name in corpus_splits(paths.corpus)}
    readings = char_readings(
        (record["text"], record["pinyin"].split()) for name in records for record in records[name]
    )
    return records, readings


def error_split(records: Sequence[dict], hypotheses: Sequence[str], readings: dict) -> dict:
    """:func:`~modeling_tot_cakt.training.error_analysis.split_errors` of `hypotheses` against `records`."""
    references = [normalize_transcript(record["text"]) for record in records]
    syllables = [record["pinyin"].split() for record in records]
    return split_errors(references, hypotheses, syllables, readings).as_dict()


def language_model_stage(preset: DemoPreset, paths: DemoPaths) -> dict:
    """
    Estimate (or reuse) the character n-gram model of ``paths.language_model_dir``: KenLM's ``lmplz`` on the
    teacher's text (the four sources, every dev/test sentence held out), of the preset's ``lm.order``.
    """
    settings = {**LM_DEFAULTS, **preset.lm}
    heldout = heldout_sentences(paths.corpus)
    key = settings_hash({"teacher": preset.teacher, "order": settings["order"], "heldout": lines_digest(heldout)})
    arpa = paths.language_model_dir / f"chars-{settings['order']}gram-{key}.arpa"
    report_file = arpa.with_suffix(".json")
    if arpa.is_file() and report_file.is_file():
        return {**json.loads(report_file.read_text(encoding="utf-8")), "reused": True}
    start = time.perf_counter()
    teacher = TeacherConfig(output_dir=str(paths.teacher), corpus_dir=str(paths.corpus), **preset.teacher)
    texts, excluded = training_texts(teacher, heldout)
    estimate_character_lm(texts, arpa, order=settings["order"])
    report = {
        "arpa": str(arpa),
        "order": settings["order"],
        "sentences": len(texts),
        "characters": sum(map(len, texts)),
        "excluded_overlapping_heldout": excluded,
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    report_file.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return {**report, "reused": False}


def decoding_stage(
    preset: DemoPreset, paths: DemoPaths, arpa: str | os.PathLike, test_splits: Sequence[str] = ("test",)
) -> dict:
    """
    Decode dev and the `test_splits` (e.g. both test tracks of a corpus that has two) greedily and with the
    character language model `arpa`, whose weight and bonus are chosen on dev by the preset's grid, and split the
    errors of each (with the corpus' own pinyin). The model folder gets the language model (its ``alphabet.json``
    and ``language_model/``), so that the pipeline decodes with it from then on.

    Returns:
        ``{"weights": {alpha, beta, cer, beam_width, grid}, "dev"/each test split: {"greedy": split, "lm": split,
        "utterances"}, "speed": greedy and LM decoding seconds of the last test split, side by side}``.
    """
    settings = {**LM_DEFAULTS, **preset.lm}
    records, readings = corpus_records_and_readings(paths)
    model, processor = load_model_and_processor(paths.model)
    splits = ("dev", *test_splits)
    scored = decode_and_score(
        processor,
        paths.model,
        arpa,
        logits={
            split: manifest_logits(model, processor, [record["audio"] for record in records[split]])
            for split in splits
        },
        references={split: [record["text"] for record in records[split]] for split in splits},
        tune_split="dev",
        syllables={split: [record["pinyin"].split() for record in records[split]] for split in splits},
        readings=readings,
        beam_width=settings["beam_width"],
        alphas=settings["alphas"],
        betas=settings["betas"],
    )
    for split in splits:
        scored[split]["utterances"] = len(records[split])
    return scored


# -------------------------------------------------------------------------------------- public API
@dataclass
class DemoStages:
    """The demo's stages on one preset and one layout of paths: what other programs (the quality benchmark) use.

    The corpus, teacher and encoder are built when missing and reused otherwise; with ``build=False`` they are
    only reused (None where an earlier run left nothing), so that a program that only reports trains nothing.
    Attributes: ``preset`` (:class:`DemoPreset`) and ``paths`` (:class:`DemoPaths`).
    """

    preset: DemoPreset
    paths: DemoPaths

    @classmethod
    def create(cls, work_dir: str | os.PathLike, preset: DemoPreset) -> DemoStages:
        """The demo's own layout (:meth:`DemoPaths.create`)."""
        return cls(preset, DemoPaths.create(work_dir, preset))

    def for_run(self, run_dir: Path, train: dict, teacher: Path | None = None) -> DemoStages:
        """The stages of one training run in ``run_dir`` (its model in ``run_dir/model``) with the ``train_hf.py``
        arguments ``train``, sharing this layout's corpus, encoder, cache and teacher (or ``teacher``)."""
        paths = DemoPaths(
            root=run_dir,
            corpus=self.paths.corpus,
            teacher=teacher or self.paths.teacher,
            model=run_dir / "model",
            cache=self.paths.cache,
            encoder_root=self.paths.encoder_root,
        )
        return DemoStages(dataclasses.replace(self.preset, train=train), paths)

    def corpus(self, build: bool = True) -> CorpusSummary | None:
        return synthesize_stage(self.preset, self.paths, build)

    def teacher(self, build: bool = True) -> TeacherSummary | None:
        return teacher_stage(self.preset, self.paths, build)

    def encoder(self, build: bool = True, **script_options) -> dict | None:
        return encoder_stage(self.preset, self.paths, build, **script_options)

    def language_model(self) -> dict:
        return language_model_stage(self.preset, self.paths)

    def train(self, **options) -> bool:
        """:func:`train_stage`: True when a completed run with the same arguments was reused."""
        return train_stage(self.preset, self.paths, **options)

    def evaluate(self, **script_options) -> dict:
        return evaluate_stage(self.preset, self.paths, **script_options)

    def error_split(self, split: str = "test") -> dict:
        return error_split_stage(self.paths, split)

    def decode_with_language_model(self, arpa: str | os.PathLike, test_splits: Sequence[str] = ("test",)) -> dict:
        return decoding_stage(self.preset, self.paths, arpa, test_splits)

    def training_summary(self) -> dict:
        return training_summary(self.paths.model)


# --------------------------------------------------------------------------------------- couplings
@dataclass
class UtteranceCouplings:
    """TOT and plain-OT couplings of one utterance.

    Attributes:
        tot: ``(N, M)`` TOT coupling (the trained model's ``tot_lambda1``, ``tot_lambda2``, ``tot_sigma``).
        plain: ``(N, M)`` plain entropic OT coupling (``lambda1 = 0``, no prior, same ``lambda2``).
        frame_seconds: duration of one encoder frame.
        trained: for a model trained with another member of the family (``uot``, ``tot_uot``, ``gmot``,
            ``tot_gmot``), ``(alignment, (N, M) coupling)`` as that mode computes it in training; else None.
    """

    tot: np.ndarray
    plain: np.ndarray
    frame_seconds: float
    trained: tuple[str, np.ndarray] | None = None

    def panels(self) -> list[tuple[str, np.ndarray]]:
        """``(title, coupling)`` of every coupling drawn: TOT, plain OT, then the trained mode's own if another."""
        panels = [("TOT", self.tot), ("plain OT", self.plain)]
        if self.trained is not None:
            panels.append((f"{self.trained[0]} (trained mode)", self.trained[1]))
        return panels


class AlignmentModels:
    """A trained TOT-CAKT model with its processor and teacher, for computing couplings.

    Args:
        model_dir: the saved model (``train_hf.py``'s output); it must have been trained with
            an alignment (``tot`` or ``ot``), so that it has the adapter.
        teacher_dir: the teacher it was trained with.
    """

    def __init__(self, model_dir: str | os.PathLike, teacher_dir: str | os.PathLike):
        from transformers import AutoProcessor

        from ..modeling_tot_cakt import TOTCAKTForCTC
        from ..training.trainer import load_teacher

        self.model = TOTCAKTForCTC.from_pretrained(model_dir).eval()
        if not self.model.config.uses_teacher:
            raise ValueError(
                f"{model_dir} was trained with alignment='none': it has no adapter, so there are no couplings to show."
            )
        self.processor = AutoProcessor.from_pretrained(model_dir)
        config = self.model.config
        teacher, self.teacher_tokenizer = load_teacher(str(teacher_dir), masked_lm=config.uses_teacher_predictions)
        self.model.attach_teacher(teacher, self.teacher_tokenizer, ctc_tokenizer=self.processor.tokenizer)

    @property
    def frame_seconds(self) -> float:
        """Seconds per encoder frame."""
        return self.model.config.inputs_to_logits_ratio / self.processor.feature_extractor.sampling_rate

    @torch.no_grad()
    def couplings(self, waveform: np.ndarray, text: str) -> UtteranceCouplings:
        """Couplings of one utterance: ``waveform`` ``(samples,)`` at the processor's rate, normalised ``text``.

        Raises:
            ValueError: the teacher does not give one token per character of ``text``.
        """
        extractor = self.processor.feature_extractor
        inputs = extractor(
            waveform, sampling_rate=extractor.sampling_rate, return_tensors="pt", return_attention_mask=True
        )
        features = inputs[extractor.model_input_names[0]]
        hidden = self.model.encoder(features, attention_mask=inputs["attention_mask"]).last_hidden_state
        frame_mask = self.model.frame_mask(hidden.shape[1], inputs["attention_mask"])
        adapted = self.model.adapter(hidden)
        encoded = self.teacher_tokenizer([text], return_tensors="pt")
        tokens, token_mask = self.model.teacher_token_features(encoded["input_ids"], encoded["attention_mask"])
        if int(token_mask.sum()) != len(text):
            raise ValueError(
                f"The teacher's tokenizer gives {int(token_mask.sum())} tokens for the {len(text)} characters of "
                f"{text!r}; couplings are drawn per character."
            )
        cost = cosine_cost(adapted, tokens)
        config = self.model.config
        solve = dict(lambda2=config.tot_lambda2, max_iter=config.tot_max_iter, tol=config.tot_tol)
        tot = tot_sinkhorn(cost, frame_mask, token_mask, lambda1=config.tot_lambda1, sigma=config.tot_sigma, **solve)
        plain = tot_sinkhorn(cost, frame_mask, token_mask, lambda1=0.0, sigma=None, **solve)
        valid = frame_mask[0]

        def utterance(coupling: torch.Tensor) -> np.ndarray:
            return coupling[0][valid][:, token_mask[0]].numpy()

        trained = None
        # The demo draws TOT and plain OT; a model trained with another alignment also gets its own, as in training.
        if config.alignment_is_unbalanced or config.alignment_is_graph_matching:
            own = self.model._alignment(adapted, frame_mask, tokens, token_mask)["coupling"]
            trained = (config.alignment, utterance(own))
        return UtteranceCouplings(
            tot=utterance(tot), plain=utterance(plain), frame_seconds=self.frame_seconds, trained=trained
        )


def alignment_error_seconds(
    coupling: np.ndarray, frame_seconds: float, char_times: Sequence[Sequence[float]]
) -> float:
    """How far a coupling's mass lies from the true alignment, in seconds.

    For each token ``j``, the expected distance ``sum_i T_ij / nu_j * |t_i - c_j|`` between the
    frame times ``t_i = (i + 1/2) * frame_seconds`` and the centre ``c_j`` of the character's
    syllable (``char_times[j] = [start, end]``); the mean over tokens.

    Args:
        coupling: ``(N, M)`` coupling whose columns sum to ``1/M``.
        frame_seconds: duration of an encoder frame.
        char_times: ``M`` ``[start, end]`` pairs in seconds (the synthesis manifest's ``char_times``).
    """
    if coupling.shape[1] != len(char_times):
        raise ValueError(f"The coupling has {coupling.shape[1]} tokens but char_times has {len(char_times)} entries.")
    frame_times = (np.arange(coupling.shape[0]) + 0.5) * frame_seconds
    centres = np.array([(start + end) / 2 for start, end in char_times])
    columns = coupling / coupling.sum(axis=0, keepdims=True)
    return float((columns * np.abs(frame_times[:, None] - centres[None, :])).sum(axis=0).mean())


def plot_couplings(couplings: UtteranceCouplings, record: dict, path: Path) -> None:
    """Save the TOT and plain-OT couplings (and the trained mode's, for another member of the family) side by
    side (frames down, characters across) as a PNG.

    The tick labels are the syllables (toneful pinyin), which every font can draw; a white box
    marks the frames of each syllable according to the synthesiser.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.patches import Rectangle

    syllables = record["pinyin"].split()
    frames = couplings.tot.shape[0]
    width = max(9.0, 3.0 + 0.9 * len(syllables))
    panels = couplings.panels()
    figure, axes = pyplot.subplots(1, len(panels), figsize=(width * len(panels) / 2, 3.0 + 0.12 * frames), sharey=True)
    for axis, (title, coupling) in zip(axes, panels):
        error = alignment_error_seconds(coupling, couplings.frame_seconds, record["char_times"])
        image = axis.imshow(coupling * coupling.shape[1], aspect="auto", cmap="viridis", interpolation="nearest")
        for column, (start, end) in enumerate(record["char_times"]):
            top = start / couplings.frame_seconds - 0.5
            axis.add_patch(
                Rectangle(
                    (column - 0.5, top), 1, (end - start) / couplings.frame_seconds, fill=False, edgecolor="white"
                )
            )
        axis.set_title(f"{title}\nmean |t - t_char| = {error * 1000:.0f} ms", fontsize=10)
        axis.set_xticks(range(len(syllables)), syllables, rotation=60, fontsize=8)
        axis.set_xlabel("character (pinyin)")
        figure.colorbar(image, ax=axis, label="T_ij / nu_j (each column sums to 1)")
    axes[0].set_ylabel(f"encoder frame ({couplings.frame_seconds * 1000:.0f} ms)")
    figure.suptitle(f"{record['id']}: {record['pinyin']}", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def coupling_stage(paths: DemoPaths, record: dict) -> dict:
    """Draw the couplings of ``record`` into ``paths.couplings_png``; returns their alignment errors."""
    models = AlignmentModels(paths.model, paths.teacher)
    sampling_rate = models.processor.feature_extractor.sampling_rate
    couplings = models.couplings(load_audio(record["audio"], sampling_rate), record["text"])
    plot_couplings(couplings, record, paths.couplings_png)
    return {
        "utterance": record["id"],
        "png": str(paths.couplings_png),
        "tot_alignment_error_seconds": round(
            alignment_error_seconds(couplings.tot, couplings.frame_seconds, record["char_times"]), 4
        ),
        "ot_alignment_error_seconds": round(
            alignment_error_seconds(couplings.plain, couplings.frame_seconds, record["char_times"]), 4
        ),
        **(
            {
                "trained_alignment": couplings.trained[0],
                "trained_alignment_error_seconds": round(
                    alignment_error_seconds(couplings.trained[1], couplings.frame_seconds, record["char_times"]), 4
                ),
            }
            if couplings.trained is not None
            else {}
        ),
    }


# --------------------------------------------------------------------------------------------- run
def _corpus_stats(corpus: CorpusSummary) -> dict:
    info = corpus.info
    return {
        "utterances": corpus.num_utterances,
        "sentences": corpus.num_sentences,
        "hours": {split: info["splits"][split]["hours"] for split in SPLITS},
        "vocabulary_size": info["vocabulary_size"],
        "homophones_test": info["homophones_test"],
        "test_tracks": info.get("test_tracks"),
    }


def _teacher_stats(teacher: TeacherSummary) -> dict:
    names = (
        "parameters",
        "vocab_size",
        "training_clauses",
        "heldout_masked_token_accuracy",
        "train_masked_token_accuracy",
        "homophone_choice",
        "build_seconds",
    )
    return {name: teacher.report.get(name) for name in names}


def training_budget(time_budget_seconds: float, elapsed: float, fresh_stage_seconds: float | None) -> float:
    """
    Seconds of training that keep the demo within `time_budget_seconds` after `elapsed` seconds: what is left,
    less the stages after training (:data:`AFTER_TRAINING_SECONDS`, measured on a machine of the reference speed),
    scaled by how much slower than the reference this machine built the corpus and the teacher
    (`fresh_stage_seconds`, None when both were reused: then the reference speed is assumed), and never less than
    :data:`MIN_TRAINING_SECONDS`.
    """
    slowness = 1.0 if fresh_stage_seconds is None else max(1.0, fresh_stage_seconds / REFERENCE_STAGE_SECONDS)
    left = time_budget_seconds - elapsed - AFTER_TRAINING_SECONDS * slowness
    return max(left, MIN_TRAINING_SECONDS)


def run_demo(
    preset: DemoPreset,
    work_dir: str | os.PathLike,
    retrain: bool = False,
    num_transcriptions: int = 3,
    time_budget_seconds: float | None = None,
) -> dict:
    """Run every stage (see the module docstring) and write ``demo_report.json``; returns the report.

    With `time_budget_seconds`, training stops when its share of the budget is spent (:func:`training_budget`).
    """
    paths = DemoPaths.create(work_dir, preset)
    paths.root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def timed(stage: str, function, *args, **kwargs):
        print(f"\n=== {stage} ===", flush=True)
        start = time.perf_counter()
        result = function(*args, **kwargs)
        timings[stage] = round(time.perf_counter() - start, 1)
        return result

    corpus = timed("synthesis", synthesize_stage, preset, paths)
    teacher = timed("teacher", teacher_stage, preset, paths)
    encoder = timed("encoder pretraining", encoder_stage, preset, paths) if preset.encoder else None
    language_model = timed("language model", language_model_stage, preset, paths)
    max_train_seconds = None
    if time_budget_seconds is not None:
        fresh = [timings[stage] for stage, built in (("synthesis", corpus), ("teacher", teacher)) if not built.reused]
        fresh_seconds = sum(fresh) if len(fresh) == 2 else None
        max_train_seconds = training_budget(time_budget_seconds, time.perf_counter() - started, fresh_seconds)
    model_reused = timed("training", train_stage, preset, paths, retrain, max_train_seconds)
    decoding = timed("decoding", decoding_stage, preset, paths, language_model["arpa"], corpus.test_tracks)
    evaluation = {
        split: {"cer": decoding[split]["greedy"]["cer"], "utterances": decoding[split]["utterances"]}
        for split in ("dev", "test")
    }
    test_records = read_manifest(corpus.manifests["test"])
    transcriptions = timed("transcription", transcribe_clips, paths.model, test_records[:num_transcriptions])
    couplings = timed("couplings", coupling_stage, paths, test_records[0])
    timings["total"] = round(time.perf_counter() - started, 1)

    report = {
        "preset": preset.name,
        "preset_file": str(preset.source),
        "work_dir": str(paths.root),
        "model_dir": str(paths.model),
        "reused": {
            "corpus": corpus.reused,
            "teacher": teacher.reused,
            **({"encoder": encoder["reused"]} if encoder else {}),
            "language_model": language_model["reused"],
            "model": model_reused,
        },
        "timings_seconds": timings,
        "time_budget_seconds": time_budget_seconds,
        "max_train_seconds": max_train_seconds,
        "cer": {split: evaluation[split]["cer"] for split in ("dev", "test")},
        "evaluation": evaluation,
        "training": training_summary(paths.model),
        "corpus": _corpus_stats(corpus),
        "teacher": _teacher_stats(teacher),
        "pretrained_encoder": encoder,
        "language_model": language_model,
        "test_errors": decoding["test"]["greedy"],
        "test_errors_lm": decoding["test"]["lm"],
        "decoding": decoding,
        "transcriptions": transcriptions,
        "couplings": couplings,
    }
    paths.report.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return report


def _error_line(name: str, errors: dict) -> str:
    return (
        f"{name} CER {errors['cer']:.3f}: homophone substitutions {errors['homophone_cer']:.3f}, "
        f"other errors {errors['other_cer']:.3f} (of which the spoken syllable in another tone "
        f"{errors.get('tone_cer', 0.0):.3f})"
    )


def format_summary(report: dict) -> str:
    """The demo's closing printout: CERs, transcriptions, couplings and timings."""
    lines = [
        "",
        f"=== TOT-CAKT demo ({report['preset']}) ===",
        f"dev CER  {report['cer']['dev']:.3f}  ({report['evaluation']['dev']['utterances']} utterances)",
        f"test CER {report['cer']['test']:.3f}  ({report['evaluation']['test']['utterances']} utterances)",
        _error_line("  greedy decoding:        test", report["test_errors"]),
        _error_line("  with the character LM: test", report["test_errors_lm"]),
        *(
            _error_line(f"  {label} {SEEN_VOICES_SPLIT}", report["decoding"][SEEN_VOICES_SPLIT][decoding])
            for label, decoding in (("greedy decoding:       ", "greedy"), ("with the character LM:", "lm"))
            if SEEN_VOICES_SPLIT in report["decoding"]
        ),
        f"  LM: {report['language_model']['order']}-gram on {report['language_model']['sentences']} sentences of "
        f"the teacher's text; weight {report['decoding']['weights']['alpha']}, bonus "
        f"{report['decoding']['weights']['beta']} chosen on dev (dev CER {report['decoding']['dev']['greedy']['cer']:.3f}"
        f" greedy, {report['decoding']['dev']['lm']['cer']:.3f} with the LM); beam {report['decoding']['speed']['beam_width']}, "
        f"{report['decoding']['speed']['lm_over_greedy']}x the greedy decoding time",
        f"trained {report['training']['steps']} steps"
        + (
            f" (training budget {report['max_train_seconds']:.0f} s of the demo's {report['time_budget_seconds']:.0f})"
            if report.get("max_train_seconds")
            else ""
        )
        + "; teacher held-out masked-token accuracy "
        f"{report['teacher']['heldout_masked_token_accuracy']:.3f}"
        + (
            f", homophone choice {choice['accuracy']:.3f} (most-frequent baseline "
            f"{choice['frequency_baseline_accuracy']:.3f})"
            if (choice := report["teacher"].get("homophone_choice"))
            else ""
        ),
    ]
    if encoder := report.get("pretrained_encoder"):
        lines.append(
            f"pretrained encoder: dev syllable error rate {encoder['dev_syllable_error_rate']:.3f} "
            f"on held-out voices after {encoder['steps']} steps ({'reused' if encoder['reused'] else 'built now'})"
        )
    lines += ["", "pipeline('automatic-speech-recognition', trust_remote_code=True) on test clips:"]
    for item in report["transcriptions"]:
        lines += [
            f"  {item['id']}  CER {item['cer']:.2f}",
            f"    reference:  {item['reference']}",
            f"    hypothesis: {item['hypothesis']}",
        ]
    couplings = report["couplings"]
    lines += [
        "",
        f"couplings of {couplings['utterance']}: {couplings['png']}",
        f"  mean distance of the coupling mass from the true syllable centre: TOT "
        f"{couplings['tot_alignment_error_seconds'] * 1000:.0f} ms, plain OT {couplings['ot_alignment_error_seconds'] * 1000:.0f} ms",
        "",
        "time per stage (s): "
        + ", ".join(f"{stage} {seconds}" for stage, seconds in report["timings_seconds"].items()),
        f"reused: {', '.join(name for name, reused in report['reused'].items() if reused) or 'nothing'}",
        f"report: {Path(report['work_dir']) / DEMO_REPORT_FILE}",
    ]
    return "\n".join(lines)


def describe_text(preset: DemoPreset) -> dict:
    """Print and return what the text decides of the preset's corpus (:func:`~modeling_tot_cakt.demo.synthesis.plan_corpus`):
    clauses after each filter, sentences and utterances per split, and per test track the shares of characters
    with a homophone in the train inventory and out of it."""
    start = time.perf_counter()
    info = plan_corpus(SynthesisConfig(output_dir="", **preset.synthesis)).text_info
    print(f"{preset.name}: clauses after each filter {info['sentence_filter_counts']}")
    for split, part in info["splits"].items():
        print(f"  {split}: {part['sentences']} sentences, {part['utterances']} utterances")
    print(f"  characters: {info['vocabulary_size']}, {info['train_vocabulary_size']} of them in the train transcripts")
    print("\n".join(format_test_tracks(info)))
    print(f"({time.perf_counter() - start:.0f} s)")
    return info


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: ``python -m modeling_tot_cakt.demo --preset quick --work_dir outputs/demo``."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="quick", help=f"One of {PRESETS}, or the path of a preset YAML file.")
    parser.add_argument("--work_dir", default="outputs/demo", help="Folder for everything the demo makes.")
    parser.add_argument("--retrain", action="store_true", help="Train again even when a completed model is there.")
    parser.add_argument(
        "--num_transcriptions", type=int, default=3, help="Test clips to transcribe with the pipeline."
    )
    parser.add_argument(
        "--time_budget_minutes",
        type=float,
        default=None,
        help="Finish within this many minutes: training stops when its share is spent (default: no budget).",
    )
    parser.add_argument(
        "--text_only",
        action="store_true",
        help="Print the preset's sentence counts and its test tracks' homophone and out-of-vocabulary shares, "
        "from the text alone (no audio, no training), and stop.",
    )
    args = parser.parse_args(argv)
    if args.text_only:
        return describe_text(load_preset(args.preset))
    report = run_demo(
        load_preset(args.preset),
        args.work_dir,
        retrain=args.retrain,
        num_transcriptions=args.num_transcriptions,
        time_budget_seconds=None if args.time_budget_minutes is None else 60 * args.time_budget_minutes,
    )
    print(format_summary(report))
    return report


if __name__ == "__main__":
    main()
