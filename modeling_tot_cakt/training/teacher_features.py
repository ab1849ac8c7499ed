"""Cache of the frozen teacher's token features, one safetensors file per transcript.

The teacher only ever sees the transcript, so its features are a pure function of
(teacher weights and configuration, tokenizer, normalised text). The cache key hashes exactly
that: a [`teacher_fingerprint`] (checkpoint path, commit hash, configuration, tokenizer, a digest
of every weight tensor, and the model's feature layout) plus the text. A
different teacher or a different transcript therefore never reads stale features; each file also
records its text and fingerprint, which [`TeacherFeatureCache.load`] checks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

FEATURES_KEY = "features"


def _weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
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
    """

    def __init__(self, cache_dir: str | os.PathLike, fingerprint: str):
        self.fingerprint = fingerprint
        self.directory = os.path.join(os.fspath(cache_dir), fingerprint[:16])

    def key(self, text: str) -> str:
        """Hex key of a normalised transcript for this teacher."""
        return hashlib.sha256(f"{self.fingerprint}\n{text}".encode()).hexdigest()

    def path(self, text: str) -> str:
        key = self.key(text)
        return os.path.join(self.directory, key[:2], f"{key}.safetensors")

    def __contains__(self, text: str) -> bool:
        return os.path.isfile(self.path(text))

    def save(self, text: str, features: torch.Tensor) -> None:
        """Store the `(tokens, hidden_size)` features of `text`."""
        path = self.path(text)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        os.close(handle)
        save_file(
            {FEATURES_KEY: features.detach().cpu().float().contiguous()},
            temporary,
            metadata={"text": text, "fingerprint": self.fingerprint},
        )
        os.replace(temporary, path)

    def load(self, text: str) -> torch.Tensor:
        """The `(tokens, hidden_size)` float32 features of `text`; raises `KeyError` when not cached."""
        path = self.path(text)
        if not os.path.isfile(path):
            raise KeyError(
                f"No cached teacher features for transcript {text!r} in {self.directory}. Fill the cache with "
                "precompute_teacher_features (train_hf.py does so with --cache_teacher_features)."
            )
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("text") != text or metadata.get("fingerprint") != self.fingerprint:
                raise ValueError(f"{path} holds features of another transcript or teacher; delete it and recompute.")
            return handle.get_tensor(FEATURES_KEY)


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
    Run the frozen teacher once per distinct transcript missing from `cache` and store its token features.

    Args:
        model: a [`TOTCAKTForCTC`] with its teacher attached; its `teacher_token_features` defines
            what is stored (one `(M', D)` tensor per transcript, `[CLS]`/`[SEP]` dropped).
        tokenizer: the teacher's tokenizer.
        texts: normalised transcripts (repeats are computed once, empty ones skipped).
        batch_size: transcripts per teacher forward pass.
        device: where to run the teacher (defaults to where it is).

    Returns:
        `int`: the number of transcripts computed (0 when everything was cached).
    """
    missing = sorted({text for text in texts if text and text not in cache})
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        encoded = tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")
        if device is not None:
            encoded = encoded.to(device)
        features, mask = model.teacher_token_features(encoded["input_ids"], encoded["attention_mask"])
        for text, row, row_mask in zip(chunk, features, mask):
            cache.save(text, row[row_mask])
    if missing:
        logger.info("Cached teacher features for %d transcripts in %s.", len(missing), cache.directory)
    return len(missing)


__all__ = ["TeacherFeatureCache", "precompute_teacher_features", "teacher_fingerprint"]
