"""A wall-clock budget for training: stop cleanly at a step boundary when the time is spent."""

from __future__ import annotations

import logging
import time

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class TrainingTimeBudget(TrainerCallback):
    """
    Stops training at the first optimizer-step boundary after `seconds` of this run's training (periodic
    evaluations included), as if it were the last step: the Trainer then evaluates and saves where the
    arguments ask for it at the end, and `load_best_model_at_end` restores the best checkpoint as usual. A fixed
    `max_steps` cannot promise a time on machines whose speed differs twofold; this can. The budget is per run: a
    resumed run has it afresh. Under DDP the processes agree (one all-reduce a step), so they stop at the same step.

    Attributes:
        stopped_at_step: the step training stopped at because of the budget, or None.
    """

    def __init__(self, seconds: float):
        if not seconds > 0:
            raise ValueError(f"max_train_seconds must be positive, got {seconds}.")
        self.seconds = seconds
        self.started: float | None = None
        self.stopped_at_step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        spent = time.monotonic() - self.started >= self.seconds
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([float(spent)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            spent = bool(flag.item())
        if not spent or state.global_step >= state.max_steps:
            return
        self.stopped_at_step = state.global_step
        control.should_training_stop = True
        control.should_evaluate = args.eval_strategy != "no"
        control.should_save = args.save_strategy != "no"
        logger.warning(
            f"The training time budget of {self.seconds:.0f} s is spent: stopping at step {state.global_step} of "
            f"{state.max_steps}."
        )
