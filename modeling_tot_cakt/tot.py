"""Temporal-order-preserving optimal transport (TOT) between acoustic frames and text tokens.

Pure functions (torch only) used by TOT-CAKT's alignment head:

- :func:`cosine_cost` -- cost matrix ``C_ij = 1 - cos(a_i, l_j)``;
- :func:`relative_positions`, :func:`temporal_prior_log`, :func:`order_reward` -- the temporal
  prior ``log P`` and the local order reward ``S`` of order-preserving Wasserstein [1];
- :func:`tot_sinkhorn` -- the TOT coupling, a batched, masked, over-relaxed and stabilised
  Sinkhorn solver, also with unbalanced (KL-relaxed) marginals;
- :func:`fused_gw_sinkhorn`, :func:`fused_gw_loss` -- graph-matching OT: the entropic fused
  Gromov-Wasserstein coupling over intra-modal edge costs [8, 9, 10], on the same solver;
- :func:`barycentric_transport`, :func:`ot_loss`, :func:`align_loss` -- the transport of acoustic
  features onto token positions and the two alignment losses of TOT-CAKT [2].

Conventions shared by every function:

- Batches are padded: ``source_mask`` ``(B, N)`` marks valid frames, ``target_mask`` ``(B, M)``
  valid tokens (``True`` = valid). Valid positions need not form a prefix; positions are counted
  among the valid ones. ``None`` means "all valid".
- A sample with no valid frame or no valid token is treated as fully padded: its coupling is all
  zero and it is left out of the loss means, so it never produces NaN.
- float16 / bfloat16 inputs are computed in float32 and results are returned in float32 (the
  coupling's entries are of order ``1 / (N M)``, which underflows in half precision); float32
  and float64 inputs keep their dtype. Autocast is disabled inside, for the same reason.

This file is self-contained (torch and the standard library only) because it is copied next to
the model for ``trust_remote_code``.

References
----------
.. [1] Su, B., & Hua, G. (2017). Order-preserving Wasserstein distance for sequence matching.
   In CVPR (pp. 1049-1057).
.. [2] Lu, X., Shen, P., Tsao, Y., & Kawai, H. (2024). Temporal order preserved optimal
   transport-based cross-modal knowledge transfer learning for ASR. IEEE SLT 2024,
   arXiv:2409.02239.
.. [3] Cuturi, M. (2013). Sinkhorn distances: Lightspeed computation of optimal transport.
   NeurIPS 26.
.. [4] Thibault, A., Chizat, L., Dossal, C., & Papadakis, N. (2021). Overrelaxed Sinkhorn-Knopp
   algorithm for regularized optimal transport. Algorithms 14(5), 143. arXiv:1711.01851.
.. [5] Lehmann, T., von Renesse, M.-K., Sambale, A., & Uschmajew, A. (2022). A note on
   overrelaxation in the Sinkhorn algorithm. Optimization Letters 16, 2209-2220.
.. [6] Schmitzer, B. (2019). Stabilized sparse scaling algorithms for entropy regularized
   transport problems. SIAM J. Sci. Comput. 41(3), A1443-A1481.
.. [7] Chizat, L., Peyré, G., Schmitzer, B., & Vialard, F.-X. (2018). Scaling algorithms for
   unbalanced optimal transport problems. Mathematics of Computation 87(314), 2563-2609.
.. [8] Vayer, T., Chapel, L., Flamary, R., Tavenard, R., & Courty, N. (2019). Optimal transport for
   structured data with application on graphs. ICML 2019.
.. [9] Peyré, G., Cuturi, M., & Solomon, J. (2016). Gromov-Wasserstein averaging of kernel and
   distance matrices. ICML 2016.
.. [10] GM-OT: graph-matching optimal transport for cross-modal knowledge transfer in ASR, the
   fused Gromov-Wasserstein follow-up of [2]. Interspeech 2025, arXiv:2505.13079.
"""

import math
import numbers
import os
import warnings
from dataclasses import dataclass

import torch

GRAD_MODES = ("envelope", "autodiff")

# Sinkhorn schedule (see the Notes of tot_sinkhorn). The iterations run in blocks of
# _CHECK_EVERY; after each block one device-to-host copy (a GPU sync) fetches the marginal error
# and the size of the scalings, the iterations themselves need none.
_CHECK_EVERY = 10
# Over-relaxation weight of the samples that plain Sinkhorn converges slowly on, and the error
# ratio per iteration of plain Sinkhorn above which a sample counts as slow.
_RELAXATION = 1.9
_SLOW_RATE = 0.5
# Relaxed samples whose error ratio per iteration exceeds omega - 1 by this margin get a larger
# omega, up to _MAX_RELAXATION.
_RATE_MARGIN = 0.02
_MAX_RELAXATION = 1.99
_ADAPT_AFTER = 100
# Unbalanced samples whose first plain iterations shrink the error more slowly than this per
# iteration behave like balanced ones and get _RELAXATION too.
_NEAR_BALANCED_RATE = 0.9
# Scalings are absorbed into the potentials when |log u| or |log v| exceeds this (nats).
_ABSORB_ABOVE = 10.0
# Relative accuracy of the plan's entries that the range check guarantees. Each entry is
# exp(log K + f + g), and the potentials span about as much as the log kernel, R nats (half each
# once re-centred): the exponent is rounded to about 2 eps R, the entry by that fraction. So R
# may reach _ENTRY_ACCURACY / (2 eps): 4.2e4 nats in float32, 2.3e13 in float64.
_ENTRY_ACCURACY = 1e-2
# Peak memory of one solve in (B, N, M) tensors of the working dtype, besides the cost itself
# (measured on CPU: 5 to 10, the most with float32 matrix products).
_PEAK_TENSORS = 10


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _no_autocast(device: torch.device):
    """Context in which autocast cannot push the computation back to half precision."""
    return torch.autocast(device_type=device.type, enabled=False)


def _check_mask(
    mask: torch.Tensor | None, name: str, batch: int, length: int, device, reference: str = "cost"
) -> torch.Tensor:
    """Validate a padding mask of shape ``(batch, length)`` on ``device`` (that of the tensor
    named ``reference``); ``None`` becomes all-``True``."""
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = f"a tensor of dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a torch.bool tensor (True = valid position), got {got}.")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"{name} must have shape {(batch, length)} to match the other inputs, got {tuple(mask.shape)}."
        )
    if mask.device != torch.device(device):
        raise ValueError(
            f"{name} is on device {mask.device} but {reference} is on {device}: move both to the same device "
            f"(e.g. {name}.to({reference}.device))."
        )
    return mask


def _check_same_device(first: torch.Tensor, first_name: str, second: torch.Tensor, second_name: str) -> None:
    """Raise a ValueError naming both tensors when they live on different devices."""
    if first.device != second.device:
        raise ValueError(
            f"{first_name} is on device {first.device} but {second_name} is on {second.device}: move both to the "
            f"same device (e.g. {second_name}.to({first_name}.device))."
        )


def _check_positive(value, name: str, allow_zero: bool = False) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a finite real > 0 (or >= 0)."""
    try:
        number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and (number >= 0 if allow_zero else number > 0)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}.")


def _kernel_range_limit(dtype: torch.dtype) -> float:
    """Largest log-kernel range R (nats) whose plan ``dtype`` resolves to ``_ENTRY_ACCURACY`` (see there)."""
    return _ENTRY_ACCURACY / (2 * torch.finfo(dtype).eps)


def _device_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can get on ``device``, or None where unknown.

    CUDA: the driver's free memory plus what torch's caching allocator holds unused; CPU: the
    physical memory (what certainly cannot be exceeded; swap aside).
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            return None
    return None


def _check_fits(shape: tuple, dtype: torch.dtype, device: torch.device, grad: str) -> None:
    """Refuse a problem whose estimated peak memory (``_PEAK_TENSORS`` (B, N, M) tensors) exceeds the device's."""
    batch, n_rows, n_cols = shape
    peak = _PEAK_TENSORS * batch * n_rows * n_cols * torch.finfo(dtype).bits // 8
    available = _device_memory(device)
    if available is not None and peak > available:
        extra = ", plus a graph that grows with the iterations for grad='autodiff'" if grad == "autodiff" else ""
        raise ValueError(
            f"tot_sinkhorn's estimated peak memory for a cost of shape (B, N, M) = {tuple(shape)} in {dtype} is "
            f"{peak / 2**30:.3g} GiB ({_PEAK_TENSORS} tensors of that shape{extra}), but {device} has "
            f"{available / 2**30:.3g} GiB available: split the batch, or cut the frames N or tokens M per sample."
        )


def _first(indices: list[int], limit: int = 10) -> str:
    """``indices`` as a short printable list: the first ``limit``, then how many more."""
    more = f" and {len(indices) - limit} more" if len(indices) > limit else ""
    return f"{indices[:limit]}{more}"


def _check_cost_values(cost, pair_mask, lambda1: float, lambda2: float, sigma: float | None) -> None:
    """Refuse non-finite costs on valid pairs, and problems the working dtype cannot resolve.

    One reduction and one host sync for the whole batch: the largest ``|C|`` over each sample's
    valid pairs, NaN or infinite where one of them is. ``R = (max|C| + lambda1) / lambda2 +
    1 / (2 sigma^2)`` bounds the range of the log kernel that the potentials must bridge (the
    cost and the order reward over ``lambda2``; the prior's cost of moving one step of the
    shorter sequence off the diagonal), and must stay within :func:`_kernel_range_limit`.
    """
    magnitude = cost.masked_fill(~pair_mask, 0.0).abs_().flatten(1).amax(dim=1)
    values = magnitude.tolist()  # the check's one host sync
    bad = [b for b, value in enumerate(values) if not math.isfinite(value)]
    if bad:
        b = bad[0]
        valid = cost[b][pair_mask[b]]
        counts = {"NaN": valid.isnan(), "+inf": valid == math.inf, "-inf": valid == -math.inf}
        found = ", ".join(f"{int(hits.sum())} {name}" for name, hits in counts.items() if bool(hits.any()))
        raise ValueError(
            f"cost holds non-finite values on valid (frame, token) pairs of sample(s) {_first(bad)} (batch "
            f"indices); sample {b} has {found} among its {valid.numel()} valid entries. tot_sinkhorn cannot "
            "solve them: fix the features that gave the cost, or mark those frames/tokens invalid in "
            "source_mask/target_mask (costs on padded pairs are ignored)."
        )
    prior = 0.0 if sigma is None else _prior_weight(sigma)
    limit = _kernel_range_limit(cost.dtype)
    spans = [(value + lambda1) / lambda2 + prior for value in values]
    over = [b for b, span in enumerate(spans) if span > limit]
    if over:
        b = max(over, key=lambda i: spans[i])
        needs = []
        if prior < limit:
            with_sigma = "" if sigma is None else " (with this sigma)"
            needs.append(f"lambda2 >= {(values[b] + lambda1) / (limit - prior):.4g}{with_sigma}")
        if lambda1 > 0 and (limit - prior) * lambda2 > values[b]:
            needs.append(f"lambda1 <= {(limit - prior) * lambda2 - values[b]:.4g}")
        if sigma is not None:
            needs.append(f"sigma >= {math.sqrt(0.5 / limit):.4g}")
        if cost.dtype != torch.float64:
            needs.append(f"float64 costs (R <= {_kernel_range_limit(torch.float64):.3g})")
        raise ValueError(
            f"tot_sinkhorn cannot solve sample(s) {_first(over)} (batch indices) in {cost.dtype}: the log kernel "
            f"spans R = (max|C| + lambda1) / lambda2 + 1 / (2 sigma^2) = {spans[b]:.4g} nats in sample {b} "
            f"(max|C| = {values[b]:.4g}, lambda1 = {lambda1}, lambda2 = {lambda2}, sigma = {sigma}), but "
            f"{cost.dtype} resolves the plan's entries to {_ENTRY_ACCURACY:.0%} only for R <= {limit:.4g}: "
            f"exp underflows and the plan's mass would be wrong. Use {', or '.join(needs)}, or costs of smaller "
            "magnitude."
        )


def relative_positions(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    r"""Relative positions of the valid entries of a padded sequence (OPW convention, 1-based).

    .. math::
        u_i = \frac{i}{N}, \quad i = 1, \dots, N

    where ``i`` counts valid positions only and ``N`` is the sample's number of valid positions.

    Parameters
    ----------
    mask : torch.BoolTensor, shape (B, L)
        ``True`` marks a valid position.
    dtype : torch.dtype, optional
        Floating dtype of the result (default float32).

    Returns
    -------
    positions : torch.Tensor, shape (B, L), dtype ``dtype``
        ``i / N`` on valid positions (so the last valid one is 1), 0 on padding.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError("mask must be a 2-D torch.bool tensor of shape (batch, length).")
    rank = mask.cumsum(dim=-1).to(dtype)
    count = mask.sum(dim=-1, keepdim=True).clamp(min=1).to(dtype)
    return torch.where(mask, rank / count, torch.zeros((), dtype=dtype, device=mask.device))


def _position_gaps(source_mask: torch.Tensor, target_mask: torch.Tensor, dtype: torch.dtype):
    """Return ``u_i - v_j`` (B, N, M) and the valid-pair mask (B, N, M)."""
    u = relative_positions(source_mask, dtype)
    v = relative_positions(target_mask, dtype)
    pair_mask = source_mask[:, :, None] & target_mask[:, None, :]
    return u[:, :, None] - v[:, None, :], pair_mask


def _prior_log_from_gaps(gap_sq: torch.Tensor, source_mask, target_mask, sigma: float) -> torch.Tensor:
    """``log P`` (B, N, M) from the squared gaps ``(u_i - v_j)^2``, on every pair (:func:`temporal_prior_log`)."""
    dtype = gap_sq.dtype
    n = source_mask.sum(dim=-1).clamp(min=1).to(dtype)
    m = target_mask.sum(dim=-1).clamp(min=1).to(dtype)
    scale_sq = (1.0 / n**2 + 1.0 / m**2)[:, None, None]
    return gap_sq * (-0.5 / sigma**2 / scale_sq)


def _prior_weight(sigma: float) -> float:
    """``1 / (2 sigma^2)``, the prior's cost of one step off the diagonal; inf where ``sigma**2`` underflows to 0."""
    variance = sigma**2
    return 0.5 / variance if variance > 0 else math.inf


def _order_reward_from_gaps(gap_sq: torch.Tensor, lambda1: float) -> torch.Tensor:
    """``S`` (B, N, M) from the squared gaps ``(u_i - v_j)^2``, on every pair (:func:`order_reward`)."""
    return lambda1 / (gap_sq + 1.0)


def temporal_prior_log(
    source_mask: torch.Tensor, target_mask: torch.Tensor, sigma: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    r"""Logarithm of OPW's Gaussian temporal prior between frames and tokens [1].

    .. math::
        d_{ij} = \frac{|u_i - v_j|}{\sqrt{1/N^2 + 1/M^2}}, \qquad
        \log P_{ij} = -\frac{d_{ij}^2}{2 \sigma^2}

    with relative positions ``u_i = i/N`` and ``v_j = j/M`` (:func:`relative_positions`). The
    prior is largest on the diagonal ``u = v`` and, since ``d`` is measured in steps of the
    shorter sequence, ``sigma`` is a band width in frames/tokens rather than in relative time.

    Parameters
    ----------
    source_mask : torch.BoolTensor, shape (B, N)
        Valid frames.
    target_mask : torch.BoolTensor, shape (B, M)
        Valid tokens.
    sigma : float
        Standard deviation of the prior, > 0.
    dtype : torch.dtype, optional
        Floating dtype of the result (default float32).

    Returns
    -------
    log_prior : torch.Tensor, shape (B, N, M), dtype ``dtype``
        ``log P``, 0 on padded pairs.
    """
    _check_positive(sigma, "sigma")
    if not math.isfinite(_prior_weight(sigma)):
        raise ValueError(f"sigma={sigma!r} is so small that sigma**2 underflows to 0: give a sigma above 1e-150.")
    gap, pair_mask = _position_gaps(source_mask, target_mask, dtype)
    return _prior_log_from_gaps(gap.square(), source_mask, target_mask, sigma).masked_fill(~pair_mask, 0.0)


def order_reward(
    source_mask: torch.Tensor, target_mask: torch.Tensor, lambda1: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    r"""OPW's local order reward (inverse difference moment) between frames and tokens [1].

    .. math::
        S_{ij} = \frac{\lambda_1}{(u_i - v_j)^2 + 1}

    with relative positions ``u_i = i/N`` and ``v_j = j/M`` (:func:`relative_positions`).

    Parameters
    ----------
    source_mask : torch.BoolTensor, shape (B, N)
        Valid frames.
    target_mask : torch.BoolTensor, shape (B, M)
        Valid tokens.
    lambda1 : float
        Weight of the reward, >= 0 (``S`` lies in ``[lambda1 / 2, lambda1]``).
    dtype : torch.dtype, optional
        Floating dtype of the result (default float32).

    Returns
    -------
    reward : torch.Tensor, shape (B, N, M), dtype ``dtype``
        ``S``, 0 on padded pairs.
    """
    _check_positive(lambda1, "lambda1", allow_zero=True)
    gap, pair_mask = _position_gaps(source_mask, target_mask, dtype)
    return _order_reward_from_gaps(gap.square(), lambda1).masked_fill(~pair_mask, 0.0)


def cosine_cost(source: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""Cosine-distance cost matrix between two batches of feature sequences.

    .. math::
        C_{ij} = 1 - \frac{\langle a_i, l_j \rangle}{\max(\|a_i\|, \epsilon) \max(\|l_j\|, \epsilon)}

    Parameters
    ----------
    source : torch.Tensor, shape (B, N, D)
        Source features ``a`` (e.g. adapted acoustic frames).
    target : torch.Tensor, shape (B, M, D)
        Target features ``l`` (e.g. teacher token features).
    eps : float, optional
        Norm floor, so a zero vector has cost 1 to everything instead of NaN.

    Returns
    -------
    cost : torch.Tensor, shape (B, N, M)
        Values in ``[0, 2]``; float32 for half-precision inputs, else the inputs' dtype.
    """
    if (
        source.dim() != 3
        or target.dim() != 3
        or source.shape[0] != target.shape[0]
        or source.shape[2] != target.shape[2]
    ):
        raise ValueError(
            "source and target must have shapes (B, N, D) and (B, M, D) with the same B and D, "
            f"got {tuple(source.shape)} and {tuple(target.shape)}."
        )
    _check_same_device(source, "source", target, "target")
    dtype = _working_dtype(torch.promote_types(source.dtype, target.dtype))
    with _no_autocast(source.device):
        source_unit = torch.nn.functional.normalize(source.to(dtype), dim=-1, eps=eps)
        target_unit = torch.nn.functional.normalize(target.to(dtype), dim=-1, eps=eps)
        return 1.0 - torch.bmm(source_unit, target_unit.transpose(1, 2))


def _logsumexp_last(summand: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp over the last axis of a temporary tensor, which may be overwritten.

    Without autograd it works in place (no temporaries, so faster than ``torch.logsumexp`` on
    CPU); with autograd it calls ``torch.logsumexp``,
    whose backward needs the input intact. The inputs here never hold infinities (padding is
    finite), so no guard against ``inf - inf`` is needed.
    """
    if summand.requires_grad:
        return torch.logsumexp(summand, dim=-1)
    peak = summand.amax(dim=-1, keepdim=True)
    return summand.sub_(peak).exp_().sum(dim=-1).log_().add_(peak.squeeze(-1))


def _log_kernel(cost, source_mask, target_mask, lambda1, lambda2, sigma, unbalanced=False):
    """``log K = log P + (S - lambda1 - C) / lambda2``, a huge finite negative number on padding.

    Subtracting the constant ``lambda1`` from ``S`` leaves the balanced coupling unchanged (the
    marginals are fixed, so a constant cost shift only moves the potentials) and keeps ``log K``
    close to zero, which preserves float32 precision when ``lambda1 / lambda2`` is large. With
    relaxed marginals (``unbalanced``) a constant shift changes the plan's mass, so ``S`` is kept
    whole and the reference measure ``mu nu^T`` of the KL term is included:
    ``log K = log P + (S - C) / lambda2 + log mu_i + log nu_j``. Padded pairs get a finite value
    instead of ``-inf`` so that log-sum-exp over a fully padded row stays finite (``-inf - -inf``
    would be NaN, in the forward or in the backward pass); ``exp`` of it is 0.
    """
    gap, pair_mask = _position_gaps(source_mask, target_mask, cost.dtype)
    gap_sq = gap.square_()
    log_kernel = cost / -lambda2
    if lambda1 > 0:
        shift = 0.0 if unbalanced else lambda1
        log_kernel = log_kernel + (_order_reward_from_gaps(gap_sq, lambda1) - shift) / lambda2
    if sigma is not None:
        log_kernel = log_kernel + _prior_log_from_gaps(gap_sq, source_mask, target_mask, sigma)
    if unbalanced:
        log_mu, log_nu = _log_uniform(source_mask, cost.dtype), _log_uniform(target_mask, cost.dtype)
        log_kernel = log_kernel + log_mu[:, :, None] + log_nu[:, None, :]
    return log_kernel.masked_fill(~pair_mask, torch.finfo(cost.dtype).min / 4)


def _log_uniform(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``log(1 / count)`` (B, 1) of the valid positions of ``mask`` (B, L), the log of a uniform weight."""
    return -mask.sum(dim=-1, keepdim=True).clamp(min=1).to(dtype).log()


def tot_sinkhorn(
    cost: torch.Tensor,
    source_mask: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
    *,
    lambda1: float = 1.0,
    lambda2: float = 0.1,
    sigma: float | None = 1.0,
    max_iter: int = 1000,
    tol: float = 1e-4,
    grad: str = "envelope",
    log: bool = False,
    tau: float | None = None,
    warn: bool = True,
    warm_start: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    r"""Temporal-order-preserving optimal transport coupling (TOT), batched and masked.

    Solves, for every sample of the batch, the order-preserving entropic OT problem of OPW [1]
    as used by TOT-CAKT [2]:

    .. math::
        T^* = \mathop{\arg\min}_{T \in \Pi(\mu, \nu)}
              \langle T, C \rangle - \langle T, S \rangle + \lambda_2 \, \mathrm{KL}(T \| P)

    with uniform marginals ``mu_i = 1/N`` and ``nu_j = 1/M`` over the valid frames and tokens,
    the order reward ``S`` (:func:`order_reward`) and the temporal prior ``P``
    (:func:`temporal_prior_log`). The solution has the Sinkhorn form [3]

    .. math::
        T^* = \mathrm{diag}(e^{f}) \, K \, \mathrm{diag}(e^{g}), \qquad
        \log K = \log P + (S - C) / \lambda_2,

    i.e. TOT is entropic OT with the cost ``C - S - lambda2 * log P`` and regularisation
    ``lambda2`` (``ot.sinkhorn(mu, nu, C - S - lambda2 * log P, lambda2)`` in POT). With
    ``lambda1 = 0`` and ``sigma = None`` it is plain entropic OT, ``log K = -C / lambda2``
    (the OT-CAKT baseline).

    *Unbalanced marginals* (``tau`` given) replace the constraint ``T in Pi(mu, nu)`` by KL
    penalties of weight ``tau`` [7], so that frames (silence, noise) and tokens need not carry
    their whole mass:

    .. math::
        T^* = \mathop{\arg\min}_{T \geq 0} \langle T, C - S \rangle
              + \lambda_2 \, \mathrm{KL}(T \| P \odot \mu \nu^\top)
              + \tau \, \mathrm{KL}(T \mathbf{1} \| \mu) + \tau \, \mathrm{KL}(T^\top \mathbf{1} \| \nu)

    with the generalised KL ``KL(x || y) = sum x log(x / y) - x + y``. This is POT's
    ``ot.unbalanced.sinkhorn_unbalanced(mu, nu, C - S - lambda2 * log P, reg=lambda2, reg_m=tau)``
    with its default ``reg_type="kl"``, whose reference measure is ``mu nu^T``. Its solution has
    the same form with ``log K = log P + (S - C) / lambda2 + log mu_i + log nu_j`` and the updates
    ``f <- tau / (tau + lambda2) (log mu - LSE_j(log K_ij + g_j))`` (likewise ``g``); ``tau -> inf``
    gives back the balanced problem. Here the level of ``C - S`` matters, not only its shape: a
    lower cost (or a larger ``lambda1``) means more mass.

    All samples are solved at once (no loop over the batch) by over-relaxed Sinkhorn iterations
    [4, 5] on the potentials,

    .. math::
        f \leftarrow (1 - \omega) f + \omega \left(\log \mu - \mathrm{LSE}_j(\log K_{ij} + g_j)\right),
        \qquad
        g \leftarrow (1 - \omega) g + \omega \left(\log \nu - \mathrm{LSE}_i(\log K_{ij} + f_i)\right),

    run in scaling form with absorbed potentials [6] (see Notes), until ``max_iter`` iterations
    or until, at one of the checks made every 10 iterations, the coupling that would be returned
    has an L1 marginal error below ``tol`` for every sample of the batch. The returned coupling
    ends with a plain (``omega = 1``) update of ``g``, so its columns are exact. Unbalanced
    problems use the same schedule; their update is already a contraction (of ratio about
    ``tau / (tau + lambda2)`` times the balanced one), so the first block's measured rate sets the
    optimal weight ``2 / (1 + sqrt(1 - r))`` [5], and 1.9 where ``r > 0.9`` (nearly balanced).
    Their marginal error is measured against the marginals that the updates aim at,
    ``mu exp(-lambda2 f / tau)`` and ``nu exp(-lambda2 g / tau)`` (the residual of the fixed point);
    the smaller ``tau``, the fewer iterations (docs/RESULTS.md, "Solver speed").

    Parameters
    ----------
    cost : torch.Tensor, shape (B, N, M)
        Cost matrices ``C`` (e.g. :func:`cosine_cost`), any floating dtype. Values on padded
        positions are ignored.
    source_mask : torch.BoolTensor, shape (B, N), optional
        ``True`` for valid frames (rows). Default: all valid.
    target_mask : torch.BoolTensor, shape (B, M), optional
        ``True`` for valid tokens (columns). Default: all valid.
    lambda1 : float, optional
        Weight of the order reward ``S``, >= 0. ``S`` spans ``[lambda1/2, lambda1]``; the
        default 1.0 gives it a range of 0.5, a quarter of the cosine cost's range ``[0, 2]``,
        so it steers the alignment towards the diagonal without overriding the features.
        (OPW's ``lambda1 = 50`` goes with unnormalised squared Euclidean costs.)
    lambda2 : float, optional
        Weight of the KL regularisation (the entropic temperature), > 0. Default 0.1 (OPW's
        value): ``C / lambda2`` then spans up to 20 nats, so the coupling follows the features
        closely; smaller values sharpen it further but slow Sinkhorn down.
    sigma : float or None, optional
        Width of the temporal prior, in steps of the shorter sequence, > 0, or ``None`` for no
        prior (``P = 1``). Default 1.0 (OPW's value): for ``N >> M`` and ``lambda2 = 0.1``,
        moving mass ``k`` tokens off the diagonal costs about ``0.05 k^2`` in cost units.
    max_iter : int, optional
        Maximum number of Sinkhorn iterations (each is one ``f`` and one ``g`` update), >= 1.
        The default 1000 leaves a margin over the iterations that the default parameters need
        to reach the default ``tol`` at ``N <= 1000, M <= 100`` (docs/RESULTS.md, "Convergence:
        iterations to reach 1e-4"); features aligned with their tokens (a trained model's) need
        the most.
    tol : float, optional
        Stopping threshold on the L1 marginal error of the returned coupling (total mass is 1;
        its columns are exact, so this is the error of its rows), >= 0; 0 runs exactly
        ``max_iter`` iterations. float32 reaches about 1e-6.
    grad : {"envelope", "autodiff"}, optional
        How gradients reach ``cost``, as in POT's ``ot.solve(..., grad=...)``:

        - ``"envelope"`` (default): the potentials are computed without autograd and the
          returned coupling is detached, so ``ot_loss(T, C)`` backpropagates exactly ``T``
          into ``C``. By the envelope (Danskin) theorem this is the gradient of the optimal
          value of the problem above with respect to ``C`` (exact at convergence). No graph is
          kept through the ``max_iter`` iterations, so memory is that of one ``(B, N, M)``
          problem and the backward pass costs nothing; this is why it is the default for
          training. The coupling itself carries no gradient: :func:`barycentric_transport`
          then differentiates through the source features only.
        - ``"autodiff"``: backpropagation through the unrolled iterations; the coupling itself
          is differentiable. In scaling form the graph keeps two (B, N + M) vectors per
          iteration and one (B, N, M) kernel per absorption (the log-domain fallback keeps
          (B, N, M) tensors per iteration), so it costs more time and memory than
          ``"envelope"`` (docs/RESULTS.md, "Solver speed").
    log : bool, optional
        Also return a dict, as POT's ``log=True``, for training diagnostics:

        - ``"n_iter"`` (int): iterations run;
        - ``"marginal_error"`` (tensor (B,)): L1 error of both marginals of the returned coupling;
        - ``"converged"`` (bool tensor (B,)): whether the sample passed the stopping test (its
          error below ``tol`` at the last check); ``marginal_error``, measured afterwards on the
          returned coupling, may differ from the tested error by float rounding (about 1e-7 in
          float32);
        - ``"relaxation"`` (tensor (B,)): the over-relaxation weight ``omega`` of each sample;
        - ``"log_domain"`` (bool): whether the log-domain fallback ran;
        - ``"mass"`` (tensor (B,)): the plan's total mass (1 up to ``marginal_error`` when
          balanced, what the relaxation kept when unbalanced);
        - ``"potentials"`` (tuple of tensors (B, N), (B, M)): ``(f, g)`` with
          ``T = exp(log K + f + g)`` on the valid pairs (``log K`` with the constant ``-lambda1 /
          lambda2`` of the balanced kernel), 0 on padding; ``warm_start`` takes them back.
    tau : float or None, optional
        Weight of the KL penalties on the marginals, > 0, or ``None`` (default) for the balanced
        problem, TOT itself. Works with and without the order reward and the temporal prior
        (``lambda1 = 0, sigma = None`` is plain unbalanced entropic OT). Small values let the
        plan drop mass where the cost is high; large values approach the balanced plan.
    warn : bool, optional
        Warn (``UserWarning``, naming how many and which samples) when a plan has not converged
        within ``max_iter``, as POT's ``warn=True``. Default True; a caller that reports
        non-convergence itself (the model does, once, in its configuration's terms) passes False.
        Nothing is warned with ``tol = 0``, which asks for exactly ``max_iter`` iterations.
    warm_start : tuple of two torch.Tensor, shapes (B, N) and (B, M), optional
        Potentials ``(f, g)`` to start the iterations from, as returned in ``log["potentials"]`` by
        an earlier call with the same masks, ``lambda1``, ``sigma`` and ``tau`` (e.g. on a nearby
        cost, as in the outer iterations of :func:`fused_gw_sinkhorn`). Default: zeros. The
        solution is the same; only the number of iterations changes.

    Returns
    -------
    coupling : torch.Tensor, shape (B, N, M)
        ``T*``: over the valid part rows sum to ``1/N_b`` and columns to ``1/M_b``; exactly 0
        on padded rows/columns and for samples with no valid frame or token. float32 for
        half-precision costs, else the cost's dtype.
    log : dict
        Only if ``log`` is True, see above.

    Raises
    ------
    ValueError
        Naming what is wrong, and where it is about a sample, its batch index:

        - a NaN or infinite cost on a valid (frame, token) pair (an infinite column would have
          no feasible plan; costs on padded pairs are ignored);
        - a problem the working dtype cannot resolve: the log kernel's range
          ``R = (max|C| + lambda1) / lambda2 + 1 / (2 sigma^2)`` (max over valid pairs) beyond
          ``0.01 / (2 eps)``, i.e. 4.2e4 nats in float32 and 2.3e13 in float64. The potentials
          span about as much as the kernel, so the exponent of each entry ``exp(log K + f + g)``
          is rounded to about ``2 eps R``: beyond that bound entries are off by more than 1% and
          the plan's mass goes wrong (far beyond it, the plan is NaN). The message gives the ``lambda2``, ``lambda1`` and ``sigma`` where the working
          range begins. Convergence is a separate matter: near the bound Sinkhorn is slow, which
          ``warn`` reports;
        - a plan whose entries overflowed: only unbalanced marginals let the mass grow without
          bound, where the order reward exceeds the cost (the message says to lower ``lambda1`` or
          raise ``tau``); a finite mass that runs away is warned about with that advice;
        - masks on another device than ``cost``;
        - a size whose estimated peak memory (10 tensors of shape (B, N, M) in the working dtype)
          exceeds the device's memory (the physical memory on CPU; free plus cached on CUDA).

        The value checks cost one reduction over the cost and one host sync per call.

    Notes
    -----
    *Convergence.* With the temporal prior, plain Sinkhorn (``omega = 1``) converges slowly: the
    prior makes the kernel banded and mass moves along the band only a little per iteration
    (docs/RESULTS.md, "Convergence: iterations to reach 1e-4").
    Over-relaxation [4] multiplies the error near the optimum by about ``omega - 1`` per
    iteration once ``omega`` is at least the optimal weight ``2 / (1 + sqrt(1 - theta^2))``,
    where ``theta^2`` is plain Sinkhorn's local rate [5]. The first 10 iterations are plain; the
    error ratio per iteration over their last five estimates ``theta^2`` for each sample, and
    samples with ``theta^2 > 0.5`` continue with ``omega = 1.9`` (rate 0.9), the others (plain
    OT, wide priors) with ``omega = 1``, which is faster for them. From iteration 100 on, a
    sample whose error still falls more slowly than ``omega - 1`` per iteration has ``omega``
    below the optimum: ``theta^2`` is solved from the measured rate [5] and ``omega`` raised to
    the optimum (at most 1.99). A sample whose error grows tenfold over the smallest seen since
    its relaxed iterations began returns to ``omega = 1``, which always converges.

    *Scaling form.* The iterations multiply scalings ``u = exp(f - f_0)``, ``v = exp(g - g_0)``
    into the stabilised kernel ``exp(log K + f_0 + g_0)`` with two batched matrix-vector
    products, instead of a log-sum-exp over all ``N M`` entries per half-iteration; the
    potentials ``f_0``, ``g_0`` absorb the scalings whenever ``|log u|`` or ``|log v|`` exceeds
    10 [6]. After each block of 10 iterations the scalings are checked: if any is not finite
    and positive (the kernel under- or overflowed: tiny ``lambda2``, costs far from [0, 2]),
    the block is run again in the log domain from its start, and so are all later blocks. The
    coupling itself is always ``exp(log K + f + g)`` with the full potentials, so the fast path
    changes the rounding, not the solution.

    Examples
    --------
    >>> cost = cosine_cost(torch.randn(2, 50, 8), torch.randn(2, 6, 8))
    >>> coupling = tot_sinkhorn(cost)
    >>> coupling.shape
    torch.Size([2, 50, 6])
    """
    row_mask, col_mask = _check_solver_arguments(
        cost, source_mask, target_mask, lambda1, lambda2, sigma, max_iter, tol, grad
    )
    batch, n_rows, n_cols = cost.shape
    if tau is not None:
        _check_positive(tau, "tau (None for balanced marginals)")
    rho = None if tau is None else lambda2 / tau  # None: balanced, the solver's one encoding of it
    if warm_start is not None:
        _check_warm_start(warm_start, batch, n_rows, n_cols, cost.device)

    dtype = _working_dtype(cost.dtype)
    _check_fits(cost.shape, dtype, cost.device, grad)
    autograd = torch.set_grad_enabled(grad == "autodiff" and torch.is_grad_enabled())
    with _no_autocast(cost.device), autograd:
        if cost.numel() == 0:  # no sample, frame or token in the whole batch: nothing to transport
            coupling = cost.new_zeros(cost.shape, dtype=dtype)
            f, g = torch.zeros_like(row_mask, dtype=dtype), torch.zeros_like(col_mask, dtype=dtype)
            info = dict(n_iter=0, relaxation=cost.new_ones(batch, dtype=dtype), log_domain=False, worst=0.0)
            info["converged"] = cost.new_ones(batch, dtype=torch.bool)
        else:
            cost = cost.to(dtype)
            with torch.no_grad():
                _check_cost_values(cost, row_mask[:, :, None] & col_mask[:, None, :], lambda1, lambda2, sigma)
            log_kernel = _log_kernel(cost, row_mask, col_mask, lambda1, lambda2, sigma, unbalanced=tau is not None)
            problem = _Problem.build(log_kernel, row_mask, col_mask, rho)
            coupling, (f, g), info = _sinkhorn(problem, max_iter, tol, warm_start)
    if not math.isfinite(info["worst"]):  # the stopping test is false for NaN: name it instead
        _raise_not_finite(coupling, lambda1, tau)
    if warn and tol > 0 and info["worst"] >= tol:
        _warn_not_converged(info["converged"], info["worst"], max_iter, tol, None if tau is None else coupling)
    if not log:
        return coupling
    with torch.no_grad():
        row_target = _scaled_target(_uniform(row_mask, dtype), f, rho)
        col_target = _scaled_target(_uniform(col_mask, dtype), g, rho)
        marginal_error = (coupling.sum(dim=2) - row_target).abs().sum(dim=1) + (
            coupling.sum(dim=1) - col_target
        ).abs().sum(dim=1)
    return coupling, {
        "n_iter": info["n_iter"],
        "marginal_error": marginal_error,
        "converged": info["converged"],
        "relaxation": info["relaxation"],
        "log_domain": info["log_domain"],
        "mass": coupling.detach().sum(dim=(1, 2)),
        "potentials": (f, g),
    }


def _check_count(value, name: str) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an integer >= 1 (a bool is not)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")


def _check_solver_arguments(cost, source_mask, target_mask, lambda1, lambda2, sigma, max_iter, tol, grad):
    """Validate the arguments that :func:`tot_sinkhorn` and :func:`fused_gw_sinkhorn` share.

    Returns the valid rows and columns (B, N), (B, M): the masks (``None``: all valid), where a
    sample with no valid token (frame) has no valid frame (token) either: nothing to transport.
    """
    if not isinstance(cost, torch.Tensor) or cost.dim() != 3 or not cost.is_floating_point():
        got = (
            f"shape {tuple(cost.shape)} and dtype {cost.dtype}"
            if isinstance(cost, torch.Tensor)
            else type(cost).__name__
        )
        raise ValueError(f"cost must be a floating-point torch.Tensor of shape (B, N, M), got {got}.")
    batch, n_rows, n_cols = cost.shape
    source_mask = _check_mask(source_mask, "source_mask", batch, n_rows, cost.device)
    target_mask = _check_mask(target_mask, "target_mask", batch, n_cols, cost.device)
    _check_positive(lambda1, "lambda1", allow_zero=True)
    _check_positive(lambda2, "lambda2")
    if sigma is not None:
        _check_positive(sigma, "sigma")
    _check_count(max_iter, "max_iter")
    _check_positive(tol, "tol", allow_zero=True)
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}.")
    row_mask = source_mask & target_mask.any(dim=-1, keepdim=True)
    col_mask = target_mask & source_mask.any(dim=-1, keepdim=True)
    return row_mask, col_mask


def _check_warm_start(warm_start, batch: int, n_rows: int, n_cols: int, device) -> None:
    """Refuse warm-start potentials that are not two finite tensors of shapes (B, N), (B, M) on ``device``."""
    shapes = ((batch, n_rows), (batch, n_cols))
    pair = isinstance(warm_start, (tuple, list)) and len(warm_start) == 2
    if not (
        pair
        and all(isinstance(p, torch.Tensor) and p.is_floating_point() for p in warm_start)
        and tuple(tuple(p.shape) for p in warm_start) == shapes
    ):
        got = [getattr(p, "shape", type(p).__name__) for p in warm_start] if pair else type(warm_start).__name__
        raise ValueError(
            f"warm_start must be the potentials (f, g) of log['potentials']: floating tensors of shapes {shapes}, "
            f"got {got}."
        )
    for potential, name in zip(warm_start, ("f", "g")):
        if potential.device != torch.device(device):
            raise ValueError(f"warm_start's {name} is on device {potential.device} but cost is on {device}.")
    if not bool(torch.isfinite(torch.cat([p.detach().flatten() for p in warm_start])).all()):
        raise ValueError("warm_start holds NaN or infinite potentials: pass log['potentials'] of a finite solve.")


# Why an unbalanced plan's mass runs away, and what to change: where the order reward exceeds the cost, relaxed
# marginals let the mass grow exponentially in (S - C) / tau (S up to lambda1), and more iterations do not help.
_UNBALANCED_MASS_ADVICE = (
    "With unbalanced marginals the plan's mass grows exponentially where the order reward exceeds the cost "
    "(S - C > 0, S up to lambda1): lower lambda1, raise tau, or use costs that are not negative (cosine_cost)"
)


def _warn_not_converged(
    converged: torch.Tensor, worst: float, max_iter: int, tol: float, unbalanced_plan: torch.Tensor | None
) -> None:
    """Warn that the samples where ``converged`` (B,) is False stopped above ``tol``, naming them; for an
    unbalanced plan (``unbalanced_plan``) say its mass, since a runaway mass is the usual cause there."""
    failed = (~converged).nonzero().flatten().tolist()
    advice = "Raise max_iter, or lambda2 (a smoother problem converges faster)"
    if unbalanced_plan is not None:
        mass = float(unbalanced_plan.detach().sum(dim=(1, 2)).max())
        advice = f"The largest plan's mass is {mass:.3g} (1 when balanced). {_UNBALANCED_MASS_ADVICE}; else {advice[0].lower()}{advice[1:]}"
    warnings.warn(
        f"tot_sinkhorn did not converge in max_iter={max_iter} iterations for {len(failed)} of "
        f"{converged.numel()} samples (batch indices {_first(failed)}; largest marginal error {worst:.2e} > "
        f"tol={tol}): their plans miss the marginals by that much. {advice}; log=True gives each sample's error.",
        stacklevel=3,
    )


def _raise_not_finite(coupling: torch.Tensor, lambda1: float, tau: float | None) -> None:
    """Refuse a plan whose entries overflowed (only relaxed marginals let the mass grow without bound)."""
    mass = coupling.detach().sum(dim=(1, 2))
    bad = (~torch.isfinite(mass)).nonzero().flatten().tolist()
    cause = (
        f"{_UNBALANCED_MASS_ADVICE} (here lambda1={lambda1}, tau={tau})"
        if tau is not None
        else "Raise lambda2, or use float64 costs"
    )
    raise ValueError(
        f"tot_sinkhorn's plan is not finite for sample(s) {_first(bad)} (batch indices): its entries overflowed "
        f"(mass {float(mass[bad[0]]) if bad else math.nan}). {cause}."
    )


def _uniform(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Uniform weights ``1 / count`` on the valid positions of ``mask`` (B, L), 0 elsewhere."""
    return mask.to(dtype) / mask.sum(dim=-1, keepdim=True).clamp(min=1).to(dtype)


def _relax(old: torch.Tensor, new: torch.Tensor, omega: torch.Tensor | None) -> torch.Tensor:
    """Over-relaxed log-domain update ``(1 - omega) old + omega new`` (``new`` when ``omega`` is None)."""
    return new if omega is None else old + omega * (new - old)


def _scaled_kernel(log_kernel: torch.Tensor, f: torch.Tensor, g: torch.Tensor):
    """``exp(log K + f + g)`` (B, N, M) and its transpose (B, M, N), both contiguous.

    With both layouts each matrix-vector product is a row vector times a matrix, which BLAS runs
    several times faster on CPU than a batched product with a column vector.
    """
    kernel = (log_kernel + f[:, :, None] + g[:, None, :]).exp()
    return kernel, kernel.transpose(1, 2).contiguous()


@dataclass(frozen=True)
class _Problem:
    """What one Sinkhorn solve is given; fixed for the whole solve.

    ``log_kernel`` is ``log K`` (B, N, M); the marginals are uniform over ``row_mask`` (B, N) and
    ``col_mask`` (B, M): ``mu``, ``nu`` (0 on padding) and their logs ``log_mu``, ``log_nu`` (B, 1).
    ``row_pad`` / ``col_pad`` are 1 on padding and 0 elsewhere. ``rho = lambda2 / tau`` weighs the KL
    penalties of unbalanced marginals [7]; ``None`` is the one encoding of balanced marginals, and
    ``exponent = 1 / (1 + rho)`` (None when balanced) is the power of the unbalanced updates.
    """

    log_kernel: torch.Tensor
    row_mask: torch.Tensor
    col_mask: torch.Tensor
    rho: float | None
    exponent: float | None
    mu: torch.Tensor
    nu: torch.Tensor
    log_mu: torch.Tensor
    log_nu: torch.Tensor
    row_pad: torch.Tensor
    col_pad: torch.Tensor

    @classmethod
    def build(cls, log_kernel, row_mask, col_mask, rho: float | None) -> "_Problem":
        """The problem on ``log K`` with uniform marginals over the masks; ``rho`` None for balanced ones."""
        dtype = log_kernel.dtype
        return cls(
            log_kernel=log_kernel,
            row_mask=row_mask,
            col_mask=col_mask,
            rho=rho,
            exponent=None if rho is None else 1.0 / (1.0 + rho),
            mu=_uniform(row_mask, dtype),
            nu=_uniform(col_mask, dtype),
            log_mu=_log_uniform(row_mask, dtype),  # log(1/N_b), (B, 1)
            log_nu=_log_uniform(col_mask, dtype),
            row_pad=(~row_mask).to(dtype),
            col_pad=(~col_mask).to(dtype),
        )

    @property
    def balanced(self) -> bool:
        return self.rho is None


@dataclass
class _SinkhornState:
    """The iterate of :func:`_sinkhorn`: the plan is ``u_i exp(log K_ij + f_i + g_j) v_j``.

    ``f``, ``g`` (B, N), (B, M) are the potentials absorbed into the stabilised kernel ``kernel``
    ``= exp(log K + f + g)`` (B, N, M) and its transpose ``kernel_t``; ``u``, ``v`` the scalings on
    top of them. Once the kernel under- or overflows the solve continues in the log domain
    (``log_domain``): the kernels are dropped, ``log_kernel_t`` (``log K`` transposed) is built,
    and ``u = v = 1``. ``omega`` (B, 1) holds the over-relaxation weights (None while the first
    block measures each sample's rate); ``best`` and ``previous`` (B,) the smallest error since the
    relaxation began and that of the last check.
    """

    f: torch.Tensor
    g: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    kernel: torch.Tensor | None
    kernel_t: torch.Tensor | None
    log_kernel_t: torch.Tensor | None = None
    log_domain: bool = False
    omega: torch.Tensor | None = None
    best: torch.Tensor | None = None
    previous: torch.Tensor | None = None

    @classmethod
    def start(cls, problem: _Problem, init=None) -> "_SinkhornState":
        """Zero potentials, or ``init`` = ``(f, g)`` (a warm start; padded potentials stay 0)."""
        f, g = torch.zeros_like(problem.mu), torch.zeros_like(problem.nu)
        if init is not None:
            dtype = problem.log_kernel.dtype
            f = init[0].to(dtype).masked_fill(~problem.row_mask, 0.0)
            g = init[1].to(dtype).masked_fill(~problem.col_mask, 0.0)
        infinite = torch.full_like(problem.log_mu[:, 0], math.inf)
        kernel, kernel_t = _scaled_kernel(problem.log_kernel, f, g)
        return cls(f, g, torch.ones_like(f), torch.ones_like(g), kernel, kernel_t, best=infinite, previous=infinite)

    def absorb(self, problem: _Problem) -> None:
        """Move the scalings into the potentials (``u = v = 1``) and rebuild the stabilised kernel [6]."""
        self.f, self.g = self.f + self.u.log(), self.g + self.v.log()
        if problem.balanced:
            self.f, self.g = _recentre(self.f, self.g, problem.row_mask, problem.col_mask)
        self.u, self.v = torch.ones_like(self.u), torch.ones_like(self.v)
        self.kernel, self.kernel_t = _scaled_kernel(problem.log_kernel, self.f, self.g)

    def enter_log_domain(self, problem: _Problem) -> None:
        """Absorb the scalings and continue with log-sum-exp updates on ``log K`` (no stabilised kernel)."""
        self.f, self.g = self.f + self.u.log(), self.g + self.v.log()
        self.u, self.v = torch.ones_like(self.u), torch.ones_like(self.v)
        self.kernel = self.kernel_t = None
        self.log_kernel_t = problem.log_kernel.transpose(1, 2).contiguous()
        self.log_domain = True


def _scaled_target(weights: torch.Tensor, potential: torch.Tensor, rho: float | None) -> torch.Tensor:
    """``weights * exp(-rho * potential)``: the marginal that an unbalanced update aims at, given its potential.

    At the fixed point of ``f = (log mu - LSE_j(log K + g)) / (1 + rho)`` the rows of the plan sum to
    ``mu exp(-rho f)``; with balanced marginals (``rho`` None) this is ``weights`` itself.
    """
    return weights if rho is None else weights * (-rho * potential).exp()


def _recentre(f: torch.Tensor, g: torch.Tensor, row_mask: torch.Tensor, col_mask: torch.Tensor):
    """Move the balanced potentials along their gauge ``(f + c, g - c)`` so that their valid means agree.

    The plan ``exp(log K + f + g)`` and the (relaxed) balanced updates are unchanged by the shift,
    but over-relaxed iterations on a slowly converging problem let ``f`` and ``-g`` drift together
    by orders of magnitude beyond the kernel's range, and every entry ``log K + f + g`` then loses
    ``eps * |f|`` of precision. Padded potentials stay 0.
    """
    dtype = f.dtype
    f_mean = f.masked_fill(~row_mask, 0.0).sum(-1, keepdim=True) / row_mask.sum(-1, keepdim=True).clamp(min=1).to(
        dtype
    )
    g_mean = g.masked_fill(~col_mask, 0.0).sum(-1, keepdim=True) / col_mask.sum(-1, keepdim=True).clamp(min=1).to(
        dtype
    )
    shift = (g_mean - f_mean) / 2
    return f + shift * row_mask.to(dtype), g - shift * col_mask.to(dtype)


def _scaling_block(problem: _Problem, state: _SinkhornState, steps: int, errors: list | None):
    """``steps`` Sinkhorn iterations in scaling form on the stabilised kernel; returns the new ``(u, v)``.

    The marginals the updates aim at are 0 on padding, and the paddings (1 there) keep padded
    scalings exactly 1 (``(0 + 1) / (0 + 1)``) with no division by zero in the forward or the
    backward pass. The relaxed update is written ``u (u_new / u)^omega``; with relaxed marginals
    the new scaling is ``(mu / K v)^exponent`` [7]. When ``errors`` is a list, the L1 row-marginal
    error (B,) of the iterate is appended before each ``u`` update, at no extra product. Vectors
    are kept as (B, 1, L) rows inside the loop, so that each step is a handful of kernel calls.
    The state is left unchanged: the caller accepts the scalings only if they are finite.
    """
    kernel, kernel_t, exponent = state.kernel, state.kernel_t, problem.exponent
    mu, nu = _scaled_target(problem.mu, state.f, problem.rho), _scaled_target(problem.nu, state.g, problem.rho)
    row_target, col_target = (mu + problem.row_pad)[:, None, :], (nu + problem.col_pad)[:, None, :]
    row_pad, col_pad = problem.row_pad[:, None, :], problem.col_pad[:, None, :]
    omega = None if state.omega is None else state.omega[:, :, None]
    u, v = state.u[:, None, :], state.v[:, None, :]
    for _ in range(steps):
        kernel_v = torch.baddbmm(row_pad, v, kernel_t)  # K v, plus 1 on padded rows
        if errors is not None:  # padded: 1 * 1 - 1; unbalanced: the target moves with u as u^(-rho)
            target = row_target if exponent is None else row_target * u.pow(1 - 1 / exponent)
            errors.append((u * kernel_v - target)[:, 0].abs().sum(dim=-1).detach())
        ratio = _power(row_target / kernel_v, exponent)
        u = ratio if omega is None else u * (ratio / u).pow(omega)
        ratio = _power(col_target / torch.baddbmm(col_pad, u, kernel), exponent)
        v = ratio if omega is None else v * (ratio / v).pow(omega)
    return u[:, 0], v[:, 0]


def _power(values: torch.Tensor, exponent: float | None) -> torch.Tensor:
    """``values ** exponent``, or ``values`` itself when ``exponent`` is None (balanced marginals)."""
    return values if exponent is None else values.pow(exponent)


def _scale(values: torch.Tensor, exponent: float | None) -> torch.Tensor:
    """``values * exponent``, or ``values`` itself when ``exponent`` is None: :func:`_power` in the log domain."""
    return values if exponent is None else values * exponent


def _log_block(problem: _Problem, state: _SinkhornState, steps: int, errors: list | None) -> None:
    """``steps`` Sinkhorn iterations in the log domain (log-sum-exp updates of ``state.f`` and ``state.g``).

    Padded potentials are pinned to 0, so every quantity stays finite. ``errors``: as in
    :func:`_scaling_block`.
    """
    log_kernel, log_kernel_t, exponent = problem.log_kernel, state.log_kernel_t, problem.exponent
    log_mu, log_nu, row_mask, col_mask = problem.log_mu, problem.log_nu, problem.row_mask, problem.col_mask
    f, g, omega = state.f, state.g, state.omega
    zero = log_kernel.new_zeros(())
    for _ in range(steps):
        row_lse = _logsumexp_last(log_kernel + g[:, None, :])
        if errors is not None:
            log_target = log_mu if exponent is None else log_mu + (1 - 1 / exponent) * f
            row_error = ((f + row_lse).exp() - log_target.exp()).abs().masked_fill(~row_mask, 0.0)
            errors.append(row_error.sum(dim=-1).detach())
        f = _relax(f, torch.where(row_mask, _scale(log_mu - row_lse, exponent), zero), omega)
        col_lse = _logsumexp_last(log_kernel_t + f[:, None, :])
        g = _relax(g, torch.where(col_mask, _scale(log_nu - col_lse, exponent), zero), omega)
    state.f, state.g = f, g


def _plain_column_update(problem: _Problem, state: _SinkhornState) -> torch.Tensor:
    """The potential ``g`` (B, M) of a plain column update from the state: it makes the columns exact.

    In scaling form ``g = exponent * log(nu' / (kernel^T u))``, relative to the absorbed ``g``
    (``nu'`` the target of :func:`_scaled_target` at the absorbed ``g``); in the log domain the
    whole ``g = exponent * (log nu - LSE_i(log K + f))``. ``exponent`` is 1 for balanced
    marginals. 0 on padded columns.
    """
    if not state.log_domain:
        col_pad, nu = problem.col_pad, _scaled_target(problem.nu, state.g, problem.rho)
        kernel_u = torch.bmm(state.u[:, None, :], state.kernel)[:, 0]
        return _scale(((nu + col_pad) / (kernel_u + col_pad)).log(), problem.exponent)
    col_lse = _logsumexp_last(state.log_kernel_t + state.f[:, None, :])
    zero = problem.log_nu.new_zeros(())
    return torch.where(problem.col_mask, _scale(problem.log_nu - col_lse, problem.exponent), zero)


@torch.no_grad()
def _row_error_after_column_update(problem: _Problem, state: _SinkhornState) -> torch.Tensor:
    """L1 row-marginal error (B,) of the plan that a plain column update would return now.

    That plan's columns are exact, so this is its whole marginal error: the quantity that the
    stopping rule tests. With relaxed marginals the rows are compared with what the row update
    aims at, ``mu exp(-rho f)`` (the fixed-point residual).
    """
    g = _plain_column_update(problem, state)
    if not state.log_domain:
        rows = state.u * torch.bmm(g.exp()[:, None, :], state.kernel_t)[:, 0]
        row_target = _scaled_target(problem.mu, state.f + state.u.log(), problem.rho)
    else:
        log_plan = problem.log_kernel + state.f[:, :, None] + g[:, None, :]
        rows = _logsumexp_last(log_plan).exp().masked_fill(~problem.row_mask, 0.0)
        row_target = _scaled_target(problem.mu, state.f, problem.rho)
    return (rows - row_target).abs().sum(dim=-1)


def _relaxation_weights(errors: list[torch.Tensor], unbalanced: bool = False) -> torch.Tensor:
    """Per-sample over-relaxation weights (B, 1) from the row errors of ``_CHECK_EVERY`` plain iterations.

    The error ratio per iteration over the last five, ``r``, estimates plain Sinkhorn's local
    rate ``theta^2``. Where ``r > _SLOW_RATE`` the sample gets ``omega = _RELAXATION``, else 1:
    plain Sinkhorn is fast there already, and relaxing would slow it down to the rate ``omega - 1``.
    Unbalanced samples, whose rates spread far more widely (the relaxation of the marginals
    shrinks them), get the optimal weight for ``r`` instead, ``2 / (1 + sqrt(1 - r))`` [5], at most
    ``_RELAXATION``.
    """
    rate = (errors[-1] / errors[-6]).pow(0.2).nan_to_num(0.0)  # 0 / 0 on empty samples: no relaxation
    slow = rate.new_full((), _RELAXATION)
    if unbalanced:
        optimal = 2 / (1 + (1 - rate.clamp(max=1.0)).sqrt())
        slow = torch.where(rate > _NEAR_BALANCED_RATE, slow, optimal.clamp(max=_RELAXATION))
    return torch.where(rate > _SLOW_RATE, slow, rate.new_ones(()))[:, None]


def _adapted_relaxation(omega, error, previous, best, steps, adapt):
    """Relaxation weights (B, 1) for the next block, from the errors (B,) after and before this one.

    Below the optimal weight the error of over-relaxed Sinkhorn decays like ``r^k`` with
    ``(r + omega - 1)^2 = r omega^2 theta^2`` [5]; above it, like ``(omega - 1)^k``. A block rate
    ``r`` clearly above ``omega - 1`` therefore means ``omega`` is too small: ``theta^2`` is solved
    from ``r`` and ``omega`` is raised to ``2 / (1 + sqrt(1 - theta^2))``, at most
    ``_MAX_RELAXATION``. Safeguard: a sample whose error grew tenfold since its relaxed iterations
    began (the switch itself may raise it once) goes back to plain Sinkhorn, which always converges.
    """
    rate = (error / previous).pow(1.0 / steps).nan_to_num(0.0)[:, None]
    theta_sq = ((rate + omega - 1) ** 2 / (rate * omega**2)).clamp(max=1.0)
    optimal = (2 / (1 + (1 - theta_sq).sqrt())).clamp(max=_MAX_RELAXATION)
    too_small = (omega > 1) & (rate > omega - 1 + _RATE_MARGIN) & (rate < 1) & adapt
    omega = torch.where(too_small, torch.maximum(omega, optimal), omega)
    return torch.where((error > 10 * best)[:, None], 1.0, omega)


def _sinkhorn(problem: _Problem, max_iter: int, tol: float, init=None):
    """Over-relaxed, stabilised Sinkhorn on ``problem`` (:class:`_Problem`).

    The schedule is described in the Notes of :func:`tot_sinkhorn`; ``init`` is ``(f, g)`` to
    start from (zeros when None). Returns the coupling (B, N, M), exactly 0 outside
    ``row_mask x col_mask``, the potentials ``(f, g)`` that give it, and a dict: ``n_iter``
    (iterations run), ``relaxation`` (the weights in use at the end, (B,)), ``converged`` (whether
    each sample passed the stopping test, (B,)), ``log_domain`` (whether the log-domain fallback
    ran) and ``worst`` (the largest tested error, a Python float: no further host sync is needed
    to know whether all converged).
    """
    state = _SinkhornState.start(problem, init)
    n_iter, worst = 0, math.inf
    while n_iter < max_iter:
        steps = min(_CHECK_EVERY, max_iter - n_iter)
        errors = [] if n_iter == 0 else None
        if not state.log_domain:
            u, v = _scaling_block(problem, state, steps, errors)
            scalings = torch.cat([u, v], dim=1).detach()
            if bool((torch.isfinite(scalings) & (scalings > 0)).all()):
                state.u, state.v = u, v
            else:  # the kernel under/overflowed: redo this block, and all later ones, in the log domain
                state.enter_log_domain(problem)
                errors = [] if errors is not None else None
        if state.log_domain:
            _log_block(problem, state, steps, errors)
            if problem.balanced:
                state.f, state.g = _recentre(state.f, state.g, problem.row_mask, problem.col_mask)
        n_iter += steps
        error = _row_error_after_column_update(problem, state)
        peak = torch.cat([state.u, state.v], dim=1).detach().log().abs().amax()  # 0 in the log domain (u = v = 1)
        worst, peak = torch.stack([error.max(), peak]).tolist()  # the block's one host sync
        if worst < tol:
            break
        if peak > _ABSORB_ABOVE:  # keep u and v near 1 so that the scaled kernel stays representable
            state.absorb(problem)
        if errors is not None and len(errors) == _CHECK_EVERY:
            state.omega = _relaxation_weights(errors, unbalanced=not problem.balanced)
        elif state.omega is not None:
            adapt = n_iter >= _ADAPT_AFTER
            state.omega = _adapted_relaxation(state.omega, error, state.previous, state.best, steps, adapt)
            state.best = torch.minimum(state.best, error)
        state.previous = error
    # A last plain update of g makes the columns exact, as after every iteration of plain Sinkhorn.
    if state.log_domain:
        f, g = state.f, _plain_column_update(problem, state)
    else:
        f, g = state.f + state.u.log(), state.g + _plain_column_update(problem, state)
    pair_mask = problem.row_mask[:, :, None] & problem.col_mask[:, None, :]
    coupling = (problem.log_kernel + f[:, :, None] + g[:, None, :]).exp().masked_fill(~pair_mask, 0.0)
    relaxation = state.omega[:, 0] if state.omega is not None else torch.ones_like(problem.log_mu[:, 0])
    info = dict(n_iter=n_iter, relaxation=relaxation, converged=error < tol, log_domain=state.log_domain, worst=worst)
    return coupling, (f, g), info


def _check_intra_cost(intra: torch.Tensor, name: str, batch: int, length: int, mask: torch.Tensor) -> list[float]:
    """Refuse an intra-modal cost that is not a floating (B, L, L) tensor, or not finite and symmetric on valid pairs.

    One reduction and one host sync: per sample, the largest ``|D|`` and ``|D - D^T|`` over valid pairs. Returns
    the largest ``|D|`` of each sample (empty for an empty tensor).
    """
    if (
        not isinstance(intra, torch.Tensor)
        or not intra.is_floating_point()
        or tuple(intra.shape)
        != (
            batch,
            length,
            length,
        )
    ):
        got = f"shape {tuple(intra.shape)}, dtype {intra.dtype}" if isinstance(intra, torch.Tensor) else type(intra)
        raise ValueError(
            f"{name} must be a floating-point torch.Tensor of shape {(batch, length, length)}, got {got}."
        )
    _check_same_device(mask, "the masks and cost", intra, name)
    if intra.numel() == 0:
        return []
    pairs = mask[:, :, None] & mask[:, None, :]
    with torch.no_grad():
        size = intra.detach().masked_fill(~pairs, 0.0).abs().flatten(1).amax(dim=1)
        skew = (intra.detach() - intra.detach().transpose(1, 2)).masked_fill(~pairs, 0.0).abs().flatten(1).amax(dim=1)
        sizes, skews = torch.stack([size, skew]).tolist()
    broken = [b for b, value in enumerate(sizes) if not math.isfinite(value)]
    if broken:
        raise ValueError(
            f"{name} holds NaN or infinite values on valid pairs of sample(s) {_first(broken)} (batch indices): fix the "
            "features that gave it, or mark those positions invalid in the masks (padded pairs are ignored)."
        )
    asymmetric = [b for b, (value, gap) in enumerate(zip(sizes, skews)) if gap > 1e-6 * max(value, 1.0)]
    if asymmetric:
        raise ValueError(
            f"{name} is not symmetric on the valid pairs of sample(s) {_first(asymmetric)} (batch indices; largest "
            f"|D - D^T| = {max(skews):.3g}): the linearised Gromov-Wasserstein term assumes symmetric intra-modal "
            "costs such as cosine_cost(x, x); pass (D + D^T) / 2."
        )
    return sizes


def _check_edge_range(cost, row_mask, col_mask, edge_sizes, alpha, lambda1, lambda2, sigma) -> None:
    """Refuse edge costs whose Gromov-Wasserstein term takes the linearised cost beyond what the working dtype
    resolves, where the node cost alone would not: the error then names them rather than ``cost``.

    ``|L(D_A, D_L) (x) T| <= (max|D_A| + max|D_L|)^2`` for a plan of mass 1, so the linearised cost is at most
    ``(1 - alpha) max|C| + 2 alpha (max|D_A| + max|D_L|)^2`` (``edge_sizes``: the largest ``|D_A|``, ``|D_L|`` of
    each sample). One reduction over ``cost`` and one host sync.
    """
    if cost.numel() == 0:
        return
    dtype, pairs = _working_dtype(cost.dtype), row_mask[:, :, None] & col_mask[:, None, :]
    with torch.no_grad():
        node_sizes = cost.detach().to(dtype).masked_fill(~pairs, 0.0).abs().flatten(1).amax(dim=1).tolist()
    prior = 0.0 if sigma is None else _prior_weight(sigma)
    limit = _kernel_range_limit(dtype)
    spans, over = [], []
    for b, (node, source, target) in enumerate(zip(node_sizes, *edge_sizes)):
        without_edges = ((1 - alpha) * node + lambda1) / lambda2 + prior
        spans.append(without_edges + 2 * alpha * (source + target) ** 2 / lambda2)
        if without_edges <= limit < spans[-1]:
            over.append(b)
    if over:
        b = max(over, key=lambda i: spans[i])
        raise ValueError(
            f"source_cost and target_cost are too large for fused_gw_sinkhorn in {dtype} in sample(s) {_first(over)} "
            f"(batch indices): in sample {b} their largest |D| are {edge_sizes[0][b]:.4g} and {edge_sizes[1][b]:.4g}, so "
            f"the Gromov-Wasserstein part of the linearised cost, up to 2 alpha (max|D_A| + max|D_L|)^2, spans "
            f"{spans[b]:.4g} nats over lambda2 = {lambda2}, beyond the {limit:.4g} that {dtype} resolves. Scale the "
            "edge costs down (e.g. cosine_cost(h, h), in [0, 2]), lower alpha, or raise lambda2."
        )


def _gw_tensor_product(source_cost, target_cost, coupling, row_weights, col_weights) -> torch.Tensor:
    r"""``L(D_A, D_L) (x) T`` (B, N, M) of the square loss, by Peyré et al.'s decomposition [9, Prop. 1].

    .. math::
        (\mathcal{L} \otimes T)_{ij} = \sum_{kl} (D^A_{ik} - D^L_{jl})^2 T_{kl}
        = (D_A^{\odot 2} p)_i + (D_L^{\odot 2} q)_j - 2 (D_A T D_L^\top)_{ij}

    with ``p = T 1``, ``q = T^T 1`` (here ``row_weights`` (B, N), ``col_weights`` (B, M)); POT's
    ``ot.gromov.tensor_product(*init_matrix(D_A, D_L, p, q), T)``. Three batched products, ``O(N^2 M + N M^2)``.
    """
    rows = torch.bmm(source_cost.square(), row_weights[:, :, None])  # (B, N, 1)
    cols = torch.bmm(target_cost.square(), col_weights[:, :, None]).transpose(1, 2)  # (B, 1, M)
    return rows + cols - 2 * torch.bmm(torch.bmm(source_cost, coupling), target_cost.transpose(1, 2))


def fused_gw_loss(
    coupling: torch.Tensor,
    cost: torch.Tensor,
    source_cost: torch.Tensor,
    target_cost: torch.Tensor,
    alpha: float = 0.5,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Fused Gromov-Wasserstein objective of a coupling (square loss) [8, 9].

    .. math::
        L_{fgw} = (1 - \alpha) \langle T, C \rangle
                  + \alpha \sum_{i,j,k,l} (D^A_{ik} - D^L_{jl})^2 \, T_{ij} T_{kl}

    computed as ``(1 - alpha) <T, C> + alpha <L(D_A, D_L) (x) T, T>`` with the marginals of ``T``
    itself, so it is the quadruple sum exactly, whatever the marginal error (POT's ``fgw_dist`` of
    ``ot.gromov.entropic_fused_gromov_wasserstein(..., log=True)``, which uses ``p`` and ``q``,
    agrees when ``T`` has them). With an ``"envelope"`` coupling (detached) the gradient reaches
    ``C``, ``D_A`` and ``D_L`` with ``T`` fixed: by the envelope theorem the gradient of the
    optimal value at a stationary plan. ``alpha = 0`` is :func:`ot_loss`.

    Parameters
    ----------
    coupling : torch.Tensor, shape (B, N, M)
        Coupling from :func:`fused_gw_sinkhorn` (0 on padding).
    cost : torch.Tensor, shape (B, N, M)
        Node cost ``C`` (e.g. ``cosine_cost(h, z)``).
    source_cost, target_cost : torch.Tensor, shapes (B, N, N) and (B, M, M)
        Intra-modal edge costs ``D_A``, ``D_L`` (e.g. ``cosine_cost(h, h)``), finite everywhere.
    alpha : float, optional
        Weight of the Gromov-Wasserstein term, in [0, 1]. Default 0.5.
    reduction : {"mean", "none"}, optional
        As in :func:`ot_loss`: mean over the samples with a non-zero coupling, or one value per sample.

    Returns
    -------
    loss : torch.Tensor, shape () or (B,)
        float32 for half-precision inputs, else the promoted dtype of the inputs.
    """
    _check_alpha(alpha)
    batch, n_rows, n_cols = coupling.shape if coupling.dim() == 3 else (None, None, None)
    if (
        coupling.dim() != 3
        or tuple(source_cost.shape) != (batch, n_rows, n_rows)
        or tuple(target_cost.shape) != (batch, n_cols, n_cols)
    ):
        raise ValueError(
            "coupling, source_cost and target_cost must have shapes (B, N, M), (B, N, N) and (B, M, M), got "
            f"{tuple(coupling.shape)}, {tuple(source_cost.shape)} and {tuple(target_cost.shape)}."
        )
    linear = ot_loss(coupling, cost, reduction="none")
    dtype = linear.dtype
    _check_same_device(coupling, "coupling", source_cost, "source_cost")
    _check_same_device(coupling, "coupling", target_cost, "target_cost")
    with _no_autocast(coupling.device):
        plan, source_cost, target_cost = coupling.to(dtype), source_cost.to(dtype), target_cost.to(dtype)
        product = _gw_tensor_product(source_cost, target_cost, plan, plan.sum(dim=2), plan.sum(dim=1))
        per_sample = (1 - alpha) * linear + alpha * (product * plan).sum(dim=(1, 2))
    if reduction == "none":
        return per_sample
    return _masked_batch_mean(per_sample, coupling.sum(dim=(1, 2)) != 0)  # a NaN plan counts: its loss is NaN


def _check_alpha(alpha) -> None:
    """Raise a ValueError unless ``alpha`` is a real number in [0, 1]."""
    _check_positive(alpha, "alpha", allow_zero=True)
    if alpha > 1:
        raise ValueError(f"alpha must lie in [0, 1] (0: plain OT, 1: pure Gromov-Wasserstein), got {alpha!r}.")


def fused_gw_sinkhorn(
    cost: torch.Tensor,
    source_cost: torch.Tensor,
    target_cost: torch.Tensor,
    source_mask: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
    *,
    alpha: float = 0.5,
    lambda1: float = 0.0,
    lambda2: float = 0.1,
    sigma: float | None = None,
    max_outer: int = 50,
    outer_tol: float = 1e-4,
    max_iter: int = 1000,
    tol: float = 1e-4,
    grad: str = "envelope",
    log: bool = False,
    warn: bool = True,
):
    r"""Entropic fused Gromov-Wasserstein coupling (GM-OT), batched and masked.

    Graph-matching OT [10] treats the frames and the tokens as two graphs: node cost
    ``C_ij = 1 - cos(h_i, z_j)``, edge costs ``D^A_ik = 1 - cos(h_i, h_k)`` and
    ``D^L_jl = 1 - cos(z_j, z_l)`` (:func:`cosine_cost`). For every sample it seeks

    .. math::
        T^* \in \mathop{\arg\min}_{T \in \Pi(\mu, \nu)}
              (1 - \alpha) \langle T, C \rangle
              + \alpha \sum_{i,j,k,l} (D^A_{ik} - D^L_{jl})^2 T_{ij} T_{kl}
              - \langle T, S \rangle + \lambda_2 \, \mathrm{KL}(T \| P)

    the fused Gromov-Wasserstein problem [8] (square loss) with entropic regularisation, uniform
    marginals over the valid frames and tokens, and optionally TOT's order reward ``S`` and
    temporal prior ``P`` (``lambda1``, ``sigma``; by default 0 and None: plain GM-OT, where
    ``KL(T || 1)`` is the negative entropy up to a constant).

    The problem is not convex. As POT's ``ot.gromov.entropic_fused_gromov_wasserstein`` (solver
    ``"PGD"``) [9], each outer iteration linearises the quadratic term at the current plan and
    solves the resulting entropic OT problem (mirror descent with step ``1 / lambda2``):

    .. math::
        T^{(k+1)} = \mathrm{TOT}\big((1 - \alpha) C + \alpha \, \nabla_T GW(T^{(k)})\big), \qquad
        \nabla_T GW(T) = 2 \big( (D_A^{\odot 2} \mu) \mathbf{1}^\top + \mathbf{1} (D_L^{\odot 2} \nu)^\top
                         - 2 D_A T D_L^\top \big)

    from ``T^{(0)} = mu nu^T``, where TOT is :func:`tot_sinkhorn` with the same ``lambda1``,
    ``lambda2``, ``sigma`` (POT: ``ot.sinkhorn(mu, nu, tens, epsilon)`` with ``epsilon =
    lambda2`` and ``tens`` the linearised cost; the factor 2 is POT's ``gwggrad``, the true
    gradient). The gradient takes three batched matrix products, no loop over the batch. Each
    inner solve starts from the previous one's potentials (``warm_start``). The iterations stop
    after ``max_outer`` or once the L1 change of every sample's plan, ``||T^(k+1) - T^(k)||_1``,
    is below ``outer_tol`` (POT tests the Frobenius norm every tenth iteration instead).
    ``alpha = 0`` is one call of :func:`tot_sinkhorn` on ``C``, the plain (or TOT) alignment.

    Parameters
    ----------
    cost : torch.Tensor, shape (B, N, M)
        Node cost ``C`` between frames and tokens.
    source_cost : torch.Tensor, shape (B, N, N)
        Edge cost ``D_A`` between frames, symmetric (e.g. ``cosine_cost(h, h)``).
    target_cost : torch.Tensor, shape (B, M, M)
        Edge cost ``D_L`` between tokens, symmetric (e.g. ``cosine_cost(z, z)``).
    source_mask, target_mask : torch.BoolTensor, shapes (B, N) and (B, M), optional
        Valid frames and tokens, as in :func:`tot_sinkhorn`. Padded entries of the three costs are ignored.
    alpha : float, optional
        Weight of the Gromov-Wasserstein term in [0, 1]: 0 is plain OT, 1 pure GW. Default 0.5.
    lambda1, lambda2, sigma : optional
        Order reward, entropic temperature and temporal prior, as in :func:`tot_sinkhorn`.
        Default 0, 0.1, None (no reward, no prior).
    max_outer : int, optional
        Maximum number of outer (linearisation) iterations, >= 1. Default 50.
    outer_tol : float, optional
        Stopping threshold on the L1 change of the plan between outer iterations (total mass 1),
        >= 0; 0 runs exactly ``max_outer`` iterations. Default 1e-4.
    max_iter, tol : optional
        Of each inner :func:`tot_sinkhorn` solve.
    grad : {"envelope", "autodiff"}, optional
        ``"envelope"`` (default): the returned coupling is detached; :func:`fused_gw_loss` then
        backpropagates into the costs with the plan fixed (the envelope gradient at a
        stationary plan), and no graph is kept through the iterations. ``"autodiff"``: through
        all outer and inner iterations (memory grows with both).
    log : bool, optional
        Also return a dict:

        - ``"n_outer"`` (int): outer iterations run;
        - ``"plan_change"`` (tensor (B,)): each sample's L1 change of the plan in the last one;
        - ``"plan_changes"`` (list of float): the largest change over the batch, per outer iteration;
        - ``"converged"`` (bool tensor (B,)): whether ``plan_change < outer_tol`` (all True for
          ``alpha = 0``, whose one iteration is exact) and the last inner solve converged;
        - ``"objective"`` (tensor (B,)): :func:`fused_gw_loss` of the returned plan (without the
          reward and entropy terms; POT's ``fgw_dist``);
        - ``"n_iter"`` (int): inner Sinkhorn iterations, summed over the outer ones;
        - ``"marginal_error"`` (tensor (B,)): that of the last inner solve.
    warn : bool, optional
        Warn once (``UserWarning``) when the outer iterations or an inner solve stopped above
        their tolerance. Default True.

    Returns
    -------
    coupling : torch.Tensor, shape (B, N, M)
        ``T*``, with the marginals of :func:`tot_sinkhorn`; exactly 0 on padding. float32 for
        half-precision costs, else the cost's dtype.
    log : dict
        Only if ``log`` is True, see above.

    Raises
    ------
    ValueError
        For what :func:`tot_sinkhorn` refuses (on ``C`` and on each linearised cost), an
        ``alpha`` outside [0, 1], ``max_outer`` not an integer >= 1, a negative ``outer_tol``,
        and edge costs of the wrong shape or device, or NaN, infinite or not symmetric on valid
        pairs (one host sync each), or so large that the Gromov-Wasserstein term alone takes the
        linearised cost beyond what the working dtype resolves (the error names ``source_cost`` and
        ``target_cost``, not ``cost``).

    Notes
    -----
    Memory: besides :func:`tot_sinkhorn`'s, the edge costs (B, N, N) and (B, M, M) and a few
    (B, N, M) products; ``N = 1000`` frames cost ``8 B`` MB per (B, N, N) tensor in float64.

    Examples
    --------
    >>> h, z = torch.randn(2, 40, 8), torch.randn(2, 6, 8)
    >>> coupling = fused_gw_sinkhorn(cosine_cost(h, z), cosine_cost(h, h), cosine_cost(z, z), alpha=0.5)
    >>> coupling.shape
    torch.Size([2, 40, 6])
    """
    row_mask, col_mask = _check_solver_arguments(
        cost, source_mask, target_mask, lambda1, lambda2, sigma, max_iter, tol, grad
    )
    batch, n_rows, n_cols = cost.shape
    _check_alpha(alpha)
    _check_count(max_outer, "max_outer")
    _check_positive(outer_tol, "outer_tol", allow_zero=True)
    source_sizes = _check_intra_cost(source_cost, "source_cost", batch, n_rows, row_mask)
    target_sizes = _check_intra_cost(target_cost, "target_cost", batch, n_cols, col_mask)
    _check_edge_range(cost, row_mask, col_mask, (source_sizes, target_sizes), alpha, lambda1, lambda2, sigma)
    solve = dict(lambda1=lambda1, lambda2=lambda2, sigma=sigma, max_iter=max_iter, tol=tol, grad=grad, warn=False)
    tolerances = (outer_tol, tol)
    dtype = _working_dtype(cost.dtype)
    # Padded edges become 0, so that whatever they hold never reaches a product.
    source_cost = source_cost.to(dtype).masked_fill(~(row_mask[:, :, None] & row_mask[:, None, :]), 0.0)
    target_cost = target_cost.to(dtype).masked_fill(~(col_mask[:, :, None] & col_mask[:, None, :]), 0.0)
    if alpha == 0 or cost.numel() == 0:  # the linearised cost is C itself (or nothing): one solve is exact
        coupling, inner = tot_sinkhorn(cost, source_mask, target_mask, log=True, **solve)
        return _fused_gw_result(coupling, inner, [], (cost, source_cost, target_cost), alpha, tolerances, warn, log)

    autograd = torch.set_grad_enabled(grad == "autodiff" and torch.is_grad_enabled())
    with _no_autocast(cost.device), autograd:
        cost = cost.to(dtype)
        pairs = row_mask[:, :, None] & col_mask[:, None, :]
        mu, nu = _uniform(row_mask, dtype), _uniform(col_mask, dtype)
        coupling = mu[:, :, None] * nu[:, None, :]  # mu nu^T, 0 on padding
        node_cost = (1 - alpha) * cost.masked_fill(~pairs, 0.0)
        changes, potentials, n_iter = [], None, 0
        for _ in range(max_outer):
            gradient = 2 * _gw_tensor_product(source_cost, target_cost, coupling, mu, nu)
            new, inner = tot_sinkhorn(
                node_cost + alpha * gradient, source_mask, target_mask, log=True, warm_start=potentials, **solve
            )
            potentials, n_iter = inner["potentials"], n_iter + inner["n_iter"]
            change = (new - coupling).detach().abs().sum(dim=(1, 2))
            coupling = new
            changes.append(float(change.max()))  # the outer iteration's one host sync
            if changes[-1] < outer_tol:
                break
    inner["n_iter"], inner["plan_change"] = n_iter, change
    return _fused_gw_result(coupling, inner, changes, (cost, source_cost, target_cost), alpha, tolerances, warn, log)


def _fused_gw_result(coupling, inner, changes, costs, alpha, tolerances, warn, log):
    """Warn about non-convergence and assemble :func:`fused_gw_sinkhorn`'s return value.

    ``inner`` is the last inner solve's ``log``, ``changes`` the outer iterations' largest plan
    changes (empty for ``alpha = 0``), ``costs`` ``(C, D_A, D_L)`` and ``tolerances`` ``(outer_tol, tol)``.
    """
    (outer_tol, tol), change = tolerances, inner.get("plan_change", torch.zeros_like(inner["marginal_error"]))
    outer_done = change < outer_tol if changes else torch.ones_like(inner["converged"])
    converged = inner["converged"] & outer_done
    failed_outer, failed_inner = (
        outer_tol > 0 and not bool(outer_done.all()),
        tol > 0 and not bool(inner["converged"].all()),
    )
    if warn and (failed_outer or failed_inner):
        failed = (~converged).nonzero().flatten().tolist()
        warnings.warn(
            f"fused_gw_sinkhorn stopped above tolerance for {len(failed)} of {converged.numel()} samples (batch "
            f"indices {_first(failed)}; last plan change {max(changes, default=0.0):.2e}, outer_tol={outer_tol}): "
            "raise max_outer (or max_iter for the inner solves), or lambda2; log=True gives each sample's change.",
            stacklevel=3,
        )
    if not log:
        return coupling
    with torch.no_grad():
        objective = fused_gw_loss(coupling, *costs, alpha, reduction="none")
    return coupling, {
        "n_outer": max(len(changes), 1),
        "plan_change": change,
        "plan_changes": changes,
        "converged": converged,
        "objective": objective,
        "n_iter": inner["n_iter"],
        "marginal_error": inner["marginal_error"],
    }


def barycentric_transport(
    coupling: torch.Tensor, source: torch.Tensor, target_mask: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Barycentric projection of source features onto the target positions.

    .. math::
        \hat a_j = \frac{1}{\nu_j} \sum_i T_{ij} a_i = M \, (T^\top a)_j

    Parameters
    ----------
    coupling : torch.Tensor, shape (B, N, M)
        Coupling from :func:`tot_sinkhorn` (column ``j`` carries ``nu_j = 1/M`` of mass).
    source : torch.Tensor, shape (B, N, D)
        Source features ``a`` (e.g. adapted acoustic frames).
    target_mask : torch.BoolTensor, shape (B, M), optional
        Valid tokens, giving ``M`` per sample. Default: all valid.

    Returns
    -------
    transported : torch.Tensor, shape (B, M, D)
        ``â``; 0 on padded tokens and for samples with no valid frame. float32 for
        half-precision inputs, else the promoted dtype of the inputs.
    """
    if coupling.dim() != 3 or source.dim() != 3 or coupling.shape[:2] != source.shape[:2]:
        raise ValueError(
            "coupling and source must have shapes (B, N, M) and (B, N, D) with the same B and N, "
            f"got {tuple(coupling.shape)} and {tuple(source.shape)}."
        )
    _check_same_device(coupling, "coupling", source, "source")
    batch, _, n_cols = coupling.shape
    target_mask = _check_mask(target_mask, "target_mask", batch, n_cols, coupling.device, "coupling")
    dtype = _working_dtype(torch.promote_types(coupling.dtype, source.dtype))
    with _no_autocast(coupling.device):
        weights = coupling.to(dtype) * target_mask.sum(dim=-1).to(dtype)[:, None, None]
        transported = torch.bmm(weights.transpose(1, 2), source.to(dtype))
        return transported.masked_fill(~target_mask[:, :, None], 0.0)


def _masked_batch_mean(per_sample: torch.Tensor, sample_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_sample`` (B,) over the samples where ``sample_mask`` (B,) holds; 0 if none. A NaN in a
    sample that counts makes the mean NaN (never a quiet 0)."""
    total = per_sample.masked_fill(~sample_mask, 0.0).sum()
    return total / sample_mask.sum().clamp(min=1).to(per_sample.dtype)


def ot_loss(coupling: torch.Tensor, cost: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    r"""Transport cost of a coupling, :math:`L_{ot} = \langle T, C \rangle = \sum_{ij} T_{ij} C_{ij}`.

    With an ``"envelope"`` coupling (detached) the gradient with respect to ``cost`` is exactly
    ``T``. Samples whose coupling is all zero (no valid frame or token) are left out of the mean.

    Parameters
    ----------
    coupling : torch.Tensor, shape (B, N, M)
        Coupling from :func:`tot_sinkhorn` (0 on padding, so padded costs do not count).
    cost : torch.Tensor, shape (B, N, M)
        Cost matrices, finite everywhere (including padding, since 0 * inf is NaN).
    reduction : {"mean", "none"}, optional
        ``"mean"``: mean over the non-empty samples (0 if there is none); ``"none"``: one value
        per sample.

    Returns
    -------
    loss : torch.Tensor, shape () or (B,)
        float32 for half-precision inputs, else the promoted dtype of the inputs.
    """
    if coupling.shape != cost.shape or coupling.dim() != 3:
        raise ValueError(
            f"coupling and cost must have the same shape (B, N, M), got {tuple(coupling.shape)} "
            f"and {tuple(cost.shape)}."
        )
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}.")
    _check_same_device(coupling, "coupling", cost, "cost")
    dtype = _working_dtype(torch.promote_types(coupling.dtype, cost.dtype))
    coupling = coupling.to(dtype)
    per_sample = (coupling * cost.to(dtype)).sum(dim=(1, 2))
    if reduction == "none":
        return per_sample
    return _masked_batch_mean(per_sample, coupling.sum(dim=(1, 2)) != 0)  # a NaN plan counts: its loss is NaN


def align_loss(
    transported: torch.Tensor,
    target: torch.Tensor,
    target_mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Cosine alignment loss between transported features and targets.

    .. math::
        L_{align} = \frac{1}{M} \sum_{j=1}^{M} \left(1 - \cos(\hat a_j, l_j)\right)

    per sample, over its valid tokens. The batch value is the mean over samples that have at
    least one valid token, so every utterance weighs the same whatever its length (as in
    :func:`ot_loss`, where every coupling has total mass 1).

    Parameters
    ----------
    transported : torch.Tensor, shape (B, M, D)
        ``â`` from :func:`barycentric_transport`.
    target : torch.Tensor, shape (B, M, D)
        Target features ``l`` (e.g. teacher token features).
    target_mask : torch.BoolTensor, shape (B, M), optional
        Valid tokens. Default: all valid. A sample with tokens but no valid frame receives
        nothing to align; leave its tokens out of ``target_mask`` (e.g.
        ``target_mask & source_mask.any(-1, keepdim=True)``).
    reduction : {"mean", "none"}, optional
        ``"mean"``: mean over samples with a valid token (0 if there is none); ``"none"``: one
        value per sample (0 for samples without valid tokens).

    Returns
    -------
    loss : torch.Tensor, shape () or (B,)
        float32 for half-precision inputs, else the promoted dtype of the inputs.
    """
    if transported.dim() != 3 or transported.shape != target.shape:
        raise ValueError(
            "transported and target must have the same shape (B, M, D), got "
            f"{tuple(transported.shape)} and {tuple(target.shape)}."
        )
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}.")
    _check_same_device(target, "target", transported, "transported")
    batch, n_cols, _ = target.shape
    target_mask = _check_mask(target_mask, "target_mask", batch, n_cols, target.device, "target")
    dtype = _working_dtype(torch.promote_types(transported.dtype, target.dtype))
    with _no_autocast(target.device):
        cosine = torch.nn.functional.cosine_similarity(transported.to(dtype), target.to(dtype), dim=-1, eps=1e-8)
    token_loss = (1.0 - cosine).masked_fill(~target_mask, 0.0)
    count = target_mask.sum(dim=-1)
    per_sample = token_loss.sum(dim=-1) / count.clamp(min=1).to(dtype)
    if reduction == "none":
        return per_sample
    return _masked_batch_mean(per_sample, count > 0)
