"""What TOT-CAKT costs per training step, next to the CTC-only baseline on the same encoder and batch.

One training step (forward, backward, ``AdamW`` step) of four models that share the encoder
weights and see the same batch:

- ``ctc``           ``alignment="none"``: the CTC-only baseline (no adapter, no teacher);
- ``tot uncached``  TOT-CAKT with the frozen teacher run on ``teacher_input_ids`` every step;
- ``tot cached``    TOT-CAKT fed precomputed ``teacher_hidden_states`` / ``teacher_token_mask``,
  as ``train_hf.py --cache_teacher_features`` does (padded by ``collator.pad_token_features``);
- ``ot cached``     OT-CAKT (plain entropic OT in the same place), cached, for reference;
- ``uot cached``    unbalanced OT (``alignment="uot"``, the default ``uot_tau``), cached;
- ``gmot cached``   GM-OT (fused Gromov-Wasserstein, the default ``gmot_alpha`` and ``gmot_max_outer``), cached:
  its "Sinkhorn" stage is the whole ``fused_gw_sinkhorn`` (every outer iteration).

Targets: ``tot uncached`` at most 1.25 x ``ctc``, ``tot cached`` at most 1.05 x ``ctc`` (median
step time), with the Sinkhorn solve run to convergence: ``--tot-max-iter`` (default 1000) and
``tot_tol`` = 1e-4, so that the plan's marginal error is below 1e-4 (the profile reports the
iterations and the largest marginal error of the solves). Timing follows ``benchmarks/common.py``: warm-up, interleaved rounds, median and
minimum of the wall-clock time. On CPU the process's CPU time is reported too: with one thread it
is the step's own work, which the other processes of a shared machine disturb far less.

Where the extra time goes: a separate pass times what the alignment variants add to a step, many
times over since each part is short -- the teacher's forward pass (uncached only) and the
alignment head (the model's own ``_alignment``: adapter, cost matrix, Sinkhorn, transport and
the two losses, then its backward pass into the encoder features and the adapter) -- on the
encoder features of the same batch. Stages are timed through module hooks and wrappers around the
modeling module's functions, so the code that runs is the model's own; the clock is the CPU
time on CPU and the wall clock, synchronised at each stage boundary, on CUDA. ``estimate`` is
``(ctc step + added stages) / ctc step``: the ratio that the additions alone account for.

The teacher has the bert-base-chinese architecture (``BertConfig()`` defaults: 12 layers,
hidden size 768, 21128-token vocabulary) with random weights: a frozen teacher costs the same
whatever its weights, and the checkpoint cannot be downloaded here. Audio is noise and texts are
random ids (4 characters per second of audio, as in read Mandarin): a step's cost depends on the
shapes only, except that Sinkhorn stops early once its marginal error is below ``tot_tol`` (the
profile reports the iterations it ran).

Presets: ``quick`` (CPU) a 6 x 384 log-mel Wav2Vec2-BERT encoder (about 21 M parameters,
20 ms frames), batch 8 x 4-6 s; ``full`` (GPU) the wav2vec2-base architecture (95 M
parameters), batch 8 x 9-11 s.

Usage::

    python benchmarks/bench_training_cost.py --preset quick --device cpu --out docs/results/training_cost.json
"""

import argparse
import contextlib
import functools
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

import torch
from transformers import BertConfig, BertModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from benchmarks.common import CTC_VOCAB_SIZE, ENCODERS, environment, round_robin, summary, synchronize, write_json
from modeling_tot_cakt import TOTCAKTConfig, TOTCAKTForCTC
from modeling_tot_cakt.processing_tot_cakt import create_feature_extractor
from modeling_tot_cakt.training.collator import pad_token_features

PRESETS = {
    "quick": dict(encoder="w2v2-bert-small", batch=8, seconds=(4.0, 6.0), repeats=5, profile_repeats=10),
    "full": dict(encoder="wav2vec2-base", batch=8, seconds=(9.0, 11.0), repeats=10, profile_repeats=30),
}
# name -> (alignment, where the teacher features come from)
VARIANTS = {
    "ctc": ("none", None),
    "tot uncached": ("tot", "teacher"),
    "tot cached": ("tot", "cache"),
    "ot cached": ("ot", "cache"),
    "uot cached": ("uot", "cache"),
    "gmot cached": ("gmot", "cache"),
}
TARGETS = {"tot uncached": 1.25, "tot cached": 1.05}
BASELINE = "ctc"
CHARACTERS_PER_SECOND = 4.0
SAMPLING_RATE = 16000
# bert-base-chinese's [PAD], [CLS] and [SEP] ids, and the range of its CJK characters.
TEACHER_PAD_ID, TEACHER_CLS_ID, TEACHER_SEP_ID = 0, 101, 102
TEACHER_CHARACTER_IDS = (670, 7992)
TEACHER_NOTE = (
    "bert-base-chinese architecture (BertConfig defaults: 12 layers, hidden 768, vocab 21128) with random "
    "weights: a frozen teacher's cost does not depend on its weights, and the checkpoint cannot be "
    "downloaded here"
)
PROFILE_STAGES = (
    "teacher forward",
    "adapter forward",
    "cost matrix",
    "Sinkhorn",
    "transport + OT/align losses",
    "alignment backward",
)
# Functions of the modeling module that make up the alignment head, and the stage each belongs to.
PROFILED_FUNCTIONS = {
    "cosine_cost": "cost matrix",
    "tot_sinkhorn": "Sinkhorn",
    "fused_gw_sinkhorn": "Sinkhorn",
    "fused_gw_loss": "transport + OT/align losses",
    "barycentric_transport": "transport + OT/align losses",
    "ot_loss": "transport + OT/align losses",
    "align_loss": "transport + OT/align losses",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", default=None, help="write the results to this JSON file")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds of whole steps (default: the preset's)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 keeps timings stable on a shared machine)"
    )
    parser.add_argument(
        "--tot-max-iter",
        type=int,
        default=1000,
        help="Sinkhorn iteration cap of the alignment variants (enough to reach tot_tol at these shapes)",
    )
    parser.add_argument("--bf16", action="store_true", help="run the forward passes under bfloat16 autocast")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------- set-up
def make_batch(encoder_config: dict, batch: int, seconds: tuple, generator: torch.Generator):
    """A training batch of noise clips with random transcripts.

    Returns ``(inputs, teacher_input_ids, teacher_attention_mask, durations)``: ``inputs`` holds the
    feature extractor's padded output (``input_values`` or ``input_features``, ``attention_mask``)
    and ``labels`` ``(B, L)`` padded with -100; the teacher ids are ``(B, L + 2)`` with
    ``[CLS]``/``[SEP]``, right padded; ``durations`` are the clip lengths in seconds.
    """
    durations = torch.linspace(seconds[0], seconds[1], batch).tolist()
    waves = [0.1 * torch.randn(int(d * SAMPLING_RATE), generator=generator).numpy() for d in durations]
    extractor = create_feature_extractor(encoder_config, SAMPLING_RATE)
    inputs = dict(
        extractor(waves, sampling_rate=SAMPLING_RATE, padding=True, return_attention_mask=True, return_tensors="pt")
    )
    lengths = [round(CHARACTERS_PER_SECOND * d) for d in durations]
    labels = torch.full((batch, max(lengths)), -100)
    teacher_ids = torch.full((batch, max(lengths) + 2), TEACHER_PAD_ID)
    for row, length in enumerate(lengths):
        labels[row, :length] = torch.randint(3, CTC_VOCAB_SIZE, (length,), generator=generator)
        teacher_ids[row, 0], teacher_ids[row, length + 1] = TEACHER_CLS_ID, TEACHER_SEP_ID
        teacher_ids[row, 1 : length + 1] = torch.randint(*TEACHER_CHARACTER_IDS, (length,), generator=generator)
    inputs["labels"] = labels
    return inputs, teacher_ids, (teacher_ids != TEACHER_PAD_ID).long(), durations


def build_models(encoder_config: dict, teacher: BertModel, device: torch.device, tot_max_iter: int) -> dict:
    """One model per variant, in training mode; all start from the CTC baseline's encoder and head
    weights, and the alignment variants have ``teacher`` attached and solve with ``tot_max_iter``."""
    models = {}
    for name, (alignment, _) in VARIANTS.items():
        config = TOTCAKTConfig(
            encoder_config=dict(encoder_config),
            vocab_size=CTC_VOCAB_SIZE,
            alignment=alignment,
            teacher_hidden_size=teacher.config.hidden_size,
            tot_max_iter=tot_max_iter,
        )
        model = TOTCAKTForCTC(config)
        if models:
            missing, unexpected = model.load_state_dict(models[BASELINE].state_dict(), strict=False)
            if unexpected or any(not key.startswith("tot_cakt.adapter.") for key in missing):
                raise RuntimeError(f"{name}: the baseline's weights do not fit ({missing=}, {unexpected=}).")
        model.attach_teacher(teacher)  # a no-op for alignment="none"
        models[name] = model.to(device).train()
    return models


def variant_inputs(model: TOTCAKTForCTC, inputs: dict, teacher_ids, teacher_mask, source) -> dict:
    """The forward arguments of one variant: teacher ids, cached teacher features (computed here
    with ``model``'s teacher), or neither."""
    if source == "teacher":
        return dict(inputs, teacher_input_ids=teacher_ids, teacher_attention_mask=teacher_mask)
    if source == "cache":
        features, mask = model.teacher_token_features(teacher_ids, teacher_mask)
        hidden, token_mask = pad_token_features([row[row_mask] for row, row_mask in zip(features, mask)])
        return dict(inputs, teacher_hidden_states=hidden, teacher_token_mask=token_mask)
    return dict(inputs)


def training_step(model, optimizer, inputs: dict, bf16: bool) -> None:
    """Forward, backward and optimiser step."""
    optimizer.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(**inputs).loss
    loss.backward()
    optimizer.step()


# ------------------------------------------------------------------------------------------ profile
class StageTimer:
    """Time of named stages (seconds, summed per stage): process CPU time on CPU, wall clock with
    CUDA synchronised at each boundary on GPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.clock = time.perf_counter if device.type == "cuda" else time.process_time
        self.seconds = defaultdict(float)
        self.sinkhorn_calls = []
        self._started = {}

    def start(self, name: str) -> None:
        synchronize(self.device)
        self._started[name] = self.clock()

    def stop(self, name: str) -> None:
        synchronize(self.device)
        self.seconds[name] += self.clock() - self._started.pop(name)

    @contextlib.contextmanager
    def stage(self, name: str):
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def wrap(self, name: str, function, keep_arguments: bool = False):
        """``function`` timed as part of stage ``name``; ``keep_arguments`` (for ``tot_sinkhorn``) keeps
        its arguments in ``sinkhorn_calls``, to count the iterations afterwards."""

        @functools.wraps(function)
        def timed(*args, **kwargs):
            with self.stage(name):
                result = function(*args, **kwargs)
            if keep_arguments:
                self.sinkhorn_calls.append((function, args, kwargs))
            return result

        return timed

    def sinkhorn_logs(self) -> list:
        """``(iterations, largest marginal error)`` of each recorded Sinkhorn call (solved again with
        ``log=True``, untimed)."""
        with torch.no_grad():
            # The model may already ask for the log (it does, for its convergence warning).
            logs = [function(*args, **{**kwargs, "log": True})[1] for function, args, kwargs in self.sinkhorn_calls]
        return [(log["n_iter"], log["marginal_error"].max().item()) for log in logs]

    @contextlib.contextmanager
    def hooked(self, model: TOTCAKTForCTC):
        """Time the teacher, the adapter and the alignment functions of ``model`` inside the context."""
        handles = []
        for name, module in (("teacher forward", model.teacher), ("adapter forward", model.adapter)):
            handles.append(module.register_forward_pre_hook(lambda *_, name=name: self.start(name)))
            handles.append(module.register_forward_hook(lambda *_, name=name: self.stop(name)))
        namespace = sys.modules[type(model).__module__]
        with contextlib.ExitStack() as patches:
            for function, name in PROFILED_FUNCTIONS.items():
                wrapped = self.wrap(name, getattr(namespace, function), keep_arguments=name == "Sinkhorn")
                patches.enter_context(mock.patch.object(namespace, function, wrapped))
            try:
                yield self
            finally:
                for handle in handles:
                    handle.remove()


def added_stages(model: TOTCAKTForCTC, hidden_states, frame_mask, batch: dict, bf16: bool, device: torch.device):
    """Stage times (seconds) of what an alignment variant adds to a CTC step, and the Sinkhorn iterations.

    Runs the teacher (when ``batch`` holds ``teacher_input_ids``) and the alignment head on the
    encoder features ``hidden_states`` ``(B, N, H)`` (a leaf that requires grad; ``frame_mask``
    ``(B, N)``), then the backward pass of ``w_ot * L_ot + w_align * L_align`` into them and the
    adapter.
    """
    timer = StageTimer(device)
    hidden_states.grad = None
    model.adapter.zero_grad(set_to_none=True)
    with timer.hooked(model), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        if "teacher_input_ids" in batch:
            tokens, token_mask = model.teacher_token_features(
                batch["teacher_input_ids"], batch["teacher_attention_mask"]
            )
        else:
            tokens, token_mask = batch["teacher_hidden_states"], batch["teacher_token_mask"]
        losses = model._alignment(model.adapter(hidden_states), frame_mask, tokens, token_mask)
    with timer.stage("alignment backward"):
        weights = model.config
        (weights.ot_loss_weight * losses["ot_loss"] + weights.align_loss_weight * losses["align_loss"]).backward()
    return {name: timer.seconds.get(name, 0.0) for name in PROFILE_STAGES}, timer.sinkhorn_logs()


def profile_additions(
    models: dict, batches: dict, hidden_states, frame_mask, repeats: int, bf16: bool, device: torch.device
) -> dict:
    """Median stage times (ms) of what each alignment variant adds, over ``repeats`` interleaved rounds."""
    hidden_states = hidden_states.detach().requires_grad_(True)
    rounds = defaultdict(list)

    def run(name):
        rounds[name].append(added_stages(models[name], hidden_states, frame_mask, batches[name], bf16, device))

    round_robin(
        {name: functools.partial(run, name) for name in VARIANTS if name != BASELINE},
        repeats,
        device,
        measure_memory=False,
    )
    profile = {}
    for name, results in rounds.items():
        results = results[1:]  # the first is the warm-up
        stages_ms = {
            stage: 1e3 * statistics.median(stages[stage] for stages, _ in results) for stage in PROFILE_STAGES
        }
        stages_ms["total added"] = sum(stages_ms.values())
        solves = [solve for _, logs in results for solve in logs]
        profile[name] = dict(
            stages_ms=stages_ms,
            sinkhorn_iterations=sorted({n_iter for n_iter, _ in solves}),
            sinkhorn_max_marginal_error=max(error for _, error in solves),
        )
    return profile


# ------------------------------------------------------------------------------------------- report
def parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def step_rows(timings, with_cpu: bool) -> list:
    """One result dict per variant: wall-clock (and, on CPU, CPU-time) summaries and ratios to ctc."""
    rows = []
    for name in VARIANTS:
        row = dict(variant=name, **summary(timings.wall[name]), peak_mib=max(timings.peak_mib[name]))
        row.update(
            ratio=row["median_s"] / statistics.median(timings.wall[BASELINE]),
            ratio_min=row["min_s"] / min(timings.wall[BASELINE]),
        )
        if with_cpu:
            cpu = summary(timings.cpu[name])
            row.update(
                cpu_median_s=cpu["median_s"],
                cpu_min_s=cpu["min_s"],
                cpu_times_s=cpu["times_s"],
                ratio_cpu=cpu["median_s"] / statistics.median(timings.cpu[BASELINE]),
            )
        row["target"] = TARGETS.get(name)
        rows.append(row)
    return rows


def format_steps(rows, with_cpu: bool):
    header = f"{'variant':<14} {'median s':>9} {'min s':>7} {'x ctc':>6} {'x ctc(min)':>10}"
    if with_cpu:
        header += f" {'CPU s':>6} {'x ctc(CPU)':>10}"
    header += f" {'target':>7} {'peak MiB':>9}"
    lines = [header, "-" * (len(header) + 8)]
    for row in rows:
        line = (
            f"{row['variant']:<14} {row['median_s']:>9.3f} {row['min_s']:>7.3f} {row['ratio']:>6.3f} "
            f"{row['ratio_min']:>10.3f}"
        )
        if with_cpu:
            line += f" {row['cpu_median_s']:>6.2f} {row['ratio_cpu']:>10.3f}"
        target = f"<={row['target']:.2f}" if row["target"] else ""
        lines.append(f"{line} {target:>7} {row['peak_mib']:>9.0f}")
    return "\n".join(lines)


def format_profile(profile: dict, baseline_ms: float, repeats: int, clock: str):
    names = list(profile)
    header = f"{'added per step (ms)':<28}" + "".join(f"{name:>14}" for name in names)
    lines = [header, "-" * len(header)]
    for stage in (*PROFILE_STAGES, "total added"):
        lines.append(f"{stage:<28}" + "".join(f"{profile[name]['stages_ms'][stage]:>14.1f}" for name in names))
    lines.append(
        f"{'estimate (ctc + added)/ctc':<28}" + "".join(f"{profile[name]['estimate']:>14.3f}" for name in names)
    )
    lines.append(
        f"{'Sinkhorn iterations':<28}" + "".join(f"{str(profile[name]['sinkhorn_iterations']):>14}" for name in names)
    )
    lines.append(
        f"{'Sinkhorn max marginal error':<28}"
        + "".join(f"{profile[name]['sinkhorn_max_marginal_error']:>14.1e}" for name in names)
    )
    lines.append(f"(medians over {repeats} rounds, {clock}; ctc step: {baseline_ms:.0f} ms, same clock)")
    return "\n".join(lines)


def target_verdicts(row: dict, estimate: float) -> dict:
    """A variant's ratio to ctc and whether it meets its target, by each measure: wall-clock
    median, CPU-time median (CPU only) and the profile's estimate."""
    ratios = {"wall median": row["ratio"], "CPU median": row.get("ratio_cpu"), "estimate": estimate}
    return {
        measure: dict(ratio=ratio, met=ratio <= row["target"])
        for measure, ratio in ratios.items()
        if ratio is not None
    }


def format_verdicts(rows) -> str:
    lines = []
    for row in rows:
        if row["target"] is not None:
            parts = [
                f"{measure} {verdict['ratio']:.3f} {'met' if verdict['met'] else 'MISSED'}"
                for measure, verdict in row["target_met"].items()
            ]
            lines.append(f"Target {row['variant']} <= {row['target']:.2f} x ctc: " + ", ".join(parts))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset = PRESETS[args.preset]
    repeats = args.repeats or preset["repeats"]
    encoder_config = ENCODERS[preset["encoder"]]
    meta = dict(
        preset=args.preset,
        **environment(device, args.threads),
        bf16=args.bf16,
        repeats=repeats,
        profile_repeats=preset["profile_repeats"],
    )

    torch.manual_seed(0)
    teacher = BertModel(BertConfig()).to(device)
    models = build_models(encoder_config, teacher, device, args.tot_max_iter)
    inputs, teacher_ids, teacher_mask, durations = make_batch(
        encoder_config, preset["batch"], preset["seconds"], torch.Generator().manual_seed(0)
    )
    inputs = {key: value.to(device) for key, value in inputs.items()}
    batches = {
        name: variant_inputs(models["tot cached"], inputs, teacher_ids.to(device), teacher_mask.to(device), source)
        for name, (_, source) in VARIANTS.items()
    }
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    with torch.no_grad():  # encoder features of the batch, for the frame counts and the profile
        hidden_states = (
            models[BASELINE]
            .encoder(**{key: value for key, value in inputs.items() if key != "labels"})
            .last_hidden_state
        )
    frame_mask = models[BASELINE].frame_mask(hidden_states.shape[1], inputs["attention_mask"])

    frames, tokens = frame_mask.sum(-1).tolist(), (inputs["labels"] >= 0).sum(-1).tolist()
    meta.update(
        encoder=preset["encoder"],
        encoder_config=encoder_config,
        encoder_parameters=parameter_count(models[BASELINE].encoder),
        ctc_model_parameters=parameter_count(models[BASELINE]),
        adapter_parameters=parameter_count(models["tot cached"].adapter),
        teacher=TEACHER_NOTE,
        teacher_parameters=parameter_count(teacher),
        ctc_vocab_size=CTC_VOCAB_SIZE,
        batch=preset["batch"],
        clip_seconds=[round(d, 3) for d in durations],
        frames=frames,
        tokens=tokens,
        tot_config={
            key: getattr(models["tot cached"].config, key)
            for key in ("tot_lambda1", "tot_lambda2", "tot_sigma", "tot_max_iter", "tot_tol", "tot_grad")
        },
        optimizer="AdamW(lr=1e-4)",
        targets=TARGETS,
        ratio="median step time / median step time of ctc; x ctc(min): the same with minima; x ctc(CPU): "
        "with the median process CPU time (CPU only; little disturbed by other processes)",
        profile_clock="process CPU time" if device.type == "cpu" else "wall clock, synchronised per stage",
    )
    print(
        f"Encoder {preset['encoder']} ({meta['encoder_parameters'] / 1e6:.1f} M parameters), batch {preset['batch']} "
        f"x {preset['seconds'][0]:g}-{preset['seconds'][1]:g} s: {min(frames)}-{max(frames)} frames, "
        f"{min(tokens)}-{max(tokens)} tokens; CTC vocabulary {CTC_VOCAB_SIZE}; {args.threads} thread(s) on "
        f"{args.device}.\nTeacher: {TEACHER_NOTE} ({meta['teacher_parameters'] / 1e6:.0f} M parameters).",
        flush=True,
    )

    calls = {
        name: functools.partial(training_step, models[name], optimizers[name], batches[name], args.bf16)
        for name in VARIANTS
    }
    timings = round_robin(calls, repeats, device)
    rows = step_rows(timings, with_cpu=device.type == "cpu")
    print()
    print(format_steps(rows, with_cpu=device.type == "cpu"), flush=True)

    profile = profile_additions(
        models, batches, hidden_states, frame_mask, preset["profile_repeats"], args.bf16, device
    )
    baseline_ms = 1e3 * statistics.median((timings.cpu if device.type == "cpu" else timings.wall)[BASELINE])
    for entry in profile.values():
        entry["estimate"] = (baseline_ms + entry["stages_ms"]["total added"]) / baseline_ms
    print()
    print(format_profile(profile, baseline_ms, preset["profile_repeats"], meta["profile_clock"]))
    for row in rows:
        if row["target"] is not None:
            row["target_met"] = target_verdicts(row, profile[row["variant"]]["estimate"])
    print()
    print(format_verdicts(rows))
    meta["load_average_after"] = environment(device, args.threads)["load_average"]
    if args.out:
        write_json(args.out, meta, dict(steps=rows, added=profile, ctc_step_ms_profile_clock=baseline_ms))


if __name__ == "__main__":
    main()
