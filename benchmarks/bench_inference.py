"""Inference speed and checkpoint size of a saved TOT-CAKT model against transformers' own CTC model.

TOT-CAKT adds nothing to inference: no text, no teacher, no alignment head, only encoder + CTC
head. This benchmark checks that on what users load:

1. a TOT-CAKT model (``alignment="tot"``, random weights) is saved with ``save_pretrained``; its
   encoder and CTC-head weights are copied into the stock transformers CTC model of the same
   encoder configuration and vocabulary (``Wav2Vec2ForCTC`` for a wav2vec2 encoder), which is
   saved too;
2. both are loaded from their folders with ``AutoModelForCTC.from_pretrained`` (TOT-CAKT with
   ``trust_remote_code=True``), put in eval mode. The models are saved by a child process, and
   this process never imports the package, so TOT-CAKT runs from the code files saved next to
   its weights, as for a user who loads it from the Hub;
3. their logits on the same clip are compared: equal logits show that the inference graph is the
   same;
4. both are timed on single clips (batch 1) of several lengths under ``torch.inference_mode``,
   with the interleaved protocol of ``benchmarks/common.py``. The real-time factor (RTF) is
   seconds of compute per second of audio; the target is an RTF ratio of 1.00 +- 0.05. On CPU
   the process's CPU time is reported too (little disturbed by other processes);
5. the sizes of the two ``model.safetensors`` files are compared. TOT-CAKT's also holds the small
   adapter that maps frames to the teacher's space (kept so that training can continue); its
   share is reported.

Feature extraction (the processor) is the same for both models and is not timed. Presets:
``quick`` clips of 2, 5 and 10 s, 9 rounds; ``full`` (GPU) 2 to 30 s, 20 rounds; both with the
wav2vec2-base architecture (95 M parameters) and a 4233-symbol character vocabulary.

Usage::

    python benchmarks/bench_inference.py --preset quick --device cpu --out docs/results/inference.json
"""

import argparse
import functools
import multiprocessing
import os
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoFeatureExtractor, AutoModelForCTC
from transformers.utils import logging as transformers_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from benchmarks.common import CTC_VOCAB_SIZE, ENCODERS, environment, round_robin, summary, write_json

PRESETS = {
    "quick": dict(encoder="wav2vec2-base", clip_seconds=(2.0, 5.0, 10.0), repeats=9),
    "full": dict(encoder="wav2vec2-base", clip_seconds=(2.0, 5.0, 10.0, 20.0, 30.0), repeats=20),
}
TOT, BASELINE = "tot-cakt", "baseline"
RTF_TARGET, RTF_TOLERANCE = 1.00, 0.05
SAMPLING_RATE = 16000
WEIGHTS_FILE = "model.safetensors"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", default=None, help="write the results to this JSON file")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 keeps timings stable on a shared machine)"
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="folder for the two saved models (default: a temporary folder, removed afterwards)",
    )
    return parser.parse_args(argv)


def save_models(encoder_config: dict, directory: Path) -> dict:
    """Save a TOT-CAKT model and the stock CTC model holding its encoder and CTC-head weights, each
    with the feature extractor of the encoder. Returns ``{TOT: folder, BASELINE: folder}``.

    Meant to run in a child process (see [`save_models_in_child`]): importing the package registers
    TOT-CAKT with the Auto classes, which would then load it from the package, not from its folder.
    """
    from modeling_tot_cakt import TOTCAKTConfig, TOTCAKTForCTC
    from modeling_tot_cakt.processing_tot_cakt import create_feature_extractor

    transformers_logging.disable_progress_bar()
    torch.manual_seed(0)
    config = TOTCAKTConfig(encoder_config=dict(encoder_config), vocab_size=CTC_VOCAB_SIZE, alignment="tot")
    model = TOTCAKTForCTC(config)
    baseline_config = AutoConfig.for_model(
        **encoder_config, vocab_size=CTC_VOCAB_SIZE, pad_token_id=model.config.pad_token_id
    )
    baseline = AutoModelForCTC.from_config(baseline_config)
    prefix = baseline.base_model_prefix  # "wav2vec2" for Wav2Vec2ForCTC
    weights = {f"{prefix}.{key}": value for key, value in model.encoder.state_dict().items()}
    weights.update({f"lm_head.{key}": value for key, value in model.lm_head.state_dict().items()})
    baseline.load_state_dict(weights, strict=True)
    folders = {TOT: directory / "tot-cakt", BASELINE: directory / "baseline"}
    for name, saved in ((TOT, model), (BASELINE, baseline)):
        saved.save_pretrained(folders[name])
        create_feature_extractor(encoder_config, SAMPLING_RATE).save_pretrained(folders[name])
    return folders


def save_models_in_child(encoder_config: dict, directory: Path) -> dict:
    """[`save_models`] in a fresh (spawned) process."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(save_models, encoder_config, directory).result()


def load_models(folders: dict, device: torch.device) -> dict:
    """Both models as users load them, in eval mode on ``device``."""
    return {
        TOT: AutoModelForCTC.from_pretrained(folders[TOT], trust_remote_code=True).to(device).eval(),
        BASELINE: AutoModelForCTC.from_pretrained(folders[BASELINE]).to(device).eval(),
    }


def clip_inputs(folder: Path, seconds: float, device: torch.device, seed: int = 0) -> dict:
    """The saved feature extractor's output for one clip of noise (batch 1), on ``device``."""
    wave = 0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SAMPLING_RATE)).astype(np.float32)
    extractor = AutoFeatureExtractor.from_pretrained(folder)
    features = extractor(wave, sampling_rate=SAMPLING_RATE, return_attention_mask=True, return_tensors="pt")
    return {key: value.to(device) for key, value in features.items()}


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs).logits


def compare_logits(models: dict, inputs: dict) -> dict:
    """Whether both models give the same logits on ``inputs``."""
    ours, theirs = logits(models[TOT], inputs), logits(models[BASELINE], inputs)
    return dict(
        identical=bool(torch.equal(ours, theirs)),
        max_abs_diff=(ours - theirs).abs().max().item(),
        shape=list(ours.shape),
    )


def weight_sizes(folders: dict, models: dict) -> dict:
    """Bytes of each ``model.safetensors`` and of TOT-CAKT's adapter in it."""
    sizes = {name: os.path.getsize(folder / WEIGHTS_FILE) for name, folder in folders.items()}
    adapter = sum(p.numel() * p.element_size() for p in models[TOT].adapter.parameters())
    return dict(
        tot_cakt_bytes=sizes[TOT],
        baseline_bytes=sizes[BASELINE],
        ratio=sizes[TOT] / sizes[BASELINE],
        adapter_bytes=adapter,
        adapter_share=adapter / sizes[TOT],
        ratio_without_adapter=(sizes[TOT] - adapter) / sizes[BASELINE],
    )


def time_clips(models: dict, folder: Path, clip_seconds, repeats: int, device: torch.device) -> list:
    """RTF of both models on one clip per length (features from the extractor saved in ``folder``),
    timed with the interleaved protocol; prints the table row by row."""
    with_cpu = device.type == "cpu"
    print(table_header(with_cpu), flush=True)
    rows = []
    for seconds in clip_seconds:
        inputs = clip_inputs(folder, seconds, device)
        timings = round_robin(
            {name: functools.partial(logits, model, inputs) for name, model in models.items()},
            repeats,
            device,
            measure_memory=False,
        )
        row = dict(clip_seconds=seconds)
        for name in models:
            row[name] = dict(**summary(timings.wall[name]), rtf=statistics.median(timings.wall[name]) / seconds)
            if with_cpu:
                row[name].update(cpu_median_s=statistics.median(timings.cpu[name]), cpu_times_s=timings.cpu[name])
        row["rtf_ratio"] = row[TOT]["median_s"] / row[BASELINE]["median_s"]
        row["rtf_ratio_min"] = row[TOT]["min_s"] / row[BASELINE]["min_s"]
        if with_cpu:
            row["rtf_ratio_cpu"] = row[TOT]["cpu_median_s"] / row[BASELINE]["cpu_median_s"]
        row["within_target"] = abs(row["rtf_ratio"] - RTF_TARGET) <= RTF_TOLERANCE
        rows.append(row)
        print(format_row(row, with_cpu), flush=True)
    return rows


def table_header(with_cpu: bool) -> str:
    header = (
        f"{'clip s':>6} {'TOT-CAKT ms':>12} {'(min)':>8} {'baseline ms':>12} {'(min)':>8} {'RTF TOT':>8} "
        f"{'RTF base':>8} {'ratio':>6} {'(min)':>6}" + (f" {'(CPU)':>6}" if with_cpu else "")
    )
    return header + "\n" + "-" * (len(header) + 18)


def format_row(row: dict, with_cpu: bool) -> str:
    ours, theirs = row[TOT], row[BASELINE]
    line = (
        f"{row['clip_seconds']:>6g} {1e3 * ours['median_s']:>12.1f} {1e3 * ours['min_s']:>8.1f} "
        f"{1e3 * theirs['median_s']:>12.1f} {1e3 * theirs['min_s']:>8.1f} {ours['rtf']:>8.4f} "
        f"{theirs['rtf']:>8.4f} {row['rtf_ratio']:>6.3f} {row['rtf_ratio_min']:>6.3f}"
    )
    if with_cpu:
        line += f" {row['rtf_ratio_cpu']:>6.3f}"
    verdict = "within" if row["within_target"] else "OUTSIDE"
    return f"{line}  {verdict} {RTF_TARGET:.2f}+-{RTF_TOLERANCE}"


def format_sizes(sizes: dict) -> str:
    mib = 2**20
    return (
        f"model.safetensors: TOT-CAKT {sizes['tot_cakt_bytes'] / mib:.2f} MiB, baseline "
        f"{sizes['baseline_bytes'] / mib:.2f} MiB, ratio {sizes['ratio']:.4f}; TOT-CAKT's adapter "
        f"{sizes['adapter_bytes'] / mib:.2f} MiB ({100 * sizes['adapter_share']:.2f} % of its file); without it "
        f"the ratio is {sizes['ratio_without_adapter']:.6f}"
    )


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset = PRESETS[args.preset]
    encoder_config = ENCODERS[preset["encoder"]]
    transformers_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(args.workdir or scratch)
        folders = save_models_in_child(encoder_config, directory)
        models = load_models(folders, device)
        meta = dict(
            preset=args.preset,
            **environment(device, args.threads),
            repeats=preset["repeats"],
            encoder=preset["encoder"],
            encoder_config=encoder_config,
            ctc_vocab_size=CTC_VOCAB_SIZE,
            classes={name: f"{type(model).__module__}.{type(model).__name__}" for name, model in models.items()},
            attention={
                TOT: models[TOT].encoder.config._attn_implementation,
                BASELINE: models[BASELINE].config._attn_implementation,
            },
            parameters={name: sum(p.numel() for p in model.parameters()) for name, model in models.items()},
            batch=1,
            mode="eval, torch.inference_mode, float32",
            rtf="median seconds of compute per second of audio; ratio: TOT-CAKT / baseline (median), "
            "(min): with minima, (CPU): with median process CPU times",
            rtf_target=f"{RTF_TARGET} +- {RTF_TOLERANCE}",
        )
        print(
            f"Encoder {preset['encoder']}, CTC vocabulary {CTC_VOCAB_SIZE}, batch 1, {args.threads} thread(s) on "
            f"{args.device}, eval + torch.inference_mode, float32.\nLoaded: TOT-CAKT {meta['classes'][TOT]} "
            f"({meta['parameters'][TOT] / 1e6:.2f} M parameters), baseline {meta['classes'][BASELINE]} "
            f"({meta['parameters'][BASELINE] / 1e6:.2f} M); attention {meta['attention']}.",
            flush=True,
        )
        identity = compare_logits(models, clip_inputs(folders[TOT], 5.0, device, seed=1))
        print(
            f"Logits with TOT-CAKT's encoder + CTC head weights in the baseline: "
            f"{'identical' if identity['identical'] else 'DIFFERENT'} (max |diff| {identity['max_abs_diff']:.3g}, "
            f"shape {identity['shape']})",
            flush=True,
        )
        sizes = weight_sizes(folders, models)
        print(format_sizes(sizes) + "\n", flush=True)
        rows = time_clips(models, folders[TOT], preset["clip_seconds"], preset["repeats"], device)
    meta["load_average_after"] = environment(device, args.threads)["load_average"]
    if args.out:
        write_json(args.out, meta, dict(logits=identity, sizes=sizes, clips=rows))


if __name__ == "__main__":
    main()
