"""TOT-CAKT: a wav2vec-style CTC recogniser that learns from a frozen language model through
temporal-order-preserving optimal transport.

Reference: Lu, Shen, Tsao, Kawai, "Temporal Order Preserved Optimal Transport-based Cross-modal
Knowledge Transfer Learning for ASR", IEEE SLT 2024 (arXiv:2409.02239).

This file is copied next to the saved weights for `trust_remote_code=True`; it imports only torch,
transformers and its sibling files `configuration_tot_cakt.py` and `tot.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, Wav2Vec2CTCTokenizer
from transformers.utils import ModelOutput, cached_file, logging
from transformers.utils.hub import get_checkpoint_shard_files

from .configuration_tot_cakt import TOTCAKTConfig
from .tot import (
    align_loss,
    barycentric_transport,
    cosine_cost,
    fused_gw_loss,
    fused_gw_sinkhorn,
    ot_loss,
    tot_sinkhorn,
)

logger = logging.get_logger(__name__)

# Inputs longer than this many encoder frames (a minute at 20 ms frames) get a warning about attention memory.
LONG_INPUT_FRAMES = 3000


def teacher_loading_advice(name_or_path: str) -> str:
    """What to do when no teacher loads from `name_or_path`: the end of every such message."""
    advice = (
        "Pass the teacher itself (`model.attach_teacher(teacher)`), or name one that loads here in "
        "`config.teacher_name_or_path` (`--teacher_name_or_path` for train_hf.py): a Hub id (with network access) or "
        "a local folder with config.json, the weights and the tokenizer (for example one built by "
        "`python -m modeling_tot_cakt.demo.teacher_pretraining`)."
    )
    # A Hub id has at most one "/" and never starts like a path.
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path:
        advice = (
            f"'{name_or_path}' is a path: a saved model names its teacher as its training run was given it, which "
            f"may be a folder of another machine. {advice}"
        )
    return advice


def load_teacher(name_or_path: str, **hub_kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """
    Load the frozen teacher language model and its tokenizer (Hub id or folder), with errors that name
    `teacher_name_or_path`.

    Args:
        name_or_path (`str`): Hub id or local folder of a BERT-like model with its tokenizer.
        hub_kwargs: passed to `from_pretrained` (`cache_dir`, `token`, `revision`, ...).

    Returns:
        `(teacher, tokenizer)`.

    Raises:
        ValueError: nothing loadable there, or a tokenizer that does not fit the teacher's embeddings.
            A folder without tokenizer files still loads a 5-token BERT tokenizer that reads every
            character as [UNK]; that, and ids beyond the embedding table, are refused.
    """
    # transformers reports every checkpoint key the encoder does not use (a masked-LM head, `cls.*`) and every one
    # it lacks (the pooler, unused here) in a table; the teacher's are checked here and only a real gap is said.
    # A filter drops that one record: raising the logger's level would make transformers run its tensor-parallel
    # plan check, which warns about a plan nobody asked for.
    report_logger = logging.get_logger("transformers.modeling_utils")

    def without_load_report(record) -> bool:
        return "LOAD REPORT" not in record.getMessage()

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **hub_kwargs)
        report_logger.addFilter(without_load_report)
        teacher, loading_info = AutoModel.from_pretrained(name_or_path, output_loading_info=True, **hub_kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"Could not load the teacher language model from teacher_name_or_path='{name_or_path}': {err} "
            f"{teacher_loading_advice(name_or_path)}"
        ) from err
    finally:
        report_logger.removeFilter(without_load_report)
    missing = sorted(key for key in loading_info["missing_keys"] if not key.startswith("pooler."))
    if missing:
        raise ValueError(
            f"The teacher checkpoint at teacher_name_or_path='{name_or_path}' lacks {len(missing)} weights its "
            f"encoder needs ({', '.join(missing[:3])}, ...): they would be random. Give a complete checkpoint."
        )
    # A checkpoint's embedding table may have a few padding rows more than its tokenizer has tokens, never
    # fewer; a tokenizer with less than half as many tokens is not the one the teacher was trained with.
    embeddings = teacher.get_input_embeddings().num_embeddings
    if not embeddings // 2 < len(tokenizer) <= embeddings:
        raise ValueError(
            f"The tokenizer loaded from teacher_name_or_path='{name_or_path}' has {len(tokenizer)} tokens but the "
            f"teacher's embedding table has {embeddings}: the folder's tokenizer files (vocab.txt, "
            "tokenizer.json) are missing or belong to another model."
        )
    return teacher, tokenizer


# What to do about a saved folder with a damaged file: the end of every such message.
RESTORE_ADVICE = (
    "Copy the folder again from where it was saved, download it again (from_pretrained(..., force_download=True)), "
    "or load an earlier checkpoint."
)
# Loading options that say where a folder's files are, passed on when its configuration is read again.
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def config_file_problem(config_class, name_or_path, kwargs: dict) -> str | None:
    """
    What is wrong with the `config.json` of the saved model `name_or_path` (it does not parse, `config_class`
    refuses it, or it lacks the `encoder_config` every saved one has), or None when it loads or is not there at
    all (transformers' own message then says so).
    """
    where = f"'{name_or_path}'"
    try:
        config_dict, _ = config_class.get_config_dict(name_or_path, **hub_options(kwargs))
        config_class.from_dict(config_dict)
    except OSError as error:
        if "valid JSON" not in str(error):
            return None
        return f"The config.json of {where} is not valid JSON: it was cut off or damaged. {RESTORE_ADVICE}"
    except Exception as error:  # whatever the configuration class refuses
        reason = f"{type(error).__name__}: {error}"
        reason = reason if len(reason) <= 200 else f"{reason[:200]}..."
        return (
            f"The config.json of {where} is not a valid TOT-CAKT configuration ({reason}): it was damaged or edited. "
            f"{RESTORE_ADVICE}"
        )
    if "encoder_config" not in config_dict:  # saved configurations always have it; without it a default is built
        return (
            f"The config.json of {where} has no encoder_config (the acoustic encoder's configuration): it was damaged "
            f"or edited. {RESTORE_ADVICE}"
        )
    return None


def damaged_folder_problem(config_class, name_or_path, error: Exception, kwargs: dict) -> str | None:
    """
    The file of the saved model `name_or_path` that explains why loading it raised `error`, and what to do,
    or None when its files do not explain it (the error is then the one to show):

    - a weights file that safetensors cannot read (cut off by an interrupted copy or download);
    - a `config.json` that does not parse or is not a TOT-CAKT configuration ([`config_file_problem`]);
    - weights whose shapes do not fit `config.json` (an edited or foreign configuration, e.g. another
      `vocab_size`).
    """
    where = f"'{name_or_path}'"
    if type(error).__name__ == "SafetensorError":
        return (
            f"The weights of {where} cannot be read: its model.safetensors (or a shard its "
            f"model.safetensors.index.json names) is cut off or damaged ({error}). {RESTORE_ADVICE}"
        )
    problem = config_file_problem(config_class, name_or_path, kwargs)
    if problem is not None or not (isinstance(error, RuntimeError) and "mismatched" in str(error)):
        return problem
    config_dict, _ = config_class.get_config_dict(name_or_path, **hub_options(kwargs))
    given = kwargs.get("config")
    if given is not None and comparable(given) != comparable(config_class.from_dict(config_dict)):
        return None  # the caller's configuration, not the folder's, does not fit the weights
    lacking = "" if "vocab_size" in config_dict else " (it has no vocab_size)"
    return (
        f"The weights in model.safetensors of {where} do not have the shapes its config.json describes{lacking}; "
        "the load report above lists them. config.json was damaged, edited or belongs to another model. "
        f"{RESTORE_ADVICE}"
    )


def comparable(config) -> dict:
    """A configuration's fields without those that say where and with which version it was saved."""
    fields = config.to_dict() if hasattr(config, "to_dict") else {}
    return {key: value for key, value in fields.items() if key not in ("_name_or_path", "transformers_version")}


def hub_options(kwargs: dict) -> dict:
    """The `from_pretrained` options among `kwargs` that say where a saved model's files are."""
    return {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}


def vocabulary_problem(name_or_path, vocab_size: int, kwargs: dict) -> str | None:
    """
    What is wrong with the CTC vocabulary (`vocab.json`) saved next to a model, or None: it must load and have
    `vocab_size` symbols, one per output of the CTC head; a folder without `vocab.json` has nothing to check.
    """
    hub_kwargs = hub_options(kwargs)
    vocab_file = cached_file(
        name_or_path,
        "vocab.json",
        _raise_exceptions_for_gated_repo=False,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_kwargs,
    )
    if vocab_file is None:
        return None
    try:
        size = len(Wav2Vec2CTCTokenizer.from_pretrained(name_or_path, **hub_kwargs))
    except (OSError, ValueError, TypeError) as err:
        return f"{vocab_file} cannot be read as the model's CTC vocabulary ({err}). {RESTORE_ADVICE}"
    if size != vocab_size:
        return (
            f"{vocab_file} has {size} symbols but the model's config.json says vocab_size={vocab_size}: the vocabulary "
            "and the weights come from different models (or one was edited), so the ids would decode to the wrong "
            f"characters. Put back the vocab.json saved with these weights. {RESTORE_ADVICE}"
        )
    return None


def weights_file_of(name_or_path, keys: tuple[str, ...], kwargs: dict) -> str:
    """The file of the saved model `name_or_path` that holds the weight named by one of `keys`: its shard (the index
    names it), its `model.safetensors` or its `pytorch_model.bin`."""
    hub_kwargs = hub_options(kwargs)
    quiet = dict(_raise_exceptions_for_gated_repo=False, _raise_exceptions_for_missing_entries=False)
    quiet.update(_raise_exceptions_for_connection_errors=False)
    for name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin"):
        path = cached_file(name_or_path, name, **quiet, **hub_kwargs)
        if path is None:
            continue
        if not name.endswith(".json"):
            return path
        try:
            shards, metadata = get_checkpoint_shard_files(name_or_path, path, **hub_kwargs)
        except (OSError, ValueError, KeyError):  # an index that does not parse: the load report says more
            return f"one of the shards {path} names"
        shard = next((metadata["weight_map"][key] for key in keys if key in metadata["weight_map"]), None)
        return next((file for file in shards if shard and file.endswith(shard)), f"one of the shards {path} names")
    return f"the weights of '{name_or_path}'"


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a non-empty float tensor holds no NaN or infinity: its minimum and maximum, which NaN propagates to,
    in one pass without a copy (ten times faster than `torch.isfinite(tensor).all()` on a CPU)."""
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def non_finite_weights_problem(model: nn.Module, name_or_path, kwargs: dict, loading_info: dict) -> str | None:
    """
    Which weights of `model`, just loaded from `name_or_path`, hold NaN or infinite values, in which file, and
    what to do; None when every floating-point weight read from the folder is finite. Such a model gives NaN logits,
    whose greedy decoding reads as silence. The check is one min/max pass over the weights on their device
    ([`all_finite`]; docs/BAD_INPUT.md gives its measured cost). Weights the folder lacks (`loading_info`'s
    `missing_keys`, initialised by transformers and listed in its load report) and weights on the meta device
    (offloaded) are not read.
    """
    weights = model.state_dict()
    missing = set(loading_info["missing_keys"])
    broken = [
        name
        for name, tensor in weights.items()
        if name not in missing
        and tensor.is_floating_point()
        and tensor.device.type != "meta"
        and tensor.numel()
        and not all_finite(tensor)
    ]
    if not broken:
        return None
    name, tensor = broken[0], weights[broken[0]]
    # A base model loaded from a CTC model's folder names its weights without the folder's prefix.
    file = weights_file_of(name_or_path, (name, f"{model.base_model_prefix}.{name}"), kwargs)
    counts = (
        f"{int(tensor.isnan().sum())} NaN and {int(tensor.isinf().sum())} infinite values among its {tensor.numel()}"
    )
    others = f"{', '.join(broken[1:4])}{', ...' if len(broken) > 4 else ''}"
    others = f" (and {len(broken) - 1} other tensor(s): {others})" if len(broken) > 1 else ""
    return (
        f"The weights of '{name_or_path}' hold non-finite values: {name} in {file} has {counts}{others}. Its logits "
        "would be NaN or infinite and every transcript empty or wrong. Such weights come from a save that was damaged "
        f"or written after training diverged. {RESTORE_ADVICE}"
    )


@dataclass
class TOTCAKTModelOutput(ModelOutput):
    """
    Output of [`TOTCAKTModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, frames, hidden_size)`):
            Frame features of the acoustic encoder's last layer (after its frame-rate adapter, if any).
        adapted_features (`torch.FloatTensor` of shape `(batch_size, frames, teacher_hidden_size)`, *optional*):
            `last_hidden_state` mapped into the teacher's feature space by the adapter, returned when
            `output_adapted_features=True` and the model has an adapter (a teacher, or `ctc_input="adapter"`).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            The encoder's embedding output and each layer's output, each `(batch_size, frames, encoder hidden size)`.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
            Each encoder layer's attention weights, `(batch_size, num_heads, frames, frames)`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    adapted_features: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class TOTCAKTOutput(ModelOutput):
    """
    Output of [`TOTCAKTForCTC`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are given):
            `ctc_loss_weight * ctc_loss + ot_loss_weight * ot_loss + align_loss_weight * align_loss`
            (the alignment terms only when teacher features are available).
        logits (`torch.FloatTensor` of shape `(batch_size, frames, vocab_size)`):
            CTC logits (before softmax).
        ctc_loss (`torch.FloatTensor` of shape `()`, *optional*): CTC loss.
        ot_loss (`torch.FloatTensor` of shape `()`, *optional*): transport cost `<T*, C>`, batch mean (in the
            `"gmot"` modes the fused Gromov-Wasserstein objective `(1 - alpha) <T*, C> + alpha GW(T*)`).
        align_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Mean cosine distance between transported acoustics and teacher token features.
        coupling (`torch.FloatTensor` of shape `(batch_size, frames, tokens)`, *optional*):
            The transport plan `T*`, returned when `output_coupling=True` and teacher features exist.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): encoder hidden states, when asked.
        attentions (`tuple(torch.FloatTensor)`, *optional*): encoder attentions, when asked.
        solver_marginal_error (`torch.FloatTensor` of shape `()`, *optional*):
            Largest L1 marginal error over the batch of the returned transport plan (with teacher features).
        solver_iterations (`torch.FloatTensor` of shape `()`, *optional*): Sinkhorn iterations the plan took.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    ctc_loss: torch.FloatTensor | None = None
    ot_loss: torch.FloatTensor | None = None
    align_loss: torch.FloatTensor | None = None
    coupling: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    solver_marginal_error: torch.FloatTensor | None = None
    solver_iterations: torch.FloatTensor | None = None


class TOTCAKTAdapter(nn.Module):
    """
    Maps acoustic frames `(B, N, hidden_size)` into the teacher's space `(B, N, teacher_hidden_size)`:
    `config.adapter_type="mlp"`, a LayerNorm and `adapter_num_layers` linear layers, or `"linear"`, one projection.
    """

    def __init__(self, config: TOTCAKTConfig):
        super().__init__()
        if config.adapter_type == "linear":
            self.layers = nn.Sequential(nn.Linear(config.hidden_size, config.teacher_hidden_size))
            return
        layers: list[nn.Module] = [nn.LayerNorm(config.hidden_size)]
        width = config.hidden_size
        for _ in range(config.adapter_num_layers - 1):
            layers += [nn.Linear(width, config.adapter_hidden_size), nn.GELU(), nn.Dropout(config.adapter_dropout)]
            width = config.adapter_hidden_size
        layers.append(nn.Linear(width, config.teacher_hidden_size))
        self.layers = nn.Sequential(*layers)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layers(hidden_states)


class TOTCAKTPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading for TOT-CAKT models; the encoder keeps its own initialisation."""

    config: TOTCAKTConfig
    config_class = TOTCAKTConfig
    base_model_prefix = "tot_cakt"
    main_input_name = "input_values"
    input_modalities = "audio"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # The loss is already a per-batch mean: the Trainer must scale it for gradient accumulation / DDP.
    accepts_loss_kwargs = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        r"""
        [`~PreTrainedModel.from_pretrained`], refusing a plain acoustic-encoder checkpoint (e.g. a `Wav2Vec2Model`
        or `Wav2Vec2ForCTC` folder), whose weights would otherwise be ignored and the encoder left random, and a
        damaged folder with an error that names the file and what to do: a cut-off `model.safetensors`, a
        `config.json` that is not a TOT-CAKT configuration or does not fit the weights, a `vocab.json` whose
        size is not the configuration's `vocab_size` ([`damaged_folder_problem`], [`vocabulary_problem`]).

        Folders written before the base model existed (weights named `encoder.*`, `adapter.*`, `lm_head.*`)
        load as they are: their `encoder.*`/`adapter.*` weights are those of [`TOTCAKTModel`], and transformers
        adds the `tot_cakt.` prefix of the base model when loading them into [`TOTCAKTForCTC`].
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        try:
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except Exception as err:  # re-raised as it is unless the folder's files explain it
            damage = damaged_folder_problem(cls.config_class, pretrained_model_name_or_path, err, kwargs)
            if damage is None:
                raise
            raise ValueError(damage) from err
        vocabulary = vocabulary_problem(pretrained_model_name_or_path, model.config.vocab_size, kwargs)
        if vocabulary is not None:
            raise ValueError(vocabulary)
        weights = non_finite_weights_problem(model, pretrained_model_name_or_path, kwargs, loading_info)
        if weights is not None:
            raise ValueError(weights)
        encoder = model.base_model.encoder
        prefix = "" if model.base_model is model else f"{model.base_model_prefix}."
        encoder_keys = {f"{prefix}encoder.{name}" for name, _ in encoder.named_parameters()}
        # Unexpected weights that are the encoder's own, named as its own checkpoints name them.
        stray = {key.removeprefix(f"{encoder.base_model_prefix}.") for key in loading_info["unexpected_keys"]}
        if encoder_keys <= set(loading_info["missing_keys"]) and stray & set(encoder.state_dict()):
            raise ValueError(
                f"'{pretrained_model_name_or_path}' is a checkpoint of the acoustic encoder alone, not of a TOT-CAKT "
                f"model (it has none of the weights named like '{min(encoder_keys)}'), so the encoder would stay "
                "randomly initialised. To start from a wav2vec2 / HuBERT / WavLM / data2vec-audio / Wav2Vec2-BERT "
                "checkpoint, use "
                f"{cls.__name__}.from_encoder_pretrained('{pretrained_model_name_or_path}', ...)."
            )
        return (model, loading_info) if output_loading_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """[`~PreTrainedModel.save_pretrained`]; the folder's `auto_map` names both Auto classes, whichever model saves."""
        if self._auto_class is not None:  # registered for remote code: the code files are copied too
            module = type(self).__module__.rsplit(".", 1)[-1]
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModel": f"{module}.TOTCAKTModel",
                "AutoModelForCTC": f"{module}.TOTCAKTForCTC",
            }
        return super().save_pretrained(save_directory, *args, **kwargs)


class TOTCAKTModel(TOTCAKTPreTrainedModel):
    """
    The bare TOT-CAKT model: the acoustic encoder (wav2vec2, HuBERT, WavLM, data2vec-audio, Wav2Vec2-BERT, ...)
    and, when the configuration uses a teacher or its CTC head reads the adapted features, the adapter that maps
    its frames into the teacher's feature space. It outputs frame features, as [`Wav2Vec2Model`] does;
    [`TOTCAKTForCTC`] adds the CTC head and losses.
    """

    def __init__(self, config: TOTCAKTConfig):
        super().__init__(config)
        self.encoder = AutoModel.from_config(config.encoder_config)
        # The pipeline feeds the feature extractor's output under this name.
        self.main_input_name = self.encoder.main_input_name
        self.adapter = TOTCAKTAdapter(config) if config.has_adapter else None
        self.post_init()

    def freeze_feature_encoder(self) -> None:
        """Stop gradients into the convolutional feature encoder (raw-waveform encoders only)."""
        feature_extractor = getattr(self.encoder, "feature_extractor", None)
        if feature_extractor is None or not hasattr(feature_extractor, "_freeze_parameters"):
            raise ValueError(
                f"The {self.config.encoder_config.model_type} encoder has no convolutional feature encoder to freeze."
            )
        feature_extractor._freeze_parameters()

    def frame_mask(self, frames: int, attention_mask: torch.Tensor) -> torch.BoolTensor:
        """
        Valid output frames `(B, frames)` for an input `attention_mask` (`(B, samples)` for raw-waveform
        encoders, `(B, feature frames)` for log-mel ones): True where the encoder saw real input.
        """
        return self.encoder._get_feature_vector_attention_mask(frames, attention_mask).bool()

    def check_inputs(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """
        Reject what would otherwise fail deep inside torch: clips too short to encode, non-finite input.

        The checks read tensor values on the host, so `forward` skips them while `torch.compile` or
        `torch.export` trace the model (they would break the graph); call this method before a compiled
        or exported model to keep them.
        """
        lengths = (
            attention_mask.sum(-1)
            if attention_mask is not None
            else torch.full((input_values.shape[0],), input_values.shape[1], device=input_values.device)
        )
        nonfinite = (~torch.isfinite(input_values)).flatten(1).any(1)
        # A log-mel clip of a single frame normalises to NaN: it is too short, not broken.
        too_short = self.encoder._get_feat_extract_output_lengths(lengths) < 1
        if input_values.dim() == 3:
            too_short = too_short | (nonfinite & (lengths < 2))
        if bool(too_short.any()):
            shortest = int(lengths[too_short].min())
            raise ValueError(
                f"An input of {shortest} {'samples' if input_values.dim() == 2 else 'frames'} is shorter than the "
                f"{self.config.encoder_config.model_type} encoder's receptive field and yields no usable output "
                "frame; drop such clips or pad them (train_hf.py skips them and counts them as 'audio too short')."
            )
        if bool(nonfinite.any()):
            raise ValueError(
                f"{self.main_input_name} contains NaN or Inf values (batch items {nonfinite.nonzero().flatten().tolist()}); "
                "check the audio files (the data loaders drop such clips and report them)."
            )
        frames = int(self.encoder._get_feat_extract_output_lengths(lengths).max())
        if frames > LONG_INPUT_FRAMES:
            heads = self.config.encoder_config.num_attention_heads
            logger.warning_once(
                f"An input of {frames} encoder frames: self-attention needs {heads} x {frames}^2 scores per layer "
                f"(about {heads * frames**2 * 4 / 2**30:.1f} GiB in float32). Split long recordings, e.g. "
                "pipeline(..., chunk_length_s=30, stride_length_s=5) or `chunk_length_s` in the pipeline call."
            )

    def forward(
        self,
        input_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_features: torch.FloatTensor | None = None,
        output_adapted_features: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> TOTCAKTModelOutput | tuple:
        r"""
        Args:
            input_values (`torch.FloatTensor` of shape `(batch_size, samples)` or `(batch_size, frames, features)`):
                What the feature extractor produced: raw waveform for wav2vec2/HuBERT/WavLM, log-mel
                features for Wav2Vec2-BERT (also accepted as `input_features`).
            attention_mask (`torch.Tensor` of shape like the input without the feature axis, *optional*):
                1 for real input, 0 for padding.
            input_features (`torch.FloatTensor` of shape `(batch_size, frames, features)`, *optional*):
                The name the log-mel feature extractors give `input_values`.
            output_adapted_features (`bool`, *optional*, defaults to `False`):
                Also return the frames mapped into the teacher's feature space (needs a configuration with
                an adapter: `alignment` other than `"none"`, or `ctc_input="adapter"`).
            output_attentions, output_hidden_states, return_dict (`bool`, *optional*):
                As in transformers' models; when None, the configuration's values are used.

        Returns:
            [`TOTCAKTModelOutput`] (or a tuple when `return_dict=False`).
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if input_values is None:
            input_values = input_features
        if input_values is None:
            raise ValueError(f"Pass the audio features as input_values (or {self.main_input_name}).")
        if output_adapted_features and self.adapter is None:
            raise ValueError(
                'output_adapted_features=True needs the adapter, which a configuration with alignment="none" and '
                'ctc_input="encoder" has not.'
            )
        if not torch.compiler.is_compiling():
            self.check_inputs(input_values, attention_mask)
        if input_values.is_floating_point() and input_values.dtype != self.dtype:
            # transformers' stock raw-waveform extractor (saved with models by earlier versions) returns float64 for
            # integer PCM, its normalisation having removed the scale; cast instead of failing with "expected scalar
            # type Double".
            input_values = input_values.to(self.dtype)

        outputs = self.encoder(
            input_values,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        output = TOTCAKTModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            adapted_features=self.adapter(outputs.last_hidden_state) if output_adapted_features else None,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


class TOTCAKTForCTC(TOTCAKTPreTrainedModel):
    """
    [`TOTCAKTModel`] with a CTC head. During training the base model's adapter and a TOT alignment head
    couple encoder frames to the token features of a frozen teacher language model, so that
    `L = w_ctc * L_ctc + w_ot * <T*, C> + w_align * mean_j (1 - cos(â_j, l_j))`. The CTC head reads the
    encoder's frames (`config.ctc_input="encoder"`) or the adapter's output (`"adapter"`), the very features the
    alignment acts on; the adapter is then part of the recogniser and saved with it.

    The teacher is attached with [`~TOTCAKTForCTC.attach_teacher`]; it is not a registered submodule,
    so it is never saved with the model, never handed to the optimiser and never needed at inference.
    """

    def __init__(self, config: TOTCAKTConfig):
        super().__init__(config)
        self.tot_cakt = TOTCAKTModel(config)
        # The pipeline feeds the feature extractor's output under this name.
        self.main_input_name = self.tot_cakt.main_input_name
        self.dropout = nn.Dropout(config.final_dropout)
        self.lm_head = nn.Linear(config.ctc_input_size, config.vocab_size)
        self.__dict__["_teacher"] = None  # plain attribute: kept out of state_dict and parameters()
        self.post_init()

    @property
    def encoder(self) -> PreTrainedModel:
        """The acoustic encoder (`self.tot_cakt.encoder`)."""
        return self.tot_cakt.encoder

    @property
    def adapter(self) -> TOTCAKTAdapter | None:
        """The adapter into the teacher's feature space (`self.tot_cakt.adapter`), None when the model has none."""
        return self.tot_cakt.adapter

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_encoder_pretrained(
        cls,
        encoder_name_or_path: str,
        config: TOTCAKTConfig | None = None,
        encoder_kwargs: dict | None = None,
        **config_kwargs,
    ) -> TOTCAKTForCTC:
        """
        Build a TOT-CAKT model whose encoder starts from a pretrained wav2vec2 / HuBERT / WavLM /
        data2vec-audio / Wav2Vec2-BERT checkpoint (Hub id or local folder; a `*ForCTC` or
        `*ForPreTraining` checkpoint works too, its head is dropped).

        Args:
            encoder_name_or_path: checkpoint to take the encoder weights and configuration from.
            config: a TOT-CAKT configuration whose `encoder_config` is replaced by the checkpoint's.
            encoder_kwargs: overrides for the encoder configuration (e.g. `mask_time_prob=0.05`).
            config_kwargs: fields of a new [`TOTCAKTConfig`] when `config` is not given.
        """
        try:
            encoder = AutoModel.from_pretrained(encoder_name_or_path, **(encoder_kwargs or {}))
        except OSError as err:
            raise ValueError(
                f"Could not load the acoustic encoder from '{encoder_name_or_path}': {err}. Pass a Hub id "
                "(with network access) or a local folder written by save_pretrained."
            ) from err
        if config is None:
            config = TOTCAKTConfig(encoder_config=encoder.config, **config_kwargs)
        else:
            fields = config.to_dict()
            # `hidden_size` is the old encoder's: the checkpoint's configuration sets it.
            del fields["hidden_size"]
            config = TOTCAKTConfig.from_dict({**fields, "encoder_config": encoder.config.to_dict()})
        model = cls(config)
        model.encoder.load_state_dict(encoder.state_dict())
        return model

    def attach_teacher(self, teacher: PreTrainedModel | None = None) -> PreTrainedModel | None:
        """
        Attach the frozen teacher used for training (loaded with [`load_teacher`] from
        `config.teacher_name_or_path` when `teacher` is None). It is put in eval mode with gradients off.
        No-op for `alignment="none"`.
        """
        if not self.config.uses_teacher:
            return None
        if teacher is None:
            teacher, _ = load_teacher(self.config.teacher_name_or_path)
        hidden = getattr(teacher.config, "hidden_size", None)
        if hidden != self.config.teacher_hidden_size:
            raise ValueError(
                f"The teacher's hidden size is {hidden} but config.teacher_hidden_size is "
                f"{self.config.teacher_hidden_size}. Set teacher_hidden_size={hidden} in the TOT-CAKT config "
                "(the adapter's output size must match the teacher)."
            )
        layers = getattr(teacher.config, "num_hidden_layers", None)
        if layers is not None and not -(layers + 1) <= self.config.teacher_layer <= layers:
            raise ValueError(
                f"config.teacher_layer is {self.config.teacher_layer} but the teacher has {layers} layers: use 0 "
                f"(embeddings) to {layers} (last layer), or -1 to -{layers + 1} counting from the last layer."
            )
        teacher.eval()
        teacher.requires_grad_(False)
        self.__dict__["_teacher"] = teacher
        return teacher

    def detach_teacher(self) -> PreTrainedModel | None:
        """Drop the attached teacher (e.g. once its features are cached) and return it."""
        teacher, self.__dict__["_teacher"] = self.__dict__["_teacher"], None
        return teacher

    @property
    def teacher(self) -> PreTrainedModel | None:
        """The attached frozen teacher, or None."""
        return self.__dict__["_teacher"]

    def freeze_feature_encoder(self) -> None:
        """Stop gradients into the convolutional feature encoder (raw-waveform encoders only)."""
        self.tot_cakt.freeze_feature_encoder()

    def frame_mask(self, frames: int, attention_mask: torch.Tensor) -> torch.BoolTensor:
        """Valid output frames `(B, frames)` for an input `attention_mask`; see [`TOTCAKTModel.frame_mask`]."""
        return self.tot_cakt.frame_mask(frames, attention_mask)

    # ------------------------------------------------------------------ teacher features
    @torch.no_grad()
    def teacher_token_features(
        self, teacher_input_ids: torch.LongTensor, teacher_attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.FloatTensor, torch.BoolTensor]:
        """
        Run the frozen teacher on a tokenised transcript and keep one feature per text token, taken
        from the teacher's layer `config.teacher_layer` (-1: its last layer).

        Args:
            teacher_input_ids (`torch.LongTensor` of shape `(B, L)`): teacher tokenisation with
                `[CLS] ... [SEP]` (right padded).
            teacher_attention_mask (`torch.Tensor` of shape `(B, L)`, *optional*): 1 for real tokens.

        Returns:
            `(features, token_mask)`: `(B, L', teacher_hidden_size)` float features and a `(B, L')`
            bool mask of valid tokens, where `[CLS]`/`[SEP]` are dropped when
            `config.teacher_strip_special_tokens` (then `L' = L - 1`).
        """
        if self.teacher is None:
            raise ValueError(
                "teacher_input_ids were given but no teacher is attached: call model.attach_teacher() "
                "or pass precomputed teacher_hidden_states."
            )
        if teacher_attention_mask is None:
            teacher_attention_mask = torch.ones_like(teacher_input_ids)
        device = teacher_input_ids.device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        layer = self.config.teacher_layer
        outputs = self.teacher(
            input_ids=teacher_input_ids, attention_mask=teacher_attention_mask, output_hidden_states=layer != -1
        )
        hidden = outputs.last_hidden_state if layer == -1 else outputs.hidden_states[layer]
        mask = teacher_attention_mask.bool()
        if self.config.teacher_strip_special_tokens:
            last = mask.sum(dim=1) - 1  # index of [SEP]
            positions = torch.arange(mask.shape[1], device=device)
            mask = mask & (positions[None, :] < last[:, None])
            hidden, mask = hidden[:, 1:], mask[:, 1:]
        return hidden.float(), mask

    def _resolve_teacher_features(
        self,
        batch_size: int,
        teacher_input_ids: torch.LongTensor | None,
        teacher_attention_mask: torch.Tensor | None,
        teacher_hidden_states: torch.FloatTensor | None,
        teacher_token_mask: torch.Tensor | None,
    ) -> tuple[torch.FloatTensor, torch.BoolTensor] | None:
        """Teacher token features and their mask for this batch (computed or precomputed), or None."""
        if not self.config.uses_teacher or (teacher_hidden_states is None and teacher_input_ids is None):
            return None
        if teacher_hidden_states is None:
            return self.teacher_token_features(teacher_input_ids, teacher_attention_mask)
        expected = (batch_size, "tokens", self.config.teacher_hidden_size)
        if (
            teacher_hidden_states.dim() != 3
            or teacher_hidden_states.shape[0] != batch_size
            or teacher_hidden_states.shape[2] != self.config.teacher_hidden_size
        ):
            raise ValueError(
                f"teacher_hidden_states must have shape {expected}, got {tuple(teacher_hidden_states.shape)}. "
                "Pass the teacher's token features for this batch (see teacher_token_features)."
            )
        mask = teacher_token_mask if teacher_token_mask is not None else teacher_attention_mask
        if mask is None:
            mask = torch.ones(teacher_hidden_states.shape[:2], dtype=torch.bool, device=teacher_hidden_states.device)
        elif mask.shape != teacher_hidden_states.shape[:2]:
            raise ValueError(
                f"teacher_token_mask must have shape {tuple(teacher_hidden_states.shape[:2])} (batch, tokens) to "
                f"match teacher_hidden_states, got {tuple(mask.shape)}."
            )
        return teacher_hidden_states.float(), mask.bool()

    def check_logits(self, logits: torch.Tensor) -> None:
        """
        Refuse CTC logits `(B, frames, vocab_size)` that hold NaN or infinite values, naming the likely cause: their
        greedy decoding would read as silence or noise instead of failing.

        `forward` runs this check at inference: without `labels` and with gradients off (`torch.no_grad()`,
        `torch.inference_mode()`, as the pipeline runs it). A forward with labels or gradients is a training or
        analysis step, whose caller handles non-finite values (the Trainer skips the update of a non-finite loss).
        Like [`TOTCAKTModel.check_inputs`], it is skipped while `torch.compile` or `torch.export` trace the model. It
        costs one reduction and one host sync per forward.
        """
        nonfinite = (~torch.isfinite(logits)).flatten(1).any(1)
        if not bool(nonfinite.any()):
            return
        weights = {name: weight.detach() for name, weight in self.named_parameters() if weight.numel()}
        broken = next((name for name, weight in weights.items() if not all_finite(weight)), None)
        if broken is not None:
            cause = (
                f"the weight {broken} holds NaN or infinite values: it was changed after loading (from_pretrained "
                "refuses such saved weights). Load the model again"
            )
        elif self.dtype in (torch.float16, torch.bfloat16):
            cause = f"the weights are finite, so the computation overflowed in {self.dtype}: run the model in float32"
        else:
            largest = max(weights, key=lambda name: float(weights[name].abs().max()))
            cause = (
                f"the weights are finite (the largest, in {largest}, of magnitude "
                f"{float(weights[largest].abs().max()):.3g}), so the computation overflowed in {self.dtype}: check the "
                "input (float audio lies in [-1, 1]) and where the weights come from"
            )
        raise ValueError(
            f"The CTC logits of batch items {nonfinite.nonzero().flatten().tolist()} hold NaN or infinite values "
            f"({int((~torch.isfinite(logits)).sum())} of {logits.numel()}), which would decode to an empty or wrong "
            f"transcript: {cause}."
        )

    # ------------------------------------------------------------------ losses
    def _ctc_loss(self, logits: torch.Tensor, frame_lengths: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`F.ctc_loss` over the valid frames and labels (-100 = padding), blank = `pad_token_id`."""
        label_mask = labels >= 0
        target_lengths = label_mask.sum(-1)
        if not torch.compiler.is_compiling():  # host-side checks: they would break a compiled graph
            if labels.max() >= self.config.vocab_size:
                raise ValueError(
                    f"labels contain id {int(labels.max())} but vocab_size is {self.config.vocab_size}: the "
                    "tokenizer and the model configuration disagree."
                )
            if bool((target_lengths > frame_lengths).any()):
                logger.warning_once(
                    "Some utterances have more label tokens than encoder frames, so CTC cannot align them; their "
                    "CTC loss is zeroed (ctc_zero_infinity). Filter such utterances or reduce the frame-rate "
                    "reduction."
                )
        flat_targets = labels.masked_select(label_mask)
        log_probs = nn.functional.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
        with torch.backends.cudnn.flags(enabled=False):
            return nn.functional.ctc_loss(
                log_probs,
                flat_targets,
                frame_lengths,
                target_lengths,
                blank=self.config.pad_token_id,
                reduction=self.config.ctc_loss_reduction,
                zero_infinity=self.config.ctc_zero_infinity,
            )

    def _alignment(
        self,
        adapted: torch.Tensor,
        frame_mask: torch.BoolTensor,
        tokens: torch.Tensor,
        token_mask: torch.BoolTensor,
    ) -> dict[str, torch.Tensor]:
        """
        The alignment terms of adapted frames `(B, N, teacher_hidden_size)` against teacher token features:
        `ot_loss`, `align_loss`, `coupling` and the solver's `solver_marginal_error` and `solver_iterations`.
        """
        adapted = adapted.float()
        cost = cosine_cost(adapted, tokens)
        plain = self.config.alignment in ("ot", "uot", "gmot")  # no order reward, no temporal prior
        unbalanced = self.config.alignment in ("uot", "tot_uot")
        settings = dict(
            lambda1=0.0 if plain else self.config.tot_lambda1,
            lambda2=self.config.tot_lambda2,
            sigma=None if plain else self.config.tot_sigma,
            max_iter=self.config.tot_max_iter,
            tol=self.config.tot_tol,
            grad=self.config.tot_grad,
            log=True,
            warn=False,  # warned below, once, in the configuration's terms
        )
        # A diverged step (e.g. a float16 overflow in the encoder) gives NaN features. The solver refuses a
        # NaN cost, so it gets a finite stand-in; the losses below use the real cost and come out NaN, which
        # the trainer's loss scaling skips, as before.
        finite = dict(nan=1.0, posinf=2.0, neginf=0.0)
        finite_cost = cost.nan_to_num(**finite)
        if self.config.alignment in ("gmot", "tot_gmot"):  # edges: cosine distances within each modality
            edges = cosine_cost(adapted, adapted), cosine_cost(tokens, tokens)
            finite_edges = [edge.nan_to_num(**finite) for edge in edges]
            coupling, solver = fused_gw_sinkhorn(
                finite_cost,
                *finite_edges,
                frame_mask,
                token_mask,
                alpha=self.config.gmot_alpha,
                max_outer=self.config.gmot_max_outer,
                outer_tol=settings["tol"],
                **settings,
            )
            transport_cost = fused_gw_loss(coupling, cost, *edges, self.config.gmot_alpha)
        else:
            coupling, solver = tot_sinkhorn(
                finite_cost,
                frame_mask,
                token_mask,
                tau=self.config.uot_tau if unbalanced else None,
                **settings,
            )
            transport_cost = ot_loss(coupling, cost)
        if self.config.tot_tol > 0 and not torch.compiler.is_compiling() and not bool(solver["converged"].all()):
            outer = (
                f", plan change {float(solver['plan_change'].max()):.2e} after {solver['n_outer']} outer iterations"
                if "plan_change" in solver
                else ""
            )
            logger.warning_once(
                f"The transport plan did not converge in tot_max_iter={self.config.tot_max_iter} iterations (largest "
                f"marginal error {float(solver['marginal_error'].max()):.2e}{outer}, tot_tol={self.config.tot_tol}); the "
                "envelope gradient is exact only at the optimum. Raise tot_max_iter (training logs "
                "solver_marginal_error and solver_iterations)."
            )
        transported = barycentric_transport(coupling, adapted, token_mask)
        return {
            "ot_loss": transport_cost,
            "align_loss": align_loss(transported, tokens, token_mask),
            "coupling": coupling,
            "solver_marginal_error": solver["marginal_error"].detach().max(),
            "solver_iterations": torch.tensor(float(solver["n_iter"]), device=cost.device),
        }

    def _losses(
        self,
        adapted: torch.Tensor | None,
        logits: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.LongTensor | None,
        teacher: tuple[torch.FloatTensor, torch.BoolTensor] | None,
    ) -> dict[str, torch.Tensor]:
        """
        The loss fields of [`TOTCAKTOutput`] that the inputs allow: `ctc_loss` with `labels`; `ot_loss`,
        `align_loss`, `coupling` and the solver diagnostics with teacher features (aligning the `adapted`
        frames); `loss` = `w_ctc * L_ctc + w_ot * L_ot + w_align * L_align` with `labels` (the alignment terms only
        with teacher features).
        """
        if labels is None and teacher is None:
            return {}
        batch_size, frames = logits.shape[:2]
        frame_mask = (
            self.frame_mask(frames, attention_mask)
            if attention_mask is not None
            else torch.ones(batch_size, frames, dtype=torch.bool, device=logits.device)
        )
        fields = {}
        if teacher is not None:
            tokens, token_mask = (t.to(logits.device) for t in teacher)
            fields.update(self._alignment(adapted, frame_mask, tokens, token_mask))
        if labels is not None:
            fields["ctc_loss"] = self._ctc_loss(logits, frame_mask.sum(-1), labels)
            fields["loss"] = self.config.ctc_loss_weight * fields["ctc_loss"]
            if teacher is not None:
                fields["loss"] = (
                    fields["loss"]
                    + self.config.ot_loss_weight * fields["ot_loss"]
                    + self.config.align_loss_weight * fields["align_loss"]
                )
        return fields

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        teacher_input_ids: torch.LongTensor | None = None,
        teacher_attention_mask: torch.Tensor | None = None,
        teacher_hidden_states: torch.FloatTensor | None = None,
        teacher_token_mask: torch.Tensor | None = None,
        output_coupling: bool = False,
        input_features: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> TOTCAKTOutput | tuple:
        r"""
        Args:
            input_values (`torch.FloatTensor` of shape `(B, samples)` or `(B, frames, features)`):
                What the feature extractor produced: raw waveform for wav2vec2/HuBERT/WavLM, log-mel
                features for Wav2Vec2-BERT (also accepted as `input_features`).
            attention_mask (`torch.Tensor` of shape like the input without the feature axis, *optional*):
                1 for real input, 0 for padding.
            labels (`torch.LongTensor` of shape `(B, target_length)`, *optional*):
                CTC targets in `[0, vocab_size)`, padded with -100.
            teacher_input_ids, teacher_attention_mask (`(B, L)`, *optional*):
                The transcript tokenised by the teacher's tokenizer (with `[CLS]`/`[SEP]`); the attached
                teacher computes the token features.
            teacher_hidden_states (`torch.FloatTensor` of shape `(B, M, teacher_hidden_size)`, *optional*):
                Precomputed token features (as returned by `teacher_token_features`) instead of ids.
            teacher_token_mask (`torch.BoolTensor` of shape `(B, M)`, *optional*):
                Valid positions of `teacher_hidden_states` (if absent, `teacher_attention_mask` is used,
                and if that is absent too, all positions are valid).
            output_coupling (`bool`): also return the transport plan.
            input_features (`torch.FloatTensor` of shape `(B, frames, features)`, *optional*):
                The name the log-mel feature extractors give `input_values`.
            output_attentions, output_hidden_states, return_dict (`bool`, *optional*):
                As in transformers' models; when None, the configuration's values are used.

        The alignment losses are computed when teacher features are available and `alignment` is not
        `"none"`; inference needs neither text nor teacher. The CTC head reads the encoder's frames, or with
        `config.ctc_input="adapter"` the adapter's output, which the alignment acts on too.

        Returns:
            [`TOTCAKTOutput`] (or a tuple when `return_dict=False`).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.tot_cakt(
            input_values,
            attention_mask=attention_mask,
            input_features=input_features,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = self.dropout(outputs.last_hidden_state)
        teacher = self._resolve_teacher_features(
            hidden_states.shape[0],
            teacher_input_ids,
            teacher_attention_mask,
            teacher_hidden_states,
            teacher_token_mask,
        )
        reads_adapter = self.config.ctc_input == "adapter"
        # The adapter runs once: its output feeds the alignment and, with ctc_input="adapter", the CTC head.
        adapted = self.adapter(hidden_states) if reads_adapter or teacher is not None else None
        logits = self.lm_head(adapted if reads_adapter else hidden_states)
        if labels is None and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self.check_logits(logits)
        losses = self._losses(adapted, logits, attention_mask, labels, teacher)
        if not output_coupling:
            losses.pop("coupling", None)
        output = TOTCAKTOutput(
            logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions, **losses
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "TOTCAKTAdapter",
    "TOTCAKTForCTC",
    "TOTCAKTModel",
    "TOTCAKTModelOutput",
    "TOTCAKTOutput",
    "TOTCAKTPreTrainedModel",
    "load_teacher",
]
