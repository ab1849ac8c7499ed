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
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Wav2Vec2CTCTokenizer,
)
from transformers.utils import (
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    ModelOutput,
    cached_file,
    logging,
)
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


def encoder_output_lengths(encoder_config, input_lengths: torch.Tensor) -> torch.Tensor:
    """
    The number of frames an encoder outputs for inputs of `input_lengths` samples (raw-waveform encoders: the
    convolutional feature encoder, then the optional adapter's strided layers) or feature frames (Wav2Vec2-BERT:
    its optional adapter), from the encoder configuration alone, as the encoders of transformers count them.
    """

    def convolved(lengths, kernel, stride, padding=0):
        return torch.div(lengths + 2 * padding - kernel, stride, rounding_mode="floor") + 1

    lengths = input_lengths
    if encoder_config.model_type == "wav2vec2-bert":  # log-mel input; its adapter pads to keep "same" frames
        adapter_kernel = getattr(encoder_config, "adapter_kernel_size", 1)
    else:
        for kernel, stride in zip(encoder_config.conv_kernel, encoder_config.conv_stride):
            lengths = convolved(lengths, kernel, stride)
        adapter_kernel = 1  # the raw-waveform encoders count their adapter's frames as if of width 1
    if getattr(encoder_config, "add_adapter", False):
        for _ in range(encoder_config.num_adapter_layers):
            lengths = convolved(lengths, adapter_kernel, encoder_config.adapter_stride, adapter_kernel // 2)
    return lengths


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


def load_teacher(
    name_or_path: str, masked_lm: bool = False, **hub_kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """
    Load the frozen teacher language model and its tokenizer (Hub id or folder), with errors that name
    `teacher_name_or_path`.

    Args:
        name_or_path (`str`): Hub id or local folder of a BERT-like model with its tokenizer.
        masked_lm (`bool`): load it with its masked-LM head (`AutoModelForMaskedLM`), which the distillation of its
            predictions (`kd_loss_weight > 0`) needs; the token features are those of its base model either way.
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
        model_class = AutoModelForMaskedLM if masked_lm else AutoModel
        teacher, loading_info = model_class.from_pretrained(name_or_path, output_loading_info=True, **hub_kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"Could not load the teacher language model from teacher_name_or_path='{name_or_path}': {err} "
            f"{teacher_loading_advice(name_or_path)}"
        ) from err
    finally:
        report_logger.removeFilter(without_load_report)
    missing = sorted(key for key in loading_info["missing_keys"] if not key.startswith("pooler."))
    if masked_lm and any(key.startswith("cls.") for key in missing):
        raise ValueError(
            f"The teacher checkpoint at teacher_name_or_path='{name_or_path}' has no masked-LM head (it lacks "
            f"{', '.join(key for key in missing if key.startswith('cls.'))[:200]}), which the distillation of its "
            "predictions needs (kd_loss_weight > 0): give a checkpoint saved with its head (a *ForMaskedLM model), "
            "or set kd_loss_weight=0 (train_hf.py --kd_loss_weight 0) to train without it."
        )
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


def saved_file(name_or_path, filename: str, kwargs: dict) -> str | None:
    """The local path of `filename` in the saved model `name_or_path` (downloaded if need be), or None if absent."""
    return cached_file(
        name_or_path,
        filename,
        _raise_exceptions_for_gated_repo=False,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_options(kwargs),
    )


def read_weights_shapes(path) -> tuple[dict | None, str | None]:
    """
    `(shapes, None)` for a whole safetensors file `path` (tensor name -> shape, read from its header alone), else
    `(None, what is wrong)`: safetensors checks that the file holds exactly the bytes its header describes, so a
    file cut off anywhere, or one that is not safetensors at all, is named here.
    """
    try:
        with safe_open(path, framework="pt") as weights:
            names = weights.keys()
            return {name: tuple(weights.get_slice(name).get_shape()) for name in names}, None
    except (SafetensorError, OSError) as error:  # OSError: a shard the index names is missing
        return None, f"{path}: {error}"


def weights_shapes(name_or_path, kwargs: dict) -> tuple[dict | None, str | None]:
    """
    The tensors' shapes (name -> shape) in the saved model's `model.safetensors`, or in every shard its
    `model.safetensors.index.json` names, and None; or None and what is wrong with one of those files. A model
    without safetensors weights gives `(None, None)`: nothing to check.
    """
    single = saved_file(name_or_path, SAFE_WEIGHTS_NAME, kwargs)
    if single is not None:
        return read_weights_shapes(single)
    index = saved_file(name_or_path, SAFE_WEIGHTS_INDEX_NAME, kwargs)
    if index is None:
        return None, None
    try:
        shards, _ = get_checkpoint_shard_files(name_or_path, index, **hub_options(kwargs))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:  # not JSON, no weight_map, ...
        return None, f"{index} is not a readable weights index ({type(error).__name__}: {error})"
    shapes = {}
    for shard in shards:
        shard_shapes, problem = read_weights_shapes(shard)
        if problem is not None:
            return None, problem
        shapes.update(shard_shapes)
    return shapes, None


def saved_config_dict(config_class, name_or_path, kwargs: dict) -> tuple[dict | None, str | None]:
    """
    `(fields, None)` when the `config.json` of the saved model `name_or_path` is a TOT-CAKT configuration, else
    `(None, what is wrong)`: it does not parse, `config_class` refuses it, or it lacks the `encoder_config` every
    saved one has. `(None, None)` when there is no `config.json` at all (transformers' own message then says so).
    """
    where = f"'{name_or_path}'"
    if saved_file(name_or_path, CONFIG_NAME, kwargs) is None:
        return None, None
    try:
        config_dict, _ = config_class.get_config_dict(name_or_path, **hub_options(kwargs))
    except OSError:  # the file is there (checked above) but cannot be parsed
        return None, f"The config.json of {where} is not valid JSON: it was cut off or damaged. {RESTORE_ADVICE}"
    except Exception as error:  # parsed, but not a JSON object of fields
        config_dict = error
    try:
        if not isinstance(config_dict, dict):
            raise TypeError(f"it does not hold a JSON object of fields ({config_dict})")
        config_class.from_dict(config_dict)
    except Exception as error:  # whatever the configuration class refuses
        reason = f"{type(error).__name__}: {error}"
        reason = reason if len(reason) <= 200 else f"{reason[:200]}..."
        return None, (
            f"The config.json of {where} is not a valid TOT-CAKT configuration ({reason}): it was damaged or edited. "
            f"{RESTORE_ADVICE}"
        )
    if "encoder_config" not in config_dict:  # saved configurations always have it; without it a default is built
        return None, (
            f"The config.json of {where} has no encoder_config (the acoustic encoder's configuration): it was damaged "
            f"or edited. {RESTORE_ADVICE}"
        )
    return config_dict, None


def config_file_problem(config_class, name_or_path, kwargs: dict) -> str | None:
    """What is wrong with the `config.json` of the saved model `name_or_path` ([`saved_config_dict`]), or None."""
    return saved_config_dict(config_class, name_or_path, kwargs)[1]


def shape_mismatches(model_class, config, saved_shapes: dict) -> list[str]:
    """
    The saved tensors (name -> shape) whose shapes differ from those of `model_class` built from `config`, each as
    `name (saved shape) instead of (shape)`. Saved names may lack or carry the base model's prefix, as
    transformers loads them. The model is built on the meta device: no memory, no initialisation.
    """
    with torch.device("meta"):
        shapes = {name: tuple(tensor.shape) for name, tensor in model_class(config).state_dict().items()}
    prefix = f"{model_class.base_model_prefix}."
    wrong = []
    for name, saved in saved_shapes.items():
        match = next((key for key in (name, prefix + name, name.removeprefix(prefix)) if key in shapes), None)
        if match is not None and saved != shapes[match]:
            wrong.append(f"{name} {saved} instead of {shapes[match]}")
    return wrong


def damaged_folder_problem(model_class, name_or_path, kwargs: dict) -> str | None:
    """
    The file of the saved model `name_or_path` that keeps `model_class` from loading it, and what to do, or None
    when its files are sound (an error in loading it is then not theirs). The files are checked themselves:

    - the weights (`model.safetensors`, or the shards its index names): each must hold exactly the bytes its
      header describes ([`read_weights_shapes`]);
    - `config.json` must parse and be a TOT-CAKT configuration ([`saved_config_dict`]);
    - the weights' shapes must be those the configuration describes (an edited or foreign `config.json`, e.g.
      another `vocab_size`) unless the caller passed a configuration of their own.
    """
    where = f"'{name_or_path}'"
    saved_shapes, problem = weights_shapes(name_or_path, kwargs)
    if problem is not None:
        return (
            f"The weights of {where} cannot be read: its model.safetensors (or a shard its "
            f"model.safetensors.index.json names) is cut off or damaged ({problem}). {RESTORE_ADVICE}"
        )
    config_dict, problem = saved_config_dict(model_class.config_class, name_or_path, kwargs)
    if problem is not None or saved_shapes is None or config_dict is None:
        return problem
    config = model_class.config_class.from_dict(config_dict)
    given = kwargs.get("config")
    if given is not None and comparable(given) != comparable(config):
        return None  # the caller's configuration, not the folder's, decides the shapes
    wrong = shape_mismatches(model_class, config, saved_shapes)
    if not wrong:
        return None
    lacking = "" if "vocab_size" in config_dict else " (it has no vocab_size)"
    more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
    return (
        f"The weights in model.safetensors of {where} do not have the shapes its config.json describes{lacking}: "
        f"{'; '.join(wrong[:3])}{more}. config.json was damaged, edited or belongs to another model. {RESTORE_ADVICE}"
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
    vocab_file = saved_file(name_or_path, "vocab.json", kwargs)
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
        kd_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Distillation of the teacher's predictions through the plan ([`plan_distillation_loss`]), when
            `kd_loss_weight > 0` and the teacher's predictions are available.
        grad_norm_ctc, grad_norm_ot, grad_norm_align, grad_norm_kd (`torch.FloatTensor` of shape `()`, *optional*):
            With `output_loss_gradient_norms=True`: the L2 norm of the gradient that each weighted loss term
            (`ctc_loss_weight * ctc_loss`, ...) puts on the encoder's output states (terms of weight 0 are left out).
        knowledge_share (`torch.FloatTensor` of shape `()`, *optional*):
            With `output_loss_gradient_norms=True`: `||grad of the weighted OT + alignment + KD terms|| / ||grad of
            the weighted CTC term||` on the encoder's output states: how much the teacher's losses move the encoder,
            relative to CTC.
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
    kd_loss: torch.FloatTensor | None = None
    grad_norm_ctc: torch.FloatTensor | None = None
    grad_norm_ot: torch.FloatTensor | None = None
    grad_norm_align: torch.FloatTensor | None = None
    grad_norm_kd: torch.FloatTensor | None = None
    knowledge_share: torch.FloatTensor | None = None


# --------------------------------------------------------------------- distillation of the teacher's predictions
# Loss terms whose gradient on the encoder is the teacher's knowledge (the rest, CTC, is the transcript's).
KNOWLEDGE_LOSSES = ("ot", "align", "kd")
# Rows (one transcript with one position masked) per teacher pass of the masked-position targets.
MASKED_PASS_ROWS = 256


def teacher_vocabulary_map(
    teacher_tokenizer: PreTrainedTokenizerBase, ctc_tokenizer: PreTrainedTokenizerBase, teacher_vocab_size: int
) -> torch.LongTensor:
    """
    The CTC id of each teacher token id, or -1: a teacher token maps to the CTC symbol spelled the same (a
    character), except the special tokens of either tokenizer and the CTC word delimiter. Teacher tokens with no
    CTC symbol (word pieces `##x`, characters outside the CTC vocabulary) map to -1: the distillation drops them
    and renormalises over the rest.

    Returns:
        `torch.LongTensor` of shape `(teacher_vocab_size,)`.
    """
    ctc_vocabulary = ctc_tokenizer.get_vocab()
    excluded = set(ctc_tokenizer.all_special_tokens) | set(teacher_tokenizer.all_special_tokens)
    excluded.add(getattr(ctc_tokenizer, "word_delimiter_token", None))
    mapping = torch.full((teacher_vocab_size,), -1, dtype=torch.long)
    for token, teacher_id in teacher_tokenizer.get_vocab().items():
        if token not in excluded and token in ctc_vocabulary and teacher_id < teacher_vocab_size:
            mapping[teacher_id] = ctc_vocabulary[token]
    return mapping


def ctc_token_targets(
    prediction_ids: torch.LongTensor, prediction_probs: torch.Tensor, teacher_to_ctc: torch.LongTensor, vocab_size: int
) -> torch.Tensor:
    """
    The teacher's top-k predictions at each token position as distributions over the CTC vocabulary.

    Args:
        prediction_ids (`torch.LongTensor` of shape `(B, M, k)`): teacher token ids, -1 on padding.
        prediction_probs (`torch.Tensor` of shape `(B, M, k)`): their masked-LM probabilities.
        teacher_to_ctc (`torch.LongTensor` of shape `(teacher vocabulary,)`): [`teacher_vocabulary_map`].
        vocab_size (`int`): CTC vocabulary size.

    Returns:
        `torch.Tensor` of shape `(B, M, vocab_size)`: the probabilities of the tokens that have a CTC id, summed
        per CTC id and renormalised to 1; an all-zero row where none has (that position gives no target).
    """
    teacher_to_ctc = teacher_to_ctc.to(prediction_ids.device)
    ctc_ids = torch.where(prediction_ids >= 0, teacher_to_ctc[prediction_ids.clamp_min(0)], -1)
    probs = prediction_probs.float() * (ctc_ids >= 0)
    targets = probs.new_zeros(*ctc_ids.shape[:2], vocab_size).scatter_add_(-1, ctc_ids.clamp_min(0), probs)
    return targets / targets.sum(-1, keepdim=True).clamp_min(torch.finfo(targets.dtype).tiny)


def plan_distillation_loss(
    coupling: torch.Tensor, logits: torch.Tensor, frame_mask: torch.BoolTensor, token_targets: torch.Tensor, blank: int
) -> torch.Tensor:
    r"""
    Distillation of the teacher's predictions onto the CTC posteriors through the transport plan:

    - target of frame `i`: `t_i = sum_j T_ij p_j / sum_j T_ij` over the tokens `j` that have a target (`p_j`, a row
      of `token_targets`), i.e. `sum_j T_ij / mu_i p_j` when every token has one; the plan is not differentiated
      (it says where the knowledge goes, the distillation does not move it);
    - student at frame `i`: the CTC posterior renormalised over the non-blank symbols, `q_i(c) = p(c|i) / (1 -
      p(blank|i))` (softmax of the logits without the blank);
    - `L_kd = sum_i w_i KL(t_i || q_i) / sum_i w_i` over the valid frames of the batch, with `w_i = 1 - p(blank|i)`
      detached.

    Blank frames: the blank column is outside both distributions, so the term never moves the blank posterior
    (it reshapes which character a frame favours, not whether it emits one), and the detached weight lets frames
    that CTC spends on blank count little. This plays the part of Futami et al.'s restriction to the frames of the
    CTC path's emitted tokens (arXiv 2209.02030), without a forced alignment.

    Args:
        coupling (`torch.Tensor` of shape `(B, N, M)`): transport plan, zero on padding.
        logits (`torch.Tensor` of shape `(B, N, V)`): CTC logits.
        frame_mask (`torch.BoolTensor` of shape `(B, N)`): valid frames.
        token_targets (`torch.Tensor` of shape `(B, M, V)`): [`ctc_token_targets`], zero in the blank column.
        blank (`int`): the CTC blank id.

    Returns:
        `torch.Tensor` of shape `()`.
    """
    coupling = coupling.detach().float()
    has_target = token_targets.sum(-1) > 0
    weights = coupling * has_target[:, None, :]
    mass = weights.sum(-1)
    targets = torch.bmm(weights, token_targets.float()) / mass.clamp_min(torch.finfo(mass.dtype).tiny)[..., None]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    symbols = torch.arange(logits.shape[-1], device=logits.device) != blank
    student = torch.log_softmax(logits.float()[..., symbols], dim=-1)
    targets = targets[..., symbols]
    divergence = (torch.xlogy(targets, targets) - targets * student).sum(-1)
    frame_weights = (-torch.expm1(log_probs[..., blank])).detach() * (frame_mask & (mass > 0))
    return (frame_weights * divergence).sum() / frame_weights.sum().clamp_min(torch.finfo(mass.dtype).tiny)


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
            damage = damaged_folder_problem(cls, pretrained_model_name_or_path, kwargs)
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

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        """[`~PreTrainedModel.register_for_auto_class`], remembered: a registered class saves its code files too."""
        super().register_for_auto_class(auto_class)
        cls.registered_for_remote_code = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        """[`~PreTrainedModel.save_pretrained`]; the folder's `auto_map` names both Auto classes, whichever model saves."""
        if getattr(type(self), "registered_for_remote_code", False):
            module = type(self).__module__.rsplit(".", 1)[-1]
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModel": f"{module}.TOTCAKTModel",
                "AutoModelForCTC": f"{module}.TOTCAKTForCTC",
            }
        return super().save_pretrained(save_directory, *args, **kwargs)


class ClipGroupNorm(nn.GroupNorm):
    """
    The group normalisation of a raw-waveform encoder's first convolution (wav2vec2-base, HuBERT-base, WavLM-base,
    SEW: `feat_extract_norm="group"`), with statistics over each clip's own steps. The stock layer averages over
    the whole padded time axis, so a clip padded in a batch gets other features than alone; given the clip lengths
    of the current call (`clip_lengths`, in this layer's steps), this one gives the same result for a clip alone
    and in any batch, and 0 before its affine map on the padding. Without lengths it is `nn.GroupNorm`. Its
    parameters keep the replaced layer's names, so checkpoints load unchanged.
    """

    clip_lengths: torch.Tensor | None = None
    position: int = 0  # which convolution it follows

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.clip_lengths is None:
            return super().forward(hidden_states)
        batch, channels, steps = hidden_states.shape
        valid = (torch.arange(steps, device=hidden_states.device) < self.clip_lengths[:, None]).to(hidden_states.dtype)
        grouped = hidden_states.reshape(batch, self.num_groups, channels // self.num_groups, steps)
        valid = valid[:, None, None, :]
        count = (valid.sum(-1, keepdim=True) * grouped.shape[2]).clamp(min=1)
        mean = (grouped * valid).sum((-2, -1), keepdim=True) / count
        variance = (((grouped - mean) * valid) ** 2).sum((-2, -1), keepdim=True) / count
        normalised = ((grouped - mean) * torch.rsqrt(variance + self.eps) * valid).reshape(batch, channels, steps)
        if self.affine:
            normalised = normalised * self.weight[:, None] + self.bias[:, None]
        return normalised


class ClipLayerNorm(nn.LayerNorm):
    """
    The layer normalisations in front of Wav2Vec2-BERT's adapter convolutions, with the padding frames set to 0
    after them (`clip_lengths`, in the adapter layer's input frames): the strided convolution then reads past a
    clip's end the zeros it reads alone, where the stock layer would read the normalised padding. Without lengths
    it is `nn.LayerNorm`; its parameters keep the replaced layer's names.
    """

    clip_lengths: torch.Tensor | None = None
    position: int = 0  # which adapter layer it belongs to

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normalised = super().forward(hidden_states)
        if self.clip_lengths is None:
            return normalised
        valid = torch.arange(hidden_states.shape[1], device=hidden_states.device) < self.clip_lengths[:, None]
        return normalised * valid[..., None].to(normalised.dtype)


def _replace(parent: nn.Module, child: str, module: nn.Module, position: int) -> nn.Module:
    """Put `module`'s clip-aware twin (same parameters) in its place under `parent`; returns the twin."""
    if isinstance(module, nn.GroupNorm):
        twin = ClipGroupNorm(module.num_groups, module.num_channels, module.eps, module.affine)
    else:
        twin = ClipLayerNorm(module.normalized_shape, module.eps, module.elementwise_affine, module.bias is not None)
    for name in ("weight", "bias"):
        if getattr(module, name, None) is not None:
            setattr(twin, name, getattr(module, name))
    twin.position = position
    setattr(parent, child, twin)
    return twin


def clip_norms(encoder: nn.Module) -> list[nn.Module]:
    """
    Make `encoder`'s output for a clip independent of the clips it is padded with, where transformers' encoder
    is not: the group normalisations of the convolutional feature encoder (`feature_extractor.conv_layers[i]`)
    become [`ClipGroupNorm`]s and the layer normalisations in front of a Wav2Vec2-BERT adapter's convolutions
    (`adapter.layers[i]`) [`ClipLayerNorm`]s, holding the same parameters. Returns them (none for other encoders).
    """
    replaced = []
    conv_layers = getattr(getattr(encoder, "feature_extractor", None), "conv_layers", None)
    for index, layer in enumerate(conv_layers if isinstance(conv_layers, nn.ModuleList) else ()):
        norm = getattr(layer, "layer_norm", None)
        if type(norm) is nn.GroupNorm:
            replaced.append(_replace(layer, "layer_norm", norm, index))
    if getattr(encoder.config, "model_type", None) == "wav2vec2-bert" and getattr(encoder, "adapter", None):
        for index, layer in enumerate(encoder.adapter.layers):
            for name in ("residual_layer_norm", "self_attn_layer_norm"):
                if type(getattr(layer, name, None)) is nn.LayerNorm:
                    replaced.append(_replace(layer, name, getattr(layer, name), index))
    return replaced


def clip_norm_lengths(encoder_config, norm: nn.Module, input_lengths: torch.Tensor) -> torch.Tensor:
    """The lengths, in `norm`'s own steps, of clips of `input_lengths` (samples or feature frames)."""
    lengths = input_lengths
    if isinstance(norm, ClipGroupNorm):
        for kernel, stride in list(zip(encoder_config.conv_kernel, encoder_config.conv_stride))[: norm.position + 1]:
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        return lengths
    kernel, stride = encoder_config.adapter_kernel_size, encoder_config.adapter_stride
    for _ in range(norm.position):  # the adapter layers before it
        lengths = torch.div(lengths + 2 * (kernel // 2) - kernel, stride, rounding_mode="floor") + 1
    return lengths


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
        # Normalisations that would mix a clip with its padding see the clip alone (batch-independent outputs).
        self.clip_norms = clip_norms(self.encoder)
        # The pipeline feeds the feature extractor's output under this name.
        self.main_input_name = self.encoder.main_input_name
        self.adapter = TOTCAKTAdapter(config) if config.has_adapter else None
        self.post_init()

    def freeze_feature_encoder(self) -> None:
        """Stop gradients into the convolutional feature encoder (raw-waveform encoders only)."""
        freeze = getattr(self.encoder, "freeze_feature_encoder", None)
        if freeze is None:
            raise ValueError(
                f"The {self.config.encoder_config.model_type} encoder has no convolutional feature encoder to freeze."
            )
        freeze()

    def frame_mask(self, frames: int, attention_mask: torch.Tensor) -> torch.BoolTensor:
        """
        Valid output frames `(B, frames)` for an input `attention_mask` (`(B, samples)` for raw-waveform
        encoders, `(B, feature frames)` for log-mel ones): True where the encoder saw real input.
        """
        lengths = encoder_output_lengths(self.config.encoder_config, attention_mask.sum(-1))
        return torch.arange(frames, device=attention_mask.device) < lengths[:, None]

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
        too_short = encoder_output_lengths(self.config.encoder_config, lengths) < 1
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
        frames = int(encoder_output_lengths(self.config.encoder_config, lengths).max())
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

        if self.clip_norms and attention_mask is not None:
            for norm in self.clip_norms:
                norm.clip_lengths = clip_norm_lengths(self.config.encoder_config, norm, attention_mask.sum(-1))
        try:
            outputs = self.encoder(
                input_values,
                attention_mask=attention_mask,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
        finally:
            for norm in self.clip_norms:
                norm.clip_lengths = None
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
        # What the masked passes and the distillation need of the teacher's tokenizer (plain attributes too).
        self.__dict__["_teacher_mask_token_id"] = None
        self.__dict__["_teacher_to_ctc"] = None
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

    def attach_teacher(
        self,
        teacher: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        ctc_tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> PreTrainedModel | None:
        """
        Attach the frozen teacher used for training (loaded with [`load_teacher`] from
        `config.teacher_name_or_path` when `teacher` is None). It is put in eval mode with gradients off.
        No-op for `alignment="none"`.

        `config.teacher_target="masked_states"` and `config.kd_loss_weight > 0` also need the teacher's `tokenizer`
        (its mask token), and the distillation needs the teacher's masked-LM head and the model's `ctc_tokenizer`
        (to map the teacher's predictions into the CTC vocabulary, [`teacher_vocabulary_map`]).
        """
        if not self.config.uses_teacher:
            return None
        if teacher is None:
            teacher, loaded_tokenizer = load_teacher(
                self.config.teacher_name_or_path, masked_lm=self.config.uses_teacher_predictions
            )
            tokenizer = tokenizer or loaded_tokenizer
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
        self._attach_teacher_vocabulary(teacher, tokenizer, ctc_tokenizer)
        teacher.eval()
        teacher.requires_grad_(False)
        self.__dict__["_teacher"] = teacher
        return teacher

    def _attach_teacher_vocabulary(
        self,
        teacher: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None,
        ctc_tokenizer: PreTrainedTokenizerBase | None,
    ) -> None:
        """Keep the teacher's mask token and its map into the CTC vocabulary, where the configuration needs them."""
        masked_passes = self.config.teacher_target == "masked_states" or self.config.uses_teacher_predictions
        if masked_passes and getattr(tokenizer, "mask_token_id", None) is None:
            raise ValueError(
                f"teacher_target={self.config.teacher_target!r} / kd_loss_weight={self.config.kd_loss_weight} mask "
                "each transcript position in turn: attach the teacher with its tokenizer, which must have a mask "
                "token (model.attach_teacher(teacher, tokenizer))."
            )
        if masked_passes:
            self.__dict__["_teacher_mask_token_id"] = tokenizer.mask_token_id
        if not self.config.uses_teacher_predictions:
            return
        if teacher.get_output_embeddings() is None:
            raise ValueError(
                f"kd_loss_weight={self.config.kd_loss_weight} distils the teacher's masked-LM predictions, but the "
                f"teacher given is a {type(teacher).__name__} without its masked-LM head: load it with "
                "load_teacher(..., masked_lm=True) (AutoModelForMaskedLM), or set kd_loss_weight=0."
            )
        if ctc_tokenizer is None:
            raise ValueError(
                f"kd_loss_weight={self.config.kd_loss_weight} maps the teacher's predictions into the CTC vocabulary: "
                "attach the teacher with the model's CTC tokenizer (model.attach_teacher(teacher, tokenizer, "
                "ctc_tokenizer=processor.tokenizer)), or set kd_loss_weight=0 to train without the distillation."
            )
        self.__dict__["_teacher_to_ctc"] = teacher_vocabulary_map(
            tokenizer, ctc_tokenizer, teacher.get_output_embeddings().out_features
        )

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

    def blank_padding_frames(self, logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """
        `logits` with every padding frame (past the clip's own frames, as `attention_mask` gives them) replaced by
        a certain blank: 0 for the blank (`pad_token_id`) and -1e4 for every other symbol. A greedy or beam search
        over a padded batch then writes what it writes for each clip alone, as the frames past a clip's end are
        never read as speech; the losses are computed before, on the valid frames only.
        """
        valid = self.frame_mask(logits.shape[1], attention_mask)
        blank = torch.full((logits.shape[-1],), -1e4, dtype=logits.dtype, device=logits.device)
        blank[self.config.pad_token_id] = 0
        return torch.where(valid[..., None], logits, blank)

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
        teacher_attention_mask = self._teacher_ready(teacher_input_ids, teacher_attention_mask)
        mask = self._teacher_positions(teacher_attention_mask)
        layer = self.config.teacher_layer
        if self.config.teacher_target == "masked_states":
            hidden = self._masked_teacher_passes(teacher_input_ids, teacher_attention_mask, mask)[0]
        else:
            outputs = self.teacher.base_model(
                input_ids=teacher_input_ids, attention_mask=teacher_attention_mask, output_hidden_states=layer != -1
            )
            hidden = outputs.last_hidden_state if layer == -1 else outputs.hidden_states[layer]
        if self.config.teacher_strip_special_tokens:
            hidden, mask = hidden[:, 1:], mask[:, 1:]
        return hidden.float(), mask

    @torch.no_grad()
    def teacher_predictions(
        self, teacher_input_ids: torch.LongTensor, teacher_attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.LongTensor, torch.FloatTensor, torch.BoolTensor]:
        """
        The teacher's masked-LM predictions at each token position, read with that position replaced by the mask
        token: its `config.kd_top_k` most probable tokens (what `kd_loss` distils, and what the cache stores).

        Args:
            teacher_input_ids, teacher_attention_mask: as for [`~TOTCAKTForCTC.teacher_token_features`].

        Returns:
            `(ids, probs, token_mask)`: `(B, L', kd_top_k)` teacher token ids (-1 off the valid positions) and their
            probabilities (0 there), and the `(B, L')` mask of valid positions, laid out as the token features.
        """
        teacher_attention_mask = self._teacher_ready(teacher_input_ids, teacher_attention_mask)
        mask = self._teacher_positions(teacher_attention_mask)
        _, ids, probs = self._masked_teacher_passes(teacher_input_ids, teacher_attention_mask, mask, predictions=True)
        if self.config.teacher_strip_special_tokens:
            ids, probs, mask = ids[:, 1:], probs[:, 1:], mask[:, 1:]
        return ids, probs, mask

    def _teacher_ready(self, teacher_input_ids: torch.Tensor, teacher_attention_mask: torch.Tensor | None):
        """Check that a teacher is attached and on the inputs' device; return the attention mask (all ones if None)."""
        if self.teacher is None:
            raise ValueError(
                "teacher_input_ids were given but no teacher is attached: call model.attach_teacher() "
                "or pass precomputed teacher_hidden_states."
            )
        if next(self.teacher.parameters()).device != teacher_input_ids.device:
            self.teacher.to(teacher_input_ids.device)
        return torch.ones_like(teacher_input_ids) if teacher_attention_mask is None else teacher_attention_mask

    def _teacher_positions(self, teacher_attention_mask: torch.Tensor) -> torch.BoolTensor:
        """`(B, L)` positions whose features are kept: the valid ones, less `[CLS]`/`[SEP]` when they are stripped."""
        mask = teacher_attention_mask.bool()
        if self.config.teacher_strip_special_tokens:
            last = mask.sum(dim=1) - 1  # index of [SEP]
            positions = torch.arange(mask.shape[1], device=mask.device)
            mask = mask & (positions[None, :] < last[:, None]) & (positions[None, :] > 0)
        return mask

    def _masked_teacher_passes(self, input_ids, attention_mask, positions, predictions: bool = False):
        """
        Run the teacher once per `positions` entry with that position replaced by the mask token (rows of all
        transcripts batched together). Returns the `(B, L, D)` states of layer `config.teacher_layer` at the masked
        positions (0 elsewhere) and, with `predictions`, the `(B, L, kd_top_k)` top ids (-1 elsewhere) and
        probabilities (0 elsewhere) of the masked-LM head there (None otherwise).
        """
        mask_token_id = self.__dict__["_teacher_mask_token_id"]
        if mask_token_id is None:
            raise ValueError(
                "Masking transcript positions needs the teacher's mask token: attach the teacher with its tokenizer "
                "(model.attach_teacher(teacher, tokenizer))."
            )
        teacher = self.teacher if predictions else self.teacher.base_model
        batch, length = input_ids.shape
        states = torch.zeros(batch, length, self.config.teacher_hidden_size, device=input_ids.device)
        top_k = self.config.kd_top_k
        ids = torch.full((batch, length, top_k), -1, dtype=torch.long, device=input_ids.device)
        probs = torch.zeros(batch, length, top_k, device=input_ids.device)
        rows, columns = positions.nonzero(as_tuple=True)
        for start in range(0, len(rows), MASKED_PASS_ROWS):
            row, column = rows[start : start + MASKED_PASS_ROWS], columns[start : start + MASKED_PASS_ROWS]
            index = torch.arange(len(row), device=input_ids.device)
            masked = input_ids[row].clone()
            masked[index, column] = mask_token_id
            outputs = teacher(input_ids=masked, attention_mask=attention_mask[row], output_hidden_states=True)
            states[row, column] = outputs.hidden_states[self.config.teacher_layer][index, column].float()
            if predictions:
                distribution = torch.softmax(outputs.logits[index, column].float(), dim=-1)
                probs[row, column], ids[row, column] = distribution.topk(top_k, dim=-1)
        return states, (ids if predictions else None), (probs if predictions else None)

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
        ordered = self.config.alignment_is_ordered  # else no order reward, no temporal prior
        settings = dict(
            lambda1=self.config.tot_lambda1 if ordered else 0.0,
            lambda2=self.config.tot_lambda2,
            sigma=self.config.tot_sigma if ordered else None,
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
        if self.config.alignment_is_graph_matching:  # edges: cosine distances within each modality
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
                tau=self.config.uot_tau if self.config.alignment_is_unbalanced else None,
                **settings,
            )
            transport_cost = ot_loss(coupling, cost)
        if self.config.tot_tol > 0 and not torch.compiler.is_compiling() and not bool(solver["converged"].all()):
            self._warn_not_converged(solver)
        transported = barycentric_transport(coupling, adapted, token_mask)
        return {
            "ot_loss": transport_cost,
            "align_loss": align_loss(transported, tokens, token_mask),
            "coupling": coupling,
            "solver_marginal_error": solver["marginal_error"].detach().max(),
            "solver_iterations": torch.tensor(float(solver["n_iter"]), device=cost.device),
        }

    def _warn_not_converged(self, solver: dict) -> None:
        """Warn once, in the configuration's terms, that the plans of `solver` (the solver's log) did not converge."""
        outer = (
            f", plan change {float(solver['plan_change'].max()):.2e} after {solver['n_outer']} outer iterations"
            if "plan_change" in solver
            else ""
        )
        advice = "Raise tot_max_iter"
        if self.config.alignment_is_unbalanced:  # a runaway mass, not too few iterations, is the usual cause
            advice = (
                f"The largest plan's mass is {float(solver['mass'].max()):.3g} (1 when balanced): far above 1, "
                "the order reward exceeds the cost, which unbalanced marginals turn into mass. Lower tot_lambda1 "
                "or raise uot_tau; else raise tot_max_iter"
            )
        logger.warning_once(
            f"The transport plan did not converge in tot_max_iter={self.config.tot_max_iter} iterations (largest "
            f"marginal error {float(solver['marginal_error'].max()):.2e}{outer}, tot_tol={self.config.tot_tol}); the "
            f"envelope gradient is exact only at the optimum. {advice} (training logs "
            "solver_marginal_error and solver_iterations)."
        )

    def _losses(
        self,
        adapted: torch.Tensor | None,
        logits: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.LongTensor | None,
        teacher: tuple[torch.FloatTensor, torch.BoolTensor] | None,
        token_targets: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        The loss fields of [`TOTCAKTOutput`] that the inputs allow: `ctc_loss` with `labels`; `ot_loss`,
        `align_loss`, `coupling` and the solver diagnostics with teacher features (aligning the `adapted`
        frames); `loss` = `w_ctc * L_ctc + w_ot * L_ot + w_align * L_align` with `labels` (the alignment terms only
        with teacher features). With `token_targets` (the teacher's predictions, [`ctc_token_targets`]) also
        `kd_loss`, and `w_kd * L_kd` in `loss`.
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
            if token_targets is not None:
                fields["kd_loss"] = plan_distillation_loss(
                    fields["coupling"], logits, frame_mask, token_targets.to(logits.device), self.config.pad_token_id
                )
        if labels is not None:
            fields["ctc_loss"] = self._ctc_loss(logits, frame_mask.sum(-1), labels)
            fields["loss"] = self.config.ctc_loss_weight * fields["ctc_loss"]
            if teacher is not None:
                fields["loss"] = (
                    fields["loss"]
                    + self.config.ot_loss_weight * fields["ot_loss"]
                    + self.config.align_loss_weight * fields["align_loss"]
                )
            if "kd_loss" in fields:
                fields["loss"] = fields["loss"] + self.config.kd_loss_weight * fields["kd_loss"]
        return fields

    def _resolve_token_targets(
        self,
        teacher: tuple[torch.FloatTensor, torch.BoolTensor] | None,
        teacher_input_ids: torch.LongTensor | None,
        teacher_attention_mask: torch.Tensor | None,
        teacher_prediction_ids: torch.LongTensor | None,
        teacher_prediction_probs: torch.FloatTensor | None,
    ) -> torch.Tensor | None:
        """The teacher's predictions in the CTC vocabulary `(B, M, vocab_size)` for `kd_loss`, or None without it."""
        if teacher is None or not self.config.uses_teacher_predictions:
            return None
        if teacher_prediction_ids is None:
            if teacher_input_ids is None:
                raise ValueError(
                    f"kd_loss_weight={self.config.kd_loss_weight} needs the teacher's predictions: pass "
                    "teacher_prediction_ids and teacher_prediction_probs with the precomputed features (the collator "
                    "reads them from a cache filled with kd_loss_weight > 0), or teacher_input_ids."
                )
            teacher_prediction_ids, teacher_prediction_probs, _ = self.teacher_predictions(
                teacher_input_ids, teacher_attention_mask
            )
        if teacher_prediction_ids.shape[:2] != teacher[1].shape:
            raise ValueError(
                f"teacher_prediction_ids must have shape {tuple(teacher[1].shape)} + (kd_top_k,) to match the teacher "
                f"features, got {tuple(teacher_prediction_ids.shape)}."
            )
        if self.__dict__["_teacher_to_ctc"] is None:
            raise ValueError(
                "kd_loss needs the map from the teacher's vocabulary to the CTC vocabulary: attach the teacher with "
                "both tokenizers (model.attach_teacher(teacher, tokenizer, ctc_tokenizer=processor.tokenizer))."
            )
        return ctc_token_targets(
            teacher_prediction_ids, teacher_prediction_probs, self.__dict__["_teacher_to_ctc"], self.config.vocab_size
        )

    def _loss_gradient_norms(self, encoder_states: torch.Tensor, fields: dict) -> dict[str, torch.Tensor]:
        """
        `grad_norm_<term>` of each weighted loss term on `encoder_states` and the `knowledge_share`. Each is one
        backward pass through the heads and the adapter only (not the encoder), on a graph that is kept for the
        training step's own backward; parameter gradients are not touched.
        """
        if not (torch.is_grad_enabled() and encoder_states.requires_grad and "loss" in fields):
            return {}
        terms = {
            name: getattr(self.config, f"{name}_loss_weight") * fields[f"{name}_loss"]
            for name in ("ctc", *KNOWLEDGE_LOSSES)
            if f"{name}_loss" in fields and getattr(self.config, f"{name}_loss_weight") > 0
        }
        gradients = {
            name: torch.autograd.grad(term, encoder_states, retain_graph=True, allow_unused=True)[0]
            for name, term in terms.items()
        }
        gradients = {name: torch.zeros_like(encoder_states) if g is None else g for name, g in gradients.items()}
        norms = {f"grad_norm_{name}": gradient.detach().norm() for name, gradient in gradients.items()}
        knowledge = [gradients[name] for name in KNOWLEDGE_LOSSES if name in gradients]
        if knowledge and "ctc" in gradients:
            norms["knowledge_share"] = sum(knowledge).detach().norm() / norms["grad_norm_ctc"]
        return norms

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
        teacher_prediction_ids: torch.LongTensor | None = None,
        teacher_prediction_probs: torch.FloatTensor | None = None,
        output_loss_gradient_norms: bool = False,
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
            teacher_prediction_ids, teacher_prediction_probs (`(B, M, kd_top_k)`, *optional*):
                Precomputed masked-LM predictions of the teacher (as returned by `teacher_predictions`, in the
                teacher's vocabulary, -1 / 0 on padding) for `kd_loss`; computed from `teacher_input_ids` when absent.
            output_loss_gradient_norms (`bool`):
                Also return `grad_norm_<term>` and `knowledge_share`: the gradient each weighted loss term puts on
                the encoder's output states (one extra backward per term through the heads and the adapter; the
                training step's gradients are unchanged), or on the states of layer `config.align_layer` when the
                alignment reads an inner layer (CTC's term then goes back through the layers above it). The
                Trainer asks for them at logging steps.
            output_attentions, output_hidden_states, return_dict (`bool`, *optional*):
                As in transformers' models; when None, the configuration's values are used.

        The alignment losses are computed when teacher features are available and `alignment` is not
        `"none"`; inference needs neither text nor teacher. The CTC head reads the encoder's frames, or with
        `config.ctc_input="adapter"` the adapter's output, which the alignment acts on too.

        Returns:
            [`TOTCAKTOutput`] (or a tuple when `return_dict=False`).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        # The alignment of an inner encoder layer (align_layer) reads it from the encoder's hidden states.
        aligns_inner_layer = self.config.align_layer != -1 and self.config.uses_teacher
        outputs = self.tot_cakt(
            input_values,
            attention_mask=attention_mask,
            input_features=input_features,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states or aligns_inner_layer,
            return_dict=True,
        )
        encoder_states = outputs.last_hidden_state
        hidden_states = self.dropout(encoder_states)
        teacher = self._resolve_teacher_features(
            hidden_states.shape[0],
            teacher_input_ids,
            teacher_attention_mask,
            teacher_hidden_states,
            teacher_token_mask,
        )
        reads_adapter = self.config.ctc_input == "adapter"
        # The adapter runs once: its output feeds the alignment and, with ctc_input="adapter", the CTC head.
        aligned_states = outputs.hidden_states[self.config.align_layer] if aligns_inner_layer else encoder_states
        if reads_adapter or teacher is not None:
            adapted = self.adapter(self.dropout(aligned_states) if aligns_inner_layer else hidden_states)
        else:
            adapted = None
        logits = self.lm_head(adapted if reads_adapter else hidden_states)
        if labels is None and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self.check_logits(logits)
        token_targets = self._resolve_token_targets(
            teacher, teacher_input_ids, teacher_attention_mask, teacher_prediction_ids, teacher_prediction_probs
        )
        losses = self._losses(adapted, logits, attention_mask, labels, teacher, token_targets)
        if output_loss_gradient_norms:
            losses.update(self._loss_gradient_norms(aligned_states, losses))
        if not output_coupling:
            losses.pop("coupling", None)
        if attention_mask is not None:
            logits = self.blank_padding_frames(logits, attention_mask)
        output = TOTCAKTOutput(
            logits=logits,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
            attentions=outputs.attentions,
            **losses,
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
