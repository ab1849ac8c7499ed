"""A few solver figures that docs/RESULTS.md quotes next to the convergence tables.

- iterations of unbalanced ``tot_sinkhorn`` (``tau = 1`` and ``100``) to its default ``tol``;
- the marginal error of plain Sinkhorn (``omega = 1``) with TOT's defaults after 100 iterations:
  ten 10-iteration solves, each warm-started from the last one's potentials (a solve runs its first
  10 iterations plain, so no over-relaxation ever starts);
- outer iterations of ``fused_gw_sinkhorn`` (``alpha = 0.5``) to its default ``outer_tol``.

Random features, 3 seeds, float32, one thread::

    OMP_NUM_THREADS=1 python benchmarks/solver_figures.py
"""

import torch

from modeling_tot_cakt.tot import cosine_cost, fused_gw_sinkhorn, tot_sinkhorn

SEEDS = (0, 1, 2)


def random_cost(seed: int, batch: int, frames: int, tokens: int, dim: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    frames = torch.randn(batch, frames, dim, generator=generator)
    return cosine_cost(frames, torch.randn(batch, tokens, dim, generator=generator))


def plain_sinkhorn_error(cost: torch.Tensor, iterations: int) -> float:
    """Largest marginal error after ``iterations`` plain iterations (blocks of 10, warm-started)."""
    potentials = None
    for _ in range(iterations // 10):
        _, log = tot_sinkhorn(cost, log=True, tol=0.0, max_iter=10, warm_start=potentials)
        potentials = log["potentials"]
    return float(log["marginal_error"].max())


def main() -> None:
    shape = "4 utterances of 1000 frames x 50 tokens, random 64-d features"
    for tau in (1.0, 100.0):
        counts = [tot_sinkhorn(random_cost(seed, 4, 1000, 50, 64), tau=tau, log=True)[1]["n_iter"] for seed in SEEDS]
        print(f"unbalanced, tau = {tau:g}: iterations to tol = 1e-4 ({shape}), per seed: {counts}")
    errors = [plain_sinkhorn_error(random_cost(seed, 4, 1000, 50, 64), 100) for seed in SEEDS]
    print(
        f"plain Sinkhorn, TOT defaults: largest marginal error after 100 iterations ({shape}), per seed: "
        + ", ".join(f"{error:.2e}" for error in errors)
    )
    outer = []
    for seed in SEEDS:
        generator = torch.Generator().manual_seed(seed)
        h, z = torch.randn(2, 40, 8, generator=generator), torch.randn(2, 6, 8, generator=generator)
        _, log = fused_gw_sinkhorn(cosine_cost(h, z), cosine_cost(h, h), cosine_cost(z, z), alpha=0.5, log=True)
        outer.append(log["n_outer"])
    print(
        f"fused GW, alpha = 0.5: outer iterations to outer_tol = 1e-4 (2 utterances of 40 frames x 6 tokens, "
        f"random 8-d features), per seed: {outer}"
    )


if __name__ == "__main__":
    main()
