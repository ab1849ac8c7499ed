"""Tests of the fused Gromov-Wasserstein coupling (GM-OT) against POT's entropic FGW, and of its edges."""

import warnings

import numpy as np
import ot
import pytest
import torch
from test_tot import TIGHT, opw_effective_cost, random_masks

from modeling_tot_cakt.tot import cosine_cost, fused_gw_loss, fused_gw_sinkhorn, ot_loss, tot_sinkhorn

# Inner solves to float64 accuracy, so that each outer iteration is the exact entropic OT step.
INNER = dict(max_iter=TIGHT["max_iter"], tol=1e-12)
POT_INNER = dict(numItermax=200000, stopThr=1e-14)


def graph_problem(seed, batch=4, n_rows=15, n_cols=6, dim=5):
    """Node and edge costs of random features, as GM-OT builds them, with padded masks (some with holes)."""
    generator = torch.Generator().manual_seed(seed)
    frames = torch.randn(batch, n_rows, dim, generator=generator, dtype=torch.float64)
    tokens = torch.randn(batch, n_cols, dim, generator=generator, dtype=torch.float64)
    costs = cosine_cost(frames, tokens), cosine_cost(frames, frames), cosine_cost(tokens, tokens)
    return costs, random_masks(generator, batch, n_rows, n_cols)


def unpadded(costs, masks, b):
    """Sample ``b``'s node and edge costs over its valid frames and tokens, as numpy arrays."""
    (cost, source_cost, target_cost), (rows, cols) = costs, (masks[0][b], masks[1][b])
    return cost[b][rows][:, cols].numpy(), source_cost[b][rows][:, rows].numpy(), target_cost[b][cols][:, cols].numpy()


def pot_fgw(cost, source_cost, target_cost, alpha, lambda2, max_outer, tol):
    """POT's entropic FGW (square loss, PGD) from mu nu^T, with its inner Sinkhorn run to convergence."""
    n, m = cost.shape
    return ot.gromov.entropic_fused_gromov_wasserstein(
        cost,
        source_cost,
        target_cost,
        np.full(n, 1 / n),
        np.full(m, 1 / m),
        epsilon=lambda2,
        alpha=alpha,
        symmetric=True,
        max_iter=max_outer,
        tol=tol,
        log=True,
        **POT_INNER,
    )


@pytest.mark.parametrize("alpha,lambda2,max_outer", [(0.5, 0.1, 3), (0.5, 0.1, 12), (0.9, 0.5, 6), (1.0, 0.2, 5)])
def test_iterates_equal_pots_on_each_padded_sample(alpha, lambda2, max_outer):
    """Same start (mu nu^T), same update: after a fixed number of outer iterations the plans agree."""
    costs, masks = graph_problem(seed=max_outer)
    coupling = fused_gw_sinkhorn(
        *costs, *masks, alpha=alpha, lambda2=lambda2, max_outer=max_outer, outer_tol=0.0, **INNER
    )
    pair_mask = masks[0][:, :, None] & masks[1][:, None, :]
    assert torch.all(coupling[~pair_mask] == 0)
    for b in range(coupling.shape[0]):
        expected, _ = pot_fgw(*unpadded(costs, masks, b), alpha, lambda2, max_outer, tol=0.0)
        ours = coupling[b][masks[0][b]][:, masks[1][b]].numpy()
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-11)


def test_converged_objective_equals_pots_fgw_distance():
    """Run to the stopping rules of each (plan change in L1 here, Frobenius every tenth iteration in POT)."""
    costs, masks = graph_problem(seed=7, batch=3, n_rows=20, n_cols=8)
    coupling, log = fused_gw_sinkhorn(*costs, *masks, alpha=0.6, outer_tol=1e-11, max_outer=500, log=True, **INNER)
    assert bool(log["converged"].all()) and log["n_outer"] < 500
    for b in range(3):
        _, pot_log = pot_fgw(*unpadded(costs, masks, b), 0.6, 0.1, 1000, tol=1e-12)
        assert abs(float(log["objective"][b]) - float(pot_log["fgw_dist"])) < 1e-11


@pytest.mark.parametrize("lambda1,sigma", [(1.0, 1.0), (0.0, 2.0), (1.0, None)])
def test_temporal_prior_with_gw_equals_pot_on_the_equivalent_node_cost(lambda1, sigma):
    """TOT-prior + GW: POT's FGW on ``C + (C' - C) / (1 - alpha)`` with ``C' = C - S - lambda2 log P`` has
    the same linearised cost ``(1 - alpha) C + alpha grad - S - lambda2 log P`` at every outer iteration."""
    costs, masks = graph_problem(seed=3, batch=3, n_rows=14, n_cols=5)
    alpha, lambda2 = 0.4, 0.2
    coupling = fused_gw_sinkhorn(
        *costs, *masks, alpha=alpha, lambda1=lambda1, lambda2=lambda2, sigma=sigma, max_outer=5, outer_tol=0, **INNER
    )
    for b in range(3):
        cost, source_cost, target_cost = unpadded(costs, masks, b)
        shifted = cost + (opw_effective_cost(cost, lambda1, lambda2, sigma) - cost) / (1 - alpha)
        expected, _ = pot_fgw(shifted, source_cost, target_cost, alpha, lambda2, 5, tol=0.0)
        np.testing.assert_allclose(coupling[b][masks[0][b]][:, masks[1][b]].numpy(), expected, rtol=0, atol=1e-11)


def test_alpha_zero_is_exactly_the_plain_and_the_tot_coupling():
    costs, masks = graph_problem(seed=11)
    for params in (dict(lambda1=0.0, sigma=None), dict(lambda1=1.0, sigma=1.0)):
        coupling, log = fused_gw_sinkhorn(*costs, *masks, alpha=0.0, log=True, **params)
        assert torch.equal(coupling, tot_sinkhorn(costs[0], *masks, **params))
        assert log["n_outer"] == 1 and bool(log["converged"].all())
        torch.testing.assert_close(log["objective"], ot_loss(coupling, costs[0], reduction="none"), rtol=0, atol=0)


def test_fused_gw_loss_is_the_quadruple_sum_and_its_envelope_gradient():
    costs, masks = graph_problem(seed=5, batch=2, n_rows=7, n_cols=4)
    coupling = fused_gw_sinkhorn(*costs, *masks, alpha=0.3)
    assert not coupling.requires_grad
    cost, source_cost, target_cost = (c.clone().requires_grad_() for c in costs)
    loss = fused_gw_loss(coupling, cost, source_cost, target_cost, 0.3, reduction="none")
    quadratic = (source_cost[:, :, None, :, None] - target_cost[:, None, :, None, :]).square()  # (B, i, j, k, l)
    brute = 0.7 * (coupling * cost).sum((1, 2)) + 0.3 * torch.einsum("bijkl,bij,bkl->b", quadratic, coupling, coupling)
    torch.testing.assert_close(loss, brute, rtol=1e-12, atol=1e-14)
    loss.sum().backward()
    torch.testing.assert_close(cost.grad, 0.7 * coupling, rtol=0, atol=1e-15)


def test_autodiff_through_outer_and_inner_iterations_passes_gradcheck():
    costs, masks = graph_problem(seed=2, batch=2, n_rows=5, n_cols=3)
    masks[0][1, -1] = False
    fixed = dict(alpha=0.5, lambda2=0.3, max_outer=3, outer_tol=0.0, max_iter=20, tol=0.0, grad="autodiff")

    def solve(cost, source_cost):
        return fused_gw_sinkhorn(cost, (source_cost + source_cost.transpose(1, 2)) / 2, costs[2], *masks, **fixed)

    inputs = (costs[0].clone().requires_grad_(), costs[1].clone().requires_grad_())
    assert torch.autograd.gradcheck(solve, inputs, eps=1e-6, atol=1e-7)


def test_outer_iterations_stop_on_the_plan_change():
    costs, masks = graph_problem(seed=9)
    _, log = fused_gw_sinkhorn(*costs, *masks, alpha=0.5, outer_tol=1e-3, max_outer=200, log=True, **INNER)
    changes = log["plan_changes"]
    assert len(changes) == log["n_outer"] < 200
    assert changes[-1] < 1e-3 <= changes[-2]
    assert float(log["plan_change"].max()) == changes[-1]


def test_warm_started_inner_solves_cost_fewer_iterations_and_reach_the_same_plan():
    costs, masks = graph_problem(seed=4)
    coupling, log = tot_sinkhorn(costs[0], *masks, log=True, **INNER)
    again, warm_log = tot_sinkhorn(costs[0], *masks, log=True, warm_start=log["potentials"], **INNER)
    assert warm_log["n_iter"] == 10 < log["n_iter"]  # converged at the first check
    torch.testing.assert_close(again, coupling, rtol=0, atol=1e-12)
    for potential, mask in zip(log["potentials"], masks):
        assert torch.all(potential[~mask] == 0)


def test_padding_holds_no_mass_even_where_padded_edges_are_nan():
    costs, masks = graph_problem(seed=6)
    reference = fused_gw_sinkhorn(*costs, *masks, alpha=0.5, max_outer=4, outer_tol=0)
    source_cost = costs[1].clone()
    source_cost[~(masks[0][:, :, None] & masks[0][:, None, :])] = float("nan")
    coupling = fused_gw_sinkhorn(costs[0], source_cost, costs[2], *masks, alpha=0.5, max_outer=4, outer_tol=0)
    assert torch.equal(coupling, reference)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("lambda2", [2e-3, 1e3])
def test_extreme_alpha_and_regularisation_give_finite_plans_with_the_marginals(alpha, lambda2):
    costs, masks = graph_problem(seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny lambda2: the inner solves may stop above tol
        coupling = fused_gw_sinkhorn(*costs, *masks, alpha=alpha, lambda2=lambda2, max_outer=20, max_iter=3000)
    assert torch.isfinite(coupling).all()
    columns = masks[1].double() / masks[1].sum(dim=1, keepdim=True)
    torch.testing.assert_close(coupling.sum(dim=1), columns, rtol=0, atol=1e-11)
    torch.testing.assert_close(coupling.sum(dim=(1, 2)), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-3)
    if lambda2 > 1:  # nearly the independent plan mu nu^T
        rows = masks[0].double() / masks[0].sum(dim=1, keepdim=True)
        torch.testing.assert_close(coupling, rows[:, :, None] * columns[:, None, :], rtol=0, atol=1e-3)


def test_too_few_outer_iterations_warn_naming_the_samples():
    costs, masks = graph_problem(seed=1)
    with pytest.warns(UserWarning, match=r"fused_gw_sinkhorn stopped above tolerance for 4 of 4 samples"):
        fused_gw_sinkhorn(*costs, *masks, alpha=0.5, max_outer=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_gw_sinkhorn(*costs, *masks, alpha=0.5, max_outer=2, outer_tol=0.0)  # asked for exactly 2


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(alpha=1.5), r"alpha must lie in \[0, 1\]"),
        (dict(alpha=float("nan")), r"alpha must be a finite number >= 0"),
        (dict(max_outer=0), r"max_outer must be an integer >= 1"),
        (dict(outer_tol=-1.0), r"outer_tol must be a finite number >= 0"),
        (dict(source_cost="asym"), r"source_cost is not symmetric on the valid pairs of sample\(s\) \[2\]"),
        (dict(target_cost="nan"), r"target_cost holds NaN or infinite values on valid pairs of sample\(s\) \[1\]"),
        (dict(target_cost="shape"), r"target_cost must be a floating-point torch.Tensor of shape \(4, 6, 6\)"),
        (dict(lambda2=1e-9), r"tot_sinkhorn cannot solve sample"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(change, match):
    (cost, source_cost, target_cost), masks = graph_problem(seed=0)
    if change.get("source_cost") == "asym":
        source_cost = source_cost.clone()
        source_cost[2, 0, 1] += 0.5
    if change.get("target_cost") == "nan":
        target_cost = target_cost.clone()
        target_cost[1, 0, 0] = float("nan")
    if change.get("target_cost") == "shape":
        target_cost = target_cost[:, :5, :5]
    kwargs = {key: value for key, value in change.items() if key not in ("source_cost", "target_cost")}
    with pytest.raises(ValueError, match=match):
        fused_gw_sinkhorn(cost.float(), source_cost, target_cost, *masks, **kwargs)


def test_warm_start_of_the_wrong_shape_is_refused():
    (cost, _, _), masks = graph_problem(seed=0)
    with pytest.raises(ValueError, match=r"warm_start must be the potentials \(f, g\)"):
        tot_sinkhorn(cost, *masks, warm_start=(torch.zeros(4, 15), torch.zeros(4, 5)))


@pytest.mark.parametrize("n_rows,n_cols", [(1, 1), (1, 4), (6, 1), (0, 3)])
def test_single_frame_or_token_empty_and_fully_padded_samples(n_rows, n_cols):
    generator = torch.Generator().manual_seed(0)
    frames, tokens = torch.randn(3, n_rows, 4, generator=generator), torch.randn(3, n_cols, 4, generator=generator)
    source_mask, target_mask = torch.ones(3, n_rows, dtype=torch.bool), torch.ones(3, n_cols, dtype=torch.bool)
    target_mask[1] = False  # no valid token: nothing to transport
    costs = cosine_cost(frames, tokens), cosine_cost(frames, frames), cosine_cost(tokens, tokens)
    coupling, log = fused_gw_sinkhorn(*costs, source_mask, target_mask, alpha=0.5, log=True)
    assert torch.all(coupling[1] == 0) and torch.isfinite(log["objective"]).all()
    expected_mass = torch.tensor([1.0, 0.0, 1.0]) if n_rows > 0 else torch.zeros(3)
    torch.testing.assert_close(coupling.sum(dim=(1, 2)), expected_mass)
    torch.testing.assert_close(
        fused_gw_loss(coupling, *costs, 0.5), log["objective"][[0, 2]].mean() if n_rows else torch.tensor(0.0)
    )


def test_an_empty_batch_gives_an_empty_plan():
    cost, source_cost, target_cost = torch.zeros(0, 5, 3), torch.zeros(0, 5, 5), torch.zeros(0, 3, 3)
    coupling, log = fused_gw_sinkhorn(cost, source_cost, target_cost, alpha=0.5, log=True)
    assert coupling.shape == (0, 5, 3) and log["objective"].shape == (0,)
