"""Property-based tests of modeling_tot_cakt.tot.tot_sinkhorn (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_tot_cakt.tot import tot_sinkhorn

SETTINGS = settings(max_examples=25, deadline=None)
FIXED = dict(max_iter=60, tol=0.0)  # a fixed number of iterations: comparisons see the same iterates
# Marginal relaxation: balanced (None) or unbalanced with a weak to strong penalty.
TAUS = st.one_of(st.none(), st.floats(0.05, 20.0))


@st.composite
def problems(draw):
    """A padded float64 batch: cost (B, N, M), masks with holes and empty samples, parameters."""
    batch = draw(st.integers(1, 3))
    n_rows = draw(st.integers(1, 12))
    n_cols = draw(st.integers(1, 8))
    source_mask = torch.tensor(
        draw(st.lists(st.lists(st.booleans(), min_size=n_rows, max_size=n_rows), min_size=batch, max_size=batch))
    )
    target_mask = torch.tensor(
        draw(st.lists(st.lists(st.booleans(), min_size=n_cols, max_size=n_cols), min_size=batch, max_size=batch))
    )
    seed = draw(st.integers(0, 2**31 - 1))
    cost = 2 * torch.rand(batch, n_rows, n_cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    params = dict(
        lambda1=draw(st.floats(0.0, 5.0)),
        lambda2=draw(st.floats(0.1, 1.0)),
        sigma=draw(st.one_of(st.none(), st.floats(0.5, 5.0))),
    )
    return cost, source_mask, target_mask, params


def solvable(source_mask, target_mask):
    """(B, N, M) mask of the pairs that carry mass: valid pairs of samples with frames and tokens."""
    non_empty = source_mask.any(dim=1) & target_mask.any(dim=1)
    return source_mask[:, :, None] & target_mask[:, None, :] & non_empty[:, None, None]


@SETTINGS
@given(problems(), TAUS)
def test_coupling_is_nonnegative_finite_and_zero_exactly_off_the_valid_pairs(problem, tau):
    cost, source_mask, target_mask, params = problem
    coupling = tot_sinkhorn(cost, source_mask, target_mask, **params, tau=tau, warn=False)
    pairs = solvable(source_mask, target_mask)
    assert torch.isfinite(coupling).all()
    assert torch.all(coupling >= 0)
    assert torch.all(coupling[~pairs] == 0)
    assert torch.all(coupling[pairs] > 0)


@SETTINGS
@given(problems())
def test_marginals_are_uniform_over_valid_positions(problem):
    cost, source_mask, target_mask, params = problem
    # Sinkhorn's linear rate degrades like exp(-range(C) / (2 lambda2)) on near-permutation
    # problems; a larger temperature keeps 20000 iterations enough to reach the tolerance.
    params = dict(params, lambda2=5 * params["lambda2"])
    coupling = tot_sinkhorn(cost, source_mask, target_mask, **params, max_iter=20000, tol=1e-9)
    pairs = solvable(source_mask, target_mask)
    rows, cols = pairs.any(dim=2), pairs.any(dim=1)
    row_target = rows.double() / rows.sum(dim=1, keepdim=True).clamp(min=1)
    col_target = cols.double() / cols.sum(dim=1, keepdim=True).clamp(min=1)
    assert (coupling.sum(dim=2) - row_target).abs().sum(dim=1).max() < 1e-9
    assert (coupling.sum(dim=1) - col_target).abs().sum(dim=1).max() < 1e-12


@SETTINGS
@given(problems(), st.integers(0, 5), st.integers(0, 5), st.floats(-1e3, 1e3), TAUS)
def test_extra_padding_changes_nothing(problem, extra_rows, extra_cols, padding_cost, tau):
    cost, source_mask, target_mask, params = problem
    batch, n_rows, n_cols = cost.shape
    padded_cost = torch.full((batch, n_rows + extra_rows, n_cols + extra_cols), padding_cost, dtype=cost.dtype)
    padded_cost[:, :n_rows, :n_cols] = cost
    padded_source = torch.cat([source_mask, torch.zeros(batch, extra_rows, dtype=torch.bool)], dim=1)
    padded_target = torch.cat([target_mask, torch.zeros(batch, extra_cols, dtype=torch.bool)], dim=1)

    coupling = tot_sinkhorn(cost, source_mask, target_mask, **params, tau=tau, **FIXED)
    padded = tot_sinkhorn(padded_cost, padded_source, padded_target, **params, tau=tau, **FIXED)

    torch.testing.assert_close(padded[:, :n_rows, :n_cols], coupling, rtol=1e-10, atol=1e-15)
    assert torch.all(padded[:, n_rows:] == 0) and torch.all(padded[:, :, n_cols:] == 0)


@SETTINGS
@given(problems(), st.floats(-5.0, 5.0))
def test_adding_a_constant_to_the_cost_leaves_the_coupling_unchanged(problem, shift):
    cost, source_mask, target_mask, params = problem
    coupling = tot_sinkhorn(cost, source_mask, target_mask, **params, **FIXED)
    shifted = tot_sinkhorn(cost + shift, source_mask, target_mask, **params, **FIXED)
    torch.testing.assert_close(shifted, coupling, rtol=1e-9, atol=1e-14)


@SETTINGS
@given(problems())
def test_tot_tends_to_plain_ot_as_lambda1_vanishes_and_sigma_grows(problem):
    cost, source_mask, target_mask, params = problem
    plain = tot_sinkhorn(cost, source_mask, target_mask, lambda1=0.0, sigma=None, lambda2=params["lambda2"], **FIXED)
    near = dict(lambda2=params["lambda2"], **FIXED)
    close = tot_sinkhorn(cost, source_mask, target_mask, lambda1=1e-7, sigma=1e7, **near)
    far = tot_sinkhorn(cost, source_mask, target_mask, lambda1=1e-2, sigma=1e2, **near)
    torch.testing.assert_close(close, plain, rtol=1e-5, atol=1e-12)
    # The floor is float64 rounding (a few hundred ulps of a plan entry): a problem whose plan the marginals fix
    # alone (one valid row) leaves both differences at rounding noise, e.g. 1.3e-15 each.
    assert (close - plain).abs().max() <= 1e-3 * (far - plain).abs().max() + 1e-13
