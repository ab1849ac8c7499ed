"""Hub model card (rendered from a Jinja template with `huggingface_hub.ModelCard`) and upload."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from ..configuration_tot_cakt import TOTCAKTConfig
from .output_lock import LOCK_FILE

CARD_TAGS = [
    "automatic-speech-recognition",
    "ctc",
    "tot-cakt",
    "optimal-transport",
    "knowledge-distillation",
    "mandarin",
]
# Training state that must not be published: checkpoints, the pickled TrainingArguments, the run's lock,
# leftovers of a killed run.
UPLOAD_IGNORE_PATTERNS = [
    LOCK_FILE,
    "checkpoint-*",
    "checkpoint-*/**",
    "incomplete_checkpoints/**",
    "training_args.bin",
    "*.tmp",
    "**/*.tmp",
]


def is_hub_id(name: str | None) -> bool:
    """Whether `name` looks like a Hub repository id rather than a local path."""
    return bool(name) and not os.path.exists(name) and not os.path.isabs(name) and name.count("/") <= 1


def public_name(name_or_path: str | None) -> str | None:
    """
    How a card names a model it was built from: a Hub id as it is, a local folder by its own name only
    (an absolute path would publish the training machine's directory layout and mean nothing elsewhere).
    """
    if not name_or_path or is_hub_id(name_or_path):
        return name_or_path
    return os.path.basename(os.path.normpath(os.path.abspath(name_or_path)))


def public_teacher(teacher_name_or_path: str | None, hub_teacher_id: str | None = None) -> str | None:
    """
    How a published model names its teacher: `hub_teacher_id` when given (the teacher's Hub id, for a teacher
    trained from a local folder), else [`public_name`] of `teacher_name_or_path`.
    """
    return hub_teacher_id or public_name(teacher_name_or_path)


def public_config(folder: str | os.PathLike, hub_teacher_id: str | None = None) -> bytes:
    """
    `folder/config.json` as it is uploaded: its `teacher_name_or_path` is [`public_teacher`]'s name, never a path
    on the training machine, which would publish its directory layout and name nothing anywhere else. The file
    in `folder` keeps the path, for `attach_teacher()` and `--model_name_or_path` on that machine.
    """
    config = json.loads(Path(folder, "config.json").read_text(encoding="utf-8"))
    if "teacher_name_or_path" in config:
        config["teacher_name_or_path"] = public_teacher(config["teacher_name_or_path"], hub_teacher_id)
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")  # as transformers writes it


class TrainingData(NamedTuple):
    """How the card names the training data: `model-index` dataset name and type, and a sentence."""

    name: str
    type: str
    description: str


def describe_training_data(
    dataset_name: str | None, aishell_dir: str | None, train_manifest: str | None, split: str
) -> TrainingData:
    """Name the data source a model was trained on (a Hub dataset, a local folder, AISHELL-1 or a manifest)."""
    if aishell_dir:
        return TrainingData("AISHELL-1", "aishell-1", f"AISHELL-1 (`{split}` split)")
    if is_hub_id(dataset_name):
        return TrainingData(dataset_name, dataset_name, f"`{dataset_name}` (`{split}` split)")
    if dataset_name:
        name = os.path.basename(os.path.abspath(dataset_name))
        return TrainingData(name, "local", f"a local dataset, `{name}` (`{split}` split)")
    return TrainingData("manifest", "local", f"the utterances listed in `{os.path.basename(train_manifest or '')}`")


def cer_result(
    cer: float, dataset_name: str, dataset_type: str, split: str, dataset_config: str | None = None
) -> EvalResult:
    """A `model-index` entry for a character error rate (a fraction, e.g. 0.081) on one dataset split."""
    return EvalResult(
        task_type="automatic-speech-recognition",
        task_name="Speech Recognition",
        dataset_type=dataset_type,
        dataset_name=dataset_name,
        dataset_config=dataset_config,
        dataset_split=split,
        metric_type="cer",
        metric_name="CER",
        metric_value=float(cer),
    )


def describe_adapter(config: TOTCAKTConfig) -> str | None:
    """The adapter in words, for the card (None when the model has none)."""
    if not config.has_adapter:
        return None
    sizes = f"from {config.hidden_size} to {config.teacher_hidden_size} features"
    if config.adapter_type == "linear":
        return f"one linear projection {sizes}"
    if config.adapter_num_layers == 1:
        return f"a LayerNorm and one linear layer {sizes}"
    return (
        f"a LayerNorm and {config.adapter_num_layers} linear layers of width {config.adapter_hidden_size} with GELU, "
        f"{sizes}"
    )


def render_model_card(
    template_path: str | os.PathLike,
    config: TOTCAKTConfig,
    *,
    model_name: str,
    repo_id: str,
    encoder_name_or_path: str | None = None,
    datasets: list[str] | None = None,
    dataset_description: str = "",
    results: list[EvalResult] | None = None,
    hyperparameters: dict | None = None,
    sampling_rate: int = 16000,
    do_lower_case: bool = True,
    license: str = "apache-2.0",
    hub_teacher_id: str | None = None,
) -> ModelCard:
    """
    Render the model card of a trained TOT-CAKT model.

    Args:
        template_path: the Jinja template (`model_cards/README_TEMPLATE.md`).
        config: the trained model's configuration (method, teacher, loss weights, vocabulary size).
        model_name: title of the card and name of the `model-index` entry.
        repo_id: Hub repository the card is for (used in the usage examples).
        encoder_name_or_path: checkpoint the encoder started from; recorded as `base_model` when it is a Hub id,
            named by its folder name when it is local (so is a local teacher: see [`public_name`]).
        datasets: Hub dataset ids trained on (local data is described in `dataset_description` only).
        results: evaluation results ([`cer_result`]) for the `model-index` metadata and the results table.
        hyperparameters: name -> value rows of the training table.
        sampling_rate, do_lower_case: the audio rate and transcript normalisation the model expects.
        hub_teacher_id: the teacher's Hub id, for a teacher given as a local folder (see [`public_teacher`]).

    Returns:
        `huggingface_hub.ModelCard` with YAML metadata (language, license, tags, datasets,
        base_model, teacher_model, pipeline_tag, model-index) and the rendered text.
    """
    teacher = (hub_teacher_id or config.teacher_name_or_path) if config.uses_teacher else None
    card_data = ModelCardData(
        language="zh",
        license=license,
        library_name="transformers",
        pipeline_tag="automatic-speech-recognition",
        tags=CARD_TAGS + [f"alignment-{config.alignment}"],
        datasets=[name for name in datasets or [] if is_hub_id(name)] or None,
        base_model=encoder_name_or_path if is_hub_id(encoder_name_or_path) else None,
        model_name=model_name,
        eval_results=results or None,
        teacher_model=teacher if is_hub_id(teacher) else None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=os.fspath(template_path),
        model_name=model_name,
        repo_id=repo_id,
        teacher_name=public_name(teacher),
        teacher_is_local=teacher is not None and not is_hub_id(teacher),
        encoder_name=public_name(encoder_name_or_path),
        encoder_is_local=encoder_name_or_path is not None and not is_hub_id(encoder_name_or_path),
        results=results or [],
        config=config,
        adapter=describe_adapter(config),
        dataset_description=dataset_description or "not recorded",
        hyperparameters=hyperparameters or {},
        sampling_rate=sampling_rate,
        letter_case="lower" if do_lower_case else "upper",
    )


def training_hyperparameters(args, global_step: int, config: TOTCAKTConfig) -> dict:
    """
    The rows of the card's hyper-parameter table, from `transformers.TrainingArguments`, the number of
    optimisation steps done, and the model configuration (encoder SpecAugment, alignment method, what the CTC
    head reads, the adapter).
    """
    encoder = config.encoder_config
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    rows = {
        "learning_rate": args.learning_rate,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "total_train_batch_size": args.per_device_train_batch_size
        * args.gradient_accumulation_steps
        * args.world_size,
        "optimizer": getattr(args.optim, "value", args.optim),
        "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
        "warmup_steps": args.warmup_steps,
        "training_steps": global_step,
        "seed": args.seed,
        "mixed_precision": precision,
        "mask_time_prob": getattr(encoder, "mask_time_prob", None),
        "layerdrop": getattr(encoder, "layerdrop", None),
        "alignment": config.alignment,
        "ctc_input": config.ctc_input,
        "adapter_type": config.adapter_type if config.has_adapter else None,
    }
    if config.uses_teacher:  # the fields that the model's alignment reads, and only those
        rows["ctc_loss_weight"] = config.ctc_loss_weight
        rows.update({name: getattr(config, name) for name in config.alignment_fields})
    return {name: value for name, value in rows.items() if value is not None}


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload TOT-CAKT model",
    hub_teacher_id: str | None = None,
) -> str:
    """
    Create the Hub model repository if needed and upload `folder` (weights, configuration, the
    remote-code files, processor files, README.md, training results) in one commit, leaving out
    checkpoints and training state. `config.json` is uploaded as [`public_config`] makes it: it names a
    local teacher by `hub_teacher_id` or by its folder name, not by its path.

    Returns:
        `str`: the URL of the commit.
    """
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    files = {path.relative_to(folder).as_posix(): path for path in sorted(Path(folder).glob("**/*")) if path.is_file()}
    operations = [
        CommitOperationAdd(
            path_in_repo=name,
            path_or_fileobj=public_config(folder, hub_teacher_id) if name == "config.json" else os.fspath(files[name]),
        )
        for name in filter_repo_objects(files, ignore_patterns=UPLOAD_IGNORE_PATTERNS + DEFAULT_IGNORE_PATTERNS)
    ]
    commit = api.create_commit(
        repo.repo_id, operations, commit_message=commit_message, revision=revision, repo_type="model"
    )
    return commit.commit_url


__all__ = [
    "CARD_TAGS",
    "TrainingData",
    "cer_result",
    "describe_adapter",
    "describe_training_data",
    "is_hub_id",
    "public_config",
    "public_name",
    "public_teacher",
    "push_folder_to_hub",
    "render_model_card",
    "training_hyperparameters",
]
