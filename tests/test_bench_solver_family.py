"""The solver-family benchmark's bookkeeping: the settings that make its solvers solve the same problem,
plan errors, threshold calibration and the time ratios it reports (the timings themselves are benchmarks)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_solver_family as bench  # noqa: E402
from common import Timings, write_json  # noqa: E402

TINY = (2, 12, 5)
# Tight enough that every solver is at its fixed point in float64; the caps leave room for it.
TIGHT_ARGS = ["--max-iter", "200000", "--max-outer", "2000"]


def relative_error(plan, other):
    return bench.plan_errors(plan, other)["plan_relative_error"]


def test_unbalanced_solvers_reach_the_same_plan_in_float64():
    """tot_sinkhorn with tau, lambda1 = 0 and no prior is POT's sinkhorn_unbalanced (reg_type "kl") for every
    POT method the benchmark times; the reference is that plan. tau = 0.5, not the default, so that a solver
    given another relaxation would differ."""
    args = bench.parse_args([*TIGHT_ARGS, "--tau", "0.5"])
    problem = bench.make_problem("unbalanced", TINY, dtype=torch.float64)
    ours = bench.tot_unbalanced(problem, 1e-13, args)
    reference = bench.reference_plan(problem, args)
    assert relative_error(ours, reference) < 1e-10
    for solver in ("pot.uot", "pot.uot_stab", "pot.uot_ti"):
        assert relative_error(bench.SOLVERS["unbalanced"][solver](problem, 1e-15, args), ours) < 1e-6, solver
    # tau matters: a different relaxation is a different plan, which the comparison must see.
    other = bench.tot_unbalanced(problem, 1e-13, bench.parse_args(TIGHT_ARGS))
    assert relative_error(other, ours) > 1e-3


def test_fused_gw_solvers_reach_the_same_plan_in_float64():
    args = bench.parse_args(TIGHT_ARGS)
    problem = bench.make_problem("fused_gw", TINY, dtype=torch.float64)
    ours = bench.ours_fused_gw(problem, 1e-12, args)
    assert relative_error(ours, bench.reference_plan(problem, args)) < 1e-8
    assert relative_error(bench.pot_fused_gw(problem, 1e-12, args), ours) < 1e-6
    objective = bench.fused_gw_objective(problem)
    assert objective(bench.pot_fused_gw(problem, 1e-12, args)) == pytest.approx(objective(ours), abs=1e-10)


def test_plan_errors_are_the_largest_entry_difference_absolute_and_relative():
    reference = torch.rand(3, 6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plan = reference.clone()
    plan[1, 2, 3] += 2e-3
    plan[2, 0, 0] -= 5e-4
    errors = bench.plan_errors(plan.float(), reference)
    assert errors["plan_max_abs_error"] == pytest.approx(2e-3, rel=1e-4)  # float32 rounding of the plan
    assert errors["plan_relative_error"] == pytest.approx(2e-3 / reference.max().item(), rel=1e-4)


def test_calibration_keeps_the_loosest_threshold_within_the_accuracy():
    reference = torch.ones(1, 2, 2, dtype=torch.float64)
    calls = []

    def solve(threshold):  # relative error 0.005 * threshold: 1e-2 is the loosest threshold within 1e-4
        calls.append(threshold)
        return reference + 0.005 * threshold

    threshold, trace = bench.calibrate(solve, reference, accuracy=1e-4)
    assert threshold == pytest.approx(1e-2)
    assert calls == list(bench.THRESHOLDS[:3])
    assert [t for t, _ in trace] == calls and trace[-1][1] == pytest.approx(5e-5)
    threshold, trace = bench.calibrate(lambda t: reference + 1.0, reference, accuracy=1e-4)
    assert threshold == bench.THRESHOLDS[-1] and len(trace) == len(bench.THRESHOLDS)  # never reached: tightest


def test_ratios_are_medians_over_the_package_solvers_median(tmp_path):
    """Medians 4 / 2 by wall clock and 2.1 / 0.7 by CPU time; the mean, the minimum, the inverse or the
    first solver as the base would all give other numbers."""
    reference = torch.full((1, 3, 2), 0.1, dtype=torch.float64)
    close, far = reference.clone(), reference.clone()
    close[0, 0, 0] += 5e-6  # relative error 5e-5: within 1e-4
    far[0, 1, 1] += 3e-5  # 3e-4: not
    timings = Timings(
        wall={"pot.uot": [3.0, 10.0, 4.0], "tot_sinkhorn": [1.0, 5.0, 2.0]},
        cpu={"pot.uot": [2.1, 1.4, 9.9], "tot_sinkhorn": [0.5, 0.9, 0.7]},
        peak_mib={"pot.uot": [1.0, 3.0, 2.0], "tot_sinkhorn": [4.0, None, 5.0]},
        results={"pot.uot": far, "tot_sinkhorn": close},
    )
    extras = {"pot.uot": dict(threshold=1e-3)}
    rows = bench.result_rows("unbalanced", TINY, timings, reference, 1e-4, extras)
    write_json(str(tmp_path / "out.json"), {}, rows)
    pot, ours = json.loads((tmp_path / "out.json").read_text())["results"]
    assert (pot["solver"], ours["solver"]) == ("pot.uot", "tot_sinkhorn")
    assert pot["ratio_to_ours"] == pytest.approx(2.0, rel=1e-12)
    assert pot["ratio_to_ours_cpu"] == pytest.approx(3.0, rel=1e-12)
    assert ours["ratio_to_ours"] == 1.0 and ours["ratio_to_ours_cpu"] == 1.0
    assert (pot["median_s"], pot["min_s"], pot["cpu_median_s"]) == (4.0, 3.0, 2.1)
    assert (pot["peak_mib"], ours["peak_mib"]) == (3.0, 5.0)
    assert pot["threshold"] == 1e-3
    assert pot["plan_relative_error"] == pytest.approx(3e-4) and not pot["reached"]
    assert ours["plan_relative_error"] == pytest.approx(5e-5) and ours["reached"]


def test_a_tiny_run_reaches_the_accuracy_and_writes_every_row(tmp_path, capsys):
    out = tmp_path / "family.json"
    bench.main(["--shapes", "2x12x4", "--repeats", "1", "--out", str(out)])
    meta, rows = json.loads(out.read_text()).values()
    assert meta["accuracy"] == 1e-4 and meta["pot_batch_unbalanced"] is None
    solvers = {(row["problem"], row["solver"]): row for row in rows}
    assert set(solvers) == {
        ("unbalanced", "tot_sinkhorn"),
        ("unbalanced", "pot.uot"),
        ("unbalanced", "pot.uot_stab"),
        ("unbalanced", "pot.uot_ti"),
        ("fused_gw", "fused_gw_sinkhorn"),
        ("fused_gw", "pot.fgw"),
        ("fused_gw", "pot.batch"),
    }
    for (problem, solver), row in solvers.items():
        assert len(row["times_s"]) == 1
        if solver == "pot.batch":  # not the entropic problem: fixed iteration counts, no threshold
            assert row["threshold"] is None and row["plan_relative_error"] > 1e-2
            assert row["iterations"]["n_outer"] == solvers[problem, "fused_gw_sinkhorn"]["iterations"]["n_outer"]
            continue
        assert row["reached"] and row["plan_relative_error"] <= 1e-4, solver
        assert row["threshold"] == row["calibration"][-1][0]
        if problem == "fused_gw":
            assert row["objective"] == pytest.approx(row["reference_objective"], rel=1e-4)
    assert solvers["fused_gw", "fused_gw_sinkhorn"]["ratio_to_ours"] == 1.0
    assert "reference (f64)" in capsys.readouterr().out
