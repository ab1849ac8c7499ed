"""Tests of modeling_tot_cakt.tot: the TOT solver against POT, masks, gradients, losses."""

import math

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


def test_envelope_coupling_is_the_finite_difference_gradient_of_the_optimal_value():
    """W(C) = min_T <T, C - S> + lambda2 KL(T || P) has gradient T*(C) (Danskin): a central difference of
    the solved value along a random direction must equal <T*, direction>. A plan that is not the
    optimum of this very problem (unconverged, other parameters, transposed potentials) fails."""
    lambda1, lambda2, sigma = 1.0, 0.1, 1.0
    generator = torch.Generator().manual_seed(25)
    cost = 2 * torch.rand(1, 30, 7, generator=generator, dtype=torch.float64)
    direction = torch.randn(1, 30, 7, generator=generator, dtype=torch.float64)
    rows, cols = torch.ones(1, 30, dtype=torch.bool), torch.ones(1, 7, dtype=torch.bool)
    reward = order_reward(rows, cols, lambda1, torch.float64)
    log_prior = temporal_prior_log(rows, cols, sigma, torch.float64)
    params = dict(lambda1=lambda1, lambda2=lambda2, sigma=sigma, **TIGHT)

    def optimal_value(c):
        plan = tot_sinkhorn(c, **params)
        kl = (plan * (plan.log() - log_prior) - plan + log_prior.exp()).sum()
        return ((plan * (c - reward)).sum() + lambda2 * kl).item()

    step = 1e-5
    finite_difference = (optimal_value(cost + step * direction) - optimal_value(cost - step * direction)) / (2 * step)
    coupling = tot_sinkhorn(cost.clone().requires_grad_(), **params)  # envelope: detached

    assert not coupling.requires_grad
    np.testing.assert_allclose((coupling * direction).sum().item(), finite_difference, rtol=1e-6, atol=1e-9)


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
