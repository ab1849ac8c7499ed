#!/usr/bin/env python
"""Mutation check: plant plausible bugs one at a time, run the tests meant to catch each, restore the file.

A mutant is a regular-expression substitution in one file of the package (or `train_hf.py`) plus the
tests that should fail on it. For each mutant the script

1. finds the pattern in the file (exactly one match, or the mutant is reported as "pattern not found" /
   "ambiguous": the code changed and the pattern must be rewritten);
2. writes the mutated file, runs `pytest -x` on the mutant's tests in a fresh interpreter (no stale
   bytecode: `PYTHONPYCACHEPREFIX` points to an empty folder), and restores the original file, also
   when interrupted (Ctrl-C, SIGTERM);
3. reports it as *killed* (a test failed or the tests could not even be collected), *survived*
   (every test passed) or *timeout*.

Patterns are written against short, stable snippets (the name of a configuration field, a call to a
public function), so they survive renames of the code around them.

Usage (from the repository root; `make mutation` runs the first form)::

    python tests/mutation/mutation_check.py                  # baseline, then every mutant
    python tests/mutation/mutation_check.py --list           # the mutants, whether they match, their tests
    python tests/mutation/mutation_check.py --only ot-mode-runs-tot ctc-padded-frame-count
    python tests/mutation/mutation_check.py --skip-slow      # leave out mutants whose tests take minutes
    python tests/mutation/mutation_check.py --markdown results.md

The exit status is 0 when every mutant run is killed or an accepted survivor (`ACCEPTED_SURVIVORS`,
each with its reason), 1 otherwise (a survivor, a pattern that no longer matches, a failing baseline).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

MODEL = "modeling_tot_cakt/modeling_tot_cakt.py"
SOLVER = "modeling_tot_cakt/tot.py"
TRAINER = "modeling_tot_cakt/training/trainer.py"
COLLATOR = "modeling_tot_cakt/training/collator.py"
CER = "modeling_tot_cakt/training/metrics/cer/cer.py"
DATA = "modeling_tot_cakt/training/data.py"
TEACHER_FEATURES = "modeling_tot_cakt/training/teacher_features.py"
SAVED_FILES = "modeling_tot_cakt/training/saved_files.py"
AUDIO = "modeling_tot_cakt/training/audio.py"
FEATURES = "modeling_tot_cakt/feature_extraction_tot_cakt.py"
SCRIPT = "train_hf.py"

WIRING = ("tests/test_model_wiring.py",)
MODELING = ("tests/test_modeling.py",)
EVALUATION = ("tests/test_evaluation.py",)
SOLVER_TESTS = ("tests/test_tot.py", "tests/test_tot_properties.py", "tests/test_tot_solver.py")
GW_TESTS = ("tests/test_tot_gw.py",)
RESUME = ("tests/test_faults.py", "tests/test_train_hf.py")
TRAIN = ("tests/test_train_hf.py",)
FEATURE_CACHE = ("tests/test_teacher_features.py",)
KNOWLEDGE = ("tests/test_knowledge.py",)
BATCH = ("tests/test_batch_independence.py",)


@dataclass(frozen=True)
class Mutant:
    """One planted bug: `pattern` (a regular expression, exactly one match) becomes `replacement` in `path`."""

    name: str
    path: str
    pattern: str
    replacement: str
    tests: tuple[str, ...]  # test files or node ids
    bug: str  # what the planted bug does, in words
    select: str | None = None  # a pytest `-k` expression that narrows `tests` down
    slow: bool = False  # its tests run whole trainings in subprocesses (a minute or more)


MUTANTS = (
    # ---------------------------------------------------------------- model wiring
    Mutant(
        "solver-without-frame-mask",
        MODEL,
        r"(tot_sinkhorn\(\s*\w+,\s*)(?:source_mask=)?\w+(?=\s*,)",
        r"\1None",
        WIRING + MODELING,
        "the model passes no frame mask to the solver: padded frames receive transport mass",
    ),
    Mutant(
        "solver-without-token-mask",
        MODEL,
        r"(tot_sinkhorn\(\s*\w+,\s*(?:source_mask=)?\w+,\s*)(?:target_mask=)?\w+(?=\s*,)",
        r"\1target_mask=None",
        WIRING + MODELING,
        "the model passes no token mask to the solver: padded tokens receive transport mass",
    ),
    Mutant(
        "frame-mask-all-valid",
        MODEL,
        r"(torch\.arange\(frames, device=attention_mask\.device\) < lengths\[:, None\])",
        r"(\1) | True",
        WIRING + MODELING,
        "every output frame counts as valid, padded ones included",
    ),
    Mutant(
        "padding-frames-not-blank",
        MODEL,
        r"logits = self\.blank_padding_frames\(logits, attention_mask\)",
        "pass",
        BATCH,
        "the frames past a clip's end keep what the head makes of the padding, so a batched clip gains characters",
    ),
    Mutant(
        "group-norm-over-padding",
        MODEL,
        r"if type\(norm\) is nn\.GroupNorm:",
        "if False:",
        BATCH,
        "a wav2vec2-base-style group norm averages over the padded batch axis: a clip's features depend on its batch",
    ),
    Mutant(
        "adapter-reads-normalised-padding",
        MODEL,
        r"if type\(getattr\(layer, name, None\)\) is nn\.LayerNorm:",
        "if False:",
        BATCH,
        "Wav2Vec2-BERT's adapter convolutions read the normalised padding past a clip's end",
    ),
    Mutant(
        "ot-mode-runs-tot",
        MODEL,
        r"ordered = self\.config\.alignment_is_ordered",
        "ordered = True",
        WIRING,
        'alignment="ot" silently runs TOT (and "uot" / "gmot" TOT with unbalanced marginals / the GW term)',
    ),
    Mutant(
        "gmot-modes-run-plain-transport",
        MODEL,
        r"if self\.config\.alignment_is_graph_matching:",
        "if False:",
        WIRING,
        'alignment="gmot" / "tot_gmot" silently solve without the Gromov-Wasserstein term',
    ),
    Mutant(
        "gmot-alpha-not-configurable",
        MODEL,
        r"alpha=self\.config\.gmot_alpha",
        "alpha=0.5",
        WIRING,
        "config.gmot_alpha never reaches the solver (its default is used)",
    ),
    Mutant(
        "gmot-max-outer-not-configurable",
        MODEL,
        r"max_outer=self\.config\.gmot_max_outer",
        "max_outer=50",
        WIRING,
        "config.gmot_max_outer never reaches the solver (its default is used)",
    ),
    Mutant(
        "gmot-loss-is-the-transport-cost",
        MODEL,
        r"fused_gw_loss\(coupling, cost, \*edges, self\.config\.gmot_alpha\)",
        "ot_loss(coupling, cost)",
        WIRING,
        'alignment="gmot" reports and trains on <T, C> instead of the fused Gromov-Wasserstein objective',
    ),
    Mutant(
        "gmot-edges-detached-from-adapter",
        MODEL,
        r"cosine_cost\(adapted, adapted\)",
        "cosine_cost(adapted.detach(), adapted.detach())",
        WIRING,
        "the frames' edge costs carry no gradient into the adapter",
        select="backpropagate",
    ),
    Mutant(
        "gmot-solver-without-frame-mask",
        MODEL,
        r"(\*finite_edges,\s*)frame_mask",
        r"\1None",
        WIRING,
        "the graph-matching modes pass no frame mask to the solver: padded frames receive transport mass",
        select="padded",
    ),
    Mutant(
        "unbalanced-modes-run-balanced",
        MODEL,
        r"tau=self\.config\.uot_tau if self\.config\.alignment_is_unbalanced else None",
        "tau=None",
        WIRING,
        'alignment="uot" / "tot_uot" silently solve with balanced marginals',
    ),
    Mutant(
        "uot-tau-not-configurable",
        MODEL,
        r"(?:self\.)?config\.uot_tau\b",
        "1.0",
        WIRING,
        "config.uot_tau never reaches the solver",
    ),
    Mutant(
        "lambda1-not-configurable",
        MODEL,
        r"(?:self\.)?config\.tot_lambda1\b",
        "1.0",
        WIRING,
        "config.tot_lambda1 never reaches the solver (its default is used)",
    ),
    Mutant(
        "lambda2-not-configurable",
        MODEL,
        r"(?:self\.)?config\.tot_lambda2\b",
        "0.1",
        WIRING,
        "config.tot_lambda2 never reaches the solver",
    ),
    Mutant(
        "sigma-not-configurable",
        MODEL,
        r"(?:self\.)?config\.tot_sigma\b",
        "1.0",
        WIRING,
        "config.tot_sigma never reaches the solver",
    ),
    Mutant(
        "max-iter-not-configurable",
        MODEL,
        r"max_iter=self\.config\.tot_max_iter\b",
        "max_iter=1000",
        WIRING,
        "config.tot_max_iter never reaches the solver",
    ),
    Mutant(
        "tol-not-configurable",
        MODEL,
        r"tol=self\.config\.tot_tol\b",
        "tol=1e-4",
        WIRING,
        "config.tot_tol never reaches the solver",
    ),
    Mutant(
        "grad-mode-not-configurable",
        MODEL,
        r"(?:self\.)?config\.tot_grad\b",
        '"envelope"',
        WIRING,
        "config.tot_grad never reaches the solver",
    ),
    Mutant(
        "cost-detached-from-adapter",
        MODEL,
        r"cost = cosine_cost\((\w+),",
        r"cost = cosine_cost(\1.detach(),",
        WIRING + MODELING,
        "the transport cost carries no gradient into the adapter",
    ),
    Mutant(
        "align-loss-without-token-mask",
        MODEL,
        r"(align_loss\(\s*\w+,\s*\w+),\s*\w+\s*\)",
        r"\1)",
        WIRING + MODELING,
        "the alignment loss averages over padded tokens too",
    ),
    Mutant(
        "transport-without-token-mask",
        MODEL,
        r"(barycentric_transport\(\s*\w+,\s*\w+),\s*\w+\s*\)",
        r"\1)",
        WIRING + MODELING,
        "the barycentric transport scales every sample by the padded token count",
    ),
    Mutant(
        "loss-weights-swapped",
        MODEL,
        r"((?:self\.)?config\.)ot_loss_weight(\s*\*)",
        r"\1align_loss_weight\2",
        WIRING + MODELING,
        "the transport cost is weighted with align_loss_weight",
    ),
    Mutant(
        "ctc-weight-ignored",
        MODEL,
        r"(?:self\.)?config\.ctc_loss_weight\s*\*\s*",
        "",
        WIRING,
        "config.ctc_loss_weight is not applied",
    ),
    Mutant(
        "teacher-special-tokens-kept",
        MODEL,
        r"hidden, mask = hidden\[:, 1:\], mask\[:, 1:\]",
        "hidden, mask = hidden, mask",
        MODELING,
        "[CLS] stays among the teacher's token features",
    ),
    # ---------------------------------------------------------------- CTC loss
    Mutant(
        "ctc-padded-frame-count",
        MODEL,
        r"(ctc_loss\(\s*log_probs,\s*\w+,\s*)(\w+)(?=\s*,)",
        r"\1torch.full_like(\2, log_probs.shape[0])",
        WIRING,
        "the CTC loss uses the padded frame count instead of each utterance's valid frames",
    ),
    Mutant(
        "ctc-blank-is-zero",
        MODEL,
        r"blank=(?:self\.)?config\.pad_token_id",
        "blank=0",
        WIRING,
        "the CTC blank is id 0 whatever pad_token_id says",
    ),
    Mutant(
        "ctc-reduction-not-configurable",
        MODEL,
        r"reduction=(?:self\.)?config\.ctc_loss_reduction",
        'reduction="mean"',
        WIRING,
        "config.ctc_loss_reduction is ignored",
    ),
    # ---------------------------------------------------------------- evaluation and metric
    Mutant(
        "eval-predictions-unmasked",
        TRAINER,
        r"(\w+) = \1\.masked_fill\(~frame_mask",
        r"\1 = \1 if True else \1.masked_fill(~frame_mask",
        EVALUATION,
        "evaluation predictions are not masked on padded frames, so the CER reads padding",
    ),
    Mutant(
        "cer-references-collapsed",
        TRAINER,
        r"decode\(prediction\.label_ids, group_tokens=False\)",
        "decode(prediction.label_ids, group_tokens=True)",
        ("tests/test_cer.py",) + EVALUATION,
        "references are CTC-collapsed, so a real double character is scored as one",
    ),
    Mutant(
        "cer-arguments-swapped",
        CER,
        r"jiwer\.cer\(list\(references\), list\(predictions\)\)",
        "jiwer.cer(list(predictions), list(references))",
        ("tests/test_cer.py",),
        "the CER divides by the prediction's length",
    ),
    # ---------------------------------------------------------------- collation
    Mutant(
        "labels-padded-with-blank",
        COLLATOR,
        r"(masked_fill\(labels\[\"attention_mask\"\]\.ne\(1\),\s*)-100\)",
        r"\g<1>0)",
        ("tests/test_collator.py",),
        "label padding is the blank id instead of -100, so CTC reads padding as targets",
    ),
    Mutant(
        "collator-without-attention-mask",
        COLLATOR,
        r"return_attention_mask=True",
        "return_attention_mask=False",
        ("tests/test_collator.py",),
        "batches carry no attention mask",
    ),
    Mutant(
        "cached-token-mask-off-by-one",
        COLLATOR,
        r"< lengths\[:, None\]",
        "<= lengths[:, None]",
        ("tests/test_collator.py",),
        "one padded cached token per utterance counts as valid",
    ),
    # ---------------------------------------------------------------- solver
    Mutant(
        "positions-zero-based",
        SOLVER,
        r"rank / count",
        "(rank - 1) / count",
        SOLVER_TESTS,
        "relative positions are (i - 1)/N instead of OPW's i/N",
    ),
    Mutant(
        "prior-without-factor-two",
        SOLVER,
        r"-0\.5 / sigma\*\*2",
        "-1.0 / sigma**2",
        SOLVER_TESTS,
        "the temporal prior is exp(-d^2 / sigma^2)",
    ),
    Mutant(
        "row-update-ignores-marginal",
        SOLVER,
        r"log_mu - row_lse",
        "-row_lse",
        SOLVER_TESTS,
        "the log-domain fallback's f update drops log(1/N)",
    ),
    Mutant(
        "scaling-row-update-ignores-marginal",
        SOLVER,
        r"ratio = _power\(row_target / kernel_v",
        "ratio = _power((row_target > 0).to(kernel_v.dtype) / kernel_v",
        SOLVER_TESTS,
        "the scaling-form u update drops the marginal 1/N",
    ),
    Mutant(
        "relaxation-ignored-in-scaling-form",
        SOLVER,
        r"u = ratio if omega is None else u \* \(ratio / u\)\.pow\(omega\)",
        "u = ratio",
        SOLVER_TESTS,
        "the over-relaxation of the u update is dropped",
    ),
    Mutant(
        "unbalanced-without-reference-measure",
        SOLVER,
        r"log_kernel = log_kernel \+ log_mu\[:, :, None\] \+ log_nu\[:, None, :\]",
        "log_kernel = log_kernel",
        SOLVER_TESTS,
        "unbalanced OT drops the reference measure mu nu^T of its entropy (POT's reg_type='kl')",
        select="unbalanced",
    ),
    Mutant(
        "unbalanced-exponent-wrong",
        SOLVER,
        r"1\.0 / \(1\.0 \+ rho\)",
        "1.0 / (1.0 + 2 * rho)",
        SOLVER_TESTS,
        "the unbalanced updates use tau / (tau + 2 lambda2) instead of tau / (tau + lambda2)",
        select="unbalanced",
    ),
    Mutant(
        "non-finite-cost-accepted",
        SOLVER,
        r"if bad:",
        "if False:",
        SOLVER_TESTS,
        "a NaN or infinite cost on a valid pair is solved into a NaN plan without a word",
        select="non_finite or column",
    ),
    Mutant(
        "kernel-range-not-checked",
        SOLVER,
        r"if span > limit\]",
        "if span > 2 * limit]",
        SOLVER_TESTS,
        "kernels beyond the dtype's range are solved (wrong mass) instead of refused",
        select="range or underflows or narrow",
    ),
    Mutant(
        "unconverged-plan-not-warned",
        SOLVER,
        r"if warn and tol > 0 and info\[\"worst\"\] >= tol:",
        "if False:",
        SOLVER_TESTS,
        "tot_sinkhorn returns an unconverged plan without a warning",
        select="unconverged",
    ),
    Mutant(
        "transport-not-rescaled",
        SOLVER,
        r"(weights = coupling\.to\(dtype\)) \* [^\n]+",
        r"\1",
        SOLVER_TESTS,
        "the barycentric map forgets the 1/nu_j factor",
    ),
    # ---------------------------------------------------------------- graph-matching (fused Gromov-Wasserstein) solver
    Mutant(
        "gw-gradient-without-factor-two",
        SOLVER,
        r"gradient = 2 \* _gw_tensor_product\(",
        "gradient = _gw_tensor_product(",
        GW_TESTS,
        "the linearised Gromov-Wasserstein cost is half the gradient (Peyre et al.'s Prop. 2 without its factor 2)",
    ),
    Mutant(
        "gw-cross-term-halved",
        SOLVER,
        r"return rows \+ cols - 2 \* torch\.bmm\(",
        "return rows + cols - torch.bmm(",
        GW_TESTS,
        "the cross term -2 D_A T D_L^T of the square loss loses its factor 2",
    ),
    Mutant(
        "gw-loss-without-target-edges",
        SOLVER,
        r"return rows \+ cols -",
        "return rows -",
        GW_TESTS,
        "the target edges' constant term is dropped: the plan is unchanged, the objective is wrong",
    ),
    Mutant(
        "gw-starts-from-an-empty-plan",
        SOLVER,
        r"coupling = mu\[:, :, None\] \* nu\[:, None, :\]",
        "coupling = torch.zeros_like(mu[:, :, None] * nu[:, None, :])",
        GW_TESTS,
        "the outer iterations start from 0 instead of mu nu^T",
    ),
    Mutant(
        "gw-warm-start-ignored",
        SOLVER,
        r"if init is not None:",
        "if False:",
        GW_TESTS,
        "tot_sinkhorn ignores warm_start: every inner solve starts from zero potentials",
    ),
    Mutant(
        "gw-outer-iterations-never-stop",
        SOLVER,
        r"if changes\[-1\] < outer_tol:",
        "if False:",
        GW_TESTS,
        "the outer iterations ignore outer_tol and always run max_outer times",
    ),
    Mutant(
        "gw-padded-edges-kept",
        SOLVER,
        r"source_cost = source_cost\.to\(dtype\)\.masked_fill\([^\n]*\)",
        "source_cost = source_cost.to(dtype)",
        GW_TESTS,
        "padded frame edges reach the products: a NaN there turns the whole plan NaN",
    ),
    Mutant(
        "gw-asymmetric-edges-accepted",
        SOLVER,
        r"if gap > 1e-6 \* max\(value, 1\.0\)",
        "if gap > 1e6 * max(value, 1.0)",
        GW_TESTS,
        "edge costs that are not symmetric are solved with the symmetric gradient, without a word",
    ),
    # ---------------------------------------------------------------- training loop
    Mutant(
        "nonfinite-loss-not-skipped",
        TRAINER,
        r"if model\.training and not torch\.isfinite\(loss\):",
        "if False:",
        ("tests/test_train_hf.py",),
        "a NaN loss is backpropagated into the weights",
        select="nonfinite",
    ),
    Mutant(
        "checkpoint-chosen-by-name",
        TRAINER,
        r"sorted\((\w+), key=\1\.get\)",
        r"sorted(\1)",
        RESUME,
        "the last complete checkpoint is chosen by name: checkpoint-9 wins over checkpoint-10",
        select="resume or checkpoint",
        slow=True,
    ),
    Mutant(
        "resume-ignores-last-checkpoint",
        SCRIPT,
        r"return resume or last_checkpoint",
        "return resume",
        RESUME,
        "train_hf.py ignores the last checkpoint and retrains from step 1",
        select="resume or checkpoint",
        slow=True,
    ),
    Mutant(
        "eval-during-training-reads-test-split",
        SCRIPT,
        r"eval_dataset=vectorized_datasets\.get\(\"eval\"\)",
        'eval_dataset=vectorized_datasets.get("test")',
        TRAIN,
        "the evaluation during training (and the best checkpoint) reads the test split",
        select="never_the_test",
    ),
    Mutant(
        "eval-split-loaded-by-test-flags",
        SCRIPT,
        r"splits\[\"eval\"\] = \(data_args\.eval_split_name, data_args\.eval_manifest",
        'splits["eval"] = (data_args.test_split_name, data_args.test_manifest',
        TRAIN,
        "the eval split is loaded from --test_split_name / --test_manifest",
        select="never_the_test",
    ),
    Mutant(
        "best-checkpoint-highest-cer",
        TRAINER,
        r"(greater_is_better: bool \| None = field\(default=)False",
        r"\1None",
        TRAIN,
        "greater_is_better is left to transformers, which takes a higher CER as better",
        select="lowest_cer",
    ),
    Mutant(
        "best-checkpoint-by-loss",
        TRAINER,
        r"(metric_for_best_model: str \| None = field\(\s*default=)\"cer\"",
        r'\1"loss"',
        TRAIN,
        "the best checkpoint is the one with the lowest loss, not the lowest CER",
        select="lowest_cer",
    ),
    Mutant(
        "max-duration-not-passed",
        SCRIPT,
        r"max_input_length=int\(data_args\.max_duration_in_seconds \* feature_extractor\.sampling_rate\)",
        "max_input_length=None",
        TRAIN,
        "--max_duration_in_seconds removes nothing",
        select="max_duration",
    ),
    Mutant(
        "max-duration-filter-off",
        DATA,
        r"if max_input_length is not None and length >= max_input_length:",
        "if False:",
        ("tests/test_data.py", "tests/test_train_hf.py"),
        "clips longer than the maximum duration are kept",
        select="duration",
    ),
    Mutant(
        "teacher-targets-in-train-mode",
        MODEL,
        r"teacher\.eval\(\)",
        "teacher.train()",
        MODELING,
        "the frozen teacher makes its token features with dropout on",
        select="eval_mode",
    ),
    Mutant(
        "nonconvergence-warning-needs-every-sample",
        MODEL,
        r"solver\[\"converged\"\]\.all\(\)",
        'solver["converged"].any()',
        MODELING,
        "the non-convergence warning fires only when no sample of the batch converged",
        select="any_sample",
    ),
    Mutant(
        "feature-cache-key-without-tokenizer-limit",
        TEACHER_FEATURES,
        r"\n\s*\"model_max_length\": tokenizer\.model_max_length,",
        "",
        FEATURE_CACHE,
        "the teacher-feature cache key ignores the tokenizer's model_max_length, which cuts long transcripts",
    ),
    Mutant(
        "feature-cache-key-without-weights",
        TEACHER_FEATURES,
        r"\n\s*\"weights\": _weights_digest\(teacher\),",
        "",
        FEATURE_CACHE,
        "the teacher-feature cache key ignores the teacher's weights",
    ),
    Mutant(
        "feature-cache-key-without-tokenization",
        TEACHER_FEATURES,
        r"\n\s*\"tokenization\": _tokenizer_identity\(tokenizer\),",
        "",
        FEATURE_CACHE,
        "the teacher-feature cache key ignores the tokenizer's vocabulary and normalisation",
    ),
    Mutant(
        "feature-cache-key-without-layout-in-train-hf",
        SCRIPT,
        r"\n\s*feature_layout=teacher_feature_layout\(model\.config\),",
        "",
        FEATURE_CACHE,
        "train_hf.py keys its feature cache without the teacher layer / special-token setting",
    ),
    Mutant(
        "checkpoint-manifest-not-written",
        TRAINER,
        r"write_file_manifest\(os\.path\.join\(run_dir,",
        "(lambda folder: None)(os.path.join(run_dir,",
        RESUME,
        "checkpoints are saved without the list of their files and sizes",
        select="truncated_optimizer or missing_from",
    ),
    Mutant(
        "checkpoint-file-formats-unchecked",
        SAVED_FILES,
        r"problem = file_problem\(path\)\n",
        "problem = None\n",
        RESUME,
        "a cut-off file of a checkpoint without a manifest (an earlier version's) is resumed from",
        select="cut_off",
    ),
    Mutant(
        "final-save-weights-first",
        TRAINER,
        r"if name in FINAL_SAVE_FIRST:\n(\s*)return 0",
        r"if name in FINAL_SAVE_FIRST:\n\1return 3",
        RESUME,
        "the final save moves the weights into output_dir before the trainer state and metrics",
        select="final_save",
    ),
    Mutant(
        "lm-weights-chosen-on-test",
        SCRIPT,
        r"tune_split=\"eval\"",
        'tune_split="test"',
        TRAIN,
        "train_hf.py chooses the language model's weight and bonus on the test split",
        select="never_on_test",
    ),
    Mutant(
        "larger-saved-file-accepted",
        SAVED_FILES,
        r"os\.path\.getsize\(path\) != size",
        "os.path.getsize(path) < size",
        ("tests/test_saved_files.py",),
        "a saved file larger than its manifest records counts as whole",
        select="manifest",
    ),
    Mutant(
        "decode-limit-fixed",
        AUDIO,
        r"MAX_SAMPLES_PER_BYTE \* max\(size, BLOCK_FRAMES\)",
        "MAX_SAMPLES_PER_BYTE * BLOCK_FRAMES",
        ("tests/test_audio.py",),
        "the decode limit is 64 blocks whatever the file's size: a long healthy recording is refused",
    ),
    Mutant(
        "adapter-reads-encoder-before-dropout",
        MODEL,
        r"if aligns_inner_layer else hidden_states\)",
        "if aligns_inner_layer else encoder_states)",
        MODELING,
        "the adapter reads the encoder's output before final_dropout",
        select="after_dropout",
    ),
    Mutant(
        "aishell-repeated-ids-unchecked",
        DATA,
        r"\n(\s*)_check_repeated_utterances\(path, ",
        r"\n\1(lambda *args: None)(path, ",
        ("tests/test_data.py",),
        "an AISHELL-1 utterance id listed twice keeps its last text without a word",
        select="aishell",
    ),
    Mutant(
        "non-finite-weights-loaded",
        MODEL,
        r"weights = non_finite_weights_problem\(model, ",
        "weights = (lambda *args: None)(model, ",
        ("tests/test_saved_files.py",),
        "a saved model whose weights hold NaN loads without a word",
        select="non_finite or copied_code",
    ),
    Mutant(
        "non-finite-logits-decoded",
        MODEL,
        r"\n(\s*)self\.check_logits\(logits\)",
        r"\n\1pass",
        MODELING,
        "NaN logits at inference are decoded (as blanks) instead of refused",
        select="non_finite_logits",
    ),
    Mutant(
        "waveform-variance-overflows",
        FEATURES,
        r"wide = _squares_overflow_float32\(vector, length\)",
        "wide = False",
        ("tests/test_processing.py", "tests/test_bad_input.py"),
        "audio scaled by 1e20 normalises to all-zero raw-waveform features (a transcript of silence)",
        select="far_beyond or scaled_by_1e20",
    ),
    Mutant(
        "log-mel-scaling-overflows",
        FEATURES,
        r"if not peak > MAX_FBANK_PEAK or",
        "if True or",
        ("tests/test_processing.py",),
        "audio scaled beyond about 1e31 gives NaN log-mel features",
        select="far_beyond",
    ),
    Mutant(
        "loss-components-not-reduced-across-processes",
        TRAINER,
        r"accelerator\.reduce\(self\.totals, reduction=\"sum\"\)",
        "self.totals",
        ("tests/test_distributed.py",),
        "logged ctc/ot/align losses are those of process 0 only",
        slow=True,
    ),
    # ---------------------------------------------------------------- knowledge share, masked targets, distillation
    Mutant(
        "knowledge-share-measured-into-parameters",
        MODEL,
        r"torch\.autograd\.grad\(term, encoder_states, retain_graph=True, allow_unused=True\)\[0\]",
        "(term.backward(retain_graph=True), encoder_states.grad)[1]",
        KNOWLEDGE,
        "measuring the gradient norms accumulates each term's gradient into the parameters: training changes",
    ),
    Mutant(
        "knowledge-share-without-kd",
        MODEL,
        r'KNOWLEDGE_LOSSES = \("ot", "align", "kd"\)',
        'KNOWLEDGE_LOSSES = ("ot", "align")',
        KNOWLEDGE,
        "the knowledge share and its norms leave out the distillation term",
    ),
    Mutant(
        "knowledge-share-measured-every-step",
        TRAINER,
        r'return self\.args\.logging_strategy == "steps" and step % self\.state\.logging_steps == 0',
        "return True",
        KNOWLEDGE,
        "the gradient norms are measured on every step, not only on logging steps",
    ),
    Mutant(
        "masked-targets-mask-the-next-position",
        MODEL,
        r"masked\[index, column\] = mask_token_id",
        "masked[index, (column + 1).clamp_max(masked.shape[1] - 1)] = mask_token_id",
        KNOWLEDGE,
        "the masked-position targets mask the position after the one they are read at",
    ),
    Mutant(
        "feature-cache-key-without-teacher-target",
        TEACHER_FEATURES,
        r'layout\["teacher_target"\] = config\.teacher_target',
        "pass",
        KNOWLEDGE + FEATURE_CACHE,
        "the teacher-feature cache key ignores teacher_target: masked targets would read plain ones",
    ),
    Mutant(
        "kd-weights-not-detached",
        MODEL,
        r"\(-torch\.expm1\(log_probs\[\.\.\., blank\]\)\)\.detach\(\)",
        "(-torch.expm1(log_probs[..., blank]))",
        KNOWLEDGE,
        "the distillation's frame weights carry gradient: it can lower itself by making frames blank",
    ),
    Mutant(
        "kd-blank-in-the-student",
        MODEL,
        r"torch\.log_softmax\(logits\.float\(\)\[\.\.\., symbols\], dim=-1\)",
        "torch.log_softmax(logits.float(), dim=-1)[..., symbols]",
        KNOWLEDGE,
        "the distillation's student keeps the blank in its normalisation",
    ),
    Mutant(
        "kd-targets-not-renormalised",
        MODEL,
        r"return targets / targets\.sum\(-1, keepdim=True\)\.clamp_min\(torch\.finfo\(targets\.dtype\)\.tiny\)",
        "return targets",
        KNOWLEDGE,
        "teacher predictions without a CTC symbol are dropped without renormalising the rest",
    ),
    Mutant(
        "kd-moves-the-plan",
        MODEL,
        r"coupling = coupling\.detach\(\)\.float\(\)",
        "coupling = coupling.float()",
        KNOWLEDGE,
        "the distillation backpropagates into the transport plan (with tot_grad='autodiff')",
    ),
    Mutant(
        "kd-weight-ignored",
        MODEL,
        r"self\.config\.kd_loss_weight \* fields\[\"kd_loss\"\]",
        'fields["kd_loss"]',
        KNOWLEDGE,
        "kd_loss enters the total loss with weight 1 whatever kd_loss_weight says",
    ),
    Mutant(
        "align-layer-ignored",
        MODEL,
        r"self\.adapter\(self\.dropout\(aligned_states\) if aligns_inner_layer else hidden_states\)",
        "self.adapter(hidden_states)",
        KNOWLEDGE,
        "the adapter maps the encoder's output whatever align_layer says",
    ),
    Mutant(
        "knowledge-share-on-the-output-with-an-inner-align-layer",
        MODEL,
        r"self\._loss_gradient_norms\(aligned_states, losses\)",
        "self._loss_gradient_norms(encoder_states, losses)",
        KNOWLEDGE,
        "with an inner align_layer the gradient norms are taken on the encoder's output, where the teacher's terms "
        "put none",
    ),
)

# Mutants that no test kills, each with the reason it is accepted.
ACCEPTED_SURVIVORS = {
    "transport-without-token-mask": (
        "equivalent for every output: without the mask the transported features of a sample are scaled by "
        "max M / M_b, padded tokens are already zero in the coupling, and the alignment loss is a cosine, "
        "which ignores the scale."
    ),
}


@dataclass
class Result:
    mutant: Mutant
    status: str  # killed, survived, timeout, pattern not found, ambiguous, invalid mutant, error
    seconds: float = 0.0
    detail: str = ""

    @property
    def ok(self) -> bool:
        if self.status == "survived":
            return self.mutant.name in ACCEPTED_SURVIVORS
        return self.status.startswith("killed") or self.status == "timeout"


def pytest_arguments(tests: tuple[str, ...], select: str | None) -> list[str]:
    return [*tests, *(["-k", select] if select else [])]


def run_pytest(arguments: list[str], timeout: float) -> tuple[int | None, str, float]:
    """Run pytest in a fresh interpreter and its own process group (training tests start subprocesses).

    Returns the exit code (None on timeout, after killing the group), the output's tail and the seconds taken.
    """
    with tempfile.TemporaryDirectory(prefix="mutation-pycache-") as pycache:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "PYTHONPYCACHEPREFIX": pycache,
        }
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *arguments]
        start = time.monotonic()
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = process.communicate(timeout=timeout)
        except BaseException as err:  # timeout, Ctrl-C, SIGTERM: stop the tests and whatever they started
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            if not isinstance(err, subprocess.TimeoutExpired):
                raise
            return None, "", time.monotonic() - start
        return process.returncode, output[-2000:], time.monotonic() - start


def last_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def check(mutant: Mutant, timeout: float) -> Result:
    path = ROOT / mutant.path
    original = path.read_text(encoding="utf-8")
    matches = len(re.findall(mutant.pattern, original))
    if matches == 0:
        return Result(mutant, "pattern not found")
    if matches > 1:
        return Result(mutant, f"ambiguous ({matches} matches)")
    mutated = re.sub(mutant.pattern, mutant.replacement, original, count=1)
    try:
        compile(mutated, str(path), "exec")
    except SyntaxError as err:  # the replacement is wrong, not the tests: say so without running them
        return Result(mutant, "invalid mutant (syntax error)", detail=f"line {err.lineno}: {err.msg}")
    try:
        path.write_text(mutated, encoding="utf-8")
        code, output, seconds = run_pytest(pytest_arguments(mutant.tests, mutant.select), timeout)
    finally:
        path.write_text(original, encoding="utf-8")
    if code is None:
        return Result(mutant, "timeout", seconds)
    if code == 0:
        return Result(mutant, "survived", seconds, last_line(output))
    if code == 1:
        return Result(mutant, "killed", seconds, first_failure(output))
    if code == 2:  # collection failed: the mutant broke an import
        return Result(mutant, "killed (collection error)", seconds, last_line(output))
    return Result(mutant, f"error (pytest exit code {code})", seconds, last_line(output))


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("FAILED "):
            return line[len("FAILED ") :].split(" - ")[0]
    return last_line(output)


def markdown_table(results: list[Result]) -> str:
    lines = ["| mutant | file | planted bug | result | caught by | seconds |", "|---|---|---|---|---|---|"]
    for result in results:
        status = result.status
        if status == "survived" and result.mutant.name in ACCEPTED_SURVIVORS:
            status = "survived (accepted)"
        caught = result.detail if result.status.startswith("killed") else ""
        lines.append(
            f"| `{result.mutant.name}` | `{result.mutant.path}` | {result.mutant.bug} | {status} | "
            f"{f'`{caught}`' if caught else ''} | {result.seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--skip-slow", action="store_true", help="leave out mutants whose tests take minutes")
    parser.add_argument("--no-baseline", action="store_true", help="do not first run the tests on unmutated code")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed for one mutant's tests")
    parser.add_argument("--markdown", type=Path, help="also write the result table (Markdown) to this file")
    args = parser.parse_args(argv)

    mutants = list(MUTANTS)
    if args.only:
        unknown = set(args.only) - {mutant.name for mutant in MUTANTS}
        if unknown:
            parser.error(f"unknown mutants: {', '.join(sorted(unknown))} (see --list)")
        mutants = [mutant for mutant in mutants if mutant.name in args.only]
    if args.skip_slow:
        mutants = [mutant for mutant in mutants if not mutant.slow]
    if args.list:
        for mutant in mutants:
            tests = " ".join(pytest_arguments(mutant.tests, mutant.select))
            matches = len(re.findall(mutant.pattern, (ROOT / mutant.path).read_text(encoding="utf-8")))
            found = {0: "pattern not found", 1: "pattern found"}.get(matches, f"ambiguous ({matches} matches)")
            print(f"{mutant.name:46} {found:18} {mutant.path:42} {tests}{'  (slow)' if mutant.slow else ''}")
        return 0

    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)  # restore the file on `kill` too
    if not args.no_baseline:
        # The unmutated code must pass every selection first, or every mutant would look killed.
        selections = dict.fromkeys((mutant.tests, mutant.select) for mutant in mutants if mutant.select)
        unselected = tuple(dict.fromkeys(test for mutant in mutants if not mutant.select for test in mutant.tests))
        runs = ([pytest_arguments(unselected, None)] if unselected else []) + [
            pytest_arguments(tests, select) for tests, select in selections
        ]
        for arguments in runs:
            print(f"baseline: {' '.join(arguments)}", flush=True)
            code, output, seconds = run_pytest(arguments, args.timeout * 2)
            print(f"  {last_line(output)} ({seconds:.0f} s)", flush=True)
            if code != 0:
                print("The tests fail on the unmutated code: fix that first (or pass --no-baseline).")
                return 1

    results = []
    for mutant in mutants:
        print(f"{mutant.name} ...", end=" ", flush=True)
        result = check(mutant, args.timeout)
        accepted = " (accepted)" if result.status == "survived" and result.ok else ""
        print(f"{result.status}{accepted} {result.seconds:.0f} s  {result.detail}", flush=True)
        results.append(result)

    table = markdown_table(results)
    print("\n" + table)
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")
    killed = sum(result.status.startswith("killed") or result.status == "timeout" for result in results)
    print(f"{killed} of {len(results)} mutants killed.")
    failures = [result for result in results if not result.ok]
    for result in failures:
        print(f"NOT OK: {result.mutant.name}: {result.status} ({result.mutant.path})")
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: the tests were stopped and the mutated file restored", file=sys.stderr)
        sys.exit(130)
