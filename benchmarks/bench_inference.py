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

On CPU the benchmark then compares the deployment forms of the same TOT-CAKT model
(``modeling_tot_cakt.training.export_onnx``, exported in the child process): the torch float32 model, its
ONNX float32 export and the export's dynamic int8 quantisation, both run by onnxruntime:

6. the three forms are timed on the same clips with 1 and 2 threads (``torch.set_num_threads`` and
   onnxruntime's ``intra_op_num_threads``), interleaved; the figure is milliseconds of compute per second of
   audio (1000 x RTF);
7. with ``--model_dir`` (a trained model folder) and ``--test_manifest`` (JSONL ``{audio, text}``), a child
   process exports that model too and transcribes the test clips one at a time (batch 1, 1 thread) with each
   form: the greedy CER of each form and its ms per second of audio. If the folder has a language model
   (``TOTCAKTProcessorWithLM``), the clips are also decoded with it at ``--beam_width`` (32): the share that LM
   decoding takes of end-to-end transcription time, ``decode / (forward + decode)``, for each form's forward
   (target: at most 20 %), and the CER with the LM.

Usage::

    python benchmarks/bench_inference.py --preset quick --device cpu --out docs/results/inference.json \
        --model_dir outputs/demo/quick/model --test_manifest outputs/demo/quick/corpus/test.jsonl
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
    "quick": dict(encoder="wav2vec2-base", clip_seconds=(2.0, 5.0, 10.0), repeats=9, test_repeats=2),
    "full": dict(encoder="wav2vec2-base", clip_seconds=(2.0, 5.0, 10.0, 20.0, 30.0), repeats=20, test_repeats=5),
}
TOT, BASELINE = "tot-cakt", "baseline"
TORCH_FLOAT, ONNX_FLOAT, ONNX_INT8 = "torch float32", "onnx float32", "onnx int8"
FORM_THREADS = (1, 2)
LM_SHARE_TARGET = 0.20
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
    parser.add_argument(
        "--model_dir", default=None, help="a trained model folder: the test CER of each form (needs --test_manifest)"
    )
    parser.add_argument("--test_manifest", default=None, help="JSONL {audio, text} of the test clips for --model_dir")
    parser.add_argument("--beam_width", type=int, default=32, help="beam width of the LM decoding (default 32)")
    parser.add_argument(
        "--test_set_only",
        action="store_true",
        help="only the trained folder's part (7.): its forms' CER and speed and the LM decoding's share",
    )
    args = parser.parse_args(argv)
    if args.test_set_only and args.model_dir is None:
        parser.error("--test_set_only measures a trained folder: give --model_dir and --test_manifest.")
    if (args.model_dir is None) != (args.test_manifest is None):
        parser.error("--model_dir and --test_manifest go together: the test CER needs both the model and the clips.")
    return args


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


def in_child(function, *args):
    """``function(*args)`` in a fresh (spawned) process, which may import the package (see [`save_models`])."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def export_forms(model_dir: Path, directory: Path) -> dict:
    """Export the model saved in ``model_dir`` to ``directory`` with the package's command (checked against torch):
    ``{ONNX_FLOAT: file, ONNX_INT8: file}``. Runs in a child process, as [`save_models`] does."""
    from modeling_tot_cakt.training.export_onnx import save_onnx_folder

    transformers_logging.disable_progress_bar()
    exported = save_onnx_folder(model_dir, directory, int8=True)
    return {ONNX_FLOAT: Path(exported["onnx"]), ONNX_INT8: Path(exported["int8"])}


def load_models(folders: dict, device: torch.device) -> dict:
    """Both models as users load them, in eval mode on ``device``."""
    return {
        TOT: AutoModelForCTC.from_pretrained(folders[TOT], trust_remote_code=True).to(device).eval(),
        BASELINE: AutoModelForCTC.from_pretrained(folders[BASELINE]).to(device).eval(),
    }


def clip_inputs(folder: Path, seconds: float, device: torch.device, seed: int = 0) -> dict:
    """The saved feature extractor's output for one clip of noise (batch 1), on ``device``."""
    wave = 0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SAMPLING_RATE)).astype(np.float32)
    extractor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)  # the package's extractor class
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


def time_forms(model, onnx_files: dict, folder: Path, clip_seconds, repeats: int) -> list:
    """Milliseconds per second of audio of the torch model and its ONNX forms (onnxruntime) on one clip per
    length, with each of [`FORM_THREADS`] threads, interleaved; prints the table row by row."""
    # Imported only now: the torch model was loaded from its folder already (see save_models).
    from modeling_tot_cakt.training.export_onnx import inference_session, run_onnx

    device = torch.device("cpu")
    print(f"{'threads':>7} {'clip s':>6} " + " ".join(f"{name + ' ms/s':>18}" for name in (TORCH_FLOAT, *onnx_files)))
    rows = []
    for threads in FORM_THREADS:
        torch.set_num_threads(threads)
        sessions = {name: inference_session(path, threads) for name, path in onnx_files.items()}
        for seconds in clip_seconds:
            inputs = clip_inputs(folder, seconds, device)
            calls = {TORCH_FLOAT: functools.partial(logits, model, inputs)}
            calls.update({name: functools.partial(run_onnx, session, inputs) for name, session in sessions.items()})
            timings = round_robin(calls, repeats, device, measure_memory=False)
            expected = timings.results[TORCH_FLOAT].numpy()
            row = dict(threads=threads, clip_seconds=seconds)
            for name in calls:
                median = statistics.median(timings.wall[name])
                row[name] = dict(**summary(timings.wall[name]), ms_per_audio_second=1e3 * median / seconds)
                if name != TORCH_FLOAT:
                    row[name]["max_abs_diff_to_torch"] = float(np.abs(timings.results[name][0] - expected).max())
            rows.append(row)
            print(
                f"{threads:>7} {seconds:>6g} "
                + " ".join(f"{row[name]['ms_per_audio_second']:>18.1f}" for name in calls)
                + "   max |logit diff| "
                + ", ".join(f"{name} {row[name]['max_abs_diff_to_torch']:.2g}" for name in sessions),
                flush=True,
            )
    return rows


def transcribe_test_set(model_dir: Path, manifest: Path, directory: Path, beam_width: int, repeats: int) -> dict:
    """
    Export the trained model in ``model_dir`` (ONNX float32 and int8) and transcribe the clips of ``manifest`` one
    at a time with each form on 1 thread: greedy CER and ms per second of audio of each form; with a language model
    in the folder, the LM decoding's time at ``beam_width``, its share of end-to-end time for each form's forward
    pass, and its CER. Runs in a child process (it imports the package).
    """
    from transformers import AutoProcessor

    from modeling_tot_cakt import TOTCAKTForCTC
    from modeling_tot_cakt.training.audio import load_audio
    from modeling_tot_cakt.training.export_onnx import inference_session, run_onnx
    from modeling_tot_cakt.training.language_model import greedy_transcripts, lm_transcripts, read_manifest_records
    from modeling_tot_cakt.training.trainer import load_cer_metric
    from modeling_tot_cakt.training.transcripts import normalize_transcript

    transformers_logging.disable_progress_bar()
    torch.set_num_threads(1)
    device = torch.device("cpu")
    onnx_files = export_forms(model_dir, directory)
    model = TOTCAKTForCTC.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    extractor = processor.feature_extractor
    records = read_manifest_records(manifest)
    waves = [load_audio(record["audio"], extractor.sampling_rate) for record in records]
    audio_seconds = sum(len(wave) for wave in waves) / extractor.sampling_rate
    clips = [
        extractor(wave, sampling_rate=extractor.sampling_rate, return_attention_mask=True, return_tensors="pt")
        for wave in waves
    ]
    sessions = {name: inference_session(path, threads=1) for name, path in onnx_files.items()}

    def torch_forward():
        return [logits(model, clip)[0].numpy() for clip in clips]

    def onnx_forward(session):
        return [run_onnx(session, clip)[0][0] for clip in clips]

    forwards = {TORCH_FLOAT: torch_forward}
    forwards.update({name: functools.partial(onnx_forward, session) for name, session in sessions.items()})
    timings = round_robin(forwards, repeats, device, measure_memory=False)
    references = [normalize_transcript(record["text"]) for record in records]
    metric = load_cer_metric()
    forward_seconds = {name: statistics.median(times) for name, times in timings.wall.items()}
    result = dict(clips=len(records), audio_seconds=audio_seconds, threads=1, batch=1, forms={})
    for name, form_logits in timings.results.items():
        hypotheses = greedy_transcripts(processor.tokenizer, form_logits)
        result["forms"][name] = dict(
            greedy_cer=float(metric.compute(predictions=hypotheses, references=references)),
            forward_median_s=forward_seconds[name],
            ms_per_audio_second=1e3 * forward_seconds[name] / audio_seconds,
        )
    if getattr(processor, "decoder", None) is None:
        result["language_model"] = None
        return result
    torch_logits = timings.results[TORCH_FLOAT]
    decodings = round_robin(
        {
            "greedy": functools.partial(greedy_transcripts, processor.tokenizer, torch_logits),
            "lm": functools.partial(lm_transcripts, processor, torch_logits, beam_width=beam_width),
        },
        repeats,
        device,
        measure_memory=False,
    )
    decode_seconds = {name: statistics.median(times) for name, times in decodings.wall.items()}
    result["language_model"] = dict(
        beam_width=beam_width,
        greedy_decode_median_s=decode_seconds["greedy"],
        lm_decode_median_s=decode_seconds["lm"],
        lm_cer=float(metric.compute(predictions=decodings.results["lm"], references=references)),
        lm_share_of_end_to_end={
            name: decode_seconds["lm"] / (seconds + decode_seconds["lm"]) for name, seconds in forward_seconds.items()
        },
        lm_share_target=LM_SHARE_TARGET,
    )
    return result


def format_test_set(report: dict) -> str:
    lines = [
        f"Test set: {report['clips']} clips, {report['audio_seconds']:.1f} s of audio, batch 1, 1 thread.",
        f"{'form':>14} {'greedy CER':>10} {'ms/s audio':>10}"
        + (f" {'LM share':>9}" if report["language_model"] else ""),
    ]
    language_model = report["language_model"]
    for name, form in report["forms"].items():
        line = f"{name:>14} {form['greedy_cer']:>10.4f} {form['ms_per_audio_second']:>10.2f}"
        if language_model:
            line += f" {100 * language_model['lm_share_of_end_to_end'][name]:>8.1f}%"
        lines.append(line)
    if language_model:
        lines.append(
            f"LM decoding (beam {language_model['beam_width']}): {language_model['lm_decode_median_s']:.2f} s for the "
            f"set (greedy {language_model['greedy_decode_median_s']:.3f} s), CER {language_model['lm_cer']:.4f}; "
            f"LM share = decode / (forward + decode), target <= {100 * LM_SHARE_TARGET:.0f} %."
        )
    else:
        lines.append("The folder has no language model: no LM decoding measured.")
    return "\n".join(lines)


def format_sizes(sizes: dict) -> str:
    mib = 2**20
    return (
        f"model.safetensors: TOT-CAKT {sizes['tot_cakt_bytes'] / mib:.2f} MiB, baseline "
        f"{sizes['baseline_bytes'] / mib:.2f} MiB, ratio {sizes['ratio']:.4f}; TOT-CAKT's adapter "
        f"{sizes['adapter_bytes'] / mib:.2f} MiB ({100 * sizes['adapter_share']:.2f} % of its file); without it "
        f"the ratio is {sizes['ratio_without_adapter']:.6f}"
    )


def trained_test_set(args, directory: Path, preset: dict) -> dict:
    """Part 7 on ``args.model_dir``'s test clips, in a child process; printed and returned as its record."""
    report = in_child(
        transcribe_test_set,
        Path(args.model_dir),
        Path(args.test_manifest),
        directory / "trained-onnx",
        args.beam_width,
        preset["test_repeats"],
    )
    print(f"\nTrained model {args.model_dir}:\n" + format_test_set(report), flush=True)
    return dict(model_dir=args.model_dir, test_manifest=args.test_manifest, **report)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset = PRESETS[args.preset]
    encoder_config = ENCODERS[preset["encoder"]]
    transformers_logging.disable_progress_bar()
    if args.test_set_only:
        with tempfile.TemporaryDirectory() as scratch:
            results = {"test_set": trained_test_set(args, Path(args.workdir or scratch), preset)}
        meta = dict(preset=args.preset, **environment(device, args.threads))
        meta["load_average_after"] = environment(device, args.threads)["load_average"]
        if args.out:
            write_json(args.out, meta, results)
        return
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(args.workdir or scratch)
        folders = in_child(save_models, encoder_config, directory)
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
        results = dict(logits=identity, sizes=sizes, clips=rows)
        if device.type == "cpu":
            onnx_files = in_child(export_forms, folders[TOT], directory / "onnx")
            print(
                f"\nDeployment forms of TOT-CAKT: ms of compute per second of audio, batch 1, interleaved; ONNX "
                f"files {', '.join(f'{n} {p.stat().st_size / 2**20:.1f} MiB' for n, p in onnx_files.items())}.",
                flush=True,
            )
            results["forms"] = time_forms(
                models[TOT], onnx_files, folders[TOT], preset["clip_seconds"], preset["repeats"]
            )
            results["onnx_bytes"] = {name: path.stat().st_size for name, path in onnx_files.items()}
            torch.set_num_threads(args.threads)
        if args.model_dir:
            results["test_set"] = trained_test_set(args, directory, preset)
    meta["load_average_after"] = environment(device, args.threads)["load_average"]
    if args.out:
        write_json(args.out, meta, results)


if __name__ == "__main__":
    main()
