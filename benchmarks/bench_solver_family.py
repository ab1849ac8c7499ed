"""Time to accuracy of the unbalanced and the fused Gromov-Wasserstein solvers against POT's.

Problems: B utterances of N frames and M tokens (float32, no padding), random 64-d frame features
``h`` and token features ``z``, node cost ``C = cosine_cost(h, z)``, uniform weights ``mu = 1/N``,
``nu = 1/M``, entropic temperature ``lambda2 = 0.1``. Solvers, each timed on the same inputs:

``unbalanced``: entropic OT with KL penalties of weight ``tau`` (``--tau``, 1) on the marginals and
reference measure ``mu nu^T``, without order reward or temporal prior:

- ``tot_sinkhorn``  ``modeling_tot_cakt.tot.tot_sinkhorn(C, lambda1=0, sigma=None, lambda2=0.1, tau=tau,
  tol=t)``; it stops when the L1 residual of the marginals the updates aim at is below ``t``;
- ``pot.uot``       ``ot.unbalanced.sinkhorn_unbalanced(mu, nu, C_b, reg=0.1, reg_m=tau, reg_type="kl",
  stopThr=t)`` in a Python loop over the batch (torch backend), its default ``method="sinkhorn"``;
  it stops when the relative change of its scalings is below ``t``;
- ``pot.uot_stab``, ``pot.uot_ti``  the same with ``method="sinkhorn_stabilized"`` and
  ``"sinkhorn_translation_invariant"``.

The two formulations are the same problem (``tests/test_tot.py`` checks the plans to 1e-6 of their
largest entry). POT 0.9.7's ``ot.batch`` has no unbalanced solver (``solve_batch`` takes no marginal
relaxation), so there is no batched POT contender here.

``fused_gw``: entropic fused Gromov-Wasserstein, square loss, ``alpha = 0.5``, edge costs
``D_A = cosine_cost(h, h)`` and ``D_L = cosine_cost(z, z)`` (symmetrised), projected gradient from
``mu nu^T``:

- ``fused_gw_sinkhorn``  ``modeling_tot_cakt.tot.fused_gw_sinkhorn(C, D_A, D_L, alpha=0.5, lambda2=0.1,
  outer_tol=t, tol=t)``; outer iterations stop when the L1 change of the plan is below ``t``, inner
  Sinkhorn solves when their L1 marginal error is;
- ``pot.fgw``  ``ot.gromov.entropic_fused_gromov_wasserstein(C_b, D_A_b, D_L_b, mu, nu, epsilon=0.1,
  alpha=0.5, symmetric=True, tol=t / sqrt(N M), stopThr=t / sqrt(M))`` in a loop over the batch (torch
  backend): the same start and the same updates (``tests/test_tot_gw.py`` checks the iterates to 1e-11).
  Its outer test is the Frobenius norm of the plan change, every tenth iteration, and its inner one
  the L2 norm of the column error, so these thresholds bound the same L1 quantities by ``t``;
- ``pot.batch``  ``ot.batch.solve_gromov_batch(D_A, D_L, reg=0.1, M=C, alpha=0.5, symmetric=True)``.
  A different problem: each outer step solves ``min <M_k, T> + lambda2 KL(T || T_k)`` (a proximal
  point step), whose fixed points are those of *unregularised* fused GW, not the entropic plan. It
  cannot reach the reference below, so it is not calibrated: it runs exactly the outer iterations of
  the calibrated ``fused_gw_sinkhorn`` (``max_iter``, ``tol=0``) and as many inner iterations per outer
  one as that run used on average (``max_iter_inner``, ``tol_inner=0``). Its row gives the cost of the
  same iteration counts, its distance to the entropic plan and its objective, not a convergence error.

Both caps are shared: ``--max-iter`` (1000) Sinkhorn iterations per solve, ``--max-outer`` (100)
outer iterations.

Accuracy. The reference ``T_ref`` is the package solver's float64 plan at tight tolerances
(unbalanced: ``tol=1e-13``; fused GW: ``outer_tol=1e-11, tol=1e-12``), the plan POT's solvers converge
to (the tests above). A plan's error is ``max |T - T_ref|`` over the batch (``max|dT|``) and that over
the largest entry of ``T_ref`` (``rel err``). Each solver stops by its own rule at its threshold
``t``; before timing, ``t`` is calibrated for each solver and shape: the solver runs with
``t = 1e-1, 10^-1.5, ..., 1e-8`` in turn and keeps the first (loosest) whose plan has
``rel err <= --accuracy`` (1e-4). That ``t`` is the one timed, so every time is a time to the same
accuracy; ``NOT REACHED`` marks a solver that misses it at the tightest threshold (timed there). The
fused GW rows also give the objective ``(1 - alpha) <T, C> + alpha sum (D_A - D_L)^2 T T``
(``fused_gw_loss``, POT's ``fgw_dist``; no entropy term), averaged over the batch, in float64.

Timing and memory follow ``benchmarks/common.py`` (warm-up, interleaved rounds, median and minimum);
only the solver call is timed (costs are built before). ``x ours`` is a solver's median over that of
the package's solver for the same problem and shape, by wall clock and by process CPU time (with one
thread, the call's own work, which other processes on a shared machine disturb far less).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_solver_family.py --preset quick --out /tmp/solver_family.json
    python benchmarks/bench_solver_family.py --shapes 16x225x15 --problems fused_gw --repeats 3
"""

import argparse
import math
import os
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import ot
import ot.batch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from benchmarks.common import environment, round_robin, summary, write_json
from modeling_tot_cakt.tot import cosine_cost, fused_gw_loss, fused_gw_sinkhorn, tot_sinkhorn

PRESETS = {
    # (batch, frames, tokens): 20 ms frames of 4.5 s, 6 s and 20 s utterances.
    # quick takes about a minute on 2 CPU cores at one thread (calibration included).
    "quick": dict(shapes=[(16, 225, 15), (8, 300, 30), (8, 1000, 50)], repeats=7),
    "full": dict(shapes=[(16, 225, 15), (8, 300, 30), (32, 300, 30), (8, 1000, 50), (2, 1000, 100)], repeats=10),
}
PROBLEMS = ("unbalanced", "fused_gw")
OURS = {"unbalanced": "tot_sinkhorn", "fused_gw": "fused_gw_sinkhorn"}
FEATURE_DIM = 64
LAMBDA2, ALPHA = 0.1, 0.5
# Thresholds tried in calibration, loosest first: 1e-1, 10^-1.5, ..., 1e-8.
THRESHOLDS = tuple(10 ** (-k / 2) for k in range(2, 17))
REFERENCE_TOLERANCES = {
    "unbalanced": dict(max_iter=20000, tol=1e-13),
    "fused_gw": dict(max_outer=2000, outer_tol=1e-11, max_iter=20000, tol=1e-12),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", default=None, help="write the results to this JSON file")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--shapes", default=None, help="comma-separated BxNxM problem shapes (default: the preset's)")
    parser.add_argument("--problems", default=",".join(PROBLEMS), help=f"comma-separated subset of {PROBLEMS}")
    parser.add_argument(
        "--accuracy", type=float, default=1e-4, help="target largest |T - T_ref| over the largest entry of T_ref"
    )
    parser.add_argument("--tau", type=float, default=1.0, help="KL marginal penalty of the unbalanced problem")
    parser.add_argument("--max-iter", type=int, default=1000, help="Sinkhorn iteration cap of every solve")
    parser.add_argument("--max-outer", type=int, default=100, help="outer iteration cap of the fused GW solvers")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per solver (default: the preset's)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 keeps timings stable on a shared machine)"
    )
    return parser.parse_args(argv)


class Problem(NamedTuple):
    """Costs of one batch: node cost (B, N, M); edge costs (B, N, N) and (B, M, M) for fused GW, else None."""

    kind: str
    cost: torch.Tensor
    source_cost: torch.Tensor | None = None
    target_cost: torch.Tensor | None = None


def make_problem(kind, shape, device="cpu", dtype=torch.float32, seed=0):
    """Costs of random ``FEATURE_DIM``-d features (the same features for both kinds)."""
    batch, n_rows, n_cols = shape
    generator = torch.Generator().manual_seed(seed)
    frames = torch.randn(batch, n_rows, FEATURE_DIM, generator=generator, dtype=dtype).to(device)
    tokens = torch.randn(batch, n_cols, FEATURE_DIM, generator=generator, dtype=dtype).to(device)
    cost = cosine_cost(frames, tokens)
    if kind == "unbalanced":
        return Problem(kind, cost)

    def edges(features):
        distance = cosine_cost(features, features)
        return (distance + distance.transpose(1, 2)) / 2  # exactly symmetric, as the solvers assume

    return Problem(kind, cost, edges(frames), edges(tokens))


def uniform(length, like):
    return torch.full((length,), 1.0 / length, dtype=like.dtype, device=like.device)


def tot_unbalanced(problem, threshold, args, log=False):
    return tot_sinkhorn(
        problem.cost,
        lambda1=0.0,
        sigma=None,
        lambda2=LAMBDA2,
        tau=args.tau,
        max_iter=args.max_iter,
        tol=threshold,
        warn=False,
        log=log,
    )


def pot_unbalanced(method):
    def solve(problem, threshold, args):
        n_rows, n_cols = problem.cost.shape[1:]
        a, b = uniform(n_rows, problem.cost), uniform(n_cols, problem.cost)
        plans = [
            ot.unbalanced.sinkhorn_unbalanced(
                a,
                b,
                sample,
                LAMBDA2,
                args.tau,
                method=method,
                reg_type="kl",
                numItermax=args.max_iter,
                stopThr=threshold,
            )
            for sample in problem.cost
        ]
        return torch.stack(plans)

    return solve


def ours_fused_gw(problem, threshold, args, log=False):
    return fused_gw_sinkhorn(
        problem.cost,
        problem.source_cost,
        problem.target_cost,
        alpha=ALPHA,
        lambda2=LAMBDA2,
        max_outer=args.max_outer,
        outer_tol=threshold,
        max_iter=args.max_iter,
        tol=threshold,
        warn=False,
        log=log,
    )


def pot_fused_gw(problem, threshold, args):
    n_rows, n_cols = problem.cost.shape[1:]
    a, b = uniform(n_rows, problem.cost), uniform(n_cols, problem.cost)
    plans = [
        ot.gromov.entropic_fused_gromov_wasserstein(
            cost,
            source_cost,
            target_cost,
            a,
            b,
            epsilon=LAMBDA2,
            alpha=ALPHA,
            symmetric=True,
            max_iter=args.max_outer,
            tol=threshold / math.sqrt(n_rows * n_cols),  # Frobenius norm of the plan change <= its L1 norm
            numItermax=args.max_iter,
            stopThr=threshold / math.sqrt(n_cols),  # L2 norm of the column error <= its L1 norm
        )
        for cost, source_cost, target_cost in zip(problem.cost, problem.source_cost, problem.target_cost)
    ]
    return torch.stack(plans)


def pot_batch_fused_gw(problem, n_outer, inner_per_outer):
    """POT's batched proximal-point GW solver for exactly ``n_outer`` outer and ``inner_per_outer`` inner iterations."""
    result = ot.batch.solve_gromov_batch(
        problem.source_cost,
        problem.target_cost,
        reg=LAMBDA2,
        M=problem.cost,
        alpha=ALPHA,
        symmetric=True,
        max_iter=n_outer,
        tol=0.0,
        max_iter_inner=inner_per_outer,
        tol_inner=0.0,
        grad="detach",
    )
    return result.plan


SOLVERS = {
    "unbalanced": {
        "tot_sinkhorn": tot_unbalanced,
        "pot.uot": pot_unbalanced("sinkhorn"),
        "pot.uot_stab": pot_unbalanced("sinkhorn_stabilized"),
        "pot.uot_ti": pot_unbalanced("sinkhorn_translation_invariant"),
    },
    "fused_gw": {"fused_gw_sinkhorn": ours_fused_gw, "pot.fgw": pot_fused_gw},
}


def reference_plan(problem, args):
    """The package solver's float64 plan at ``REFERENCE_TOLERANCES``."""
    cost = problem.cost.double()
    if problem.kind == "unbalanced":
        tolerances = REFERENCE_TOLERANCES["unbalanced"]
        return tot_sinkhorn(cost, lambda1=0.0, sigma=None, lambda2=LAMBDA2, tau=args.tau, **tolerances)
    edges = problem.source_cost.double(), problem.target_cost.double()
    return fused_gw_sinkhorn(cost, *edges, alpha=ALPHA, lambda2=LAMBDA2, **REFERENCE_TOLERANCES["fused_gw"])


def fused_gw_objective(problem):
    """Plan -> ``fused_gw_loss`` in float64, averaged over the batch (POT's ``fgw_dist``)."""
    costs = problem.cost.double(), problem.source_cost.double(), problem.target_cost.double()
    return lambda plan: fused_gw_loss(plan.double(), *costs, ALPHA).item()


def plan_errors(plan, reference):
    """``plan_max_abs_error``: largest ``|T - T_ref|`` over the batch; ``plan_relative_error``: that over
    the largest entry of ``T_ref``."""
    largest = (plan.double() - reference.double()).abs().max().item()
    return dict(plan_max_abs_error=largest, plan_relative_error=largest / reference.abs().max().item())


def calibrate(solve, reference, accuracy):
    """The loosest threshold of ``THRESHOLDS`` at which ``solve(threshold)`` is within ``accuracy`` of
    ``reference`` (the tightest if none is), and the ``[threshold, relative error]`` pairs tried."""
    trace = []
    for threshold in THRESHOLDS:
        error = plan_errors(solve(threshold), reference)["plan_relative_error"]
        trace.append([threshold, error])
        if error <= accuracy:
            break
    return threshold, trace


def ours_iterations(problem, threshold, args):
    """Iterations of the package solver at ``threshold``: ``n_iter`` (inner, summed), and ``n_outer`` for fused GW."""
    solve = tot_unbalanced if problem.kind == "unbalanced" else ours_fused_gw
    _, log = solve(problem, threshold, args, log=True)
    return {key: log[key] for key in ("n_outer", "n_iter") if key in log}


def result_rows(kind, shape, timings, reference, accuracy, extras, objective=None):
    """One dict per solver of ``timings``: times, ratios to the package solver ``OURS[kind]``, plan errors.

    ``ratio_to_ours`` is a solver's median wall-clock time over that of ``OURS[kind]``,
    ``ratio_to_ours_cpu`` the same for the process CPU time. ``extras`` (solver -> dict) adds fields;
    ``objective`` (plan -> float), when given, adds the objective of the plan and of ``reference``.
    """
    ours_wall = summary(timings.wall[OURS[kind]])["median_s"]
    ours_cpu = summary(timings.cpu[OURS[kind]])["median_s"]
    rows = []
    for solver in timings.wall:
        times, cpu = summary(timings.wall[solver]), summary(timings.cpu[solver])
        errors = plan_errors(timings.results[solver], reference)
        peaks = [mib for mib in timings.peak_mib[solver] if mib is not None]
        row = dict(
            problem=kind,
            size=list(shape),
            solver=solver,
            **extras.get(solver, {}),
            **times,
            cpu_median_s=cpu["median_s"],
            cpu_times_s=cpu["times_s"],
            ratio_to_ours=times["median_s"] / ours_wall,
            ratio_to_ours_cpu=cpu["median_s"] / ours_cpu,
            peak_mib=max(peaks) if peaks else None,
            **errors,
            reached=errors["plan_relative_error"] <= accuracy,
        )
        if objective is not None:
            row["objective"] = objective(timings.results[solver])
            row["reference_objective"] = objective(reference)
        rows.append(row)
    return rows


def benchmark_shape(kind, shape, device, args):
    """Calibrate and time every solver of ``kind`` on one shape; return one result dict per solver."""
    problem = make_problem(kind, shape, device)
    reference = reference_plan(problem, args)
    calls, extras = {}, {}
    for solver, solve in SOLVERS[kind].items():
        threshold, trace = calibrate(lambda t, solve=solve: solve(problem, t, args), reference, args.accuracy)
        calls[solver] = lambda solve=solve, threshold=threshold: solve(problem, threshold, args)
        extras[solver] = dict(threshold=threshold, calibration=trace)
    ours = OURS[kind]
    extras[ours]["iterations"] = ours_iterations(problem, extras[ours]["threshold"], args)
    if kind == "fused_gw":
        counts = extras[ours]["iterations"]
        n_outer, inner = counts["n_outer"], math.ceil(counts["n_iter"] / counts["n_outer"])
        calls["pot.batch"] = lambda: pot_batch_fused_gw(problem, n_outer, inner)
        extras["pot.batch"] = dict(
            threshold=None,
            iterations=dict(n_outer=n_outer, n_iter=n_outer * inner),
            note="proximal point (unregularised fused GW): the iteration counts of fused_gw_sinkhorn, not calibrated",
        )
    timings = round_robin(calls, args.repeats, device)
    objective = fused_gw_objective(problem) if kind == "fused_gw" else None
    return result_rows(kind, shape, timings, reference, args.accuracy, extras, objective)


# Columns of the printed table: title and width (negative: left-aligned).
COLUMNS = (
    ("B", 3), ("N", 5), ("M", 4), ("problem", -10), ("solver", -17), ("threshold", 9), ("median ms", 10),
    ("min ms", 9), ("x ours", 7), ("CPU ms", 9), ("x ours(CPU)", 11), ("peak MiB", 9), ("max|dT|", 9),
    ("rel err", 9), ("objective", 10),
)  # fmt: skip


def table_line(cells):
    return " ".join(
        f"{cell:<{-width}}" if width < 0 else f"{cell:>{width}}" for cell, (_, width) in zip(cells, COLUMNS)
    )


def format_table(rows):
    """The rows as a table; after the package's fused GW solver, the reference plan's objective."""
    header = table_line([title for title, _ in COLUMNS])
    lines = [header, "-" * (len(header) + 15)]
    for row in rows:
        threshold = "fixed it." if row["threshold"] is None else f"{row['threshold']:.1e}"
        flag = "  NOT REACHED" if not row["reached"] else ""
        if row["solver"] == "pot.batch":
            flag = "  other problem, same iterations"
        cells = [
            *row["size"],
            row["problem"],
            row["solver"],
            threshold,
            f"{row['median_s'] * 1e3:.1f}",
            f"{row['min_s'] * 1e3:.1f}",
            f"{row['ratio_to_ours']:.2f}",
            f"{row['cpu_median_s'] * 1e3:.1f}",
            f"{row['ratio_to_ours_cpu']:.2f}",
            f"{row['peak_mib']:.1f}",
            f"{row['plan_max_abs_error']:.1e}",
            f"{row['plan_relative_error']:.1e}",
            f"{row['objective']:.6f}" if "objective" in row else "",
        ]
        lines.append(table_line(cells) + flag)
        if row["solver"] == OURS["fused_gw"]:
            objective = f"{row['reference_objective']:.6f}"
            blank = [""] * (len(COLUMNS) - 6)
            lines.append(table_line([*row["size"], row["problem"], "reference (f64)", *blank, objective]))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # Non-convergence at loose thresholds is expected during calibration; the plan errors report it.
    warnings.filterwarnings("ignore", module=r"ot(\.|$)")
    device = torch.device(args.device)
    preset = PRESETS[args.preset]
    args.repeats = args.repeats or preset["repeats"]
    shapes = (
        [tuple(int(size) for size in shape.split("x")) for shape in args.shapes.split(",")]
        if args.shapes
        else preset["shapes"]
    )
    problems = args.problems.split(",")
    unknown = set(problems) - set(PROBLEMS)
    if unknown:
        raise SystemExit(f"unknown problem(s) {sorted(unknown)}; choose from {PROBLEMS}")
    meta = dict(
        preset=args.preset,
        **environment(device, args.threads),
        pot=ot.__version__,
        accuracy=args.accuracy,
        thresholds=list(THRESHOLDS),
        reference_tolerances=REFERENCE_TOLERANCES,
        max_iter=args.max_iter,
        max_outer=args.max_outer,
        repeats=args.repeats,
        feature_dim=FEATURE_DIM,
        lambda2=LAMBDA2,
        tau=args.tau,
        alpha=ALPHA,
        pot_batch_unbalanced=None,
        pot_batch_unbalanced_note="POT's ot.batch has no unbalanced solver (solve_batch takes no marginal relaxation)",
        ratio="median time / median time of the package solver for the same problem and shape (wall clock; "
        "ratio_to_ours_cpu: process CPU time)",
        plan_relative_error="largest |T - T_ref| over the batch / largest entry of T_ref (T_ref: the package "
        "solver in float64 at reference_tolerances)",
        threshold="each solver's own stopping threshold, the loosest of `thresholds` reaching `accuracy` "
        "(calibration: the [threshold, relative error] pairs tried)",
        objective="fused_gw_loss (POT's fgw_dist, no entropy term) of the plan, float64, mean over the batch",
        peak_mib="CPU: growth of peak RSS (VmHWM) over RSS before the call, after malloc_trim; "
        "CUDA: max_memory_allocated over memory_allocated before the call",
    )
    rows = []
    for shape in shapes:
        for kind in problems:
            results = benchmark_shape(kind, shape, device, args)
            print(format_table(results) if not rows else format_table(results).split("\n", 2)[2], flush=True)
            rows.extend(results)
    print()
    print(format_table(rows))
    meta["load_average_after"] = os.getloadavg()[0]
    if args.out:
        write_json(args.out, meta, rows)


if __name__ == "__main__":
    main()
