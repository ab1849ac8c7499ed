"""TOT-CAKT model configuration."""

from __future__ import annotations

import math

from transformers import AutoConfig, PreTrainedConfig

from .tot import GRAD_MODES

ALIGNMENT_MODES = ("tot", "ot", "uot", "tot_uot", "gmot", "tot_gmot", "none")
# What each alignment mode is, said here only (the model, the card and the CLI read the configuration's properties):
# whether it adds TOT's order reward and temporal prior (ordered), relaxes the marginals (unbalanced), and adds the
# Gromov-Wasserstein term over the edges within each modality (graph). "none" aligns nothing.
_MODE_KINDS = {
    "tot": dict(ordered=True, unbalanced=False, graph=False),
    "ot": dict(ordered=False, unbalanced=False, graph=False),
    "uot": dict(ordered=False, unbalanced=True, graph=False),
    "tot_uot": dict(ordered=True, unbalanced=True, graph=False),
    "gmot": dict(ordered=False, unbalanced=False, graph=True),
    "tot_gmot": dict(ordered=True, unbalanced=False, graph=True),
    "none": dict(ordered=False, unbalanced=False, graph=False),
}
# The fields that only an alignment reads: those of every alignment, then those of each kind.
_SHARED_ALIGNMENT_FIELDS = (
    "tot_lambda2",
    "tot_max_iter",
    "tot_tol",
    "tot_grad",
    "ot_loss_weight",
    "align_loss_weight",
    "kd_loss_weight",
    "kd_top_k",
    "teacher_target",
    "align_layer",
)
_KIND_FIELDS = {
    "ordered": ("tot_lambda1", "tot_sigma"),
    "unbalanced": ("uot_tau",),
    "graph": ("gmot_alpha", "gmot_max_outer"),
}
ALIGNMENT_FIELDS = _SHARED_ALIGNMENT_FIELDS + sum(_KIND_FIELDS.values(), ())


def _alignment_fields(mode: str) -> tuple[str, ...]:
    """The fields of `ALIGNMENT_FIELDS` that the alignment `mode` reads (none for `"none"`)."""
    if mode == "none":
        return ()
    kinds = _MODE_KINDS[mode]
    return _SHARED_ALIGNMENT_FIELDS + sum((fields for kind, fields in _KIND_FIELDS.items() if kinds[kind]), ())


def alignment_modes_reading(field: str) -> tuple[str, ...]:
    """The alignment modes that read the configuration field `field` (one of `ALIGNMENT_FIELDS`)."""
    return tuple(mode for mode in ALIGNMENT_MODES if field in _alignment_fields(mode))


CTC_REDUCTIONS = ("mean", "sum")
# What the CTC head reads: the encoder's frames, or those frames mapped by the adapter into the teacher's space.
CTC_INPUTS = ("encoder", "adapter")
# "mlp": LayerNorm and `adapter_num_layers` linear layers; "linear": a single projection.
ADAPTER_TYPES = ("mlp", "linear")
# What each teacher token position gives the alignment: its state in the whole transcript, or its state computed
# with that position replaced by the mask token (what the context predicts there).
TEACHER_TARGETS = ("states", "masked_states")

# Audio encoders whose base model maps `input_values`/`input_features` to frame features and
# exposes `_get_feature_vector_attention_mask` (all wav2vec-style models in transformers).
SUPPORTED_ENCODERS = (
    "wav2vec2",
    "hubert",
    "wavlm",
    "data2vec-audio",
    "wav2vec2-bert",
    "unispeech",
    "unispeech-sat",
    "sew",
    "sew-d",
)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(condition: bool, field: str, allowed: str, value) -> None:
    if not condition:
        raise ValueError(f"TOTCAKTConfig.{field} must be {allowed}, got {value!r}.")


def _encoder_config(value: dict | PreTrainedConfig | None) -> PreTrainedConfig:
    """The acoustic encoder's configuration from a dict with a `model_type`, a config, or None (`Wav2Vec2Config()`)."""
    if value is None:
        value = AutoConfig.for_model("wav2vec2")
    elif isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", None)
        _check(model_type is not None, "encoder_config", "a dict with a 'model_type' key", "no model_type")
        value = AutoConfig.for_model(model_type, **value)
    _check(isinstance(value, PreTrainedConfig), "encoder_config", "a dict or a PreTrainedConfig", type(value))
    _check(
        value.model_type in SUPPORTED_ENCODERS,
        "encoder_config.model_type",
        f"one of {SUPPORTED_ENCODERS}",
        value.model_type,
    )
    return value


class TOTCAKTConfig(PreTrainedConfig):
    r"""
    Configuration of a [`TOTCAKTForCTC`]: a wav2vec-style acoustic encoder with a CTC head and, for
    training, an adapter plus a temporal-order-preserving optimal-transport (TOT) alignment to a
    frozen pretrained language model (the *teacher*). The CTC head reads the encoder's frames
    (`ctc_input="encoder"`), or the adapter's output, the features that the alignment shapes
    (`ctc_input="adapter"`); either way the teacher is needed for training only.

    Args:
        encoder_config (`dict` or `PreTrainedConfig`, *optional*):
            Configuration of the acoustic encoder. A dict must carry `model_type` (one of
            `wav2vec2`, `hubert`, `wavlm`, `data2vec-audio`, `wav2vec2-bert`, ...). Defaults to
            `Wav2Vec2Config()`. SpecAugment (`mask_time_prob`, ...), `layerdrop` and frame-rate
            reduction (`add_adapter`, `adapter_stride`, `num_adapter_layers`) are set here.
        hidden_size (`int`, *optional*):
            Size of the encoder's output features, stored in `encoder_config` (its `output_hidden_size`
            when the encoder has a frame-rate adapter, else its `hidden_size`); read from there when not given.
        vocab_size (`int`, defaults to 32):
            Number of CTC output symbols, blank included.
        pad_token_id (`int`, defaults to 0):
            Id of the padding token, which is also the CTC blank (as in `Wav2Vec2ForCTC`).
        ctc_loss_reduction (`str`, defaults to `"mean"`):
            `"mean"` (each utterance's loss divided by its label length, then averaged) or `"sum"`.
        ctc_zero_infinity (`bool`, defaults to `True`):
            Zero infinite CTC losses (more labels than frames) instead of propagating `inf`.
        final_dropout (`float`, defaults to 0.0):
            Dropout on the encoder's features before the CTC head and the adapter.
        ctc_input (`str`, defaults to `"encoder"`):
            What the CTC head reads: `"encoder"`, the encoder's frames (the adapter is a training-only side
            branch), or `"adapter"`, the adapted features, i.e. the frames mapped into the teacher's feature space
            that the alignment shapes. With `"adapter"` the adapter is part of the recogniser: its weights are
            saved with the model, the head's input size is `teacher_hidden_size`, and inference still needs no
            teacher. `"adapter"` with `alignment="none"` is the CTC-only baseline of the same architecture.
        teacher_name_or_path (`str`, defaults to `"bert-base-chinese"`):
            Frozen BERT-like language model (Hub id or local folder) used during training only.
        teacher_hidden_size (`int`, defaults to 768):
            Hidden size of the teacher; the adapter maps acoustic frames to this size.
        teacher_layer (`int`, defaults to -1):
            Which of the teacher's `hidden_states` gives the token features that the frames are aligned
            to: `0` is the embedding output, `k` the output of layer `k`, negative values count from the
            end (`-1`, the last layer, is `last_hidden_state`).
        adapter_type (`str`, defaults to `"mlp"`):
            `"mlp"`: a LayerNorm followed by `adapter_num_layers` linear layers (GELU and dropout between them);
            `"linear"`: a single linear projection from the encoder's to the teacher's feature size, without
            normalisation (`adapter_hidden_size`, `adapter_num_layers` and `adapter_dropout` are then unused).
        adapter_hidden_size (`int`, defaults to 512):
            Width of the hidden layers of the `"mlp"` adapter.
        adapter_num_layers (`int`, defaults to 2):
            Number of linear layers of the `"mlp"` adapter (1 = LayerNorm and one projection).
        adapter_dropout (`float`, defaults to 0.1):
            Dropout inside the `"mlp"` adapter.
        alignment (`str`, defaults to `"tot"`):
            `"tot"` (TOT-CAKT), `"ot"` (plain entropic OT, the OT-CAKT baseline), `"uot"` (plain entropic OT
            with unbalanced marginals, arXiv 2509.05609), `"tot_uot"` (TOT's prior and order reward with
            unbalanced marginals), `"gmot"` (graph-matching OT, arXiv 2505.13079: the entropic fused
            Gromov-Wasserstein coupling over the cosine distances between frames and between tokens),
            `"tot_gmot"` (the same with TOT's prior and order reward) or `"none"` (CTC-only baseline: no
            teacher, and no adapter unless `ctc_input="adapter"`).
        tot_lambda1 (`float`, defaults to 1.0):
            Weight of the local order reward `S_ij = lambda1 / ((u_i - v_j)^2 + 1)`.
        tot_lambda2 (`float`, defaults to 0.1):
            Entropic / KL regularisation weight of the transport problem.
        tot_sigma (`float`, defaults to 1.0):
            Width of the Gaussian temporal prior, in units of `sqrt(1/N^2 + 1/M^2)`.
        uot_tau (`float`, defaults to 1.0):
            Weight of the KL penalties on the marginals in the `"uot"` and `"tot_uot"` modes: small values let
            frames (silence, noise) and tokens keep less than their uniform mass, large ones approach the
            balanced plan.
        gmot_alpha (`float`, defaults to 0.5):
            Weight of the Gromov-Wasserstein (edge) term in the `"gmot"` and `"tot_gmot"` modes, in [0, 1]:
            the objective is `(1 - alpha) <T, C> + alpha GW(D_A, D_L, T)`, and `ot_loss` is its value; 0 is
            the plain (or TOT) alignment, 1 matches the two graphs' edges only.
        gmot_max_outer (`int`, defaults to 50):
            Maximum number of outer iterations of the `"gmot"` and `"tot_gmot"` modes (each linearises the
            Gromov-Wasserstein term and solves one warm-started transport problem of at most `tot_max_iter`
            iterations); they stop earlier once the plan changes by less than `tot_tol` (L1).
        tot_max_iter (`int`, defaults to 1000):
            Maximum number of Sinkhorn iterations, a margin over what the solver needs for up to 1000 frames
            and 100 tokens (docs/RESULTS.md, "Convergence"); a plan that has not converged is logged
            (`solver_marginal_error`) and warned about once.
        tot_tol (`float`, defaults to 1e-4):
            Stop when the marginal error falls below this value.
        tot_grad (`str`, defaults to `"envelope"`):
            `"envelope"` (coupling detached; exact gradient of the transport cost at the optimum,
            no graph through the iterations) or `"autodiff"` (backprop through the iterations).
        ctc_loss_weight, ot_loss_weight, align_loss_weight (`float`):
            `L = w_ctc * L_ctc + w_ot * L_ot + w_align * L_align`.
        teacher_strip_special_tokens (`bool`, defaults to `True`):
            Drop the first and last valid teacher positions (`[CLS]`, `[SEP]`) before alignment.
        teacher_target (`str`, defaults to `"states"`):
            What the frames are aligned to at each token position: `"states"`, the teacher's states of the
            transcript (layer `teacher_layer`), or `"masked_states"`, each position's state computed with that
            position replaced by the teacher's mask token (one teacher pass per position, batched), i.e. what the
            context predicts there rather than the character itself.
        kd_loss_weight (`float`, defaults to 0.0):
            Weight of the distillation of the teacher's masked-LM predictions through the transport plan
            (`kd_loss`, see [`plan_distillation_loss`]): at each frame, the teacher's top-`kd_top_k` distribution of
            the tokens the plan assigns to it, mapped into the CTC vocabulary, against the CTC posterior over the
            non-blank symbols. 0 (the default, the paper's TOT-CAKT) turns it off; above 0 the teacher needs its
            masked-LM head and is attached with the CTC tokenizer. 0.3 lowers homophone substitutions of greedy
            decoding in long fine-tunes, but a model trained with it gains much less from a character language
            model in the beam search (docs/RESULTS.md, "Decided again at a dose that could say yes").
        kd_top_k (`int`, defaults to 8):
            How many of the teacher's most probable tokens per position are kept (and cached) for `kd_loss`.
        align_layer (`int`, defaults to -1):
            Which of the encoder's states the adapter maps for the alignment: `-1` its output (what the CTC head
            reads), `0` its embedding output, `k` the output of layer `k`, other negative values counting from the
            end of its `hidden_states`. An inner layer takes the alignment's pull off the CTC head's input. Not
            with `ctc_input="adapter"` (the adapter then feeds the head) nor with an encoder whose frame-rate
            adapter (`add_adapter`) changes the frame count after its layers.
    """

    model_type = "tot_cakt"
    sub_configs = {"encoder_config": AutoConfig}

    encoder_config: dict | PreTrainedConfig | None = None
    vocab_size: int = 32
    pad_token_id: int = 0
    ctc_loss_reduction: str = "mean"
    ctc_zero_infinity: bool = True
    final_dropout: float = 0.0
    ctc_input: str = "encoder"
    teacher_name_or_path: str = "bert-base-chinese"
    teacher_hidden_size: int = 768
    teacher_layer: int = -1
    adapter_type: str = "mlp"
    adapter_hidden_size: int = 512
    adapter_num_layers: int = 2
    adapter_dropout: float = 0.1
    alignment: str = "tot"
    tot_lambda1: float = 1.0
    tot_lambda2: float = 0.1
    tot_sigma: float | None = 1.0
    uot_tau: float = 1.0
    gmot_alpha: float = 0.5
    gmot_max_outer: int = 50
    tot_max_iter: int = 1000
    tot_tol: float = 1e-4
    tot_grad: str = "envelope"
    ctc_loss_weight: float = 1.0
    ot_loss_weight: float = 0.1
    align_loss_weight: float = 0.3
    teacher_strip_special_tokens: bool = True
    teacher_target: str = "states"
    kd_loss_weight: float = 0.0
    kd_top_k: int = 8
    align_layer: int = -1

    def __post_init__(self, **kwargs):
        self.encoder_config = _encoder_config(self.encoder_config)
        # `hidden_size` is the encoder's output size: set it after the encoder configuration exists.
        hidden_size = kwargs.pop("hidden_size", None)
        super().__post_init__(**kwargs)
        if hidden_size is not None:
            self.hidden_size = hidden_size
        self.validate()

    def validate(self) -> None:
        """Raise a `ValueError` naming the first field whose value is out of range."""
        _check(_is_int(self.vocab_size) and self.vocab_size >= 2, "vocab_size", "an int >= 2", self.vocab_size)
        _check(
            _is_int(self.pad_token_id) and 0 <= self.pad_token_id < self.vocab_size,
            "pad_token_id",
            f"an int in [0, vocab_size={self.vocab_size})",
            self.pad_token_id,
        )
        _check(
            self.ctc_loss_reduction in CTC_REDUCTIONS,
            "ctc_loss_reduction",
            f"one of {CTC_REDUCTIONS}",
            self.ctc_loss_reduction,
        )
        _check(self.ctc_input in CTC_INPUTS, "ctc_input", f"one of {CTC_INPUTS}", self.ctc_input)
        _check(self.adapter_type in ADAPTER_TYPES, "adapter_type", f"one of {ADAPTER_TYPES}", self.adapter_type)
        for name in ("final_dropout", "adapter_dropout"):
            value = getattr(self, name)
            _check(_is_number(value) and 0.0 <= value < 1.0, name, "in [0, 1)", value)
        _check(
            _is_int(self.teacher_hidden_size) and self.teacher_hidden_size > 0,
            "teacher_hidden_size",
            "a positive int",
            self.teacher_hidden_size,
        )
        _check(
            _is_int(self.teacher_layer),
            "teacher_layer",
            "an int (negative counts from the last layer)",
            self.teacher_layer,
        )
        _check(
            _is_int(self.adapter_hidden_size) and self.adapter_hidden_size > 0,
            "adapter_hidden_size",
            "a positive int",
            self.adapter_hidden_size,
        )
        _check(
            _is_int(self.adapter_num_layers) and self.adapter_num_layers >= 1,
            "adapter_num_layers",
            "an int >= 1",
            self.adapter_num_layers,
        )
        _check(self.alignment in ALIGNMENT_MODES, "alignment", f"one of {ALIGNMENT_MODES}", self.alignment)
        _check(
            _is_number(self.tot_lambda1) and self.tot_lambda1 >= 0.0,
            "tot_lambda1",
            "a finite float >= 0",
            self.tot_lambda1,
        )
        _check(
            _is_number(self.tot_lambda2) and self.tot_lambda2 > 0.0,
            "tot_lambda2",
            "a finite float > 0",
            self.tot_lambda2,
        )
        _check(
            self.tot_sigma is None or (_is_number(self.tot_sigma) and self.tot_sigma > 0.0),
            "tot_sigma",
            "None (no temporal prior) or a finite float > 0",
            self.tot_sigma,
        )
        _check(_is_number(self.uot_tau) and self.uot_tau > 0.0, "uot_tau", "a finite float > 0", self.uot_tau)
        _check(
            _is_number(self.gmot_alpha) and 0.0 <= self.gmot_alpha <= 1.0, "gmot_alpha", "in [0, 1]", self.gmot_alpha
        )
        _check(
            _is_int(self.gmot_max_outer) and self.gmot_max_outer >= 1,
            "gmot_max_outer",
            "an int >= 1",
            self.gmot_max_outer,
        )
        _check(_is_int(self.tot_max_iter) and self.tot_max_iter >= 1, "tot_max_iter", "an int >= 1", self.tot_max_iter)
        _check(_is_number(self.tot_tol) and self.tot_tol >= 0.0, "tot_tol", "a float >= 0", self.tot_tol)
        _check(self.tot_grad in GRAD_MODES, "tot_grad", f"one of {GRAD_MODES}", self.tot_grad)
        for name in ("ctc_loss_weight", "ot_loss_weight", "align_loss_weight"):
            value = getattr(self, name)
            _check(_is_number(value) and value >= 0.0, name, "a finite float >= 0", value)
        self._validate_knowledge_options()

    def _validate_knowledge_options(self) -> None:
        """The checks of the teacher-target and distillation fields."""
        _check(
            self.teacher_target in TEACHER_TARGETS, "teacher_target", f"one of {TEACHER_TARGETS}", self.teacher_target
        )
        _check(
            _is_number(self.kd_loss_weight) and self.kd_loss_weight >= 0.0,
            "kd_loss_weight",
            "a finite float >= 0",
            self.kd_loss_weight,
        )
        _check(_is_int(self.kd_top_k) and self.kd_top_k >= 1, "kd_top_k", "an int >= 1", self.kd_top_k)
        layers = getattr(self.encoder_config, "num_hidden_layers", 0)
        _check(
            _is_int(self.align_layer) and -(layers + 1) <= self.align_layer <= layers,
            "align_layer",
            f"an int from -{layers + 1} to {layers} (the encoder has {layers} layers; -1: its output)",
            self.align_layer,
        )
        if self.align_layer != -1:
            _check(self.ctc_input == "encoder", "align_layer", '-1 with ctc_input="adapter"', self.align_layer)
            _check(
                not getattr(self.encoder_config, "add_adapter", False),
                "align_layer",
                "-1 for an encoder with a frame-rate adapter (add_adapter=True)",
                self.align_layer,
            )

    @property
    def inputs_to_logits_ratio(self) -> int:
        """Input samples per output frame (used by the ASR pipeline for chunking and timestamps)."""
        return self.encoder_config.inputs_to_logits_ratio

    @property
    def uses_teacher(self) -> bool:
        """Whether training needs the frozen teacher (False for the CTC-only baseline)."""
        return self.alignment != "none"

    @property
    def alignment_is_ordered(self) -> bool:
        """Whether the alignment adds TOT's order reward and temporal prior (`tot_lambda1`, `tot_sigma`)."""
        return _MODE_KINDS[self.alignment]["ordered"]

    @property
    def alignment_is_unbalanced(self) -> bool:
        """Whether the alignment relaxes the marginals by KL penalties of weight `uot_tau`."""
        return _MODE_KINDS[self.alignment]["unbalanced"]

    @property
    def alignment_is_graph_matching(self) -> bool:
        """Whether the alignment adds the Gromov-Wasserstein term over the edges (`gmot_alpha`, `gmot_max_outer`)."""
        return _MODE_KINDS[self.alignment]["graph"]

    @property
    def alignment_fields(self) -> tuple[str, ...]:
        """The fields of `ALIGNMENT_FIELDS` that this configuration's alignment reads (none for `"none"`)."""
        return _alignment_fields(self.alignment)

    @property
    def has_adapter(self) -> bool:
        """Whether the model has the adapter: for the alignment, or because the CTC head reads its output."""
        return self.uses_teacher or self.ctc_input == "adapter"

    @property
    def ctc_input_size(self) -> int:
        """Size of the features the CTC head reads: the teacher's feature size when it reads the adapter."""
        return self.teacher_hidden_size if self.ctc_input == "adapter" else self.hidden_size

    @property
    def hidden_size(self) -> int:
        """Size of the encoder's output features (after its optional frame-rate adapter)."""
        enc = self.encoder_config
        if getattr(enc, "add_adapter", False):
            return getattr(enc, "output_hidden_size", None) or enc.hidden_size
        return enc.hidden_size

    @hidden_size.setter
    def hidden_size(self, value: int) -> None:
        # The size lives in the encoder configuration: its output size after the frame-rate adapter
        # when it has one, else the width of its transformer layers.
        enc = self.encoder_config
        setattr(enc, "output_hidden_size" if getattr(enc, "add_adapter", False) else "hidden_size", value)

    @property
    def uses_teacher_predictions(self) -> bool:
        """Whether training distils the teacher's masked-LM predictions (`kd_loss_weight > 0` with a teacher)."""
        return self.uses_teacher and self.kd_loss_weight > 0

    def to_dict(self) -> dict:
        """
        [`~PreTrainedConfig.to_dict`] with `hidden_size` as a key, as transformers' configurations write it (it is
        a property over `encoder_config`, not an attribute); loading it sets the same value in `encoder_config`.
        """
        output = super().to_dict()
        output["hidden_size"] = self.hidden_size
        return output


__all__ = ["TOTCAKTConfig"]
