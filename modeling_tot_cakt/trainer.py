"""Training glue for `transformers.Trainer`: model set-up from arguments, the CER metric, and a
Trainer that logs the CTC / OT / alignment losses separately and survives non-finite losses."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import evaluate
import numpy as np
import torch
from transformers import AutoConfig, EvalPrediction, PreTrainedTokenizerBase, Trainer, TrainingArguments

from .configuration_tot_cakt import TOTCAKTConfig
from .modeling_tot_cakt import TOTCAKTForCTC

logger = logging.getLogger(__name__)

CER_METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "cer")
LOSS_COMPONENTS = ("ctc_loss", "ot_loss", "align_loss")


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

    - `model_name_or_path`: continue from a saved TOT-CAKT model (its vocabulary must be the one in use);
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
    if model_name_or_path is not None:
        config = TOTCAKTConfig.from_pretrained(model_name_or_path, **hub_kwargs)
        config.encoder_config.update(encoder_overrides)
    else:
        # With `encoder_name_or_path`, `from_encoder_pretrained` replaces this encoder configuration
        # by the checkpoint's (and applies the overrides there).
        config = TOTCAKTConfig(encoder_config=AutoConfig.for_model(**encoder_config) if encoder_config else None)
        config.encoder_config.update(encoder_overrides)
    config.update({**config_overrides, "vocab_size": vocab_size, "pad_token_id": pad_token_id})
    if config.uses_teacher and "teacher_hidden_size" not in config_overrides:
        teacher_config = AutoConfig.from_pretrained(config.teacher_name_or_path, **hub_kwargs)
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


class LossComponentMeter:
    """Running sums of the loss components (`ctc_loss`, `ot_loss`, `align_loss`) of one phase."""

    def __init__(self, device: torch.device):
        self.totals = torch.zeros(2, len(LOSS_COMPONENTS), device=device)  # row 0: sums, row 1: counts

    def update(self, outputs) -> None:
        for index, name in enumerate(LOSS_COMPONENTS):
            value = outputs.get(name)
            if value is not None:
                self.totals[0, index] += value.detach().float().to(self.totals.device)
                self.totals[1, index] += 1

    def pop_means(self, accelerator) -> dict[str, float]:
        """Means since the last call, averaged over all processes (a collective: call it on every rank)."""
        totals = accelerator.reduce(self.totals, reduction="sum") if accelerator.num_processes > 1 else self.totals
        totals = totals.tolist()
        self.totals.zero_()
        return {name: total / count for name, total, count in zip(LOSS_COMPONENTS, *totals) if count > 0}


class TOTCAKTTrainer(Trainer):
    """
    `Trainer` for [`TOTCAKTForCTC`]:

    - logs `ctc_loss`, `ot_loss` and `align_loss` next to `loss`: averaged over the logging interval
      for training, over the evaluation set for evaluation (`eval_ctc_loss`, ...), and over all
      processes; with `report_to tensorboard` they become `train/ctc_loss`, `eval/ctc_loss`, ...;
    - skips the update of a batch whose loss is NaN/inf (its gradients are zero on every process),
      warns, and logs the running count as `nonfinite_loss_batches`, instead of corrupting the weights;
    - returns greedy CTC ids from `prediction_step`, with frames beyond each utterance's length set
      to -100, so that [`CTCCharacterErrorRate`] never reads padding as speech.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_losses = LossComponentMeter(self.args.device)
        self.eval_losses = LossComponentMeter(self.args.device)
        self.nonfinite_loss_batches = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
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

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # A dict with "loss" is the periodic training log, which every process reaches together.
        if "loss" in logs:
            logs.update(self.train_losses.pop_means(self.accelerator))
            if self.nonfinite_loss_batches:
                logs["nonfinite_loss_batches"] = self.nonfinite_loss_batches
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


__all__ = [
    "CER_METRIC_PATH",
    "CTCCharacterErrorRate",
    "LOSS_COMPONENTS",
    "LossComponentMeter",
    "TOTCAKTTrainer",
    "TOTCAKTTrainingArguments",
    "build_model",
    "load_cer_metric",
    "parse_encoder_config",
]
