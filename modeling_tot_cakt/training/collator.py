"""Batch collation for TOT-CAKT training: padded audio, CTC labels and the teacher's view of the text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, ProcessorMixin

from .data import LABELS_COLUMN, TEXT_COLUMN
from .teacher_features import TeacherFeatureCache, tokenize_for_teacher


@dataclass
class DataCollatorCTCWithTeacher:
    """
    Pads a list of prepared examples into a batch for [`TOTCAKTForCTC.forward`].

    Each example holds the feature extractor's input (`input_values` `(samples,)` or
    `input_features` `(frames, features)`), `labels` (CTC ids) and `text` (the normalised
    transcript). The batch holds:

    - the padded input `(B, T)` / `(B, T, F)` and `attention_mask`. The mask is always returned,
      even for encoders trained without one, because the CTC input lengths and the transport
      marginals must not count padded frames;
    - `labels` `(B, L)` padded with -100;
    - with `teacher_tokenizer`: `teacher_input_ids` / `teacher_attention_mask` `(B, L')`, the
      transcripts tokenised for the teacher (with `[CLS]`/`[SEP]`, at most `teacher_max_length`
      tokens; the model runs the teacher);
    - with `teacher_cache` instead: `teacher_hidden_states` `(B, M, D)` and `teacher_token_mask`
      `(B, M)` bool, the cached token features of each transcript (the teacher is not run), and with
      `teacher_predictions` its cached top-k predictions, `teacher_prediction_ids` `(B, M, k)` (-1 on padding) and
      `teacher_prediction_probs` `(B, M, k)` (0 on padding), for the distillation (`kd_loss_weight > 0`).

    Args:
        processor: the model's processor (feature extractor + CTC tokenizer).
        teacher_tokenizer: the teacher's tokenizer, for on-the-fly teacher features.
        teacher_max_length: longest teacher tokenisation, special tokens included: pass
            [`~teacher_features.teacher_max_length`] of the teacher, since a tokenizer saved without
            `model_max_length` lets longer transcripts overflow the teacher's position table. None
            trusts the tokenizer's `model_max_length`.
        teacher_cache: cached teacher features, looked up by transcript.
        teacher_predictions: also read the teacher's predictions from `teacher_cache`.
        padding, pad_to_multiple_of, pad_to_multiple_of_labels: as in `processor.pad`.
    """

    processor: ProcessorMixin
    teacher_tokenizer: PreTrainedTokenizerBase | None = None
    teacher_max_length: int | None = None
    teacher_cache: TeacherFeatureCache | None = None
    teacher_predictions: bool = False
    padding: bool | str = "longest"
    pad_to_multiple_of: int | None = None
    pad_to_multiple_of_labels: int | None = None

    def __post_init__(self):
        if self.teacher_tokenizer is not None and self.teacher_cache is not None:
            raise ValueError("Give the collator a teacher_tokenizer or a teacher_cache, not both.")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_name = self.processor.feature_extractor.model_input_names[0]
        batch = self.processor.feature_extractor.pad(
            [{input_name: feature[input_name]} for feature in features],
            padding=self.padding,
            pad_to_multiple_of=self.pad_to_multiple_of,
            return_attention_mask=True,
            return_tensors="pt",
        )
        labels = self.processor.tokenizer.pad(
            [{"input_ids": feature[LABELS_COLUMN]} for feature in features],
            padding=self.padding,
            pad_to_multiple_of=self.pad_to_multiple_of_labels,
            return_tensors="pt",
        )
        batch["labels"] = labels["input_ids"].masked_fill(labels["attention_mask"].ne(1), -100)

        texts = [feature[TEXT_COLUMN] for feature in features]
        if self.teacher_tokenizer is not None:
            max_length = self.teacher_max_length or self.teacher_tokenizer.model_max_length
            teacher = tokenize_for_teacher(
                self.teacher_tokenizer, texts, max_length, padding=True, return_tensors="pt"
            )
            batch["teacher_input_ids"] = teacher["input_ids"]
            batch["teacher_attention_mask"] = teacher["attention_mask"]
        elif self.teacher_cache is not None:
            batch["teacher_hidden_states"], batch["teacher_token_mask"] = pad_token_features(
                [self.teacher_cache.load(text) for text in texts]
            )
            if self.teacher_predictions:
                ids, probs = zip(*(self.teacher_cache.load_predictions(text) for text in texts))
                batch["teacher_prediction_ids"] = torch.nn.utils.rnn.pad_sequence(ids, True, padding_value=-1)
                batch["teacher_prediction_probs"] = torch.nn.utils.rnn.pad_sequence(probs, True)
        return dict(batch)


def pad_token_features(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Stack per-utterance token features `[(M_b, D)]` into `(B, max M_b, D)` zero-padded features and
    a `(B, max M_b)` bool mask that is True on real tokens.
    """
    features = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)
    lengths = torch.tensor([len(sequence) for sequence in sequences])
    mask = torch.arange(features.shape[1])[None, :] < lengths[:, None]
    return features, mask


__all__ = ["DataCollatorCTCWithTeacher", "pad_token_features"]
