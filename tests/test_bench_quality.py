"""The quality benchmark's summary statistics (the training runs themselves are benchmarks, not tests)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_quality  # noqa: E402


def run(alignment, seed, dev, test, curve):
    return {"alignment": alignment, "seed": seed, "dev_cer": dev, "test_cer": test, "dev_cer_by_step": curve}


RUNS = [
    run("none", 0, 0.60, 0.50, [[1000, 0.9], [2000, 0.7], [3000, 0.6]]),
    run("none", 1, 0.50, 0.40, [[1000, 0.8], [2000, 0.6], [3000, 0.5]]),
    run("tot", 0, 0.40, 0.30, [[1000, 0.7], [2000, 0.5], [3000, 0.4]]),
    run("tot", 1, 0.60, 0.50, [[1000, 0.9], [2000, 0.8], [3000, 0.6]]),
]


def test_steps_to_reach():
    curve = [[1000, 0.9], [2000, 0.55], [3000, 0.5]]
    assert bench_quality.steps_to_reach(curve, 0.55) == 2000
    assert bench_quality.steps_to_reach(curve, 0.5) == 3000
    assert bench_quality.steps_to_reach(curve, 0.4) is None


def test_summary_mean_std_and_steps_to_ctc_only_final_cer():
    summary = bench_quality.summarise(RUNS, target_cer=None)
    assert summary["target_dev_cer"] == pytest.approx(0.55)
    assert set(summary["methods"]) == {"none", "tot"}  # no OT-CAKT runs: no entry, no crash
    none, tot = summary["methods"]["none"], summary["methods"]["tot"]
    assert none["dev_cer"]["mean"] == pytest.approx(0.55) and none["dev_cer"]["n"] == 2
    assert none["dev_cer"]["std"] == pytest.approx(0.0707107, abs=1e-6)  # sample std (ddof=1)
    assert tot["test_cer"]["mean"] == pytest.approx(0.40)
    assert none["steps_to_target"] == [None, 3000] and none["runs_reaching_target"] == 1
    assert tot["steps_to_target"] == [2000, None] and tot["runs_reaching_target"] == 1
    assert bench_quality.summarise(RUNS, target_cer=0.75)["methods"]["tot"]["steps_to_target"] == [1000, 3000]


def test_curves_plot(tmp_path):
    summary = bench_quality.summarise(RUNS, target_cer=None)
    bench_quality.plot_curves(RUNS, summary, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
