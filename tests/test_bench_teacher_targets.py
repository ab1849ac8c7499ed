"""The character-identity share of teacher targets (benchmarks/bench_teacher_targets.py) on a hand-made example."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_teacher_targets  # noqa: E402


def test_identity_share_on_a_hand_made_example():
    """Character 7 twice at (1, 0); character 3 at (0, 2) and (2, 0); character 9 once (left out). Means (1, 0) and
    (1, 1): within-character sum of squares 4, total 5 about the mean (1, 0.5), so R^2 = 0.2; the pairs' cosines are
    1 (character 7) and 0 (character 3)."""
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0], [2.0, 0.0], [5.0, 5.0]])
    ids = torch.tensor([7, 3, 7, 3, 9])
    share = bench_teacher_targets.identity_share(features, ids)
    assert share["r2_character_identity"] == pytest.approx(0.2)
    assert share["cosine_same_character"] == pytest.approx(0.5)
    assert (share["positions"], share["characters"]) == (4, 2)
    # Unit vectors (1, 0) three times and (0, 1) once: of the 6 pairs, the 3 among the first three have cosine 1.
    assert share["cosine_any_two_positions"] == pytest.approx(0.5)
