"""Tests of tot_sinkhorn's accelerations: over-relaxation, the scaling form with absorbed potentials and
the log-domain fallback, at training shapes and on extreme inputs."""

import pytest
import torch
from test_tot import TIGHT, opw_effective_cost, pot_coupling, random_masks

from modeling_tot_cakt.tot import (
    cosine_cost,
    fused_gw_loss,
    fused_gw_sinkhorn,
    ot_loss,
    temporal_prior_log,
    tot_sinkhorn,
)


def random_feature_cost(batch, n_rows, n_cols, seed=0, dim=64):
    """Cosine cost (float32) of random features: the untrained model's alignment problem."""
    generator = torch.Generator().manual_seed(seed)
    frames = torch.randn(batch, n_rows, dim, generator=generator)
    tokens = torch.randn(batch, n_cols, dim, generator=generator)
    return cosine_cost(frames, tokens)


def assert_matches_pot(coupling, cost, source_mask, target_mask, lambda1, lambda2, sigma):
    for b in range(cost.shape[0]):
        rows, cols = source_mask[b], target_mask[b]
        sample_cost = cost[b][rows][:, cols].numpy()
        expected = pot_coupling(opw_effective_cost(sample_cost, lambda1, lambda2, sigma), lambda2)
        got = coupling[b][rows][:, cols].numpy()
        assert abs(got - expected).max() < 1e-6


@pytest.mark.parametrize("shape", [(8, 30, 8), (16, 225, 15), (32, 300, 30), (8, 1000, 50), (2, 1000, 100)])
def test_default_solver_converges_at_training_shapes_in_float32(shape):
    """Plain Sinkhorn is still at 1e-2 after 100 iterations at 1000 x 50 and 5e-4 after 1000."""
    cost = random_feature_cost(*shape)
    coupling, log = tot_sinkhorn(cost, log=True)  # default parameters, max_iter and tol

    assert not log["log_domain"]
    assert torch.all(log["converged"]) and log["marginal_error"].max() < 1e-4
    assert log["n_iter"] <= 300
    assert torch.all(log["relaxation"] >= 1.9)
    n_rows, n_cols = shape[1:]
    assert (coupling.sum(dim=1) - 1 / n_cols).abs().sum(dim=1).max() < 1e-5  # columns exact


def test_relaxation_grows_on_aligned_features_where_omega_1_9_is_too_small():
    """Features of a trained model sit near their tokens: the cost spans [0, 2] along the band and
    plain Sinkhorn is far slower (omega = 1.9 alone is still at 2e-4 after 1000 iterations here)."""
    generator = torch.Generator().manual_seed(26)
    tokens = torch.randn(4, 100, 4, generator=generator)
    frames = tokens[:, torch.arange(1000) * 100 // 1000] + 0.5 * torch.randn(4, 1000, 4, generator=generator)
    _, log = tot_sinkhorn(cosine_cost(frames, tokens), log=True)
    assert torch.all(log["converged"]) and log["n_iter"] <= 600
    assert log["relaxation"].max() > 1.9


def test_relaxed_fast_path_matches_pot_in_float64():
    lambda1, lambda2, sigma = 1.0, 0.1, 1.0
    generator = torch.Generator().manual_seed(20)
    cost = 2 * torch.rand(3, 60, 12, generator=generator, dtype=torch.float64)
    source_mask, target_mask = random_masks(generator, 3, 60, 12)

    coupling, log = tot_sinkhorn(cost, source_mask, target_mask, **TIGHT, log=True)

    assert not log["log_domain"] and torch.all(log["relaxation"] >= 1.9)
    assert log["marginal_error"].max() < 1e-12
    assert_matches_pot(coupling, cost, source_mask, target_mask, lambda1, lambda2, sigma)


def test_fast_problems_are_not_relaxed():
    """Plain OT converges fast without relaxation; omega = 1.9 would slow it down to a rate of 0.9."""
    cost = random_feature_cost(4, 300, 30).double()
    source_mask, target_mask = random_masks(torch.Generator().manual_seed(27), 4, 300, 30)  # padding counts no error
    coupling, log = tot_sinkhorn(cost, source_mask, target_mask, lambda1=0.0, sigma=None, tol=1e-12, log=True)
    assert torch.all(log["relaxation"] == 1.0)
    assert log["n_iter"] <= 30 and log["marginal_error"].max() < 1e-12


def test_absorbing_the_scalings_keeps_the_fast_path_under_a_cost_offset():
    """A constant offset leaves the coupling unchanged but scales the kernel by exp(-offset / lambda2) =
    exp(-60): the scalings must absorb it into the potentials, or they overflow float32 later on."""
    cost = random_feature_cost(4, 40, 10)
    fixed = dict(max_iter=200, tol=0.0)
    shifted, log = tot_sinkhorn(cost + 6.0, **fixed, log=True)
    assert not log["log_domain"]
    torch.testing.assert_close(shifted, tot_sinkhorn(cost, **fixed), rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize(
    "offset,scale,params",
    [
        (98.0, 2.0, dict(lambda1=1.0, lambda2=0.1, sigma=1.0)),  # exp(-cost / lambda2) = exp(-1000) = 0
        (10.0, 0.05, dict(lambda1=0.01, lambda2=0.01, sigma=1.0)),  # lambda2 = 0.01: exp(-1000) again
    ],
)
def test_kernel_underflow_falls_back_to_the_log_domain_and_stays_exact_in_float64(offset, scale, params):
    generator = torch.Generator().manual_seed(21)
    cost = offset + scale * torch.rand(3, 20, 6, generator=generator, dtype=torch.float64)
    source_mask, target_mask = random_masks(generator, 3, 20, 6)

    coupling, log = tot_sinkhorn(cost, source_mask, target_mask, **params, **TIGHT, log=True)

    assert log["log_domain"]
    assert torch.isfinite(coupling).all()
    # POT gets the cost without its offset (the same coupling): at -1000 nats float64 rounding
    # keeps its log-domain iterations from ever reaching POT's stopping threshold.
    assert_matches_pot(coupling, cost - offset, source_mask, target_mask, **params)


@pytest.mark.parametrize(
    "scale,lambda2",
    [(2.0, 0.01), (100.0, 0.1), (-100.0, 0.1)],  # float32 under/overflows exp(-cost / lambda2) in all three
)
def test_extreme_float32_costs_fall_back_and_follow_the_float64_iterates(scale, lambda2):
    generator = torch.Generator().manual_seed(22)
    cost = scale * torch.rand(4, 20, 6, generator=generator)
    source_mask = torch.ones(4, 20, dtype=torch.bool)
    target_mask = torch.ones(4, 6, dtype=torch.bool)
    source_mask[3] = False  # a fully padded sample
    fixed = dict(lambda2=lambda2, max_iter=200, tol=0.0)

    coupling, log = tot_sinkhorn(cost, source_mask, target_mask, **fixed, log=True)
    reference = tot_sinkhorn(cost.double(), source_mask, target_mask, **fixed)

    assert log["log_domain"]
    assert torch.isfinite(coupling).all() and torch.all(coupling[3] == 0)
    torch.testing.assert_close(coupling.double(), reference, rtol=0, atol=1e-4)  # entries are ~1e-2
    assert (coupling[:3].sum(dim=1) - 1 / 6).abs().max() < 1e-5  # columns exact up to float32 rounding


@pytest.mark.parametrize("grad", ["envelope", "autodiff"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_rows,n_cols", [(1, 1), (1, 7), (7, 1)])
def test_single_frame_or_token_and_padded_samples_in_both_precisions_and_grad_modes(n_rows, n_cols, dtype, grad):
    generator = torch.Generator().manual_seed(23)
    features = torch.randn(3, n_rows, 8, generator=generator, dtype=dtype, requires_grad=True)
    tokens = torch.randn(3, n_cols, 8, generator=generator, dtype=dtype)
    source_mask = torch.tensor([[True] * n_rows, [True] * n_rows, [False] * n_rows])
    target_mask = torch.tensor([[True] * n_cols, [False] * n_cols, [True] * n_cols])

    cost = cosine_cost(features, tokens)
    coupling = tot_sinkhorn(cost, source_mask, target_mask, grad=grad)
    ot_loss(coupling, cost).backward()

    # one row or one column leaves a single feasible coupling; samples 1 and 2 have nothing to transport
    torch.testing.assert_close(coupling[0], torch.full((n_rows, n_cols), 1 / (n_rows * n_cols), dtype=dtype))
    assert torch.all(coupling[1:] == 0)
    assert torch.isfinite(features.grad).all() and torch.all(features.grad[1:] == 0)


@pytest.mark.parametrize("offset", [0.0, 98.0])  # the relaxed scaling form, then the log-domain fallback
def test_autodiff_through_relaxed_iterations_passes_gradcheck(offset):
    generator = torch.Generator().manual_seed(24)
    cost = (offset + 2 * torch.rand(2, 6, 4, generator=generator, dtype=torch.float64)).requires_grad_()
    source_mask = torch.tensor([[True] * 6, [True] * 5 + [False]])
    target_mask = torch.tensor([[True] * 4, [True, False, True, True]])
    fixed = dict(max_iter=30, tol=0.0, grad="autodiff")

    _, log = tot_sinkhorn(cost.detach(), source_mask, target_mask, **fixed, log=True)
    assert log["log_domain"] == (offset > 0) and torch.any(log["relaxation"] == 1.9)
    assert torch.autograd.gradcheck(
        lambda c: tot_sinkhorn(c, source_mask, target_mask, **fixed), (cost,), eps=1e-6, atol=1e-7
    )


def test_log_tells_which_samples_did_not_converge():
    """What training logs and warns about: a sample left above tol at max_iter is reported, per sample."""
    cost = random_feature_cost(3, 1000, 50)
    source_mask = torch.ones(3, 1000, dtype=torch.bool)
    target_mask = torch.ones(3, 50, dtype=torch.bool)
    source_mask[2, 3:], target_mask[2, 2:] = False, False  # 3 frames, 2 tokens: solved in a few iterations
    _, log = tot_sinkhorn(cost, source_mask, target_mask, max_iter=20, log=True)
    assert log["n_iter"] == 20
    assert log["converged"].tolist() == [False, False, True]
    assert torch.all(log["marginal_error"][:2] > 1e-3) and log["marginal_error"][2] < 1e-4


def test_potentials_stay_centred_so_an_unconverged_float32_plan_keeps_its_mass():
    """Relaxed iterations that have not converged let f and -g drift together (to 3e6 nats here, over 100
    times the kernel's range) and float32 then lost 6% of the mass; re-centring keeps the drift out of the
    exponent."""
    generator = torch.Generator().manual_seed(0)
    cost = cosine_cost(torch.randn(2, 40, 8, generator=generator), torch.randn(2, 7, 8, generator=generator))
    with pytest.warns(UserWarning, match="did not converge"):
        coupling, log = tot_sinkhorn(cost, lambda2=1e-4, log=True)
    assert log["log_domain"]
    assert (log["mass"] - 1).abs().max() < 1e-3


def random_cost(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return cosine_cost(torch.randn(2, 30, 8, generator=generator), torch.randn(2, 5, 8, generator=generator))


@pytest.mark.parametrize(
    "shift, params",
    [(0.0, dict(tau=1.0, lambda1=200.0)), (0.0, dict(tau=1.0, lambda1=1000.0)), (-200.0, dict(tau=1.0, lambda1=0.0))],
)
def test_an_unbalanced_plan_that_overflows_is_named_not_returned(shift, params):
    """Where the reward exceeds the cost, relaxed marginals let the mass run to inf (the stopping test, false for NaN,
    used to let it through with a NaN error and no warning)."""
    with pytest.raises(
        ValueError,
        match=r"tot_sinkhorn's plan is not finite for sample\(s\) \[0, 1\].*mass inf.*"
        r"lower lambda1, raise tau",
    ):
        tot_sinkhorn(random_cost() + shift, **params)


def test_an_unbalanced_plan_whose_mass_runs_away_is_warned_with_its_mass_and_the_right_advice():
    with pytest.warns(
        UserWarning,
        match=r"The largest plan's mass is 1\.2\de\+10 \(1 when balanced\)\. With "
        r"unbalanced marginals .* lower lambda1, raise tau",
    ):
        coupling, log = tot_sinkhorn(random_cost(), tau=1.0, lambda1=50.0, log=True)
    assert float(log["mass"].max()) > 1e10


def test_losses_of_a_nan_plan_are_nan_not_zero():
    cost = random_cost()
    plan = torch.full_like(cost, float("nan"))
    assert ot_loss(plan, cost).isnan() and ot_loss(plan, cost, reduction="none").isnan().all()
    edges = torch.zeros(2, 30, 30), torch.zeros(2, 5, 5)
    assert fused_gw_loss(plan, cost, *edges).isnan()
    plan[1] = 0.0  # an empty sample still leaves the mean, a NaN one does not
    assert ot_loss(plan, cost).isnan()


def test_a_sigma_whose_square_underflows_is_refused_with_the_sigma_that_works():
    with pytest.raises(ValueError, match=r"R = .* = inf nats.*Use sigma >= 0\.00345"):
        tot_sinkhorn(random_cost(), sigma=1e-200)
    masks = torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"sigma=1e-200 is so small that sigma\*\*2 underflows to 0"):
        temporal_prior_log(*masks, 1e-200)


def test_huge_edge_costs_are_named_by_fused_gw_not_blamed_on_cost():
    generator = torch.Generator().manual_seed(0)
    h, z = torch.randn(2, 30, 8, generator=generator), torch.randn(2, 5, 8, generator=generator)
    with pytest.raises(
        ValueError,
        match=r"source_cost and target_cost are too large for fused_gw_sinkhorn .* their "
        r"largest \|D\| are 19\d\d and 1\.\d+",
    ):
        fused_gw_sinkhorn(cosine_cost(h, z), cosine_cost(h, h) * 1e3, cosine_cost(z, z))
    with pytest.raises(ValueError, match=r"tot_sinkhorn cannot solve sample"):  # the node cost's own range: cost
        fused_gw_sinkhorn(cosine_cost(h, z), cosine_cost(h, h), cosine_cost(z, z), lambda2=1e-9)
