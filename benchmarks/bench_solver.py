"""Speed and memory of the batched TOT solver against POT, forward + backward.

For each problem size (B utterances of N frames and M tokens, float32, no padding so that
POT's batched solver applies) it times one training-style step -- cosine cost of random
features, TOT coupling, transport loss, backward to the features -- with:

- ``tot[envelope]``   ``modeling_tot_cakt.tot.tot_sinkhorn(..., grad="envelope")`` (the default);
- ``tot[autodiff]``   the same with backpropagation through the unrolled iterations;
- ``pot.solve loop``  ``ot.solve(M_b, a, b, reg=lambda2, grad="envelope")`` (log-domain
  Sinkhorn, torch backend) called once per utterance;
- ``pot.batch``       ``ot.batch.solve_batch(M, reg=lambda2, method="log_sinkhorn",
  reg_type="kl", grad="envelope")``.

POT solves plain entropic OT, so it is given the equivalent cost ``C - S - lambda2 * log P``
(built inside the timed step). Every solver runs exactly ``--iters`` Sinkhorn iterations
(``tol = 0``), so the times compare the same work. The column ``max|dT|`` compares each
coupling with ours: ``pot.batch`` updates the potentials in our order and agrees to rounding;
``ot.solve`` updates the column potential first, so after a fixed number of iterations its plan
differs from ours by the marginal error still left (TOT converges slowly, see ``tot_sinkhorn``).

Timing and memory follow ``benchmarks/common.py``: after one warm-up call per solver, the
solvers take turns (round robin, ``repeats`` rounds) so that a change in machine load hits all of
them alike; ``median`` and ``min`` are over the rounds, ``x ours`` is the median divided by that
of ``tot[envelope]`` on the same size (above 1: slower than ours). ``peak MiB`` is the growth of
the peak resident set (CPU) or of the allocated CUDA memory over the step, largest over the
timed rounds. Solvers that keep a graph through the iterations (``tot[autodiff]`` and, in POT
0.9.7, ``pot.batch``, whose "envelope" mode still records the iterations) are skipped where that
graph would exceed ``--max-graph-gib``.

Usage::

    python benchmarks/bench_solver.py --preset quick --device cpu --out bench_solver.json
"""

import argparse
import os
import statistics
import sys
from pathlib import Path

import ot
import ot.batch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from benchmarks.common import round_robin, write_json
from modeling_tot_cakt.tot import cosine_cost, order_reward, ot_loss, temporal_prior_log, tot_sinkhorn

PRESETS = {
    # (batch, frames, tokens); quick runs in a few minutes on 2 CPU cores.
    "quick": dict(sizes=[(1, 50, 5), (2, 1000, 100), (8, 500, 50), (16, 1000, 20), (64, 200, 20)], repeats=5),
    "full": dict(
        sizes=[(b, n, m) for b in (1, 8, 32, 64) for n, m in ((50, 5), (200, 20), (500, 50), (1000, 20), (1000, 100))],
        repeats=7,
    ),
}
SOLVERS = ("tot[envelope]", "tot[autodiff]", "pot.solve loop", "pot.batch")
GRAPH_SOLVERS = ("tot[autodiff]", "pot.batch")
FEATURE_DIM = 64
LAMBDA1, LAMBDA2, SIGMA = 1.0, 0.1, 1.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", default=None, help="write the results to this JSON file")
    parser.add_argument("--iters", type=int, default=100, help="Sinkhorn iterations for every solver")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 keeps timings stable on a shared machine)"
    )
    parser.add_argument(
        "--max-graph-gib",
        type=float,
        default=3.0,
        help="skip solvers that keep the iterations' graph when it would exceed this (GiB)",
    )
    return parser.parse_args(argv)


def equivalent_cost(cost):
    """``C - S - lambda2 * log P``: TOT as plain entropic OT, for POT."""
    batch, n_rows, n_cols = cost.shape
    rows = torch.ones(batch, n_rows, dtype=torch.bool, device=cost.device)
    cols = torch.ones(batch, n_cols, dtype=torch.bool, device=cost.device)
    return cost - order_reward(rows, cols, LAMBDA1) - LAMBDA2 * temporal_prior_log(rows, cols, SIGMA)


def tot_step(source, target, iters, grad):
    cost = cosine_cost(source, target)
    coupling = tot_sinkhorn(cost, lambda1=LAMBDA1, lambda2=LAMBDA2, sigma=SIGMA, max_iter=iters, tol=0.0, grad=grad)
    ot_loss(coupling, cost).backward()
    return coupling.detach()


def pot_loop_step(source, target, iters):
    cost = equivalent_cost(cosine_cost(source, target))
    n_rows, n_cols = cost.shape[1:]
    a = torch.full((n_rows,), 1.0 / n_rows, device=cost.device)
    b = torch.full((n_cols,), 1.0 / n_cols, device=cost.device)
    results = [
        ot.solve(cost[i], a, b, reg=LAMBDA2, max_iter=iters, tol=0.0, grad="envelope") for i in range(cost.shape[0])
    ]
    torch.stack([result.value for result in results]).mean().backward()
    return torch.stack([result.plan for result in results]).detach()


def pot_batch_step(source, target, iters):
    cost = equivalent_cost(cosine_cost(source, target))
    result = ot.batch.solve_batch(
        cost, reg=LAMBDA2, max_iter=iters, tol=0.0, method="log_sinkhorn", reg_type="kl", grad="envelope"
    )
    result.value.mean().backward()
    return result.plan.detach()


STEPS = {
    "tot[envelope]": lambda source, target, iters: tot_step(source, target, iters, "envelope"),
    "tot[autodiff]": lambda source, target, iters: tot_step(source, target, iters, "autodiff"),
    "pot.solve loop": pot_loop_step,
    "pot.batch": pot_batch_step,
}


def graph_gib(size, iters):
    """Rough size of a graph through the iterations: about three (B, N, M) float32 per iteration."""
    batch, n_rows, n_cols = size
    return 3 * 4 * batch * n_rows * n_cols * iters / 2**30


def benchmark_size(size, device, iters, repeats, max_graph_gib):
    """Time and measure every solver on one size; return one result dict per solver."""
    batch, n_rows, n_cols = size
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(batch, n_rows, FEATURE_DIM, generator=generator).to(device).requires_grad_()
    target = torch.randn(batch, n_cols, FEATURE_DIM, generator=generator).to(device)
    skipped = {
        solver: f"graph ~{graph_gib(size, iters):.1f} GiB > --max-graph-gib"
        for solver in GRAPH_SOLVERS
        if graph_gib(size, iters) > max_graph_gib
    }
    solvers = [solver for solver in SOLVERS if solver not in skipped]

    def reset_gradient(solver):
        source.grad = None

    calls = {solver: (lambda solver=solver: STEPS[solver](source, target, iters)) for solver in solvers}
    timings = round_robin(calls, repeats, device, setup=reset_gradient)
    times, peaks, couplings = timings.wall, timings.peak_mib, timings.results

    reference = couplings["tot[envelope]"]
    results = []
    for solver in SOLVERS:
        row = dict(size=list(size), solver=solver)
        if solver in skipped:
            row["skipped"] = skipped[solver]
        else:
            row.update(
                median_s=statistics.median(times[solver]),
                min_s=min(times[solver]),
                times_s=times[solver],
                ratio_to_ours=statistics.median(times[solver]) / statistics.median(times["tot[envelope]"]),
                peak_mib=max(peaks[solver]),
                max_abs_diff=(couplings[solver] - reference).abs().max().item(),
            )
        results.append(row)
    return results


def format_table(rows):
    header = (
        f"{'B':>3} {'N':>5} {'M':>4}  {'solver':<15} {'median ms':>10} {'min ms':>9} {'x ours':>7} "
        f"{'peak MiB':>9} {'max|dT|':>8}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        batch, n_rows, n_cols = row["size"]
        prefix = f"{batch:>3} {n_rows:>5} {n_cols:>4}  {row['solver']:<15}"
        if "skipped" in row:
            lines.append(f"{prefix} skipped: {row['skipped']}")
            continue
        lines.append(
            f"{prefix} {row['median_s'] * 1e3:>10.1f} {row['min_s'] * 1e3:>9.1f} "
            f"{row['ratio_to_ours']:>7.2f} {row['peak_mib']:>9.1f} {row['max_abs_diff']:>8.1e}"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset = PRESETS[args.preset]
    load_before = os.getloadavg()[0]
    rows = []
    for size in preset["sizes"]:
        results = benchmark_size(size, device, args.iters, preset["repeats"], args.max_graph_gib)
        print(format_table(results) if not rows else format_table(results).split("\n", 2)[2], flush=True)
        rows.extend(results)
    print()
    print(format_table(rows))
    if args.out:
        meta = dict(
            preset=args.preset,
            device=args.device,
            iters=args.iters,
            repeats=preset["repeats"],
            feature_dim=FEATURE_DIM,
            lambda1=LAMBDA1,
            lambda2=LAMBDA2,
            sigma=SIGMA,
            threads=args.threads,
            torch=torch.__version__,
            pot=ot.__version__,
            cpu_count=os.cpu_count(),
            gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
            load_average_before_after=[load_before, os.getloadavg()[0]],
            ratio="median time / median time of tot[envelope] on the same size",
            peak_mib="CPU: growth of peak RSS (VmHWM) over RSS before the step, after malloc_trim; "
            "CUDA: max_memory_allocated over memory_allocated before the step",
        )
        write_json(args.out, meta, rows)


if __name__ == "__main__":
    main()
