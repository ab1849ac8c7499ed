"""Training glue for `transformers.Trainer`: model set-up from arguments, the shortest usable clip,
the CER metric, a Trainer that logs the CTC / OT / alignment losses separately and survives non-finite
losses and gradients, and the choice of the checkpoint to resume from."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field

import evaluate
import numpy as np
import torch
from transformers import (
    AutoConfig,
    EvalPrediction,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

from ..configuration_tot_cakt import TOTCAKTConfig
from ..modeling_tot_cakt import (  # load_teacher: re-exported
    TOTCAKTForCTC,
    config_file_problem,
    encoder_output_lengths,
    load_teacher,
    teacher_loading_advice,
    vocabulary_problem,
)
from .saved_files import (
    FILE_MANIFEST,
    folder_problem,
    json_problem,
    read_file_manifest,
    write_file_manifest,
    write_json_atomically,
)
from .time_budget import TrainingTimeBudget

logger = logging.getLogger(__name__)

CER_METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "cer")
# Model outputs logged next to `loss`, averaged over each logging interval.
LOGGED_OUTPUTS = ("ctc_loss", "ot_loss", "align_loss", "solver_marginal_error", "solver_iterations", "kd_loss")
# Gradient norms of the loss terms on the encoder's output and the knowledge share, measured at logging steps.
LOGGED_GRADIENT_NORMS = ("grad_norm_ctc", "grad_norm_ot", "grad_norm_align", "grad_norm_kd", "knowledge_share")
# Sub-folder of output_dir where checkpoints that a killed run left half-written are moved.
INCOMPLETE_CHECKPOINTS_DIR = "incomplete_checkpoints"
# Sub-folder of output_dir where the final model, trainer state and train metrics are written before they
# are moved into output_dir together (see `TOTCAKTTrainer.save_final`).
FINAL_SAVE_DIR = "final_save.tmp"
# Files of the final save moved into output_dir first: a kill while moving leaves the state and metrics
# without the new weights, never the new weights without them.
FINAL_SAVE_FIRST = (TRAINER_STATE_NAME, "train_results.json", "all_results.json")


# ------------------------------------------------------------------------------------ model set-up
def parse_encoder_config(value: str | dict) -> dict:
    """
    An encoder configuration given as a dict, a JSON string, or the path of a JSON file
    (e.g. a `config.json` of a wav2vec2 checkpoint); it must name its `model_type`.
    """
    if isinstance(value, dict):
        config = dict(value)
    elif os.path.isfile(value):
        with open(value, encoding="utf-8") as handle:
            config = json.load(handle)
    else:
        try:
            config = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"--encoder_config must be a JSON object or the path of a JSON file, got {value!r}."
            ) from err
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"--encoder_config needs a JSON object with a 'model_type' key, got {value!r}.")
    return config


def _given(values: dict | None) -> dict:
    """The entries of `values` that were actually set (None means: keep the configuration's value)."""
    return {key: value for key, value in (values or {}).items() if value is not None}


def check_saved_architecture(saved: TOTCAKTConfig, overrides: dict, model_name_or_path: str) -> None:
    """
    Refuse `overrides` that change the shape of weights a saved model has (where its CTC head reads, its adapter):
    continuing it would load them into another architecture, which transformers refuses for other sizes and
    which is silently wrong for equal ones (a head trained on the encoder's frames reading the adapter's).
    """
    shaping = ["ctc_input"]
    if saved.has_adapter:
        shaping.append("adapter_type")
        if saved.adapter_type == "mlp":
            shaping += ["adapter_hidden_size", "adapter_num_layers"]
    for name in shaping:
        if name in overrides and overrides[name] != getattr(saved, name):
            raise ValueError(
                f"{name}={overrides[name]!r} (--{name}) differs from the model being continued: {model_name_or_path} "
                f"has {name}={getattr(saved, name)!r} and its saved weights are built for it. Leave --{name} out to "
                "continue that model, or start a new one (--encoder_name_or_path or --encoder_config)."
            )


def build_model(
    *,
    vocab_size: int,
    pad_token_id: int,
    model_name_or_path: str | None = None,
    encoder_name_or_path: str | None = None,
    encoder_config: dict | None = None,
    encoder_overrides: dict | None = None,
    config_overrides: dict | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
) -> TOTCAKTForCTC:
    """
    Create the model to train, in one of three ways:

    - `model_name_or_path`: continue from a saved TOT-CAKT model (its vocabulary must be the one in use, and
      `config_overrides` may not reshape its weights: see [`check_saved_architecture`]);
    - `encoder_name_or_path`: a new model whose encoder starts from a wav2vec2 / HuBERT / WavLM /
      data2vec-audio / Wav2Vec2-BERT checkpoint;
    - otherwise: a new model with a randomly initialised encoder built from `encoder_config`
      (`Wav2Vec2Config()` when None).

    Args:
        vocab_size, pad_token_id: from the CTC tokenizer (`len(tokenizer)`, `tokenizer.pad_token_id`).
        encoder_overrides: encoder configuration fields to change (SpecAugment, dropouts, layerdrop);
            None values are ignored.
        config_overrides: [`TOTCAKTConfig`] fields to change (alignment, TOT hyper-parameters, loss
            weights, teacher, ...); None values are ignored. `teacher_hidden_size` is read from the
            teacher's configuration when not given.
    """
    if sum(source is not None for source in (model_name_or_path, encoder_name_or_path, encoder_config)) > 1:
        raise ValueError("Give at most one of model_name_or_path, encoder_name_or_path and encoder_config.")
    encoder_overrides, config_overrides = _given(encoder_overrides), _given(config_overrides)
    hub_kwargs = {"cache_dir": cache_dir, "token": token}
    saved_adapter_size = None  # output size of a saved model's adapter, which the teacher must match
    if model_name_or_path is not None:
        config = TOTCAKTConfig.from_pretrained(model_name_or_path, **hub_kwargs)
        check_saved_architecture(config, config_overrides, model_name_or_path)
        config.encoder_config.update(encoder_overrides)
        saved_adapter_size = config.teacher_hidden_size if config.has_adapter else None
    else:
        # With `encoder_name_or_path`, `from_encoder_pretrained` replaces this encoder configuration
        # by the checkpoint's (and applies the overrides there).
        config = TOTCAKTConfig(encoder_config=AutoConfig.for_model(**encoder_config) if encoder_config else None)
        config.encoder_config.update(encoder_overrides)
    config.update({**config_overrides, "vocab_size": vocab_size, "pad_token_id": pad_token_id})
    if config.uses_teacher and "teacher_hidden_size" not in config_overrides:
        try:
            teacher_config = AutoConfig.from_pretrained(config.teacher_name_or_path, **hub_kwargs)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"Could not load the teacher language model's configuration from "
                f"teacher_name_or_path='{config.teacher_name_or_path}': {err} "
                f"{teacher_loading_advice(config.teacher_name_or_path)}"
            ) from err
        if saved_adapter_size not in (None, teacher_config.hidden_size):
            raise ValueError(
                f"The teacher '{config.teacher_name_or_path}' has hidden size {teacher_config.hidden_size}, but the "
                f"adapter of {model_name_or_path} maps to {saved_adapter_size} (teacher_hidden_size): continue with "
                "the teacher it was trained with, or one of the same hidden size."
            )
        config.teacher_hidden_size = teacher_config.hidden_size
    config.validate()

    if model_name_or_path is not None:
        model = TOTCAKTForCTC.from_pretrained(model_name_or_path, config=config, **hub_kwargs)
    elif encoder_name_or_path is not None:
        model = TOTCAKTForCTC.from_encoder_pretrained(
            encoder_name_or_path, config, encoder_kwargs={**encoder_overrides, **hub_kwargs}
        )
    else:
        model = TOTCAKTForCTC(config)
    return model


def check_saved_model(name_or_path: str, **hub_kwargs) -> None:
    """
    Check the files of a saved TOT-CAKT model or checkpoint (Hub id or folder) that must agree before its processor
    and weights are loaded: its `config.json` loads, and its `vocab.json` has `vocab_size` symbols (see
    [`vocabulary_problem`]). A folder without `config.json` (a processor alone) has nothing to check.

    Raises:
        ValueError: naming the damaged or inconsistent file and what to do.
    """
    options = {"_raise_exceptions_for_missing_entries": False, "_raise_exceptions_for_connection_errors": False}
    if cached_file(name_or_path, CONFIG_NAME, **options, **hub_kwargs) is None:
        return
    problem = config_file_problem(TOTCAKTConfig, name_or_path, hub_kwargs)
    if problem is None:
        vocab_size = TOTCAKTConfig.from_pretrained(name_or_path, **hub_kwargs).vocab_size
        problem = vocabulary_problem(name_or_path, vocab_size, hub_kwargs)
    if problem is not None:
        raise ValueError(problem)


def shortest_usable_input(model: TOTCAKTForCTC, feature_extractor, probe_seconds: float = 1.0) -> int:
    """
    The fewest samples (at the feature extractor's rate) from which `feature_extractor` makes finite
    features that give `model`'s encoder at least one output frame. Shorter clips cannot be trained
    on: a raw-waveform encoder's convolutions need a whole receptive field, and a log-mel extractor
    fails below one analysis window and normalises a clip of a single frame to NaN.

    Args:
        model: the model to train.
        feature_extractor: its feature extractor (`Wav2Vec2FeatureExtractor`, `SeamlessM4TFeatureExtractor`, ...).
        probe_seconds: length of the noise clip searched (any usable encoder accepts one second).

    Returns:
        `int`: the minimum clip length in samples, found by bisection on a noise clip.
    """
    input_name = feature_extractor.model_input_names[0]
    rate = feature_extractor.sampling_rate
    noise = np.random.default_rng(0).standard_normal(int(probe_seconds * rate)).astype(np.float32)

    def usable(samples: int) -> bool:
        try:
            with warnings.catch_warnings():  # numpy's divide-by-zero warnings of degenerate clips
                warnings.simplefilter("ignore", RuntimeWarning)
                features = np.asarray(feature_extractor(noise[:samples], sampling_rate=rate)[input_name][0])
        except ValueError:  # SeamlessM4T's extractor rejects clips shorter than one analysis window
            return False
        frames = encoder_output_lengths(model.config.encoder_config, torch.tensor(len(features)))
        return bool(np.isfinite(features).all()) and int(frames) >= 1

    if not usable(len(noise)):
        raise ValueError(
            f"A {probe_seconds:g} s clip gives the {model.config.encoder_config.model_type} encoder no output frame: "
            "its convolution kernels / strides or adapter strides reduce the frame rate too much."
        )
    unusable, shortest = 0, len(noise)
    while shortest - unusable > 1:
        middle = (unusable + shortest) // 2
        unusable, shortest = (unusable, middle) if usable(middle) else (middle, shortest)
    return shortest


# ------------------------------------------------------------------------------------------ metric
def load_cer_metric(**kwargs) -> evaluate.EvaluationModule:
    """The package's character error rate `evaluate` module (loaded by path, works offline)."""
    return evaluate.load(CER_METRIC_PATH, **kwargs)


class CTCCharacterErrorRate:
    """
    `compute_metrics` for the Trainer: decodes greedy CTC predictions (repeats collapsed, blanks
    removed) and references (never collapsed: `group_tokens=False`) with the CTC tokenizer and
    returns `{"cer": ...}`.

    Args:
        tokenizer: the model's `Wav2Vec2CTCTokenizer`.
        metric: an `evaluate` CER module (defaults to [`load_cer_metric`]).
    """

    # One placeholder character per [UNK] id, so an out-of-vocabulary character counts as one error
    # instead of the five characters of the string "[UNK]".
    UNKNOWN_CHARACTER = "\N{REPLACEMENT CHARACTER}"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, metric: evaluate.EvaluationModule | None = None):
        self.tokenizer = tokenizer
        self.metric = metric if metric is not None else load_cer_metric()

    def decode(self, ids: np.ndarray, group_tokens: bool) -> list[str]:
        """Decode `(batch, length)` ids where -100 marks padding."""
        ids = np.where(ids == -100, self.tokenizer.pad_token_id, ids)
        texts = self.tokenizer.batch_decode(ids, group_tokens=group_tokens)
        return [text.replace(self.tokenizer.unk_token, self.UNKNOWN_CHARACTER) for text in texts]

    def __call__(self, prediction: EvalPrediction) -> dict[str, float]:
        predictions = self.decode(prediction.predictions, group_tokens=True)
        references = self.decode(prediction.label_ids, group_tokens=False)
        return {"cer": self.metric.compute(predictions=predictions, references=references)}


# ----------------------------------------------------------------------------------------- trainer
@dataclass
class TOTCAKTTrainingArguments(TrainingArguments):
    """`TrainingArguments` with defaults for CTC speech recognition: the best checkpoint is the one
    with the lowest character error rate, and batches group utterances of similar duration."""

    metric_for_best_model: str | None = field(
        default="cer", metadata={"help": "Metric that picks the best checkpoint (with --load_best_model_at_end)."}
    )
    greater_is_better: bool | None = field(default=False, metadata={"help": "Whether a larger metric is better."})
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={"help": "random, sequential, group_by_length (batches of similar duration) or batch_rebalance."},
    )
    max_train_seconds: float | None = field(
        default=None,
        metadata={
            "help": "Wall-clock budget of the training in seconds: stop at the first step boundary after it "
            "(evaluating and saving as at the end of training); --max_steps still caps the steps."
        },
    )
    log_knowledge_share: bool = field(
        default=True,
        metadata={
            "help": "At logging steps, measure the gradient each weighted loss term puts on the encoder's output "
            "(grad_norm_ctc, grad_norm_ot, grad_norm_align, grad_norm_kd) and knowledge_share = ||grad of the "
            "teacher's terms|| / ||grad of CTC||, and log them with the losses. It does not change training."
        },
    )
    hub_teacher_id: str | None = field(
        default=None,
        metadata={
            "help": "Hub id of a teacher given as a local folder: the uploaded config.json and the model card name "
            "it (default: the folder's name; the local config.json keeps the path)."
        },
    )


class LoggedOutputMeter:
    """Running sums of the logged model outputs (loss components, solver diagnostics) of one phase."""

    def __init__(self, device: torch.device, names: tuple[str, ...] = LOGGED_OUTPUTS + LOGGED_GRADIENT_NORMS):
        self.names = names
        self.totals = torch.zeros(2, len(names), device=device)  # row 0: sums, row 1: counts

    def update(self, outputs) -> None:
        for index, name in enumerate(self.names):
            value = outputs.get(name)
            if value is not None:
                self.totals[0, index] += value.detach().float().to(self.totals.device)
                self.totals[1, index] += 1

    def pop_means(self, accelerator) -> dict[str, float]:
        """Means since the last call, averaged over all processes (a collective: call it on every rank)."""
        totals = accelerator.reduce(self.totals, reduction="sum") if accelerator.num_processes > 1 else self.totals
        totals = totals.tolist()
        self.totals.zero_()
        return {name: total / count for name, total, count in zip(self.names, *totals) if count > 0}


class NonFiniteGradientGuard(TrainerCallback):
    """
    Zeroes the gradients of an optimizer step when some are NaN/inf although the loss was finite (an
    overflow in the backward pass, say), so that the step cannot write NaN into the weights, and counts
    such steps in `skipped_steps`. It runs after gradient clipping, which spreads one non-finite value
    to every gradient. Under fp16 it stays out of the way: the loss scaler already skips these steps
    (and lowers its scale).
    """

    def __init__(self):
        self.skipped_steps = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if args.fp16 or model is None:
            return
        gradients = [parameter.grad for parameter in model.parameters() if parameter.grad is not None]
        if not gradients or bool(torch.isfinite(torch.nn.utils.get_total_norm(gradients))):
            return
        self.skipped_steps += 1
        logger.warning(
            "Non-finite gradients with a finite loss at step %d; this update is skipped (%d so far).",
            state.global_step,
            self.skipped_steps,
        )
        for gradient in gradients:
            gradient.zero_()


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """
    transformers' `LengthGroupedSampler` (batches of similar duration, in random order) whose order is a
    function of `seed` and the epoch only.

    The stock sampler draws its permutation from the global torch RNG when an epoch starts. A run resumed
    mid-epoch restores that RNG only after the Trainer has skipped the epoch's trained batches, so it
    draws a different permutation than the interrupted run did: some clips are seen twice in that epoch,
    others never. Here the Trainer's `set_epoch(epoch)` picks the permutation, so skipping the first `k`
    batches of the resumed epoch leaves exactly the batches the uninterrupted run went on with.

    Args:
        batch_size: examples per group (per-device batch size times gradient accumulation steps).
        lengths: one length per example (the `input_length` column).
        seed: the run's `data_seed`, or its `seed`.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class TOTCAKTTrainer(Trainer):
    """
    `Trainer` for [`TOTCAKTForCTC`]:

    - at logging steps (`log_knowledge_share`), logs the norm of the gradient that each weighted loss term puts on
      the encoder's output (`grad_norm_ctc`, `grad_norm_ot`, `grad_norm_align`, `grad_norm_kd`) and
      `knowledge_share`, the teacher's terms' norm over CTC's ([`TOTCAKTForCTC.forward`]'s
      `output_loss_gradient_norms`): averaged over that step's batches;
    - logs `ctc_loss`, `ot_loss` and `align_loss` next to `loss`: averaged over the logging interval
      for training, over the evaluation set for evaluation (`eval_ctc_loss`, ...), and over all
      processes; with `report_to tensorboard` they become `train/ctc_loss`, `eval/ctc_loss`, ...;
    - skips the update of a batch whose loss is NaN/inf (its gradients are zero on every process),
      warns, and logs the running count as `nonfinite_loss_batches`, instead of corrupting the weights;
      likewise an optimizer step whose gradients are NaN/inf under a finite loss
      ([`NonFiniteGradientGuard`], logged as `nonfinite_grad_steps`);
    - returns greedy CTC ids from `prediction_step`, with frames beyond each utterance's length set
      to -100, so that [`CTCCharacterErrorRate`] never reads padding as speech;
    - with `train_sampling_strategy="group_by_length"`, orders each epoch by
      [`EpochSeededLengthGroupedSampler`], so that a run resumed mid-epoch trains on exactly the batches
      the uninterrupted run would have.
    """

    def __init__(self, *args, **kwargs):
        self.length_grouped_sampler: EpochSeededLengthGroupedSampler | None = None
        super().__init__(*args, **kwargs)
        self.train_losses = LoggedOutputMeter(self.args.device)
        self.eval_losses = LoggedOutputMeter(self.args.device)
        self.nonfinite_loss_batches = 0
        self.gradient_guard = NonFiniteGradientGuard()
        self.add_callback(self.gradient_guard)
        if getattr(self.args, "max_train_seconds", None) is not None:  # TOTCAKTTrainingArguments only
            self.add_callback(TrainingTimeBudget(self.args.max_train_seconds))

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            sampler = self.length_grouped_sampler = EpochSeededLengthGroupedSampler(
                sampler.batch_size, sampler.lengths, seed
            )
        return sampler

    def _run_epoch(self, *args, **kwargs):
        # accelerate forwards `set_epoch` to the sampler, except through the batch sampler it wraps around a
        # distributed loader whose first batches are skipped on resume: set the epoch here, for every layout.
        if self.length_grouped_sampler is not None:
            self.length_grouped_sampler.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and self.is_logging_step():
            inputs = {**inputs, "output_loss_gradient_norms": True}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        (self.train_losses if model.training else self.eval_losses).update(outputs)
        if model.training and not torch.isfinite(loss):
            self.nonfinite_loss_batches += 1
            logger.warning(
                "Non-finite loss (%s) at step %d; this batch's update is skipped (%d so far).",
                loss.item(),
                self.state.global_step,
                self.nonfinite_loss_batches,
            )
            # A zero that depends on every trainable parameter: backward gives zero gradients
            # everywhere, so DDP still finds a gradient for each parameter and processes stay in step.
            loss = sum((parameter * 0.0).sum() for parameter in model.parameters() if parameter.requires_grad)
        return (loss, outputs) if return_outputs else loss

    def is_logging_step(self) -> bool:
        """
        Whether the step being trained will be logged, so that its batches measure the loss terms' gradient norms
        (`log_knowledge_share`, default on; measured on every step when logging once per epoch).
        """
        if not getattr(self.args, "log_knowledge_share", True):
            return False
        step = self.state.global_step + 1  # the Trainer counts the step once its update is done
        if self.args.logging_strategy == "epoch":
            return True
        if self.args.logging_first_step and step == 1:
            return True
        return self.args.logging_strategy == "steps" and step % self.state.logging_steps == 0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # A dict with "loss" is the periodic training log, which every process reaches together.
        if "loss" in logs:
            logs.update(self.train_losses.pop_means(self.accelerator))
            if self.nonfinite_loss_batches:
                logs["nonfinite_loss_batches"] = self.nonfinite_loss_batches
            if self.gradient_guard.skipped_steps:
                logs["nonfinite_grad_steps"] = self.gradient_guard.skipped_steps
        super().log(logs, start_time)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self.eval_losses.pop_means(self.accelerator)  # start from zero
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )
        means = self.eval_losses.pop_means(self.accelerator)
        output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in means.items()})
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        if logits is None:
            return loss, logits, labels
        # The model's outputs come as a tuple: CTC logits first, then the loss components.
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        predicted_ids = logits.argmax(dim=-1)
        attention_mask = inputs.get("attention_mask")
        if attention_mask is not None:
            frame_mask = self.accelerator.unwrap_model(model).frame_mask(predicted_ids.shape[1], attention_mask)
            predicted_ids = predicted_ids.masked_fill(~frame_mask.to(predicted_ids.device), -100)
        return loss, predicted_ids, labels

    # ------------------------------------------------------------------------------------------- saving
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        # Every process has written its own files (rng_state_<rank>.pth) before they are listed.
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            run_dir = self._get_output_dir(trial=trial)
            write_file_manifest(os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"))

    def save_state(self) -> None:
        """`Trainer.save_state`, written atomically: a kill leaves the previous `trainer_state.json`, never half of one."""
        if self.args.should_save:
            write_trainer_state(self.state, os.path.join(self.args.output_dir, TRAINER_STATE_NAME))

    def save_metrics(self, split: str, metrics: dict, combined: bool = True) -> None:
        """`Trainer.save_metrics`, written atomically; an `all_results.json` cut off by a kill is written anew."""
        if self.is_world_process_zero():
            write_metrics(self.args.output_dir, split, metrics, combined=combined)

    def save_final(self, train_metrics: dict | None, train_samples: int | None = None) -> None:
        """
        Save the model (with its processor and code files), `trainer_state.json` and the train metrics
        (`train_results.json`, `all_results.json`) to output_dir as one unit: all are written to
        `output_dir/final_save.tmp`, its files are listed ([`write_file_manifest`]), then moved into
        output_dir (the state and metrics before the weights) and the folder removed. A run killed meanwhile
        never leaves new weights without their state and metrics, and the next run completes the save.

        Args:
            train_metrics: what `train()` returned; None when this run trained nothing because its last
                checkpoint held the final step. The train metrics are then those of the earlier run's save
                (in `final_save.tmp` or output_dir) or, when it was killed before writing them, recovered from
                the trainer state's logs (with a warning: its run time is lost).
            train_samples: the number of training rows, added to the metrics as `train_samples`.
        """
        output_dir = self.args.output_dir
        staging = os.path.join(output_dir, FINAL_SAVE_DIR)
        if self.args.should_save:
            if train_metrics is None:
                train_metrics = earlier_train_metrics(staging, output_dir) or recovered_train_metrics(self.state)
            if os.path.isdir(staging):
                shutil.rmtree(staging)
        self.save_model(staging)  # on every process: a sharded model is gathered by all of them
        if self.args.should_save:
            if train_samples is not None:
                train_metrics = {**train_metrics, "train_samples": train_samples}
            write_trainer_state(self.state, os.path.join(staging, TRAINER_STATE_NAME))
            write_metrics(staging, "train", train_metrics, combined=False)
            write_json_atomically(
                os.path.join(staging, "all_results.json"),
                {**readable_json(os.path.join(output_dir, "all_results.json")), **train_metrics},
                indent=4,
                sort_keys=True,
            )
            write_file_manifest(staging)
            move_final_save(staging, output_dir)
        self.accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------- saved files
def write_trainer_state(state: TrainerState, path: str) -> None:
    """`TrainerState.save_to_json`, through a temporary file and a rename."""
    write_json_atomically(path, dataclasses.asdict(state), indent=2, sort_keys=True)


def readable_json(path: str) -> dict:
    """The JSON object in `path`; an empty dict when there is none, or when it is damaged (with a warning)."""
    if not os.path.isfile(path):
        return {}
    problem = json_problem(path)
    if problem:
        logger.warning("%s; it is written anew.", problem)
        return {}
    with open(path, encoding="utf-8") as handle:
        value = json.load(handle)
    return value if isinstance(value, dict) else {}


def write_metrics(folder: str, split: str, metrics: dict, combined: bool = True) -> None:
    """`<split>_results.json` (and, when `combined`, `all_results.json` updated with `metrics`) in `folder`."""
    write_json_atomically(os.path.join(folder, f"{split}_results.json"), metrics, indent=4, sort_keys=True)
    if combined:
        path = os.path.join(folder, "all_results.json")
        write_json_atomically(path, {**readable_json(path), **metrics}, indent=4, sort_keys=True)


def earlier_train_metrics(staging: str, output_dir: str) -> dict | None:
    """The train metrics an earlier run saved: in its complete staged final save, else in output_dir."""
    for folder in (staging, output_dir):
        path = os.path.join(folder, "train_results.json")
        staged_and_complete = folder != staging or (
            read_file_manifest(staging) is not None and folder_problem(staging) is None
        )
        if staged_and_complete and os.path.isfile(path) and json_problem(path) is None:
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
    return None


def recovered_train_metrics(state: TrainerState) -> dict:
    """
    Train metrics recovered from a trainer state whose run was killed before saving them: `epoch` and
    `train_loss` (the mean of the logged per-interval losses, weighted by their steps).
    """
    logger.warning(
        "The run that trained to step %d was stopped before it saved its train metrics: train_results.json gets "
        "those its trainer state keeps (epoch, train_loss from the logged losses), not its run time.",
        state.global_step,
    )
    metrics = {"epoch": state.epoch}
    total, previous = 0.0, 0
    for entry in state.log_history:
        if "loss" in entry and "step" in entry:
            total += entry["loss"] * (entry["step"] - previous)
            previous = entry["step"]
    if previous:
        metrics["train_loss"] = total / previous
    return metrics


def move_final_save(staging: str, output_dir: str) -> None:
    """Move the staged final save's files into `output_dir` (state and metrics first, weights last), then remove it."""

    def order(name: str) -> int:
        if name in FINAL_SAVE_FIRST:
            return 0
        return 2 if name.startswith("model.safetensors") or name.endswith(".safetensors") else 1

    names = [name for name in os.listdir(staging) if os.path.isfile(os.path.join(staging, name))]
    for name in sorted(names, key=lambda name: (order(name), name)):
        if name != FILE_MANIFEST:
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    shutil.rmtree(staging)


# ---------------------------------------------------------------------------------------- resuming
CHECKPOINT_REQUIRED_FILES = ((TRAINER_STATE_NAME,), (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME))


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """
    Why the checkpoint folder `checkpoint` cannot be resumed from, or None when it was completely written.

    [`TOTCAKTTrainer`] records every file of a checkpoint with its size ([`write_file_manifest`]) as the last
    step of saving it; a file missing or of another size means the save was interrupted or the file damaged
    since. Every file is also checked by its format (a cut-off `optimizer.pt` lacks its zip directory, a
    cut-off `model.safetensors` the bytes its header describes), which covers checkpoints written without
    a manifest (by an earlier version, or by a run stopped between its last file and the manifest).
    `trainer_state.json` and the weights must be there.
    """
    if not os.path.isdir(checkpoint):
        return f"{checkpoint} is not a folder"
    problem = folder_problem(checkpoint, required=CHECKPOINT_REQUIRED_FILES)
    if problem is None:
        with open(os.path.join(checkpoint, TRAINER_STATE_NAME), encoding="utf-8") as handle:
            if not isinstance(json.load(handle), dict):
                problem = f"{os.path.join(checkpoint, TRAINER_STATE_NAME)} holds no trainer state"
    return problem


def is_complete_checkpoint(checkpoint: str | os.PathLike) -> bool:
    """Whether the checkpoint folder `checkpoint` was completely written (see [`checkpoint_problem`])."""
    return checkpoint_problem(checkpoint) is None


def last_complete_checkpoint(output_dir: str | os.PathLike, set_aside_incomplete: bool = True) -> str | None:
    """
    The `checkpoint-<step>` folder of `output_dir` with the highest step that [`is_complete_checkpoint`]
    (transformers' `get_last_checkpoint` takes the highest step even when that folder is half-written,
    and resuming from it fails or starts from step 0).

    Args:
        output_dir: the training output folder.
        set_aside_incomplete: move incomplete checkpoint folders to
            `output_dir/incomplete_checkpoints/` (with a warning that says why), so that the Trainer neither loads
            them nor writes a new checkpoint over their stale files. Only the process that saves
            checkpoints should do so.

    Returns:
        `str | None`: the path of the checkpoint to resume from, or None when there is none.
    """
    output_dir = os.fspath(output_dir)
    pattern = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
    steps = {}
    for name in os.listdir(output_dir):
        match = pattern.fullmatch(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            steps[os.path.join(output_dir, name)] = int(match.group(1))
    last = None
    for checkpoint in sorted(steps, key=steps.get):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            last = checkpoint
            continue
        if set_aside_incomplete:
            target = os.path.join(output_dir, INCOMPLETE_CHECKPOINTS_DIR, os.path.basename(checkpoint))
            if os.path.isdir(target):
                shutil.rmtree(target)  # an older incomplete copy of the same step
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(checkpoint, target)
            logger.warning(
                "%s is incomplete or damaged, it is not resumed from: %s. Moved to %s.", checkpoint, problem, target
            )
    return last


__all__ = [
    "CER_METRIC_PATH",
    "CTCCharacterErrorRate",
    "EpochSeededLengthGroupedSampler",
    "FINAL_SAVE_DIR",
    "INCOMPLETE_CHECKPOINTS_DIR",
    "LOGGED_OUTPUTS",
    "LoggedOutputMeter",
    "NonFiniteGradientGuard",
    "TOTCAKTTrainer",
    "TOTCAKTTrainingArguments",
    "build_model",
    "check_saved_model",
    "checkpoint_problem",
    "is_complete_checkpoint",
    "last_complete_checkpoint",
    "load_cer_metric",
    "load_teacher",
    "parse_encoder_config",
    "shortest_usable_input",
]
