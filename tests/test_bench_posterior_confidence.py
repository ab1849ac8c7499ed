"""The confidence of CTC posteriors at the frames that write a character (benchmarks/bench_posterior_confidence.py),
on a hand-made posterior."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_posterior_confidence  # noqa: E402


def test_confidence_is_read_at_the_non_blank_frames_renormalised_without_the_blank():
    """Blank 0. Frame 0 is a blank frame (left out). Frame 1: 0.4 blank, 0.5 / 0.1 on symbols 1 / 2, so 5/6 and 1/6
    without the blank. Frame 2: 0.5 / 0.25 / 0.25 on symbols 1 / 2 / 3 (no blank mass)."""
    probs = torch.tensor(
        [[0.9, 0.05, 0.05, 0.0], [0.4, 0.5, 0.1, 0.0], [0.0, 0.5, 0.25, 0.25]],
    )
    top1, entropy = bench_posterior_confidence.nonblank_confidence(probs, blank=0)
    assert top1 == pytest.approx([5 / 6, 0.5])
    frame1 = -(5 / 6) * math.log(5 / 6) - (1 / 6) * math.log(1 / 6)
    frame2 = -0.5 * math.log(0.5) - 2 * 0.25 * math.log(0.25)
    assert entropy == pytest.approx([frame1, frame2])
