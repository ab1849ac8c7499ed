"""Cache of the frozen teacher's token features, one safetensors file per transcript.

The teacher only ever sees the transcript, so its features are a pure function of
(teacher weights and configuration, tokenizer, normalised text). The cache key hashes exactly
that: a [`teacher_fingerprint`] (checkpoint path, commit hash, configuration, tokenizer, a digest
of every weight tensor, and the model's feature layout) plus the text. A
different teacher or a different transcript therefore never reads stale features; each file also
records its text and fingerprint, which [`TeacherFeatureCache.load`] checks together with the
contents (shape, dtype, finite values). [`precompute_teacher_features`] also checks each file's token
count against its transcript, and recomputes any file that fails, with a warning naming it.

Transcripts are tokenised for the teacher with at most [`teacher_max_length`] tokens: the size of the
teacher's position table, whatever the tokenizer's `model_max_length` says.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

FEATURES_KEY = "features"
# The teacher's top-k masked-LM predictions at each token (ids in its vocabulary, probabilities), stored with the
# features when the distillation needs them (`kd_loss_weight > 0`).
PREDICTION_IDS_KEY = "prediction_ids"
PREDICTION_PROBS_KEY = "prediction_probs"
# Encoders whose position ids start after the padding index (RoBERTa's convention), so that
# `max_position_embeddings - pad_token_id - 1` positions are usable.
PADDING_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "data2vec-text", "xlm-roberta-xl")


def teacher_max_length(teacher_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    """
    The most tokens (special tokens included) one transcript may have for the teacher: the size of
    its position table, or the tokenizer's `model_max_length` when that is smaller. A tokenizer saved
    without `model_max_length` says 10^30, and a longer input would fail inside the teacher's
    embeddings (`The expanded size of the tensor (602) must match the existing size (512)`).

    Args:
        teacher_config: the teacher's configuration (`max_position_embeddings`).
        tokenizer: the teacher's tokenizer.

    Returns:
        `int`: the `max_length` to tokenise transcripts with (`truncation=True`).
    """
    positions = getattr(teacher_config, "max_position_embeddings", None)
    if positions is not None and getattr(teacher_config, "model_type", None) in PADDING_OFFSET_POSITIONS:
        positions -= (teacher_config.pad_token_id or 0) + 1
    limits = [limit for limit in (positions, tokenizer.model_max_length) if limit is not None]
    return int(min(limits))


def tokenize_for_teacher(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int | None, **kwargs):
    """
    Tokenise transcripts for the teacher, cut to `max_length` tokens ([`teacher_max_length`]; None, or a
    limit no shorter than the tokenizer's own `model_max_length`, leaves the cut to the tokenizer).
    """
    if max_length is not None and max_length >= tokenizer.model_max_length:
        max_length = None
    return tokenizer(texts, truncation=True, max_length=max_length, **kwargs)


def count_truncated_transcripts(
    tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], max_length: int, batch_size: int = 1000
) -> int:
    """How many of `texts` have more than `max_length` teacher tokens (special tokens included)."""
    texts, truncated = list(texts), 0
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start : start + batch_size], truncation=False, verbose=False)
        truncated += sum(len(ids) > max_length for ids in encoded["input_ids"])
    return truncated


RECOMPUTE_HINT = (
    "precompute_teacher_features recomputes such files (train_hf.py runs it with --cache_teacher_features)."
)


class InvalidTeacherFeaturesError(ValueError):
    """A cache file that cannot be used: unreadable, or holding features of the wrong shape, type or values."""


def _weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        # No token feature reads the pooler, and a checkpoint saved with a masked-LM head (the demo's teacher) has
        # none: loaded as a base model it gets a freshly drawn one, which must not change the cache's key.
        if ".pooler." in f".{name}":
            continue
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        # Hash the raw bytes (as uint8) so every dtype, bfloat16 included, is covered exactly.
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # A fast tokenizer serialises everything that maps text to ids: normaliser (lower-casing,
        # accent stripping, ...), pre-tokeniser, vocabulary and post-processor.
        return backend.to_str()
    return json.dumps(tokenizer.get_vocab(), sort_keys=True)


def teacher_feature_layout(config: PretrainedConfig) -> dict:
    """
    What a TOT-CAKT configuration changes in the teacher's stored token features, for [`teacher_fingerprint`]:
    whether `[CLS]`/`[SEP]` are stripped, and the teacher layer when it is not the last one, the target kind when it
    is not the plain states (`teacher_target`), and the number of stored predictions when the distillation needs
    them (`kd_top_k`), so that caches written with the defaults keep their key.
    """
    layout = {"strip_special_tokens": config.teacher_strip_special_tokens}
    if config.teacher_layer != -1:
        layout["teacher_layer"] = config.teacher_layer
    if config.teacher_target != "states":
        layout["teacher_target"] = config.teacher_target
    if config.uses_teacher_predictions:
        layout["kd_top_k"] = config.kd_top_k
    return layout


def teacher_fingerprint(
    teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name_or_path: str, feature_layout: dict | None = None
) -> str:
    """
    Identity of a teacher's token features, as a hex digest.

    Args:
        teacher: the loaded teacher model.
        tokenizer: the tokenizer whose ids the teacher reads.
        name_or_path: what the teacher was loaded from (Hub id or folder).
        feature_layout: anything else that changes the stored features (e.g. whether `[CLS]`/`[SEP]`
            are stripped).

    Returns:
        `str`: sha256 over the path, the Hub commit hash (when loaded from the Hub), the full
        configuration, the tokenizer (class, vocabulary and text normalisation), `feature_layout` and a
        digest of all weights.
    """
    config = teacher.config.to_dict()
    commit = config.pop("_commit_hash", None) or getattr(teacher.config, "_commit_hash", None)
    # Fields that describe where or with which library version a checkpoint was saved, not what it computes.
    for volatile in ("_name_or_path", "transformers_version"):
        config.pop(volatile, None)
    identity = {
        "name_or_path": str(name_or_path),
        "commit": commit,
        "config": config,
        "tokenizer": type(tokenizer).__name__,
        "tokenization": _tokenizer_identity(tokenizer),
        "model_max_length": tokenizer.model_max_length,
        "feature_layout": feature_layout or {},
        "weights": _weights_digest(teacher),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


class TeacherFeatureCache:
    """
    Token features of one teacher, stored under `cache_dir/<fingerprint[:16]>/<key[:2]>/<key>.safetensors`,
    where `key = sha256(fingerprint, text)`. Files are written atomically, so several processes may
    fill the cache at once.

    Args:
        cache_dir: root folder (shared between runs and teachers).
        fingerprint: the teacher's [`teacher_fingerprint`].
        hidden_size: the teacher's hidden size; when given, files of another width are refused.
    """

    def __init__(self, cache_dir: str | os.PathLike, fingerprint: str, hidden_size: int | None = None):
        self.fingerprint = fingerprint
        self.hidden_size = hidden_size
        self.directory = os.path.join(os.fspath(cache_dir), fingerprint[:16])

    def key(self, text: str) -> str:
        """Hex key of a normalised transcript for this teacher."""
        return hashlib.sha256(f"{self.fingerprint}\n{text}".encode()).hexdigest()

    def path(self, text: str) -> str:
        key = self.key(text)
        return os.path.join(self.directory, key[:2], f"{key}.safetensors")

    def __contains__(self, text: str) -> bool:
        return os.path.isfile(self.path(text))

    def save(
        self, text: str, features: torch.Tensor, predictions: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        """Store the `(tokens, hidden_size)` features of `text` and, when given, its `(tokens, k)` top-k prediction
        ids and probabilities ([`TOTCAKTForCTC.teacher_predictions`])."""
        path = self.path(text)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        os.close(handle)
        tensors = {FEATURES_KEY: features.detach().cpu().float().contiguous()}
        if predictions is not None:
            tensors[PREDICTION_IDS_KEY] = predictions[0].detach().cpu().long().contiguous()
            tensors[PREDICTION_PROBS_KEY] = predictions[1].detach().cpu().float().contiguous()
        save_file(
            tensors,
            temporary,
            metadata={"text": text, "fingerprint": self.fingerprint},
        )
        os.replace(temporary, path)

    def load(self, text: str, num_tokens: int | None = None) -> torch.Tensor:
        """
        The `(tokens, hidden_size)` float32 features of `text`.

        Args:
            text: the normalised transcript.
            num_tokens: the number of token features the transcript must have, when known.

        Raises:
            KeyError: nothing is cached for `text`.
            InvalidTeacherFeaturesError: the file (named in the message) is unreadable, belongs to another
                transcript or teacher, or holds features that are not a finite float32 `(num_tokens,
                hidden_size)` matrix with at least one token.
        """
        path = self.path(text)
        if not os.path.isfile(path):
            raise KeyError(
                f"No cached teacher features for transcript {text!r} in {self.directory}. Fill the cache with "
                "precompute_teacher_features (train_hf.py does so with --cache_teacher_features)."
            )
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                names = handle.keys()
                features = handle.get_tensor(FEATURES_KEY) if FEATURES_KEY in names else None
        except (SafetensorError, OSError, ValueError) as err:
            raise InvalidTeacherFeaturesError(
                f"{path} is not a readable safetensors file ({err}). {RECOMPUTE_HINT}"
            ) from err
        if metadata.get("text") != text or metadata.get("fingerprint") != self.fingerprint:
            raise InvalidTeacherFeaturesError(
                f"{path} holds features of another transcript or teacher; delete it and recompute."
            )
        problem = self._content_problem(features, num_tokens)
        if problem:
            raise InvalidTeacherFeaturesError(f"{path} of transcript {text!r} {problem}. {RECOMPUTE_HINT}")
        return features

    def load_predictions(self, text: str, num_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The `(tokens, k)` top-k prediction ids and probabilities stored with the features of `text`.

        Raises:
            KeyError: nothing is cached for `text`.
            InvalidTeacherFeaturesError: the file holds no predictions (written without the distillation), or
                predictions that do not fit its features (token count, finite probabilities).
        """
        features = self.load(text, num_tokens)
        with safe_open(self.path(text), framework="pt") as handle:
            names = handle.keys()
            if PREDICTION_IDS_KEY not in names or PREDICTION_PROBS_KEY not in names:
                raise InvalidTeacherFeaturesError(
                    f"{self.path(text)} of transcript {text!r} holds no teacher predictions. {RECOMPUTE_HINT}"
                )
            ids, probs = handle.get_tensor(PREDICTION_IDS_KEY), handle.get_tensor(PREDICTION_PROBS_KEY)
        if ids.dim() != 2 or ids.shape != probs.shape or len(ids) != len(features) or not torch.isfinite(probs).all():
            raise InvalidTeacherFeaturesError(
                f"{self.path(text)} of transcript {text!r} holds predictions of shape {tuple(ids.shape)} / "
                f"{tuple(probs.shape)} for {len(features)} token features, or non-finite ones. {RECOMPUTE_HINT}"
            )
        return ids, probs

    def _content_problem(self, features: torch.Tensor | None, num_tokens: int | None) -> str | None:
        if features is None:
            return f"has no '{FEATURES_KEY}' tensor"
        if features.dtype != torch.float32:
            return f"holds {features.dtype} features instead of torch.float32"
        width = self.hidden_size if self.hidden_size is not None else "hidden_size"
        expected = (num_tokens if num_tokens is not None else "tokens", width)
        if features.dim() != 2 or (self.hidden_size is not None and features.shape[1] != self.hidden_size):
            return f"holds features of shape {tuple(features.shape)} instead of {expected}"
        if num_tokens is not None and features.shape[0] != num_tokens:
            return f"holds {features.shape[0]} token features but the transcript has {num_tokens} teacher tokens"
        if features.shape[0] == 0:
            return "holds no token features"
        if not torch.isfinite(features).all():
            return "holds NaN or infinite features"
        return None


@torch.no_grad()
def precompute_teacher_features(
    model,
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    cache: TeacherFeatureCache,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> int:
    """
    Run the frozen teacher once per distinct transcript whose features `cache` lacks, or holds in a file that
    fails [`TeacherFeatureCache.load`]'s checks (unreadable, wrong shape, dtype or token count, non-finite
    values: recomputed with a warning naming the file), and store its token features.

    Args:
        model: a [`TOTCAKTForCTC`] with its teacher attached; its `teacher_token_features` defines
            what is stored (one `(M', D)` tensor per transcript, `[CLS]`/`[SEP]` dropped), and with
            `kd_loss_weight > 0` its `teacher_predictions` too (`(M', kd_top_k)` ids and probabilities).
        tokenizer: the teacher's tokenizer; transcripts are cut to [`teacher_max_length`] tokens.
        texts: normalised transcripts (repeats are computed once, empty ones skipped).
        batch_size: transcripts per teacher forward pass.
        device: where to run the teacher (defaults to where it is).

    Returns:
        `int`: the number of transcripts computed (0 when everything was cached and valid).

    Raises:
        ValueError: the teacher itself gives non-finite features for a transcript.
    """
    max_length = teacher_max_length(model.teacher.config, tokenizer)
    strip = model.config.teacher_strip_special_tokens
    predictions = model.config.uses_teacher_predictions
    distinct = sorted({text for text in texts if text})
    missing = []
    for start in range(0, len(distinct), batch_size):
        chunk = distinct[start : start + batch_size]
        lengths = [len(ids) for ids in tokenize_for_teacher(tokenizer, chunk, max_length)["input_ids"]]
        for text, length in zip(chunk, lengths):
            if text not in cache:
                missing.append(text)
                continue
            num_tokens = length - tokenizer.num_special_tokens_to_add() if strip else length
            try:
                (cache.load_predictions if predictions else cache.load)(text, num_tokens=num_tokens)
            except InvalidTeacherFeaturesError as err:
                logger.warning("Recomputing a cached teacher feature file: %s", err)
                missing.append(text)
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        encoded = tokenize_for_teacher(tokenizer, chunk, max_length, padding=True, return_tensors="pt")
        if device is not None:
            encoded = encoded.to(device)
        features, mask = model.teacher_token_features(encoded["input_ids"], encoded["attention_mask"])
        if predictions:
            ids, probs, _ = model.teacher_predictions(encoded["input_ids"], encoded["attention_mask"])
        for index, (text, row, row_mask) in enumerate(zip(chunk, features, mask)):
            if not torch.isfinite(row[row_mask]).all():
                raise ValueError(
                    f"The teacher '{model.config.teacher_name_or_path}' gives NaN or infinite features for the "
                    f"transcript {text!r}: check its weights (a teacher saved in fp16 may overflow)."
                )
            row_predictions = (ids[index][row_mask], probs[index][row_mask]) if predictions else None
            cache.save(text, row[row_mask], row_predictions)
    if missing:
        logger.info("Cached teacher features for %d transcripts in %s.", len(missing), cache.directory)
    return len(missing)


__all__ = [
    "InvalidTeacherFeaturesError",
    "TeacherFeatureCache",
    "count_truncated_transcripts",
    "precompute_teacher_features",
    "teacher_fingerprint",
    "teacher_max_length",
    "tokenize_for_teacher",
]
