#!/usr/bin/env python
"""Train a TOT-CAKT Mandarin CTC recogniser with the Hugging Face Trainer.

Runs on one device (`python train_hf.py ...`), on several (`accelerate launch train_hf.py ...`,
`torchrun ...`), and reads its arguments from the command line or from one JSON/YAML file
(`python train_hf.py args.yaml`). Flags follow transformers'
`examples/pytorch/speech-recognition/run_speech_recognition_ctc.py`; see `--help`.
"""

import logging
import os
import re
import shutil
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import datasets
import torch
import transformers
from huggingface_hub.constants import HF_HOME
from transformers import (
    AutoConfig,
    AutoProcessor,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    set_seed,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState

from modeling_tot_cakt import TOTCAKTForCTC, create_processor
from modeling_tot_cakt.configuration_tot_cakt import (
    ADAPTER_TYPES,
    ALIGNMENT_FIELDS,
    ALIGNMENT_MODES,
    CTC_INPUTS,
    CTC_REDUCTIONS,
    GRAD_MODES,
    TEACHER_TARGETS,
    alignment_modes_reading,
)
from modeling_tot_cakt.processing_tot_cakt import upgrade_feature_extractor
from modeling_tot_cakt.training.collator import DataCollatorCTCWithTeacher
from modeling_tot_cakt.training.data import (
    TEXT_COLUMN,
    build_vocabulary,
    count_out_of_vocabulary,
    dataset_texts,
    featurize_split,
    load_speech_split,
    normalize_split,
    write_vocabulary,
)
from modeling_tot_cakt.training.language_model import decode_and_score, feature_logits
from modeling_tot_cakt.training.model_card import (
    cer_result,
    describe_training_data,
    is_hub_id,
    public_name,
    push_folder_to_hub,
    render_model_card,
    training_hyperparameters,
)
from modeling_tot_cakt.training.output_lock import LOCK_FILE, lock_output_dir
from modeling_tot_cakt.training.teacher_features import (
    TeacherFeatureCache,
    count_truncated_transcripts,
    precompute_teacher_features,
    teacher_feature_layout,
    teacher_fingerprint,
    teacher_max_length,
)
from modeling_tot_cakt.training.trainer import (
    INCOMPLETE_CHECKPOINTS_DIR,
    CTCCharacterErrorRate,
    TOTCAKTTrainer,
    TOTCAKTTrainingArguments,
    build_model,
    check_saved_model,
    checkpoint_problem,
    last_complete_checkpoint,
    load_teacher,
    parse_encoder_config,
    shortest_usable_input,
)

logger = logging.getLogger(__name__)

MODEL_CARD_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_cards", "README_TEMPLATE.md")
# What a run writes to output_dir before its first complete checkpoint (its lock, the vocabulary, TensorBoard
# logs, checkpoints it was killed while saving): a rerun over only these starts afresh.
PRE_CHECKPOINT_OUTPUTS = {LOCK_FILE, "vocab.json", "runs", INCOMPLETE_CHECKPOINTS_DIR}
# The temporary file `write_vocabulary` renames to vocab.json; a run killed in between leaves it behind.
TEMPORARY_VOCABULARY = re.compile(r"vocab\.json\.\d+\.tmp")


@dataclass
class ModelArguments:
    """Which model to start from and how to change its encoder (None keeps the configuration's value)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A saved TOT-CAKT model (Hub id or folder) to continue training; its vocabulary is reused."},
    )
    encoder_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A wav2vec2 / HuBERT / WavLM / data2vec-audio / Wav2Vec2-BERT checkpoint for the encoder."},
    )
    encoder_config: str | None = field(
        default=None,
        metadata={"help": "Configuration of a from-scratch encoder: JSON with a 'model_type', or a JSON file."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A CTC tokenizer whose vocabulary to use instead of one built from the transcripts."},
    )
    language_model: str | None = field(
        default=None,
        metadata={
            "help": "A character n-gram model (ARPA; python -m modeling_tot_cakt.training.language_model estimate): "
            "after training it is saved with the model, its weight and bonus chosen on the eval split, and eval and "
            "test are scored greedily and with it (eval_lm_results.json, test_lm_results.json)."
        },
    )
    lm_beam_width: int = field(default=32, metadata={"help": "Beam width of the --language_model decoding."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store models and datasets from the Hub."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models and datasets."})
    freeze_feature_encoder: bool = field(
        default=True,
        metadata={
            "help": "Freeze the convolutional feature encoder of a pretrained raw-waveform encoder "
            "(a from-scratch encoder always trains it)."
        },
    )
    attention_dropout: float | None = field(default=None, metadata={"help": "Dropout on attention probabilities."})
    activation_dropout: float | None = field(
        default=None, metadata={"help": "Dropout inside the feed-forward layers."}
    )
    feat_proj_dropout: float | None = field(default=None, metadata={"help": "Dropout on the projected features."})
    hidden_dropout: float | None = field(default=None, metadata={"help": "Dropout on the encoder's hidden states."})
    final_dropout: float | None = field(default=None, metadata={"help": "Dropout before the CTC head."})
    mask_time_prob: float | None = field(
        default=None, metadata={"help": "SpecAugment: probability of each frame to start a masked time span."}
    )
    mask_time_length: int | None = field(default=None, metadata={"help": "SpecAugment: length of masked time spans."})
    mask_feature_prob: float | None = field(
        default=None, metadata={"help": "SpecAugment: probability of each feature to start a masked feature span."}
    )
    mask_feature_length: int | None = field(
        default=None, metadata={"help": "SpecAugment: length of masked feature spans."}
    )
    layerdrop: float | None = field(default=None, metadata={"help": "The LayerDrop probability."})
    ctc_loss_reduction: str | None = field(
        default=None, metadata={"help": "How the CTC loss is reduced.", "choices": CTC_REDUCTIONS}
    )
    ctc_zero_infinity: bool | None = field(
        default=None, metadata={"help": "Zero infinite CTC losses (utterances with more labels than frames)."}
    )

    def encoder_overrides(self) -> dict:
        """Fields of the encoder configuration to change: dropouts, SpecAugment, LayerDrop."""
        names = (
            "attention_dropout",
            "activation_dropout",
            "feat_proj_dropout",
            "hidden_dropout",
            "mask_time_prob",
            "mask_time_length",
            "mask_feature_prob",
            "mask_feature_length",
            "layerdrop",
        )
        return {name: getattr(self, name) for name in names}

    def config_overrides(self) -> dict:
        """Fields of the TOT-CAKT configuration to change: the CTC head."""
        return {name: getattr(self, name) for name in ("final_dropout", "ctc_loss_reduction", "ctc_zero_infinity")}


@dataclass
class TOTCAKTArguments:
    """The knowledge-transfer method (None keeps the configuration's value)."""

    alignment: str | None = field(
        default=None,
        metadata={
            "help": "tot (TOT-CAKT), ot (plain OT: OT-CAKT), uot (unbalanced OT), tot_uot (TOT with unbalanced "
            "marginals), gmot (graph-matching OT: fused Gromov-Wasserstein), tot_gmot (TOT with the "
            "Gromov-Wasserstein term) or none (CTC only).",
            "choices": ALIGNMENT_MODES,
        },
    )
    teacher_name_or_path: str | None = field(
        default=None, metadata={"help": "Frozen BERT-like teacher (Hub id or folder with weights and tokenizer)."}
    )
    teacher_layer: int | None = field(
        default=None,
        metadata={"help": "Teacher layer whose token features the alignment uses (-1: the last; 0: the embeddings)."},
    )
    ctc_input: str | None = field(
        default=None,
        metadata={
            "help": "What the CTC head reads: encoder (the encoder's frames) or adapter (the adapted features, the "
            "adapter then ships with the model).",
            "choices": CTC_INPUTS,
        },
    )
    adapter_type: str | None = field(
        default=None,
        metadata={"help": "mlp (LayerNorm and linear layers) or linear (one projection).", "choices": ADAPTER_TYPES},
    )
    adapter_hidden_size: int | None = field(
        default=None, metadata={"help": "Width of the hidden layers of the mlp adapter."}
    )
    adapter_num_layers: int | None = field(default=None, metadata={"help": "Linear layers in the mlp adapter."})
    tot_lambda1: float | None = field(default=None, metadata={"help": "Weight of the local order reward."})
    tot_lambda2: float | None = field(default=None, metadata={"help": "KL / entropic regularisation weight."})
    tot_sigma: float | None = field(default=None, metadata={"help": "Width of the temporal (diagonal) prior."})
    uot_tau: float | None = field(
        default=None, metadata={"help": "Weight of the marginal penalties in the uot and tot_uot alignments."}
    )
    gmot_alpha: float | None = field(
        default=None,
        metadata={"help": "Weight in [0, 1] of the Gromov-Wasserstein term in the gmot and tot_gmot alignments."},
    )
    gmot_max_outer: int | None = field(
        default=None,
        metadata={"help": "Maximum outer (linearisation) iterations of the gmot and tot_gmot alignments."},
    )
    tot_max_iter: int | None = field(default=None, metadata={"help": "Maximum Sinkhorn iterations."})
    tot_tol: float | None = field(default=None, metadata={"help": "Sinkhorn stopping tolerance on the marginals."})
    tot_grad: str | None = field(
        default=None, metadata={"help": "Gradient of the transport plan.", "choices": GRAD_MODES}
    )
    ctc_loss_weight: float | None = field(default=None, metadata={"help": "Weight of the CTC loss."})
    ot_loss_weight: float | None = field(default=None, metadata={"help": "Weight of the transport cost."})
    align_loss_weight: float | None = field(default=None, metadata={"help": "Weight of the alignment loss."})
    teacher_target: str | None = field(
        default=None,
        metadata={
            "help": "What each token position gives the alignment: states (the teacher's states of the transcript) "
            "or masked_states (each position's state with that position masked: what its context predicts).",
            "choices": TEACHER_TARGETS,
        },
    )
    kd_loss_weight: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the distillation of the teacher's masked-LM predictions onto the CTC posteriors "
            "through the transport plan (0: off; needs a teacher with its masked-LM head)."
        },
    )
    kd_top_k: int | None = field(
        default=None, metadata={"help": "Most probable teacher tokens per position kept for the distillation."}
    )
    align_layer: int | None = field(
        default=None,
        metadata={
            "help": "Encoder states the adapter maps for the alignment: -1 its output (what the CTC head reads), "
            "0 its embedding output, k the output of layer k."
        },
    )
    cache_teacher_features: bool = field(
        default=False,
        metadata={"help": "Run the teacher once per transcript before training and train on its cached features."},
    )
    teacher_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where cached teacher features live (default: $HF_HOME/tot_cakt/teacher_features)."},
    )
    teacher_batch_size: int = field(
        default=64, metadata={"help": "Transcripts per teacher pass when caching features."}
    )

    def config_overrides(self) -> dict:
        """Fields of the TOT-CAKT configuration to change: everything but the feature cache settings."""
        cache_settings = ("cache_teacher_features", "teacher_cache_dir", "teacher_batch_size")
        return {name: value for name, value in asdict(self).items() if name not in cache_settings}


@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on. Give --dataset_name, --aishell_dir, or manifests."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id or local folder (audiofolder, data files, save_to_disk)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the dataset."})
    train_split_name: str = field(default="train", metadata={"help": "Training split ('a+b' concatenates)."})
    eval_split_name: str = field(default="validation", metadata={"help": "Evaluation split (AISHELL-1 calls it dev)."})
    test_split_name: str = field(default="test", metadata={"help": "Split scored with --do_predict."})
    train_manifest: str | None = field(default=None, metadata={"help": "CSV/JSONL manifest of the training data."})
    eval_manifest: str | None = field(default=None, metadata={"help": "CSV/JSONL manifest of the evaluation data."})
    test_manifest: str | None = field(default=None, metadata={"help": "CSV/JSONL manifest scored with --do_predict."})
    aishell_dir: str | None = field(
        default=None, metadata={"help": "AISHELL-1 folder with wav/<split>/<speaker>/*.wav and transcript/."}
    )
    audio_column_name: str = field(default="audio", metadata={"help": "Column with the audio (or its path)."})
    text_column_name: str = field(default="text", metadata={"help": "Column with the transcript."})
    streaming: bool = field(
        default=False, metadata={"help": "Stream the data instead of preparing it up front (needs --max_steps)."}
    )
    overwrite_cache: bool = field(
        default=False,
        metadata={
            "help": "Recompute the preprocessed datasets (audio files changed in place are recomputed without it)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start afresh in --output_dir instead of resuming from its last checkpoint."}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for preprocessing."})
    preprocessing_only: bool = field(default=False, metadata={"help": "Only preprocess the data (to fill the cache)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many evaluation rows (and test rows with --do_predict)."}
    )
    max_duration_in_seconds: float = field(default=20.0, metadata={"help": "Skip longer utterances."})
    min_duration_in_seconds: float = field(default=0.0, metadata={"help": "Skip shorter utterances."})
    do_lower_case: bool = field(
        default=True, metadata={"help": "Lower-case Latin letters in transcripts (upper-case them when False)."}
    )


Arguments = tuple[ModelArguments, TOTCAKTArguments, DataTrainingArguments, TOTCAKTTrainingArguments]


def parse_arguments() -> Arguments:
    """The four argument groups, from the command line or from one JSON/YAML file."""
    parser = HfArgumentParser((ModelArguments, TOTCAKTArguments, DataTrainingArguments, TOTCAKTTrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(sys.argv[1]))
    if len(sys.argv) == 2 and sys.argv[1].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses()


def setup_logging(training_args: TOTCAKTTrainingArguments) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    # This script's and the package's own reports (vocabulary, skipped rows, ...) show on the main process.
    for name in (__name__, "modeling_tot_cakt"):
        logging.getLogger(name).setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    logger.warning(
        f"Process rank: {training_args.process_index}, device: {training_args.device}, "
        f"distributed: {training_args.world_size > 1}, fp16: {training_args.fp16}, bf16: {training_args.bf16}"
    )


def check_arguments(
    model_args: ModelArguments, data_args: DataTrainingArguments, training_args: TOTCAKTTrainingArguments
) -> bool:
    """Refuse inconsistent arguments and set the Trainer's fixed ones. Returns whether to push to the Hub."""
    manifests = data_args.train_manifest or data_args.eval_manifest or data_args.test_manifest
    sources = [data_args.dataset_name, data_args.aishell_dir, manifests]
    if sum(source is not None for source in sources) != 1:
        raise ValueError(
            "Give exactly one data source: --dataset_name, --aishell_dir, or --train_manifest/--eval_manifest."
        )
    if data_args.streaming and training_args.max_steps <= 0:
        raise ValueError("--streaming needs --max_steps: a streamed dataset has no length to count epochs with.")
    starts = (model_args.model_name_or_path, model_args.encoder_name_or_path, model_args.encoder_config)
    if sum(start is not None for start in starts) > 1:
        raise ValueError("Give at most one of --model_name_or_path, --encoder_name_or_path and --encoder_config.")
    if training_args.hub_teacher_id is not None and not is_hub_id(training_args.hub_teacher_id):
        raise ValueError(
            f"--hub_teacher_id names the teacher on the Hub: give a repository id (name or owner/name), not "
            f"'{training_args.hub_teacher_id}'."
        )
    if model_args.language_model is not None:
        if not training_args.do_eval:
            raise ValueError(
                "--language_model needs --do_eval: its weight is chosen on the eval split, never on test."
            )
        if not os.path.isfile(model_args.language_model):
            raise ValueError(
                f"--language_model {model_args.language_model} is not a file: give an ARPA character model "
                "(python -m modeling_tot_cakt.training.language_model estimate --text ... --output ...)."
            )
    if training_args.device.type == "cpu":
        training_args.dataloader_pin_memory = False  # pinning needs an accelerator; torch warns on every epoch
    # The model card and upload are done here, once, after training: keep the Trainer from pushing on its own.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    training_args.remove_unused_columns = False  # the collator needs the transcript column
    training_args.length_column_name = "input_length"
    return push_to_hub


def output_dir_lock(training_args: TOTCAKTTrainingArguments):
    """The output directory's lock, held by the main process of a run (the others follow its lead)."""
    return lock_output_dir(training_args.output_dir) if training_args.process_index == 0 else nullcontext()


def find_checkpoint_to_resume(data_args: DataTrainingArguments, training_args: TOTCAKTTrainingArguments) -> str | None:
    """
    The checkpoint to resume training from: --resume_from_checkpoint, else the last complete checkpoint in
    output_dir (unless --overwrite_output_dir). Refuses an incomplete checkpoint and an output_dir holding
    other files. Leftover temporary vocabularies of a killed run are removed.
    """
    output_dir = training_args.output_dir
    if training_args.should_save and os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if TEMPORARY_VOCABULARY.fullmatch(name):
                os.remove(os.path.join(output_dir, name))
                logger.info(f"Removed {name}, a vocabulary that a killed run left half-written.")
    if not training_args.do_train:
        return None
    last_checkpoint = None
    if os.path.isdir(output_dir) and not data_args.overwrite_output_dir:
        last_checkpoint = last_complete_checkpoint(output_dir, set_aside_incomplete=training_args.should_save)
        leftovers = {name for name in os.listdir(output_dir) if not TEMPORARY_VOCABULARY.fullmatch(name)}
        if last_checkpoint is None and leftovers - PRE_CHECKPOINT_OUTPUTS:
            raise ValueError(
                f"Output directory ({output_dir}) already exists and is not empty. "
                "Use --overwrite_output_dir to train in it anyway."
            )
        if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
            logger.info(f"Checkpoint detected, resuming training at {last_checkpoint}.")
    resume = training_args.resume_from_checkpoint
    problem = checkpoint_problem(resume) if resume is not None else None
    if problem is not None:
        raise ValueError(
            f"--resume_from_checkpoint {resume} is not a complete checkpoint: {problem}. A run stopped while "
            "saving leaves such a folder; pass an earlier checkpoint."
        )
    return resume or last_checkpoint


def load_datasets(
    model_args: ModelArguments, data_args: DataTrainingArguments, training_args: TOTCAKTTrainingArguments
) -> dict:
    """The raw splits to use (`train`, `eval`, `test`), loaded, cut to --max_*_samples and normalised."""
    source = dict(
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        aishell_dir=data_args.aishell_dir,
        audio_column_name=data_args.audio_column_name,
        text_column_name=data_args.text_column_name,
        streaming=data_args.streaming,
        cache_dir=model_args.cache_dir,
        token=model_args.token,
    )
    splits = {}
    if training_args.do_train:
        splits["train"] = (data_args.train_split_name, data_args.train_manifest, data_args.max_train_samples)
    if training_args.do_eval:
        splits["eval"] = (data_args.eval_split_name, data_args.eval_manifest, data_args.max_eval_samples)
    if training_args.do_predict:
        splits["test"] = (data_args.test_split_name, data_args.test_manifest, data_args.max_eval_samples)
    raw_datasets = {}
    with training_args.main_process_first(desc="load and normalise datasets"):
        for name, (split, manifest, max_samples) in splits.items():
            dataset = load_speech_split(split, manifest=manifest, **source)
            if max_samples is not None and data_args.streaming:
                dataset = dataset.take(max_samples)
            elif max_samples is not None:
                dataset = dataset.select(range(min(max_samples, len(dataset))))
            raw_datasets[name] = normalize_split(
                dataset,
                name,
                do_lower_case=data_args.do_lower_case,
                num_proc=data_args.preprocessing_num_workers,
                load_from_cache_file=not data_args.overwrite_cache,
            )
    return raw_datasets


def load_processor(
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    training_args: TOTCAKTTrainingArguments,
    raw_datasets: dict,
    resume_checkpoint: str | None,
    encoder_config: dict | None,
) -> ProcessorMixin:
    """
    The processor: a resumed checkpoint's own (its vocabulary, whatever the data holds now), a saved
    model's, or a new one over output_dir/vocab.json (built from the training transcripts, or taken from
    --tokenizer_name_or_path). A stock feature extractor saved by an earlier version becomes the package's
    (same settings, and it takes integer PCM), so the model is saved with the current one.
    """
    vocab_file = os.path.join(training_args.output_dir, "vocab.json")
    if resume_checkpoint is not None and os.path.isfile(os.path.join(resume_checkpoint, "vocab.json")):
        check_saved_model(resume_checkpoint)  # its vocab.json must fit the weights about to be loaded
        processor = upgrade_feature_extractor(AutoProcessor.from_pretrained(resume_checkpoint))
        if training_args.should_save:  # output_dir keeps the vocabulary the weights were trained with
            write_vocabulary(processor.tokenizer.get_vocab(), vocab_file)
        logger.info(f"Vocabulary of the resumed checkpoint {resume_checkpoint}.")
        return processor
    if model_args.model_name_or_path is not None:
        check_saved_model(model_args.model_name_or_path, cache_dir=model_args.cache_dir, token=model_args.token)
        return upgrade_feature_extractor(
            AutoProcessor.from_pretrained(
                model_args.model_name_or_path, cache_dir=model_args.cache_dir, token=model_args.token
            )
        )
    with training_args.main_process_first(desc="vocabulary"):
        # A vocab.json left by a run stopped before its first checkpoint is rebuilt from the data too.
        starting_afresh = data_args.overwrite_output_dir or (training_args.do_train and resume_checkpoint is None)
        if starting_afresh and training_args.local_process_index == 0 and os.path.isfile(vocab_file):
            os.remove(vocab_file)
        if not os.path.isfile(vocab_file):
            if model_args.tokenizer_name_or_path is not None:
                reference = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path, token=model_args.token)
                vocab = reference.get_vocab()
            elif "train" in raw_datasets:
                vocab = build_vocabulary(dataset_texts(raw_datasets["train"]))
            else:
                raise ValueError(
                    "Without training data there is no vocabulary: "
                    "pass --model_name_or_path or --tokenizer_name_or_path."
                )
            write_vocabulary(vocab, vocab_file)
    input_config = encoder_config  # decides between raw-waveform and log-mel features
    if model_args.encoder_name_or_path is not None:
        input_config = AutoConfig.from_pretrained(
            model_args.encoder_name_or_path, cache_dir=model_args.cache_dir, token=model_args.token
        )
    return create_processor(vocab_file, encoder_config=input_config)


def report_out_of_vocabulary(raw_datasets: dict, vocab: dict[str, int], streaming: bool) -> None:
    """Log, per split, the transcript characters that the vocabulary lacks (they become [UNK])."""
    for name, dataset in raw_datasets.items():
        # Training transcripts have them only with a saved model's or a given tokenizer's vocabulary;
        # a streamed training set is not read a second time.
        if name == "train" and streaming:
            continue
        report = count_out_of_vocabulary(dataset_texts(dataset), vocab)
        logger.log(logging.WARNING if report.oov_tokens else logging.INFO, f"{name} transcripts: {report}")


def create_model(
    model_args: ModelArguments, method_args: TOTCAKTArguments, tokenizer, encoder_config: dict | None
) -> TOTCAKTForCTC:
    """The model to train, with its raw-waveform feature encoder frozen when it starts pretrained."""
    model = build_model(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        model_name_or_path=model_args.model_name_or_path,
        encoder_name_or_path=model_args.encoder_name_or_path,
        encoder_config=encoder_config,
        encoder_overrides=model_args.encoder_overrides(),
        config_overrides={**model_args.config_overrides(), **method_args.config_overrides()},
        cache_dir=model_args.cache_dir,
        token=model_args.token,
    )
    check_method_flags(method_args, model.config)
    pretrained_encoder = model_args.model_name_or_path or model_args.encoder_name_or_path
    if model_args.freeze_feature_encoder and pretrained_encoder and model.main_input_name == "input_values":
        model.freeze_feature_encoder()
    return model


def check_method_flags(method_args: TOTCAKTArguments, config) -> None:
    """Refuse alignment flags that the configuration's alignment does not read: they would change nothing, yet
    be saved in config.json as if they had acted."""
    given = [name for name, value in method_args.config_overrides().items() if value is not None]
    unread = [name for name in given if name in ALIGNMENT_FIELDS and name not in config.alignment_fields]
    if unread:
        flags = "; ".join(
            f"--{name} is read by --alignment {'/'.join(alignment_modes_reading(name))}" for name in unread
        )
        raise ValueError(
            f"This run's alignment is {config.alignment!r}, which does not read {', '.join('--' + n for n in unread)}: "
            f"{flags}. Drop the flag, or choose an alignment that reads it."
        )


@dataclass
class TeacherInputs:
    """What the collator needs of the teacher: its tokenizer and longest input, or a cache of its features."""

    tokenizer: PreTrainedTokenizerBase | None = None
    max_length: int | None = None
    cache: TeacherFeatureCache | None = None


def prepare_teacher(
    model: TOTCAKTForCTC,
    model_args: ModelArguments,
    method_args: TOTCAKTArguments,
    training_args: TOTCAKTTrainingArguments,
    raw_datasets: dict,
    streaming: bool,
    ctc_tokenizer: PreTrainedTokenizerBase | None = None,
) -> TeacherInputs:
    """
    Attach the teacher for on-the-fly features, or fill the cache of its features and detach it. Counts
    the transcripts longer than the teacher's position table: the teacher reads their beginning only.
    The model's `ctc_tokenizer` maps the teacher's predictions into the CTC vocabulary (`kd_loss_weight > 0`).
    """
    if not model.config.uses_teacher:
        return TeacherInputs()
    teacher, tokenizer = load_teacher(
        model.config.teacher_name_or_path,
        masked_lm=model.config.uses_teacher_predictions,
        cache_dir=model_args.cache_dir,
        token=model_args.token,
    )
    model.attach_teacher(teacher, tokenizer, ctc_tokenizer=ctc_tokenizer)
    max_length = teacher_max_length(teacher.config, tokenizer)
    for name, dataset in raw_datasets.items():
        if name == "train" and streaming:
            continue
        truncated = count_truncated_transcripts(tokenizer, dataset_texts(dataset), max_length)
        if truncated:
            logger.warning(
                f"{name}: {truncated} transcripts are longer than the teacher's {max_length} positions; "
                "the teacher reads only their beginning (the CTC labels keep every character)."
            )
    if not method_args.cache_teacher_features:
        return TeacherInputs(tokenizer=tokenizer, max_length=max_length)
    fingerprint = teacher_fingerprint(
        teacher,
        tokenizer,
        model.config.teacher_name_or_path,
        feature_layout=teacher_feature_layout(model.config),
    )
    cache_dir = method_args.teacher_cache_dir or os.path.join(HF_HOME, "tot_cakt", "teacher_features")
    cache = TeacherFeatureCache(cache_dir, fingerprint, hidden_size=teacher.config.hidden_size)
    with training_args.main_process_first(desc="cache teacher features"):
        for name, dataset in raw_datasets.items():
            computed = precompute_teacher_features(
                model,
                tokenizer,
                dataset_texts(dataset),
                cache,
                batch_size=method_args.teacher_batch_size,
                device=training_args.device,
            )
            logger.info(f"{name}: computed teacher features for {computed} new transcripts.")
    model.detach_teacher()  # training reads the cache; free the teacher's memory for the student
    return TeacherInputs(cache=cache)


def featurize_datasets(
    raw_datasets: dict,
    model: TOTCAKTForCTC,
    processor: ProcessorMixin,
    data_args: DataTrainingArguments,
    training_args: TOTCAKTTrainingArguments,
) -> dict:
    """
    Decode the audio, extract features and encode the labels of every split, dropping (and counting)
    unusable rows. A split left without rows stops the run here, before any training.
    """
    feature_extractor = processor.feature_extractor
    shortest = shortest_usable_input(model, feature_extractor)
    logger.info(f"Clips shorter than {shortest} samples give the encoder no frame; they are skipped as too short.")
    # `featurize_split` keeps clips longer than min_input_length samples.
    min_input_length = max(int(data_args.min_duration_in_seconds * feature_extractor.sampling_rate), shortest - 1)
    vectorized_datasets = {}
    with training_args.main_process_first(desc="featurise datasets"):
        for name, dataset in raw_datasets.items():
            vectorized_datasets[name] = featurize_split(
                dataset,
                name,
                feature_extractor=feature_extractor,
                tokenizer=processor.tokenizer,
                min_input_length=min_input_length,
                max_input_length=int(data_args.max_duration_in_seconds * feature_extractor.sampling_rate),
                num_proc=data_args.preprocessing_num_workers,
                load_from_cache_file=not data_args.overwrite_cache,
            )
    return vectorized_datasets


def create_trainer(
    model: TOTCAKTForCTC,
    processor: ProcessorMixin,
    teacher: TeacherInputs,
    vectorized_datasets: dict,
    training_args: TOTCAKTTrainingArguments,
) -> TOTCAKTTrainer:
    return TOTCAKTTrainer(
        model=model,
        args=training_args,
        data_collator=DataCollatorCTCWithTeacher(
            processor=processor,
            teacher_tokenizer=teacher.tokenizer,
            teacher_max_length=teacher.max_length,
            teacher_cache=teacher.cache,
            teacher_predictions=model.config.uses_teacher_predictions,
        ),
        train_dataset=vectorized_datasets.get("train"),
        eval_dataset=vectorized_datasets.get("eval"),
        processing_class=processor,
        compute_metrics=CTCCharacterErrorRate(processor.tokenizer)
        if training_args.do_eval or training_args.do_predict
        else None,
    )


def finished_training_state(
    resume_checkpoint: str | None, training_args: TOTCAKTTrainingArguments
) -> TrainerState | None:
    """The trainer state of `resume_checkpoint` when it already holds the last of --max_steps, else None."""
    if resume_checkpoint is None or training_args.max_steps <= 0:
        return None
    state = TrainerState.load_from_json(os.path.join(resume_checkpoint, TRAINER_STATE_NAME))
    return state if state.global_step >= training_args.max_steps else None


def finished_model_checkpoint(
    resume_checkpoint: str, finished: TrainerState, training_args: TOTCAKTTrainingArguments
) -> str:
    """
    The checkpoint whose weights a finished run saved: with --load_best_model_at_end the best one (the Trainer
    loaded it at the end of training), when it is still complete; else the last one.
    """
    best = finished.best_model_checkpoint if training_args.load_best_model_at_end else None
    if best is None:
        return resume_checkpoint
    # Where the state says, or next to the resumed checkpoint (an output_dir given by another path, or moved).
    candidates = (best, os.path.join(os.path.dirname(resume_checkpoint), os.path.basename(best)))
    return next((path for path in candidates if checkpoint_problem(path) is None), resume_checkpoint)


def trainer_state_step(checkpoint: str | None) -> int:
    """The optimiser step a run resumed from `checkpoint` starts at (0 for a fresh run)."""
    if checkpoint is None:
        return 0
    return TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME)).global_step


def check_updates_were_made(trainer: TOTCAKTTrainer, start_step: int) -> None:
    """
    Fail a run in which every training batch (on every process) had a non-finite loss: each update was skipped, so
    the model is as it started, and exiting with success would hide it. Names the cause to look at and what to do.
    """
    batches = (trainer.state.global_step - start_step) * trainer.args.gradient_accumulation_steps
    counts = torch.tensor([trainer.nonfinite_loss_batches, batches], device=trainer.args.device)
    skipped, total = trainer.accelerator.reduce(counts, reduction="sum").tolist()
    if total == 0 or skipped < total:
        return
    config = trainer.accelerator.unwrap_model(trainer.model).config
    if config.alignment_is_unbalanced:
        cause = (
            f"With --alignment {config.alignment} an order reward above the cost (--tot_lambda1 "
            f"{config.tot_lambda1}) makes the unbalanced plan's mass overflow: lower --tot_lambda1 or raise "
            f"--uot_tau (now {config.uot_tau})."
        )
    else:
        cause = (
            "The warnings above give each batch's loss: a non-finite ctc_loss points at the data (non-finite audio "
            "features) or a too high --learning_rate (with --fp16, try --bf16 or full precision); a non-finite "
            "ot_loss or align_loss at the alignment's settings (--tot_lambda1, --tot_lambda2, --tot_sigma)."
        )
    raise RuntimeError(
        f"Every one of the {total} training batches had a non-finite loss, so every update was skipped and the "
        f"model was not trained. {cause}"
    )


def train_and_evaluate(
    trainer: TOTCAKTTrainer,
    vectorized_datasets: dict,
    resume_checkpoint: str | None,
    data_args: DataTrainingArguments,
    training_args: TOTCAKTTrainingArguments,
) -> dict:
    """Train (resuming from `resume_checkpoint`), save the model, then score the eval and test splits."""
    results = {}
    if training_args.do_train:
        finished = finished_training_state(resume_checkpoint, training_args)
        if finished is not None:
            # The Trainer would train one step past --max_steps when the last epoch is not whole.
            weights = finished_model_checkpoint(resume_checkpoint, finished, training_args)
            logger.info(
                f"{resume_checkpoint} holds step {finished.global_step}: training is finished, the weights of "
                f"{weights} kept."
            )
            trainer._load_from_checkpoint(weights)
            trainer.state = finished
            metrics = None  # save_final takes those of the run that trained
        train_samples = None if data_args.streaming else len(vectorized_datasets["train"])
        if finished is None:
            start_step = trainer_state_step(resume_checkpoint)
            metrics = trainer.train(resume_from_checkpoint=resume_checkpoint).metrics
            check_updates_were_made(trainer, start_step)
            if train_samples is not None:
                metrics["train_samples"] = train_samples
            trainer.log_metrics("train", metrics)
        # The model (with auto_map and its code files, ready for pipeline()), processor, state and metrics.
        trainer.save_final(metrics, train_samples=train_samples)
        set_aside = os.path.join(training_args.output_dir, INCOMPLETE_CHECKPOINTS_DIR)
        if training_args.should_save and os.path.isdir(set_aside):
            shutil.rmtree(set_aside)  # of no use once the run has finished, and not to be uploaded
            logger.info(f"Removed {set_aside}: checkpoints that an interrupted run left half-written.")
    for name in ("eval", "test"):
        if name in vectorized_datasets:
            logger.info(f"*** {name} ***")
            metrics = trainer.evaluate(vectorized_datasets[name], metric_key_prefix=name)
            if not data_args.streaming:
                metrics[f"{name}_samples"] = len(vectorized_datasets[name])
            trainer.log_metrics(name, metrics)
            trainer.save_metrics(name, metrics)
            results[name] = metrics
    return results


def score_with_language_model(
    trainer: TOTCAKTTrainer,
    processor: ProcessorMixin,
    vectorized_datasets: dict,
    model_args: ModelArguments,
    training_args: TOTCAKTTrainingArguments,
) -> dict:
    """
    Attach --language_model to output_dir with the weight and bonus that decode the eval split best, and score
    eval and test greedily and with it, each with its error split (homophone substitutions, tone errors, the
    rest; the spoken syllables as pypinyin reads the references). Writes <split>_lm_results.json.
    """
    input_name = processor.feature_extractor.model_input_names[0]
    splits = [name for name in ("eval", "test") if name in vectorized_datasets]
    logits = {name: feature_logits(trainer.model, processor, vectorized_datasets[name][input_name]) for name in splits}
    scored = decode_and_score(
        processor,
        training_args.output_dir,
        model_args.language_model,
        logits=logits,
        references={name: vectorized_datasets[name][TEXT_COLUMN] for name in splits},
        tune_split="eval",
        beam_width=model_args.lm_beam_width,
    )
    results = {}
    for name in splits:
        metrics = {
            f"{name}_cer_greedy": scored[name]["greedy"]["cer"],
            f"{name}_cer_lm": scored[name]["lm"]["cer"],
            **{
                f"{name}_{decoding}_{key}": value
                for decoding in ("greedy", "lm")
                for key, value in scored[name][decoding].items()
                if key.endswith("_cer")
            },
            "lm_alpha": scored["weights"]["alpha"],
            "lm_beta": scored["weights"]["beta"],
            "lm_beam_width": model_args.lm_beam_width,
        }
        trainer.log_metrics(f"{name}_lm", metrics)
        trainer.save_metrics(f"{name}_lm", metrics)
        results[f"{name}_lm"] = metrics
    return results


def write_model_card(
    trainer: TOTCAKTTrainer,
    results: dict,
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    training_args: TOTCAKTTrainingArguments,
    sampling_rate: int,
) -> str:
    """Render output_dir/README.md from the model card template. Returns the Hub repository id it names."""
    data = describe_training_data(
        data_args.dataset_name, data_args.aishell_dir, data_args.train_manifest, data_args.train_split_name
    )
    repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir))
    card = render_model_card(
        MODEL_CARD_TEMPLATE,
        trainer.model.config,
        model_name=os.path.basename(repo_id),
        repo_id=repo_id,
        encoder_name_or_path=model_args.encoder_name_or_path,
        datasets=[data_args.dataset_name] if data_args.dataset_name else None,
        dataset_description=data.description,
        results=[
            cer_result(results[name][f"{name}_cer"], data.name, data.type, split, data_args.dataset_config_name)
            for name, split in (("eval", data_args.eval_split_name), ("test", data_args.test_split_name))
            if name in results
        ],
        hyperparameters=training_hyperparameters(training_args, trainer.state.global_step, trainer.model.config),
        sampling_rate=sampling_rate,
        do_lower_case=data_args.do_lower_case,
        hub_teacher_id=training_args.hub_teacher_id,
    )
    card.save(os.path.join(training_args.output_dir, "README.md"))
    return repo_id


def push_model_to_hub(config, repo_id: str, training_args: TOTCAKTTrainingArguments) -> str:
    """
    Upload output_dir. Its config.json names the teacher by the path the run was given, which attach_teacher()
    and --model_name_or_path use on this machine; the uploaded one names a local teacher by --hub_teacher_id or,
    without it, by the folder's name (said here, since that name may mean nothing on the Hub).
    """
    teacher = config.teacher_name_or_path
    if config.uses_teacher and training_args.hub_teacher_id is None and not is_hub_id(teacher):
        logger.warning(
            f"The uploaded config.json names the local teacher {teacher} by its folder name "
            f"'{public_name(teacher)}'; pass --hub_teacher_id to name its Hub id instead."
        )
    return push_folder_to_hub(
        training_args.output_dir,
        repo_id,
        token=training_args.hub_token,
        private=training_args.hub_private_repo,
        revision=training_args.hub_revision,
        hub_teacher_id=training_args.hub_teacher_id,
    )


def main():
    model_args, method_args, data_args, training_args = parse_arguments()
    setup_logging(training_args)

    # 1. Check the arguments.
    push_to_hub = check_arguments(model_args, data_args, training_args)

    # 2. Lock the output directory: a second run on it stops here.
    with output_dir_lock(training_args):
        # 3. Resume from the last complete checkpoint in output_dir unless told to start afresh.
        resume_checkpoint = find_checkpoint_to_resume(data_args, training_args)
        set_seed(training_args.seed)

        # 4. Load and normalise the data.
        raw_datasets = load_datasets(model_args, data_args, training_args)

        # 5. The processor: the resumed checkpoint's, the saved model's, or a new one over a character vocabulary.
        encoder_config = parse_encoder_config(model_args.encoder_config) if model_args.encoder_config else None
        processor = load_processor(
            model_args, data_args, training_args, raw_datasets, resume_checkpoint, encoder_config
        )
        logger.info(f"Vocabulary: {len(processor.tokenizer)} symbols.")
        report_out_of_vocabulary(raw_datasets, processor.tokenizer.get_vocab(), data_args.streaming)

        # 6. The model.
        model = create_model(model_args, method_args, processor.tokenizer, encoder_config)

        # 7. Decode the audio, extract features, encode the labels; drop (and count) unusable rows.
        # A split left without rows stops the run here, before the teacher is loaded.
        vectorized_datasets = featurize_datasets(raw_datasets, model, processor, data_args, training_args)

        # 8. The teacher: its tokenizer for on-the-fly features, or a cache of its features.
        teacher = prepare_teacher(
            model, model_args, method_args, training_args, raw_datasets, data_args.streaming, processor.tokenizer
        )
        if data_args.preprocessing_only:
            logger.info("Data preprocessing finished.")
            return

        # 9. The Trainer.
        trainer = create_trainer(model, processor, teacher, vectorized_datasets, training_args)

        # 10. Train, evaluate, test.
        results = train_and_evaluate(trainer, vectorized_datasets, resume_checkpoint, data_args, training_args)

        # 10b. With a character language model: save it with the model, score eval and test with it too.
        if model_args.language_model and trainer.is_world_process_zero():
            results.update(
                score_with_language_model(trainer, processor, vectorized_datasets, model_args, training_args)
            )

        # 11. Model card, and the upload.
        if trainer.is_world_process_zero():
            repo_id = write_model_card(
                trainer, results, model_args, data_args, training_args, processor.feature_extractor.sampling_rate
            )
            if push_to_hub:
                url = push_model_to_hub(trainer.model.config, repo_id, training_args)
                logger.info(f"Uploaded to {url}")
        return results


def close_process_group() -> None:
    """
    Under DDP, wait for every process (the main one writes the model card and uploads) and destroy the
    process group before the interpreter exits: a gloo group torn down by interpreter shutdown can abort a
    finished worker (`terminate called without an active exception`) and fail the whole launch.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    close_process_group()  # after a normal end only: a failing process must not wait in the barrier
