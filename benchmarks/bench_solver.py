"""Time to accuracy of the batched TOT solver against POT, forward and forward + backward.

Every solver runs until its coupling's L1 marginal error (both marginals, total mass 1) is at most
``--accuracy`` (1e-4) for every utterance of the batch, or until its iteration cap. Problem: B
utterances of N frames and M tokens (float32, no padding, so that POT's batched solver applies),
cosine cost of random 64-d features, the default TOT parameters (lambda1 = 1, lambda2 = 0.1,
sigma = 1). Solvers:

- ``tot[envelope]``      ``modeling_tot_cakt.tot.tot_sinkhorn`` (default ``grad="envelope"``),
  ``tol=accuracy``, its default ``max_iter`` (1000);
- ``tot[autodiff]``      the same with backpropagation through the iterations (forward + backward only);
- ``pot.sinkhorn_log``   ``ot.sinkhorn(a, b, C', lambda2, method="sinkhorn_log")`` in a Python loop
  over the batch (torch backend);
- ``pot.sinkhorn_stab``  the same with ``method="sinkhorn_stabilized"``;
- ``pot.batch``          ``ot.batch.solve_batch(C', reg=lambda2, method="log_sinkhorn", reg_type="kl")``.

POT solves plain entropic OT, so it is given the equivalent cost ``C' = C - S - lambda2 log P``
(built inside the timed call). POT's stopping rules measure the L2 norm of one marginal's error,
so their thresholds are set to ``accuracy / sqrt(length)``, which bounds the L1 error by
``accuracy``; their cap is ``--pot-max-iter``. A solver that ends above the accuracy is marked
``NOT REACHED`` and its time is the time at its cap (its ratio is then a lower bound).

``forward``: cost of the features and the coupling. ``forward+backward``: the same, then the
transport cost ``<T, C>`` backpropagated to the features. POT's couplings are computed without a
graph and then enter the same ``<T, C>`` (the envelope gradient, as ``tot[envelope]``; in POT 0.9.7
``ot.batch``'s own "envelope" mode records the iterations).

Timing and memory follow ``benchmarks/common.py`` (warm-up, interleaved rounds, median and minimum).
``x ours`` is a solver's median over that of ``tot[envelope]`` in the same shape and mode, by wall
clock and by process CPU time (with one thread, the call's own work, which other processes on a
shared machine disturb far less).

``--convergence`` instead counts the iterations ``tot_sinkhorn`` (defaults) needs to reach the
accuracy over a grid of lengths, several seeds each (no timing).

Usage::

    python benchmarks/bench_solver.py --preset quick --device cpu --out docs/results/solver.json
    python benchmarks/bench_solver.py --convergence --out docs/results/solver_convergence.json
"""

import argparse
import functools
import math
import os
import sys
from pathlib import Path

import ot
import ot.batch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from benchmarks.common import environment, round_robin, summary, write_json
from modeling_tot_cakt.tot import cosine_cost, order_reward, ot_loss, temporal_prior_log, tot_sinkhorn

PRESETS = {
    # (batch, frames, tokens): 20 ms frames of 4.5 s and 20 s utterances, and 6 s ones in a larger batch.
    # quick takes a few minutes on 2 CPU cores, most of it in the POT loops.
    "quick": dict(shapes=[(16, 225, 15), (8, 1000, 50), (32, 300, 30)], repeats=3),
    "full": dict(shapes=[(16, 225, 15), (8, 1000, 50), (32, 300, 30), (2, 1000, 100), (64, 200, 20)], repeats=5),
}
MODES = ("forward", "forward+backward")
SOLVERS = ("tot[envelope]", "tot[autodiff]", "pot.sinkhorn_log", "pot.sinkhorn_stab", "pot.batch")
REFERENCE = "tot[envelope]"
FEATURE_DIM = 64
LAMBDA1, LAMBDA2, SIGMA = 1.0, 0.1, 1.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", default=None, help="write the results to this JSON file")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--shapes", default=None, help="comma-separated BxNxM problem shapes (default: the preset's)")
    parser.add_argument("--accuracy", type=float, default=1e-4, help="target L1 marginal error")
    parser.add_argument("--pot-max-iter", type=int, default=1000, help="iteration cap of the POT solvers")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per solver (default: the preset's)")
    parser.add_argument(
        "--convergence", action="store_true", help="count iterations to the accuracy over a grid instead of timing"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 keeps timings stable on a shared machine)"
    )
    return parser.parse_args(argv)


def equivalent_cost(cost):
    """``C - S - lambda2 * log P``: TOT as plain entropic OT, for POT."""
    batch, n_rows, n_cols = cost.shape
    rows = torch.ones(batch, n_rows, dtype=torch.bool, device=cost.device)
    cols = torch.ones(batch, n_cols, dtype=torch.bool, device=cost.device)
    return cost - order_reward(rows, cols, LAMBDA1) - LAMBDA2 * temporal_prior_log(rows, cols, SIGMA)


def marginal_error(coupling):
    """L1 error of both marginals of each uniform-marginal coupling (B, N, M) -> (B,)."""
    _, n_rows, n_cols = coupling.shape
    return (coupling.sum(dim=2) - 1 / n_rows).abs().sum(dim=1) + (coupling.sum(dim=1) - 1 / n_cols).abs().sum(dim=1)


def tot_coupling(cost, accuracy, pot_max_iter, grad):
    """Ours; stops at ``tol = accuracy`` (its error is the L1 marginal error of the coupling it returns)."""
    return tot_sinkhorn(cost, lambda1=LAMBDA1, lambda2=LAMBDA2, sigma=SIGMA, tol=accuracy, grad=grad)


def pot_loop_coupling(method):
    def solve(cost, accuracy, pot_max_iter):
        with torch.no_grad():
            effective = equivalent_cost(cost)
            n_rows, n_cols = cost.shape[1:]
            a = torch.full((n_rows,), 1.0 / n_rows, device=cost.device)
            b = torch.full((n_cols,), 1.0 / n_cols, device=cost.device)
            threshold = accuracy / math.sqrt(n_cols)  # its error: L2 norm of the column marginal's
            plans = [
                ot.sinkhorn(a, b, sample, LAMBDA2, method=method, numItermax=pot_max_iter, stopThr=threshold)
                for sample in effective
            ]
            return torch.stack(plans)

    return solve


def pot_batch_coupling(cost, accuracy, pot_max_iter):
    with torch.no_grad():
        threshold = accuracy / math.sqrt(cost.shape[1])  # its error: L2 norm of the row marginal's
        result = ot.batch.solve_batch(
            equivalent_cost(cost),
            reg=LAMBDA2,
            max_iter=pot_max_iter,
            tol=threshold,
            method="log_sinkhorn",
            reg_type="kl",
            grad="detach",
        )
        return result.plan


COUPLINGS = {
    "tot[envelope]": functools.partial(tot_coupling, grad="envelope"),
    "tot[autodiff]": functools.partial(tot_coupling, grad="autodiff"),
    "pot.sinkhorn_log": pot_loop_coupling("sinkhorn_log"),
    "pot.sinkhorn_stab": pot_loop_coupling("sinkhorn_stabilized"),
    "pot.batch": pot_batch_coupling,
}


def step(solver, mode, source, target, accuracy, pot_max_iter):
    """One timed call: cost, coupling and, for ``forward+backward``, ``<T, C>`` backpropagated."""
    cost = cosine_cost(source, target)
    coupling = COUPLINGS[solver](cost, accuracy, pot_max_iter)
    if mode == "forward+backward":
        ot_loss(coupling, cost).backward()
    return coupling.detach()


def benchmark_shape(shape, mode, device, args):
    """Time every solver of ``mode`` on one shape; return one result dict per solver."""
    batch, n_rows, n_cols = shape
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(batch, n_rows, FEATURE_DIM, generator=generator).to(device)
    source.requires_grad_(mode == "forward+backward")
    target = torch.randn(batch, n_cols, FEATURE_DIM, generator=generator).to(device)
    solvers = [solver for solver in SOLVERS if not (solver == "tot[autodiff]" and mode == "forward")]

    def reset_gradient(solver):
        source.grad = None

    calls = {
        solver: (lambda solver=solver: step(solver, mode, source, target, args.accuracy, args.pot_max_iter))
        for solver in solvers
    }
    timings = round_robin(calls, args.repeats, device, setup=reset_gradient)
    reference = summary(timings.wall[REFERENCE])["median_s"]
    reference_cpu = summary(timings.cpu[REFERENCE])["median_s"]
    rows = []
    for solver in solvers:
        times = summary(timings.wall[solver])
        cpu = summary(timings.cpu[solver])
        error = marginal_error(timings.results[solver]).max().item()
        rows.append(
            dict(
                size=list(shape),
                mode=mode,
                solver=solver,
                **times,
                cpu_median_s=cpu["median_s"],
                cpu_times_s=cpu["times_s"],
                ratio_to_ours=times["median_s"] / reference,
                ratio_to_ours_cpu=cpu["median_s"] / reference_cpu,
                peak_mib=max(timings.peak_mib[solver]),
                marginal_error=error,
                reached=error <= args.accuracy,
            )
        )
    return rows


CONVERGENCE_GRID = dict(
    frames=(30, 100, 225, 500, 1000),
    tokens=(5, 15, 30, 50, 100),
    batch=4,
    seeds=(0, 1, 2),
    features=("random 64-d", "aligned 4-d"),
)


def grid_features(kind, n_rows, n_cols, generator):
    """Frames (B, N, D) and tokens (B, M, D): independent random 64-d features (an untrained model), or
    4-d token features with each frame a noisy copy of the token at its relative position (a trained
    model's: the cost then spans [0, 2] along the band, the stiffer problem)."""
    batch = CONVERGENCE_GRID["batch"]
    if kind == "random 64-d":
        source = torch.randn(batch, n_rows, FEATURE_DIM, generator=generator)
        return source, torch.randn(batch, n_cols, FEATURE_DIM, generator=generator)
    target = torch.randn(batch, n_cols, 4, generator=generator)
    source = target[:, torch.arange(n_rows) * n_cols // n_rows]
    return source + 0.5 * torch.randn(source.shape, generator=generator), target


def convergence_grid(accuracy):
    """Iterations and final error of ``tot_sinkhorn`` with its defaults, for each feature kind, (N, M) of
    the grid and seed (a batch of ``CONVERGENCE_GRID["batch"]`` problems each)."""
    rows = []
    for kind in CONVERGENCE_GRID["features"]:
        for n_rows in CONVERGENCE_GRID["frames"]:
            for n_cols in CONVERGENCE_GRID["tokens"]:
                for seed in CONVERGENCE_GRID["seeds"]:
                    source, target = grid_features(kind, n_rows, n_cols, torch.Generator().manual_seed(seed))
                    _, log = tot_sinkhorn(cosine_cost(source, target), tol=accuracy, log=True)
                    rows.append(
                        dict(
                            features=kind,
                            frames=n_rows,
                            tokens=n_cols,
                            seed=seed,
                            n_iter=log["n_iter"],
                            marginal_error=log["marginal_error"].max().item(),
                            relaxation=sorted(set(log["relaxation"].tolist())),
                            log_domain=log["log_domain"],
                        )
                    )
    return rows


def format_convergence(rows):
    """Most iterations over the seeds, per feature kind and (N, M)."""
    tokens = CONVERGENCE_GRID["tokens"]
    lines = []
    for kind in CONVERGENCE_GRID["features"]:
        lines.append(f"{kind}: iterations to the accuracy (most over the seeds)")
        lines.append(f"{'N, M':>7}" + "".join(f"{m:>7}" for m in tokens))
        for n_rows in CONVERGENCE_GRID["frames"]:
            cells = [
                max(
                    row["n_iter"]
                    for row in rows
                    if (row["features"], row["frames"], row["tokens"]) == (kind, n_rows, m)
                )
                for m in tokens
            ]
            lines.append(f"{n_rows:>7}" + "".join(f"{cell:>7}" for cell in cells))
    return "\n".join(lines)


def format_table(rows):
    header = (
        f"{'B':>3} {'N':>5} {'M':>4}  {'mode':<16} {'solver':<18} {'median ms':>10} {'min ms':>9} {'x ours':>7} "
        f"{'CPU ms':>9} {'x ours(CPU)':>11} {'peak MiB':>9} {'L1 error':>9}"
    )
    lines = [header, "-" * (len(header) + 12)]
    for row in rows:
        batch, n_rows, n_cols = row["size"]
        lines.append(
            f"{batch:>3} {n_rows:>5} {n_cols:>4}  {row['mode']:<16} {row['solver']:<18} "
            f"{row['median_s'] * 1e3:>10.1f} {row['min_s'] * 1e3:>9.1f} {row['ratio_to_ours']:>7.1f} "
            f"{row['cpu_median_s'] * 1e3:>9.1f} {row['ratio_to_ours_cpu']:>11.1f} {row['peak_mib']:>9.1f} {row['marginal_error']:>9.1e}"
            + ("" if row["reached"] else "  NOT REACHED")
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset = PRESETS[args.preset]
    args.repeats = args.repeats or preset["repeats"]
    shapes = (
        [tuple(int(size) for size in shape.split("x")) for shape in args.shapes.split(",")]
        if args.shapes
        else preset["shapes"]
    )
    meta = dict(
        preset=args.preset,
        **environment(device, args.threads),
        pot=ot.__version__,
        accuracy=args.accuracy,
        pot_max_iter=args.pot_max_iter,
        repeats=args.repeats,
        feature_dim=FEATURE_DIM,
        lambda1=LAMBDA1,
        lambda2=LAMBDA2,
        sigma=SIGMA,
        ratio="median time / median time of tot[envelope] on the same shape and mode (wall clock; "
        "ratio_to_ours_cpu: process CPU time)",
        marginal_error="largest L1 error of both marginals over the batch, of the coupling returned",
        peak_mib="CPU: growth of peak RSS (VmHWM) over RSS before the call, after malloc_trim; "
        "CUDA: max_memory_allocated over memory_allocated before the call",
    )
    if args.convergence:
        rows = convergence_grid(args.accuracy)
        print(format_convergence(rows))
        worst = max(row["marginal_error"] for row in rows)
        print(f"largest final marginal error: {worst:.1e}; log-domain fallback: {any(r['log_domain'] for r in rows)}")
        if args.out:
            write_json(args.out, dict(meta, grid=CONVERGENCE_GRID, max_iter="tot_sinkhorn default"), rows)
        return
    rows = []
    for shape in shapes:
        for mode in MODES:
            results = benchmark_shape(shape, mode, device, args)
            print(format_table(results) if not rows else format_table(results).split("\n", 2)[2], flush=True)
            rows.extend(results)
    print()
    print(format_table(rows))
    meta["load_average_after"] = os.getloadavg()[0]
    if args.out:
        write_json(args.out, meta, rows)


if __name__ == "__main__":
    main()
