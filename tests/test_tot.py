"""Tests of modeling_tot_cakt.tot: the TOT solver against POT, masks, gradients, losses."""

import math
import re
import warnings

import numpy as np
import ot
import pytest
import torch

from modeling_tot_cakt.tot import (
    align_loss,
    barycentric_transport,
    cosine_cost,
    order_reward,
    ot_loss,
    relative_positions,
    temporal_prior_log,
    tot_sinkhorn,
)

TIGHT = dict(max_iter=20000, tol=1e-13)


def random_masks(generator, batch, n_rows, n_cols):
    """Random masks with at least one valid entry per sample; sample 0 is unpadded, odd samples
    have holes (valid positions that do not form a prefix)."""
    masks = []
    for length in (n_rows, n_cols):
        mask = torch.rand(batch, length, generator=generator) < 0.7
        mask[:, 0] = True
        mask[0] = True
        prefix = torch.arange(length)[None, :] < mask.sum(dim=1, keepdim=True)
        mask = torch.where((torch.arange(batch) % 2 == 0)[:, None], prefix, mask)
        masks.append(mask)
    return masks


def opw_effective_cost(cost, lambda1, lambda2, sigma):
    """C - S - lambda2 * log P for one unpadded (n, m) cost, straight from the formulas (numpy)."""
    n, m = cost.shape
    gap = np.arange(1, n + 1)[:, None] / n - np.arange(1, m + 1)[None, :] / m
    reward = lambda1 / (gap**2 + 1)
    log_prior = 0.0 if sigma is None else -(gap**2 / (1 / n**2 + 1 / m**2)) / (2 * sigma**2)
    return cost - reward - lambda2 * log_prior


def pot_coupling(cost, lambda2):
    """POT's entropic OT with uniform marginals, run to convergence."""
    n, m = cost.shape
    return ot.sinkhorn(
        np.full(n, 1 / n), np.full(m, 1 / m), cost, lambda2, method="sinkhorn_log", numItermax=200000, stopThr=1e-14
    )


@pytest.mark.parametrize(
    "lambda1,lambda2,sigma", [(1.0, 0.1, 1.0), (50.0, 0.1, 1.0), (0.5, 0.5, 2.5), (0.0, 0.1, None)]
)
def test_tot_sinkhorn_matches_pot_on_the_equivalent_cost(lambda1, lambda2, sigma):
    generator = torch.Generator().manual_seed(0)
    batch, n_rows, n_cols = 5, 23, 9
    cost = 2 * torch.rand(batch, n_rows, n_cols, generator=generator, dtype=torch.float64)
    source_mask, target_mask = random_masks(generator, batch, n_rows, n_cols)

    coupling = tot_sinkhorn(cost, source_mask, target_mask, lambda1=lambda1, lambda2=lambda2, sigma=sigma, **TIGHT)

    for b in range(batch):
        rows, cols = source_mask[b], target_mask[b]
        sample_cost = cost[b][rows][:, cols].numpy()
        expected = pot_coupling(opw_effective_cost(sample_cost, lambda1, lambda2, sigma), lambda2)
        got = coupling[b][rows][:, cols].numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
        assert abs(got - expected).max() < 1e-6


def test_plain_ot_matches_pot_sinkhorn():
    generator = torch.Generator().manual_seed(1)
    cost = 2 * torch.rand(3, 17, 6, generator=generator, dtype=torch.float64)
    coupling = tot_sinkhorn(cost, lambda1=0.0, sigma=None, lambda2=0.05, **TIGHT)
    for b in range(3):
        expected = pot_coupling(cost[b].numpy(), 0.05)
        np.testing.assert_allclose(coupling[b].numpy(), expected, rtol=1e-6, atol=1e-9)


def test_padded_batch_gives_each_sample_its_own_coupling():
    generator = torch.Generator().manual_seed(2)
    batch, n_rows, n_cols = 4, 30, 8
    cost = 2 * torch.rand(batch, n_rows, n_cols, generator=generator, dtype=torch.float64)
    source_mask, target_mask = random_masks(generator, batch, n_rows, n_cols)
    fixed = dict(max_iter=200, tol=0.0)  # same iterations alone and in the batch

    coupling = tot_sinkhorn(cost, source_mask, target_mask, **fixed)

    for b in range(batch):
        rows, cols = source_mask[b], target_mask[b]
        alone = tot_sinkhorn(cost[b][rows][:, cols][None], **fixed)[0]
        torch.testing.assert_close(coupling[b][rows][:, cols], alone, rtol=1e-10, atol=1e-14)


def test_marginals_hold_and_padding_gets_exactly_zero():
    generator = torch.Generator().manual_seed(3)
    cost = 2 * torch.rand(4, 40, 12, generator=generator)
    source_mask, target_mask = random_masks(generator, 4, 40, 12)
    tol = 1e-5

    coupling = tot_sinkhorn(cost, source_mask, target_mask, max_iter=5000, tol=tol)

    n = source_mask.sum(dim=1, keepdim=True)
    m = target_mask.sum(dim=1, keepdim=True)
    row_error = (coupling.sum(dim=2) - source_mask / n).abs().sum(dim=1)
    col_error = (coupling.sum(dim=1) - target_mask / m).abs().sum(dim=1)
    assert row_error.max() < tol
    assert col_error.max() < 1e-5  # exact up to float32 rounding
    pair_mask = source_mask[:, :, None] & target_mask[:, None, :]
    assert torch.all(coupling[~pair_mask] == 0)
    assert torch.all(coupling[pair_mask] > 0)


def test_convergence_check_stops_early_and_tol_zero_runs_max_iter():
    cost = 2 * torch.rand(2, 30, 6, generator=torch.Generator().manual_seed(4))
    plain = dict(lambda1=0.0, sigma=None, lambda2=0.5)

    coupling, log = tot_sinkhorn(cost, **plain, max_iter=1000, tol=1e-4, log=True)
    assert 0 < log["n_iter"] < 100 and log["n_iter"] % 10 == 0
    assert log["marginal_error"].shape == (2,) and log["marginal_error"].max() < 1e-4
    torch.testing.assert_close(
        log["marginal_error"], (coupling.sum(2) - 1 / 30).abs().sum(1) + (coupling.sum(1) - 1 / 6).abs().sum(1)
    )

    _, log = tot_sinkhorn(cost, **plain, max_iter=37, tol=0.0, log=True)
    assert log["n_iter"] == 37


def test_autodiff_gradients_pass_gradcheck():
    generator = torch.Generator().manual_seed(5)
    cost = (2 * torch.rand(2, 4, 3, generator=generator, dtype=torch.float64)).requires_grad_()
    source_mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    target_mask = torch.tensor([[True, True, True], [True, False, True]])

    def solve(c):
        return tot_sinkhorn(
            c, source_mask, target_mask, lambda1=1.0, lambda2=0.5, sigma=1.5, max_iter=25, tol=0.0, grad="autodiff"
        )

    assert torch.autograd.gradcheck(solve, (cost,), eps=1e-6, atol=1e-7)


def envelope_problem(seed, n_rows, n_cols, lambda1, sigma):
    """One unpadded float64 problem: a cost, a random direction, the order reward and the log prior."""
    generator = torch.Generator().manual_seed(seed)
    cost = 2 * torch.rand(1, n_rows, n_cols, generator=generator, dtype=torch.float64)
    direction = torch.randn(1, n_rows, n_cols, generator=generator, dtype=torch.float64)
    rows, cols = torch.ones(1, n_rows, dtype=torch.bool), torch.ones(1, n_cols, dtype=torch.bool)
    reward, log_prior = (
        order_reward(rows, cols, lambda1, torch.float64),
        temporal_prior_log(rows, cols, sigma, torch.float64),
    )
    return cost, direction, reward, log_prior


def assert_envelope_is_the_central_difference(optimal_value, cost, direction, params):
    """<T*, direction> for the detached (envelope) coupling equals the central difference of ``optimal_value``."""
    step = 1e-5
    finite_difference = (optimal_value(cost + step * direction) - optimal_value(cost - step * direction)) / (2 * step)
    coupling = tot_sinkhorn(cost.clone().requires_grad_(), **params)  # envelope: detached
    assert not coupling.requires_grad
    np.testing.assert_allclose((coupling * direction).sum().item(), finite_difference, rtol=1e-6, atol=1e-9)
    return coupling


def test_envelope_coupling_is_the_finite_difference_gradient_of_the_optimal_value():
    """W(C) = min_T <T, C - S> + lambda2 KL(T || P) has gradient T*(C) (Danskin): a central difference of
    the solved value along a random direction must equal <T*, direction>. A plan that is not the
    optimum of this very problem (unconverged, other parameters, transposed potentials) fails."""
    lambda1, lambda2, sigma = 1.0, 0.1, 1.0
    cost, direction, reward, log_prior = envelope_problem(25, 30, 7, lambda1, sigma)
    params = dict(lambda1=lambda1, lambda2=lambda2, sigma=sigma, **TIGHT)

    def optimal_value(c):
        plan = tot_sinkhorn(c, **params)
        kl = (plan * (plan.log() - log_prior) - plan + log_prior.exp()).sum()
        return ((plan * (c - reward)).sum() + lambda2 * kl).item()

    assert_envelope_is_the_central_difference(optimal_value, cost, direction, params)


def test_envelope_gradient_equals_autodiff_gradient_of_the_optimal_value():
    """d/dC [<T*,C> - <T*,S> + lambda2 KL(T*||P)] = T* (envelope theorem), via autodiff."""
    lambda1, lambda2, sigma = 1.0, 0.3, 1.5
    generator = torch.Generator().manual_seed(7)
    cost = (2 * torch.rand(1, 6, 4, generator=generator, dtype=torch.float64)).requires_grad_()
    mask_rows, mask_cols = torch.ones(1, 6, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)
    reward = order_reward(mask_rows, mask_cols, lambda1, torch.float64)
    log_prior = temporal_prior_log(mask_rows, mask_cols, sigma, torch.float64)

    coupling = tot_sinkhorn(
        cost, lambda1=lambda1, lambda2=lambda2, sigma=sigma, max_iter=3000, tol=0.0, grad="autodiff"
    )
    kl = (coupling * (coupling.log() - log_prior) - coupling + log_prior.exp()).sum()
    value = (coupling * (cost - reward)).sum() + lambda2 * kl
    (gradient,) = torch.autograd.grad(value, cost)

    envelope = tot_sinkhorn(cost.detach(), lambda1=lambda1, lambda2=lambda2, sigma=sigma, **TIGHT)
    torch.testing.assert_close(gradient, envelope, rtol=1e-7, atol=1e-10)


def test_order_reward_and_prior_keep_mass_near_the_diagonal():
    """With repeated tokens, content alone cannot tell which occurrence a frame belongs to."""
    generator = torch.Generator().manual_seed(8)
    n_frames, n_tokens, dim = 120, 12, 32
    vocabulary = torch.randn(3, dim, generator=generator)
    tokens = vocabulary[torch.arange(n_tokens) % 3]
    frame_token = torch.arange(n_frames) * n_tokens // n_frames
    frames = tokens[frame_token] + 0.5 * torch.randn(n_frames, dim, generator=generator)
    cost = cosine_cost(frames[None], tokens[None])
    gap = (torch.arange(1, n_frames + 1)[:, None] / n_frames - torch.arange(1, n_tokens + 1)[None, :] / n_tokens).abs()

    def mean_gap(coupling):
        return (coupling[0] * gap).sum().item()

    plain = mean_gap(tot_sinkhorn(cost, lambda1=0.0, sigma=None, max_iter=500))
    order_only = mean_gap(tot_sinkhorn(cost, lambda1=10.0, sigma=None, max_iter=500))
    temporal = mean_gap(tot_sinkhorn(cost, max_iter=500))

    assert plain > 0.2  # the mass is spread over every occurrence
    assert order_only < 0.2 * plain
    assert temporal < 0.2 * plain


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_solved_in_float32(dtype):
    generator = torch.Generator().manual_seed(9)
    cost = (2 * torch.rand(2, 300, 20, generator=generator)).to(dtype)
    source_mask, target_mask = random_masks(generator, 2, 300, 20)

    coupling = tot_sinkhorn(cost, source_mask, target_mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        coupling_autocast = tot_sinkhorn(cost, source_mask, target_mask)

    assert coupling.dtype == torch.float32
    assert torch.isfinite(coupling).all()
    assert torch.equal(coupling, tot_sinkhorn(cost.float(), source_mask, target_mask))
    assert torch.equal(coupling_autocast, coupling)


@pytest.mark.parametrize("n_rows,n_cols", [(1, 1), (1, 7), (7, 1), (3, 40), (400, 3)])
def test_extreme_shapes_keep_their_marginals(n_rows, n_cols):
    cost = 2 * torch.rand(2, n_rows, n_cols, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    coupling = tot_sinkhorn(cost, max_iter=5000, tol=1e-10)
    torch.testing.assert_close(coupling.sum(dim=2), torch.full((2, n_rows), 1 / n_rows, dtype=torch.float64))
    torch.testing.assert_close(coupling.sum(dim=1), torch.full((2, n_cols), 1 / n_cols, dtype=torch.float64))
    if n_rows == 1 or n_cols == 1:  # a single row/column leaves one feasible coupling
        torch.testing.assert_close(coupling, torch.full_like(coupling, 1 / (n_rows * n_cols)))


@pytest.mark.parametrize("shape", [(2, 0, 3), (2, 4, 0), (0, 4, 3)])
def test_empty_dimensions_give_an_empty_or_zero_coupling(shape):
    coupling, log = tot_sinkhorn(torch.rand(shape), log=True)
    assert coupling.shape == shape and torch.all(coupling == 0)
    assert log["n_iter"] == 0 and torch.all(log["marginal_error"] == 0)


def test_empty_samples_get_zero_coupling_and_are_left_out_of_the_losses():
    generator = torch.Generator().manual_seed(11)
    frames = torch.randn(3, 10, 8, generator=generator, requires_grad=True)
    tokens = torch.randn(3, 4, 8, generator=generator)
    source_mask = torch.tensor([[True] * 10, [False] * 10, [True] * 10])
    target_mask = torch.tensor([[True] * 4, [False] * 4, [False] * 4])  # sample 2: frames, no tokens

    cost = cosine_cost(frames, tokens)
    coupling = tot_sinkhorn(cost, source_mask, target_mask)
    transported = barycentric_transport(coupling, frames, target_mask)
    loss_ot = ot_loss(coupling, cost)
    loss_align = align_loss(transported, tokens, target_mask)
    (loss_ot + loss_align).backward()

    assert torch.all(coupling[1:] == 0)
    torch.testing.assert_close(loss_ot, ot_loss(coupling[:1], cost[:1]))
    torch.testing.assert_close(loss_align, align_loss(transported[:1], tokens[:1], target_mask[:1]))
    assert torch.isfinite(frames.grad).all()
    assert torch.all(frames.grad[1:] == 0)
    all_empty = tot_sinkhorn(cost, torch.zeros_like(source_mask), target_mask)
    assert torch.all(all_empty == 0)
    assert ot_loss(all_empty, cost).item() == 0.0


def test_relative_positions_count_valid_positions_only():
    mask = torch.tensor([[True, True, True, False], [False, True, False, True], [False] * 4])
    expected = torch.tensor([[1 / 3, 2 / 3, 1.0, 0.0], [0.0, 0.5, 0.0, 1.0], [0.0] * 4])
    torch.testing.assert_close(relative_positions(mask), expected)


def test_prior_and_reward_follow_the_opw_formulas():
    source_mask = torch.tensor([[True, True, True, True, False]])
    target_mask = torch.tensor([[True, False, True]])
    u = torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64)[:, None]
    v = torch.tensor([0.5, 1.0], dtype=torch.float64)[None, :]
    scale = math.sqrt(1 / 4**2 + 1 / 2**2)

    log_prior = temporal_prior_log(source_mask, target_mask, 0.7, torch.float64)[0]
    reward = order_reward(source_mask, target_mask, 3.0, torch.float64)[0]

    torch.testing.assert_close(log_prior[:4][:, [0, 2]], -(((u - v).abs() / scale) ** 2) / (2 * 0.7**2))
    torch.testing.assert_close(reward[:4][:, [0, 2]], 3.0 / ((u - v) ** 2 + 1))
    assert torch.all(log_prior[4] == 0) and torch.all(log_prior[:, 1] == 0)
    assert torch.all(reward[4] == 0) and torch.all(reward[:, 1] == 0)


def test_cosine_cost_hand_example():
    source = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]])
    target = torch.tensor([[[3.0, 0.0], [-1.0, 0.0]]])
    expected = torch.tensor([[[0.0, 2.0], [1.0, 1.0], [1.0, 1.0]]])
    torch.testing.assert_close(cosine_cost(source, target), expected)
    assert cosine_cost(source.half(), target.half()).dtype == torch.float32


def test_barycentric_transport_hand_example():
    coupling = torch.tensor([[[0.25, 0.0, 0.0], [0.25, 0.0, 0.0], [0.0, 0.5, 0.0]]])
    frames = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [-1.0, 4.0]]])
    target_mask = torch.tensor([[True, True, False]])

    transported = barycentric_transport(coupling, frames, target_mask)

    # token 1: 2 * (0.25 a1 + 0.25 a2) = mean(a1, a2); token 2: 2 * 0.5 a3 = a3; token 3 is padding
    torch.testing.assert_close(transported, torch.tensor([[[2.0, 1.0], [-1.0, 4.0], [0.0, 0.0]]]))


def test_align_loss_is_a_per_sample_mean_then_a_batch_mean():
    transported = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [5.0, 5.0]]])
    target = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [1.0, 1.0]]])
    target_mask = torch.tensor([[True, True], [True, False]])

    per_sample = align_loss(transported, target, target_mask, reduction="none")

    torch.testing.assert_close(per_sample, torch.tensor([0.5, 2.0]))  # (0 + 1) / 2 and 2 / 1
    torch.testing.assert_close(align_loss(transported, target, target_mask), torch.tensor(1.25))


def test_ot_loss_hand_example():
    coupling = torch.tensor([[[0.5, 0.0], [0.0, 0.5]], [[0.25, 0.25], [0.25, 0.25]]])
    cost = torch.tensor([[[0.2, 9.0], [9.0, 0.4]], [[1.0, 2.0], [3.0, 4.0]]])
    torch.testing.assert_close(ot_loss(coupling, cost, reduction="none"), torch.tensor([0.3, 2.5]))
    torch.testing.assert_close(ot_loss(coupling, cost), torch.tensor(1.4))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(lambda2=0.0), "lambda2"),
        (dict(lambda2=-1.0), "lambda2"),
        (dict(lambda2=float("nan")), "lambda2"),
        (dict(sigma=0.0), "sigma"),
        (dict(sigma=-2.0), "sigma"),
        (dict(lambda1=-0.1), "lambda1"),
        (dict(max_iter=0), "max_iter"),
        (dict(max_iter=2.5), "max_iter"),
        (dict(tol=-1e-3), "tol"),
        (dict(grad="implicit"), "grad"),
    ],
)
def test_bad_parameters_raise_value_errors_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        tot_sinkhorn(torch.rand(2, 5, 3), **kwargs)


@pytest.mark.parametrize(
    "args,name",
    [
        ((torch.rand(5, 3),), "cost"),
        ((torch.randint(0, 2, (2, 5, 3)),), "cost"),
        ((torch.rand(2, 5, 3), torch.ones(2, 4, dtype=torch.bool)), "source_mask"),
        ((torch.rand(2, 5, 3), torch.ones(2, 5)), "source_mask"),
        ((torch.rand(2, 5, 3), None, torch.ones(3, 3, dtype=torch.bool)), "target_mask"),
    ],
)
def test_bad_shapes_and_masks_raise_value_errors_naming_them(args, name):
    with pytest.raises(ValueError, match=name):
        tot_sinkhorn(*args)


def test_helpers_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="source and target"):
        cosine_cost(torch.rand(2, 5, 4), torch.rand(2, 3, 6))
    with pytest.raises(ValueError, match="coupling and source"):
        barycentric_transport(torch.rand(2, 5, 3), torch.rand(2, 4, 8))
    with pytest.raises(ValueError, match="coupling and cost"):
        ot_loss(torch.rand(2, 5, 3), torch.rand(2, 5, 4))
    with pytest.raises(ValueError, match="transported and target"):
        align_loss(torch.rand(2, 3, 8), torch.rand(2, 3, 6))
    with pytest.raises(ValueError, match="reduction"):
        ot_loss(torch.rand(2, 5, 3), torch.rand(2, 5, 3), reduction="sum")


# Bad input that tot_sinkhorn cannot solve: refused naming the sample, or warned about.

FLOAT32_RANGE = 0.01 / (2 * torch.finfo(torch.float32).eps)  # R (nats) for which float32 keeps entries to 1%


@pytest.mark.parametrize("value,found", [(math.nan, "1 NaN"), (math.inf, "1 \\+inf"), (-math.inf, "1 -inf")])
def test_non_finite_costs_on_valid_pairs_are_refused_naming_the_sample(value, found):
    cost = torch.rand(3, 6, 4)
    source_mask = torch.ones(3, 6, dtype=torch.bool)
    source_mask[2, 4:] = False
    cost[2, 3, 1] = value
    with pytest.raises(ValueError, match=rf"sample\(s\) \[2\] \(batch indices\); sample 2 has {found} among its 16"):
        tot_sinkhorn(cost, source_mask)


def test_a_column_that_no_frame_can_reach_is_refused():
    """An infeasible column (infinite cost to every frame) would end as a NaN plan after max_iter iterations."""
    cost = torch.rand(2, 5, 3)
    cost[1, :, 2] = math.inf
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\] .* sample 1 has 5 \+inf"):
        tot_sinkhorn(cost, lambda1=0.0, sigma=None)


def test_non_finite_costs_on_padded_pairs_are_ignored():
    cost = torch.rand(2, 6, 4, generator=torch.Generator().manual_seed(21))
    source_mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    target_mask = torch.tensor([[True] * 3 + [False], [True] * 4])
    dirty = cost.clone()
    dirty[0, :, 3], dirty[1, 4:, :] = math.nan, -math.inf
    torch.testing.assert_close(
        tot_sinkhorn(dirty, source_mask, target_mask), tot_sinkhorn(cost, source_mask, target_mask), rtol=0, atol=0
    )


def test_kernel_range_at_the_float32_boundary_keeps_entries_to_one_percent_and_beyond_is_refused():
    """R = max|C| / lambda2 here (no reward, no prior): a cost offset moves it to either side of the limit."""
    base = torch.rand(3, 9, 5, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    plain = dict(lambda1=0.0, lambda2=1.0, sigma=None, max_iter=2000, tol=1e-6, warn=False)
    inside = base + (0.999 * FLOAT32_RANGE - 1.0)
    reference = tot_sinkhorn(inside, **plain)
    coupling = tot_sinkhorn(inside.float(), **plain)
    assert ((coupling.double() - reference).abs() / reference).max() < 1e-2
    with pytest.raises(ValueError, match=r"= 4\.199e\+04 nats in sample 0 .* only for R <= 4\.194e\+04"):
        tot_sinkhorn((base + 1.001 * FLOAT32_RANGE).float(), **plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lambda2_and_sigma_named_by_the_refusal_are_where_the_working_range_begins(dtype):
    cost = cosine_cost(*torch.randn(2, 2, 8, 16, generator=torch.Generator().manual_seed(23), dtype=dtype))
    quick = dict(max_iter=10, warn=False)
    with pytest.raises(ValueError, match=f"in {dtype}") as refused:
        tot_sinkhorn(cost, lambda2=1e-15, **quick)
    lambda2_min = float(re.search(r"lambda2 >= (\S+) \(with this sigma\)", str(refused.value)).group(1))
    with pytest.raises(ValueError, match="lambda2 >="):
        tot_sinkhorn(cost, lambda2=lambda2_min * 0.999, **quick)
    tot_sinkhorn(cost, lambda2=lambda2_min * 1.001, **quick)

    small = dict(quick, lambda2=20 / (0.01 / (2 * torch.finfo(dtype).eps)))  # the cost takes a tenth of the range
    with pytest.raises(ValueError, match=f"in {dtype}") as refused:
        tot_sinkhorn(cost, lambda1=1e15, **small)
    lambda1_max = float(re.search(r"lambda1 <= (\S+),", str(refused.value)).group(1))
    with pytest.raises(ValueError, match="lambda1 <="):
        tot_sinkhorn(cost, lambda1=lambda1_max * 1.01, **small)
    tot_sinkhorn(cost, lambda1=lambda1_max * 0.99, **small)

    with pytest.raises(ValueError, match=f"in {dtype}") as refused:
        tot_sinkhorn(cost, sigma=1e-9, **quick)
    sigma_min = float(re.search(r"sigma >= (\S+),", str(refused.value)).group(1))
    assert sigma_min == pytest.approx(math.sqrt(0.5 / (0.01 / (2 * torch.finfo(dtype).eps))), rel=1e-3)
    with pytest.raises(ValueError, match="sigma >="):
        tot_sinkhorn(cost, sigma=sigma_min * 0.999, **quick)
    tot_sinkhorn(cost, sigma=sigma_min * 1.001, **quick)


@pytest.mark.parametrize("params", [dict(lambda2=1e-6), dict(sigma=1e-6), dict(lambda2=1e-5, lambda1=0.0, sigma=None)])
def test_parameters_whose_kernel_underflows_in_float32_are_refused_and_float64_solves_them(params):
    """The reported cases: a plan of mass 18 at lambda2 = 1e-6, NaN at a tiny sigma."""
    cost = cosine_cost(torch.randn(2, 40, 8), torch.randn(2, 7, 8))
    with pytest.raises(
        ValueError, match=r"torch.float32 resolves the plan's entries to 1% only for R <= .* or float64"
    ):
        tot_sinkhorn(cost, **params)
    coupling, log = tot_sinkhorn(cost.double(), **params, max_iter=20, log=True, warn=False)
    assert torch.isfinite(coupling).all() and torch.allclose(log["mass"], torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_prior_too_narrow_for_any_precision_is_refused(dtype):
    """sigma = 1e-20 gave a NaN plan: 1 / (2 sigma^2) overflows float32 and is beyond float64's range too."""
    with pytest.raises(ValueError, match=r"= 5e\+39 nats in sample 0 .* Use sigma >= "):
        tot_sinkhorn(torch.rand(1, 9, 4, dtype=dtype), sigma=1e-20)


def test_unconverged_plans_warn_naming_how_many_and_which_samples():
    cost = cosine_cost(*torch.randn(2, 3, 300, 64, generator=torch.Generator().manual_seed(24)))
    source_mask, target_mask = torch.ones(3, 300, dtype=torch.bool), torch.ones(3, 300, dtype=torch.bool)
    source_mask[[0, 2], 1:], target_mask[[0, 2], 1:] = False, False  # one frame, one token: solved at once
    with pytest.warns(UserWarning, match=r"max_iter=20 iterations for 1 of 3 samples \(batch indices \[1\];"):
        _, log = tot_sinkhorn(cost, source_mask, target_mask, max_iter=20, log=True)
    assert log["converged"].tolist() == [True, False, True]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tot_sinkhorn(cost, source_mask, target_mask, max_iter=20, warn=False)  # the caller warns itself
        tot_sinkhorn(cost, source_mask, target_mask, max_iter=20, tol=0.0)  # a fixed number of iterations asked for
        tot_sinkhorn(cost, source_mask, target_mask, max_iter=1000)  # converged


def test_masks_on_another_device_than_the_cost_are_named():
    cost = torch.rand(2, 5, 3)
    with pytest.raises(ValueError, match=r"source_mask is on device meta but cost is on cpu"):
        tot_sinkhorn(cost, torch.ones(2, 5, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match=r"target_mask is on device meta but coupling is on cpu"):
        barycentric_transport(cost, torch.rand(2, 5, 4), torch.ones(2, 3, dtype=torch.bool, device="meta"))
    meta = torch.empty(2, 5, 3, device="meta")
    with pytest.raises(ValueError, match=r"coupling is on device cpu but source is on meta"):
        barycentric_transport(cost, torch.empty(2, 5, 4, device="meta"))
    with pytest.raises(ValueError, match=r"coupling is on device cpu but cost is on meta"):
        ot_loss(cost, meta)
    with pytest.raises(ValueError, match=r"target is on device meta but transported is on cpu"):
        align_loss(cost, meta)
    with pytest.raises(ValueError, match=r"source is on device cpu but target is on meta"):
        cosine_cost(torch.rand(2, 5, 4), torch.empty(2, 3, 4, device="meta"))


def test_a_problem_that_cannot_fit_in_memory_is_refused_with_the_estimated_peak():
    shape = (16, 10**6, 10**5)  # 1.6e12 entries; expand allocates none of them
    cost = torch.zeros(1, 1, 1).expand(*shape)
    peak = 10 * 16 * 10**6 * 10**5 * 4 / 2**30
    with pytest.raises(
        ValueError, match=rf"estimated peak memory .* is {re.escape(f'{peak:.3g}')} GiB .* but cpu has"
    ):
        tot_sinkhorn(cost, torch.ones(16, 10**6, dtype=torch.bool), torch.ones(16, 10**5, dtype=torch.bool))


# Unbalanced marginals (tau): POT's ot.unbalanced.sinkhorn_unbalanced is the oracle.


def pot_unbalanced_coupling(cost, lambda2, tau, method="sinkhorn"):
    """POT's entropic unbalanced OT, reg_type "kl" (reference measure mu nu^T), uniform weights, to convergence."""
    n, m = cost.shape
    return ot.unbalanced.sinkhorn_unbalanced(
        np.full(n, 1 / n), np.full(m, 1 / m), cost, lambda2, tau, method=method, reg_type="kl",
        numItermax=200000, stopThr=1e-15,
    )  # fmt: skip


def assert_matches_pot_unbalanced(coupling, cost, source_mask, target_mask, params, method="sinkhorn"):
    """Every sample's valid block equals POT's plan to 1e-6; padding holds exactly zero."""
    lambda1, lambda2, sigma, tau = (params[key] for key in ("lambda1", "lambda2", "sigma", "tau"))
    for b in range(cost.shape[0]):
        rows, cols = source_mask[b], target_mask[b]
        effective = opw_effective_cost(cost[b][rows][:, cols].numpy(), lambda1, lambda2, sigma)
        expected = pot_unbalanced_coupling(effective, lambda2, tau, method)
        np.testing.assert_allclose(coupling[b][rows][:, cols].numpy(), expected, rtol=0, atol=1e-6 * expected.max())
        assert torch.all(coupling[b][~(rows[:, None] & cols[None, :])] == 0)


@pytest.mark.parametrize(
    "lambda1,lambda2,sigma,tau",
    [
        (0.0, 0.1, None, 1.0),
        (0.0, 0.05, None, 0.01),
        (1.0, 0.1, 1.0, 0.5),
        (1.0, 0.1, 1.0, 20.0),
        (0.5, 0.5, 2.5, 3.0),
    ],
)
def test_unbalanced_tot_matches_pot_sinkhorn_unbalanced_on_padded_batches(lambda1, lambda2, sigma, tau):
    """Plain unbalanced OT (lambda1 = 0, no prior) and TOT with unbalanced marginals, batches of varied sizes."""
    params = dict(lambda1=lambda1, lambda2=lambda2, sigma=sigma, tau=tau)
    for seed, (batch, n_rows, n_cols) in enumerate([(5, 23, 9), (3, 40, 4), (4, 6, 13)]):
        generator = torch.Generator().manual_seed(30 + seed)
        cost = 2 * torch.rand(batch, n_rows, n_cols, generator=generator, dtype=torch.float64)
        source_mask, target_mask = random_masks(generator, batch, n_rows, n_cols)
        coupling, log = tot_sinkhorn(cost, source_mask, target_mask, **params, **TIGHT, log=True)
        assert_matches_pot_unbalanced(coupling, cost, source_mask, target_mask, params)
        assert log["converged"].all() and log["marginal_error"].max() < 1e-10
        torch.testing.assert_close(log["mass"], coupling.sum(dim=(1, 2)))


@pytest.mark.parametrize(
    "case,params",
    [
        ("tiny tau", dict(lambda1=1.0, lambda2=0.1, sigma=1.0, tau=1e-6, tol=1e-8)),
        ("huge tau", dict(lambda1=0.0, lambda2=0.1, sigma=None, tau=1e6)),
        ("high cost", dict(lambda1=0.0, lambda2=0.05, sigma=None, tau=0.5, offset=10.0)),
        ("narrow prior", dict(lambda1=1.0, lambda2=0.1, sigma=0.1, tau=1.0)),
    ],
)
def test_unbalanced_extreme_inputs_give_no_nan_and_match_pot(case, params):
    """float64 against POT; float32 and float16 (solved in float32) against the float64 plan. ``tol`` is an
    L1 error: at tau = 1e-6 float64 stops near 1e-8 (rho = lambda2 / tau = 1e5 scales the rounding of f)."""
    params = dict(params)
    offset, tol = params.pop("offset", 0.0), params.pop("tol", 1e-13)
    generator = torch.Generator().manual_seed(34)
    cost = offset + 2 * torch.rand(4, 15, 6, generator=generator, dtype=torch.float64)
    source_mask, target_mask = random_masks(generator, 4, 15, 6)
    source_mask[3], target_mask[3, 1:] = False, False  # sample 3: nothing to transport
    source_mask[2, 1:] = False  # sample 2: a single frame
    coupling = tot_sinkhorn(cost, source_mask, target_mask, **params, max_iter=20000, tol=tol)
    assert torch.isfinite(coupling).all() and torch.all(coupling[3] == 0)
    if params["tau"] < 1e3:
        assert_matches_pot_unbalanced(coupling[:3], cost[:3], source_mask[:3], target_mask[:3], params)
    else:  # POT's unbalanced solver takes minutes here: the balanced plan is the limit, O(lambda2 / tau) away
        for b in range(3):
            rows, cols = source_mask[b], target_mask[b]
            expected = pot_coupling(cost[b][rows][:, cols].numpy(), params["lambda2"])
            np.testing.assert_allclose(coupling[b][rows][:, cols].numpy(), expected, rtol=1e-5)
    for dtype in (torch.float32, torch.float16):
        low = tot_sinkhorn(cost.to(dtype), source_mask, target_mask, **params, max_iter=2000, tol=1e-6, warn=False)
        assert torch.isfinite(low).all() and torch.all(low[3] == 0)
        if dtype == torch.float32:  # float16 rounds the cost itself
            torch.testing.assert_close(low.double(), coupling, rtol=0, atol=1e-2 * coupling.max().item())


def test_unbalanced_plan_tends_to_the_balanced_one_as_tau_grows():
    generator = torch.Generator().manual_seed(35)
    cost = 2 * torch.rand(3, 20, 6, generator=generator, dtype=torch.float64)
    source_mask, target_mask = random_masks(generator, 3, 20, 6)
    balanced = tot_sinkhorn(cost, source_mask, target_mask, **TIGHT)
    gaps = [
        (tot_sinkhorn(cost, source_mask, target_mask, tau=tau, **TIGHT) - balanced).abs().sum().item()
        for tau in (1.0, 1e2, 1e4)
    ]
    assert gaps[0] > 1e-2 and gaps[1] < gaps[0] / 50 and gaps[2] < gaps[1] / 50


def unbalanced_value(plan, cost, reward, log_prior, lambda2, tau):
    """<T, C - S> + lambda2 KL(T || P mu nu^T) + tau KL(T 1 || mu) + tau KL(T^T 1 || nu), generalised KL."""

    def kl(x, log_y):
        return (x * (x.log() - log_y) - x + log_y.exp()).sum()

    n, m = plan.shape[-2:]
    log_mu, log_nu = torch.full((n,), -math.log(n), dtype=plan.dtype), torch.full((m,), -math.log(m), dtype=plan.dtype)
    reference = log_prior + log_mu[:, None] + log_nu[None, :]
    return (
        (plan * (cost - reward)).sum()
        + lambda2 * kl(plan, reference)
        + tau * kl(plan.sum(-1), log_mu)
        + tau * kl(plan.sum(-2), log_nu)
    )


def test_unbalanced_envelope_coupling_is_the_gradient_of_the_optimal_value_and_autodiff_agrees():
    """Danskin for the unbalanced objective: d/dC of its optimal value is T*, by central differences and
    through the unrolled iterations (grad="autodiff")."""
    lambda1, lambda2, sigma, tau = 1.0, 0.2, 1.5, 0.7
    cost, direction, reward, log_prior = envelope_problem(36, 12, 5, lambda1, sigma)
    params = dict(lambda1=lambda1, lambda2=lambda2, sigma=sigma, tau=tau)

    def optimal_value(c):
        plan = tot_sinkhorn(c, **params, **TIGHT)
        return unbalanced_value(plan, c, reward, log_prior, lambda2, tau).item()

    envelope = assert_envelope_is_the_central_difference(optimal_value, cost, direction, {**params, **TIGHT})

    leaf = cost.clone().requires_grad_()
    plan = tot_sinkhorn(leaf, **params, max_iter=500, tol=0.0, grad="autodiff")
    (gradient,) = torch.autograd.grad(unbalanced_value(plan, leaf, reward, log_prior, lambda2, tau), leaf)
    torch.testing.assert_close(gradient, envelope, rtol=1e-7, atol=1e-10)


def test_unbalanced_autodiff_passes_gradcheck_on_a_padded_batch():
    generator = torch.Generator().manual_seed(37)
    cost = (2 * torch.rand(2, 5, 3, generator=generator, dtype=torch.float64)).requires_grad_()
    source_mask = torch.tensor([[True] * 5, [True, False, True, True, False]])
    target_mask = torch.tensor([[True] * 3, [True, True, False]])
    fixed = dict(lambda1=1.0, lambda2=0.5, sigma=1.5, tau=0.8, max_iter=20, tol=0.0, grad="autodiff")
    assert torch.autograd.gradcheck(
        lambda c: tot_sinkhorn(c, source_mask, target_mask, **fixed), (cost,), eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("tau", [0.0, -1.0, math.nan, math.inf, "1"])
def test_bad_tau_is_refused_naming_it(tau):
    with pytest.raises(ValueError, match="tau"):
        tot_sinkhorn(torch.rand(2, 5, 3), tau=tau)
