"""Evaluation through `TOTCAKTTrainer` + `CTCCharacterErrorRate`, as `train_hf.py` runs it, on a model whose
CTC outputs are set by hand: the character error rate must read each utterance's valid frames only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from test_model_wiring import valid_frames
from tiny_models import make_model, make_processor
from transformers import TrainingArguments

from modeling_tot_cakt.training.collator import DataCollatorCTCWithTeacher
from modeling_tot_cakt.training.trainer import CTCCharacterErrorRate, TOTCAKTTrainer

SAMPLES = (8000, 5000)  # 398 and 248 output frames: the second utterance has 150 padded frames
REFERENCES = ("你好大", "中国")
# Greedy frame labels per utterance, as (first frame, last frame + 1, character); other frames are blank.
# The first decodes to 你好 (大 is missed: 1 deletion); the second to 中国 on its valid frames, while its
# padded frames say 人, which would read as one inserted character.
FRAME_LABELS = (
    ((0, 100, "你"), (200, 300, "好")),
    ((0, 100, "中"), (150, valid_frames(5000), "国"), (valid_frames(5000), valid_frames(8000), "人")),
)
EXPECTED_CER = 1 / 5  # 1 deletion over 5 reference characters; 2 / 5 if padding were read


def hand_made_logits(tokenizer, frames: int, vocab_size: int) -> torch.Tensor:
    """Logits `(2, frames, vocab_size)` whose argmax follows FRAME_LABELS (blank elsewhere)."""
    ids = torch.full((len(FRAME_LABELS), frames), tokenizer.pad_token_id)
    for row, spans in enumerate(FRAME_LABELS):
        for start, stop, character in spans:
            ids[row, start:stop] = tokenizer.convert_tokens_to_ids(character)
    return 10.0 * torch.nn.functional.one_hot(ids, vocab_size).float()


@pytest.fixture()
def evaluation(tmp_path):
    """A trainer over a model whose CTC head outputs the hand-made logits, and the evaluation rows."""
    torch.manual_seed(0)
    model = make_model(alignment="none").eval()
    processor = make_processor(tmp_path, model)
    tokenizer = processor.tokenizer

    def replace_logits(module, args, output):
        return hand_made_logits(tokenizer, output.shape[1], output.shape[2])

    model.lm_head.register_forward_hook(replace_logits)
    rng = np.random.default_rng(0)
    rows = [
        {
            "input_values": (0.5 * rng.standard_normal(samples)).astype(np.float32),
            "labels": tokenizer(text).input_ids,
            "text": text,
            "input_length": samples,
        }
        for samples, text in zip(SAMPLES, REFERENCES)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_eval_batch_size=2,  # one batch: the shorter utterance is padded
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,
    )
    trainer = TOTCAKTTrainer(
        model=model,
        args=args,
        data_collator=DataCollatorCTCWithTeacher(processor),
        compute_metrics=CTCCharacterErrorRate(tokenizer),
    )
    return trainer, Dataset.from_list(rows), tokenizer


def test_evaluation_cer_reads_only_valid_frames(evaluation):
    trainer, dataset, _ = evaluation
    assert trainer.evaluate(dataset)["eval_cer"] == pytest.approx(EXPECTED_CER)


def test_predictions_are_masked_beyond_each_utterances_frames(evaluation):
    trainer, dataset, tokenizer = evaluation
    result = trainer.predict(dataset)
    long_frames, short_frames = valid_frames(SAMPLES[0]), valid_frames(SAMPLES[1])
    assert result.predictions.shape == (2, long_frames)
    assert (result.predictions[1, short_frames:] == -100).all()
    assert (result.predictions[0] != -100).all() and (result.predictions[1, :short_frames] != -100).all()
    guo = tokenizer.convert_tokens_to_ids("国")
    assert (result.predictions[1, 150:short_frames] == guo).all()
    assert result.metrics["test_cer"] == pytest.approx(EXPECTED_CER)
