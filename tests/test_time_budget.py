"""The wall-clock training budget stops the Trainer at a step boundary, with the end-of-training evaluation and save."""

import numpy as np
import pytest
from datasets import Dataset
from tiny_models import make_model, make_processor

from modeling_tot_cakt.training import time_budget
from modeling_tot_cakt.training.collator import DataCollatorCTCWithTeacher
from modeling_tot_cakt.training.trainer import TOTCAKTTrainer, TOTCAKTTrainingArguments


class Clock:
    """A monotonic clock that advances by `step` seconds at each reading."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_training_stops_at_the_first_step_after_the_budget_and_saves(tmp_path, monkeypatch):
    # 1 s of "training" per clock reading: the budget of 3.5 s is spent at the fourth step end.
    monkeypatch.setattr(time_budget.time, "monotonic", Clock(1.0))
    model = make_model(alignment="none")
    processor = make_processor(tmp_path, model)
    rng = np.random.default_rng(0)
    row = {"labels": processor.tokenizer("你好").input_ids, "input_length": 4000, "text": "你好"}
    rows = [{**row, "input_values": rng.standard_normal(4000).astype(np.float32)} for _ in range(4)]
    args = TOTCAKTTrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=50,
        max_train_seconds=3.5,
        per_device_train_batch_size=2,
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,
        save_strategy="steps",
        save_steps=100,
        eval_strategy="no",
        train_sampling_strategy="random",
    )
    trainer = TOTCAKTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=DataCollatorCTCWithTeacher(processor),
    )
    (budget,) = [
        callback
        for callback in trainer.callback_handler.callbacks
        if isinstance(callback, time_budget.TrainingTimeBudget)
    ]
    trainer.train()
    # Readings: train begin at 1, step ends at 2, 3, 4, 5 -> 4 s spent after step 4 (> 3.5).
    assert trainer.state.global_step == budget.stopped_at_step == 4
    assert (tmp_path / "out" / "checkpoint-4" / "trainer_state.json").is_file()  # saved as a last step would be


def test_budget_must_be_positive():
    with pytest.raises(ValueError, match="max_train_seconds must be positive"):
        time_budget.TrainingTimeBudget(0)
