"""The model's wiring, checked through its public outputs on padded batches: which frames and tokens the
solver sees, which solver settings reach it, and which frame counts the CTC loss uses.

Each expected value is recomputed outside the model, from the adapted frames it produced (read with a
forward hook on its adapter), the valid frame counts given by the convolution arithmetic, and the
public solver, losses and `torch.nn.functional.ctc_loss`."""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch
from tiny_models import TEACHER_HIDDEN, TINY_HUBERT, TINY_WAV2VEC2, TINY_WAVLM, make_model

from modeling_tot_cakt.tot import (
    align_loss,
    barycentric_transport,
    cosine_cost,
    fused_gw_loss,
    fused_gw_sinkhorn,
    ot_loss,
    tot_sinkhorn,
)

# Two utterances of different lengths; the second is zero-padded to the first.
SAMPLES = (8000, 5000)
# Teacher tokens per utterance: 5 and 3 (the second is padded with 2 tokens).
TOKENS = (5, 3)
# Raw-waveform encoders with the same convolutional feature encoder (so the same frame counts).
ENCODERS = pytest.mark.parametrize(
    "encoder", [TINY_WAV2VEC2, TINY_HUBERT, TINY_WAVLM], ids=["wav2vec2", "hubert", "wavlm"]
)


def valid_frames(samples: int, encoder: dict = TINY_WAV2VEC2) -> int:
    """Output frames of the convolutional feature encoder for `samples` input samples (no padding):
    each layer of kernel `k` and stride `s` maps `n` to `floor((n - k) / s) + 1`."""
    for kernel, stride in zip(encoder["conv_kernel"], encoder["conv_stride"]):
        samples = (samples - kernel) // stride + 1
    return samples


def padded_batch(seed: int = 0) -> dict:
    """Zero-padded audio with its attention mask, and teacher token features whose padded positions hold
    large random values (so a solver that ignored the token mask would give them mass)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(SAMPLES)
    audio = torch.zeros(len(SAMPLES), width)
    attention_mask = torch.zeros(len(SAMPLES), width, dtype=torch.long)
    for index, length in enumerate(SAMPLES):
        audio[index, :length] = 0.5 * torch.randn(length, generator=generator)
        attention_mask[index, :length] = 1
    tokens = 3 * torch.randn(len(TOKENS), max(TOKENS), TEACHER_HIDDEN, generator=generator)
    token_mask = torch.arange(max(TOKENS))[None, :] < torch.tensor(TOKENS)[:, None]
    return dict(
        input_values=audio, attention_mask=attention_mask, teacher_hidden_states=tokens, teacher_token_mask=token_mask
    )


def expected_frame_mask(frames: int) -> torch.Tensor:
    lengths = torch.tensor([valid_frames(samples) for samples in SAMPLES])
    return torch.arange(frames)[None, :] < lengths[:, None]


def adapter_of(model) -> torch.nn.Module:
    """The adapter module, in the base model (`model.tot_cakt`) when there is one."""
    base = getattr(model, "tot_cakt", model)
    return base.adapter


def run_and_capture_adapted(model, **inputs):
    """Run the model and return `(output, adapted frames)` as the adapter produced them."""
    captured = []
    handle = adapter_of(model).register_forward_hook(lambda module, args, output: captured.append(output.detach()))
    try:
        output = model(**inputs)
    finally:
        handle.remove()
    assert len(captured) == 1, "the adapter must run exactly once per forward pass"
    return output, captured[0].float()


@ENCODERS
@pytest.mark.parametrize("alignment", ["tot", "ot", "gmot"])
def test_padded_frames_and_tokens_get_no_mass_and_valid_ones_keep_their_marginals(alignment, encoder):
    torch.manual_seed(0)
    model = make_model(encoder, alignment=alignment, tot_sigma=3.0, tot_max_iter=3000, tot_tol=1e-6).eval()
    batch = padded_batch()
    with torch.no_grad():
        coupling = model(**batch, output_coupling=True).coupling
    frame_mask = expected_frame_mask(coupling.shape[1])
    token_mask = batch["teacher_token_mask"]
    assert coupling.shape == (2, valid_frames(max(SAMPLES)), max(TOKENS))
    assert frame_mask.sum(-1).tolist() == [398, 248]  # 8000 -> 1599 -> 398 and 5000 -> 999 -> 248 frames

    pair_mask = frame_mask[:, :, None] & token_mask[:, None, :]
    assert torch.count_nonzero(coupling[~pair_mask]) == 0  # exactly zero, not just small
    rows, columns = coupling.sum(2), coupling.sum(1)
    for b, (n_valid, m_valid) in enumerate(zip(frame_mask.sum(-1).tolist(), TOKENS)):
        torch.testing.assert_close(rows[b, :n_valid], torch.full((n_valid,), 1 / n_valid), rtol=1e-3, atol=0)
        torch.testing.assert_close(columns[b, :m_valid], torch.full((m_valid,), 1 / m_valid), rtol=1e-4, atol=0)


@pytest.mark.parametrize("alignment", ["tot", "tot_gmot"])
def test_coupling_of_a_padded_batch_is_each_utterances_own_coupling(alignment):
    """Padding changes nothing: each utterance's coupling in the batch equals the one it gets alone."""
    torch.manual_seed(0)
    # A fixed number of iterations in both runs.
    model = make_model(alignment=alignment, tot_tol=0.0, tot_max_iter=30, gmot_max_outer=4).eval()
    batch = padded_batch()
    with torch.no_grad():
        together = model(**batch, output_coupling=True).coupling
        for b, (samples, tokens) in enumerate(zip(SAMPLES, TOKENS)):
            alone = model(
                input_values=batch["input_values"][b : b + 1, :samples],
                teacher_hidden_states=batch["teacher_hidden_states"][b : b + 1, :tokens],
                output_coupling=True,
            ).coupling[0]
            torch.testing.assert_close(together[b, : alone.shape[0], :tokens], alone, rtol=1e-4, atol=1e-8)


# Non-default values for every solver field of the configuration; each set makes one of `tot_max_iter`
# (tol 0: exactly max_iter iterations) and `tot_tol` (a loose tol stops early) decide where Sinkhorn stops.
SOLVER_SETTINGS = {
    "max_iter": dict(
        tot_lambda1=0.7,
        tot_lambda2=0.03,
        tot_sigma=2.5,
        uot_tau=0.3,
        gmot_alpha=0.3,
        gmot_max_outer=2,
        tot_max_iter=3,
        tot_tol=0.0,
    ),
    "tol": dict(
        tot_lambda1=2.0, tot_lambda2=0.02, tot_sigma=0.8, uot_tau=5.0, gmot_alpha=0.8, tot_max_iter=500, tot_tol=0.05
    ),
}
# The mode each mode is told apart from: the one that differs only in the prior and reward, in the marginals,
# or in the Gromov-Wasserstein term.
OTHER_MODE = {"tot": "ot", "ot": "tot", "uot": "ot", "tot_uot": "tot", "gmot": "ot", "tot_gmot": "tot"}
GMOT_MODES = ("gmot", "tot_gmot")


def solve(cost, frame_mask, token_mask, config, alignment, edges=None, **overrides):
    """The public solver with the settings the configuration asks for in `alignment` mode (`edges`: the
    intra-modal costs of the graph-matching modes)."""
    plain = alignment in ("ot", "uot", "gmot")
    settings = dict(
        lambda1=0.0 if plain else config.tot_lambda1,
        lambda2=config.tot_lambda2,
        sigma=None if plain else config.tot_sigma,
        max_iter=config.tot_max_iter,
        tol=config.tot_tol,
    )
    if alignment in GMOT_MODES:
        settings = {"alpha": config.gmot_alpha, **settings, **overrides}
        settings = {"max_outer": config.gmot_max_outer, "outer_tol": settings["tol"], **settings}
        return fused_gw_sinkhorn(cost, *edges, frame_mask, token_mask, **settings, warn=False)
    settings["tau"] = config.uot_tau if alignment in ("uot", "tot_uot") else None
    return tot_sinkhorn(cost, frame_mask, token_mask, **{**settings, **overrides}, warn=False)


def assert_differs(actual, other, what):
    difference = float((actual - other).abs().max() / actual.abs().max())
    assert difference > 1e-3, f"this check cannot tell the coupling from {what} (relative difference {difference:.1e})"


@pytest.mark.parametrize("settings", SOLVER_SETTINGS.values(), ids=SOLVER_SETTINGS.keys())
@pytest.mark.parametrize("alignment", ["tot", "ot", "uot", "tot_uot", "gmot", "tot_gmot"])
def test_the_configured_solver_and_weights_make_the_coupling_and_the_losses(alignment, settings):
    torch.manual_seed(0)
    weights = dict(ctc_loss_weight=0.7, ot_loss_weight=0.2, align_loss_weight=0.45)
    model = make_model(alignment=alignment, **settings, **weights).eval()
    batch = padded_batch()
    labels = torch.tensor([[3, 4, 5, 6], [7, 8, -100, -100]])
    with torch.no_grad():
        output, adapted = run_and_capture_adapted(model, **batch, labels=labels, output_coupling=True)
    config = model.config
    frame_mask = expected_frame_mask(adapted.shape[1])
    token_mask = batch["teacher_token_mask"]
    tokens = batch["teacher_hidden_states"]
    cost = cosine_cost(adapted, tokens)
    edges = cosine_cost(adapted, adapted), cosine_cost(tokens, tokens)

    def configured(mode=alignment, **overrides):
        return solve(cost, frame_mask, token_mask, config, mode, edges, **overrides)

    expected = configured()
    torch.testing.assert_close(output.coupling, expected, rtol=1e-5, atol=1e-9)
    # The same check tells the modes and the stopping rules apart.
    assert_differs(output.coupling, configured(OTHER_MODE[alignment]), f"the {OTHER_MODE[alignment]} mode")
    if config.tot_tol == 0:
        assert_differs(output.coupling, configured(max_iter=50), "50 iterations")
    else:
        assert_differs(output.coupling, configured(tol=1e-4), "tol 1e-4")
    if alignment in ("uot", "tot_uot"):
        assert_differs(output.coupling, configured(tau=1.0), "tau=1.0")
    if alignment in GMOT_MODES:
        assert_differs(output.coupling, configured(alpha=0.5), "alpha=0.5")
        if config.tot_tol == 0:
            assert_differs(
                output.coupling, configured(max_outer=config.gmot_max_outer + 1), "one more outer iteration"
            )
    if alignment in ("tot", "tot_uot", "tot_gmot"):
        for field, value in (("lambda1", 1.0), ("lambda2", 0.1), ("sigma", 1.0)):
            assert_differs(output.coupling, configured(**{field: value}), f"{field}={value}")

    if alignment in GMOT_MODES:
        expected_ot = fused_gw_loss(expected, cost, *edges, config.gmot_alpha)
    else:
        expected_ot = ot_loss(expected, cost)
    expected_align = align_loss(barycentric_transport(expected, adapted, token_mask), tokens, token_mask)
    torch.testing.assert_close(output.ot_loss, expected_ot, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(output.align_loss, expected_align, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        output.loss, 0.7 * output.ctc_loss + 0.2 * expected_ot + 0.45 * expected_align, rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("grad", ["envelope", "autodiff"])
def test_the_configured_gradient_mode_reaches_the_solver(grad):
    torch.manual_seed(0)
    model = make_model(tot_grad=grad, tot_max_iter=5).eval()
    coupling = model(**padded_batch(), output_coupling=True).coupling
    # "envelope" returns a detached coupling; "autodiff" one that backpropagates into the adapter.
    assert coupling.requires_grad == (grad == "autodiff")


def reference_ctc_loss(logits, labels, input_lengths, config):
    log_probs = torch.log_softmax(logits.float(), dim=-1).transpose(0, 1)
    return torch.nn.functional.ctc_loss(
        log_probs,
        labels[labels >= 0],
        input_lengths,
        (labels >= 0).sum(-1),
        blank=config.pad_token_id,
        reduction=config.ctc_loss_reduction,
        zero_infinity=config.ctc_zero_infinity,
    )


@pytest.mark.parametrize(
    "config", [dict(), dict(ctc_loss_reduction="sum", pad_token_id=9)], ids=["defaults", "sum-blank9"]
)
@pytest.mark.parametrize("alignment", ["none", "tot"])
@ENCODERS
def test_ctc_loss_uses_each_utterances_valid_frames(encoder, alignment, config):
    torch.manual_seed(0)
    model = make_model(encoder, alignment=alignment, **config).eval()
    batch = padded_batch()
    if alignment == "none":
        batch = dict(input_values=batch["input_values"], attention_mask=batch["attention_mask"])
    labels = torch.tensor([[3, 4, 5, 6, 4], [7, 8, 3, -100, -100]])
    with torch.no_grad():
        output = model(**batch, labels=labels)
        # What the head makes of every frame, padding included (the output blanks the padding frames afterwards).
        inputs = {key: batch[key] for key in ("input_values", "attention_mask")}
        head = model.lm_head(model.tot_cakt(**inputs).last_hidden_state)
    frames = output.logits.shape[1]
    lengths = torch.tensor([valid_frames(samples) for samples in SAMPLES])
    expected = reference_ctc_loss(head, labels, lengths, model.config)
    torch.testing.assert_close(output.ctc_loss, expected, rtol=1e-5, atol=1e-6)
    # The head's logits of the padded frames are not blank: counting them would change the loss.
    padded_count = reference_ctc_loss(head, labels, torch.full_like(lengths, frames), model.config)
    assert abs(padded_count - expected) > 1e-2 * abs(expected)
    if alignment == "none":
        torch.testing.assert_close(output.loss, output.ctc_loss)


@pytest.mark.parametrize("alignment", ["tot", "gmot"])
@pytest.mark.parametrize("grad", ["envelope", "autodiff"])
def test_alignment_losses_backpropagate_into_the_adapter_like_the_reference(grad, alignment):
    """The gradients of `ot_loss` and `align_loss` with respect to the adapter's weights are those of the
    public losses computed on the adapted frames (the coupling detached in "envelope" mode; in the
    graph-matching mode through the frames' edge costs too)."""
    torch.manual_seed(0)
    model = make_model(alignment=alignment, tot_grad=grad, tot_max_iter=20, gmot_max_outer=3).eval()
    batch = padded_batch()
    captured = []
    handle = adapter_of(model).register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        output = model(**batch)
    finally:
        handle.remove()
    adapted = captured[0].float()
    frame_mask = expected_frame_mask(adapted.shape[1])
    tokens, token_mask = batch["teacher_hidden_states"], batch["teacher_token_mask"]
    cost = cosine_cost(adapted, tokens)
    edges = cosine_cost(adapted, adapted), cosine_cost(tokens, tokens)
    coupling = solve(cost, frame_mask, token_mask, model.config, alignment, edges, grad=grad)
    if alignment == "gmot":
        expected_ot = fused_gw_loss(coupling, cost, *edges, model.config.gmot_alpha)
    else:
        expected_ot = ot_loss(coupling, cost)
    expected_align = align_loss(barycentric_transport(coupling, adapted, token_mask), tokens, token_mask)
    weights = list(adapter_of(model).parameters())
    for name, loss, reference in (("ot", output.ot_loss, expected_ot), ("align", output.align_loss, expected_align)):
        got = torch.autograd.grad(loss, weights, retain_graph=True)
        want = torch.autograd.grad(reference, weights, retain_graph=True)
        assert any(g.abs().max() > 0 for g in want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7, msg=f"{name} loss gradient")


def test_graph_matching_warns_once_when_its_outer_iterations_stop_short_and_survives_nan_features(caplog):
    torch.manual_seed(0)
    batch = padded_batch()
    with caplog.at_level(logging.WARNING), torch.no_grad():
        make_model(alignment="gmot").eval()(**batch)
        assert "did not converge" not in caplog.text
        make_model(alignment="gmot", gmot_max_outer=1).eval()(**batch)
    assert re.search(r"did not converge .* plan change [0-9.e+-]+ after 1 outer iterations", caplog.text)

    model = make_model(alignment="gmot").eval()
    next(adapter_of(model).parameters()).data.fill_(math.nan)  # a diverged step: NaN frames
    with torch.no_grad():
        output = model(**batch)
    assert torch.isnan(output.ot_loss)  # the trainer's loss scaling skips it; the solver raised nothing
