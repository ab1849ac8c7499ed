"""What pyctcdecode's pruning settings trade: decoding time against CER with a folder's character language model.

The folder's test logits (one thread, each clip alone) are decoded by ``TOTCAKTProcessorWithLM.decode`` with the
folder's LM weights, once per setting: the defaults (beam 32, ``token_min_logp`` -5, ``beam_prune_logp`` -10), a
narrower beam, and tighter token and beam pruning. Interleaved rounds, the median decoding time of the whole set
per setting, its test CER, and its share of end-to-end time behind the torch forward measured in the same run.

    python benchmarks/bench_lm_pruning.py --model_dir <folder with a language model> \\
        --test_manifest outputs/demo/knowledge/corpus/test.jsonl --out docs/results/lm_pruning.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from benchmarks.common import round_robin
from modeling_tot_cakt import TOTCAKTForCTC
from modeling_tot_cakt.processing_tot_cakt_lm import TOTCAKTProcessorWithLM
from modeling_tot_cakt.training.language_model import manifest_logits, read_manifest_records
from modeling_tot_cakt.training.trainer import load_cer_metric
from modeling_tot_cakt.training.transcripts import normalize_transcript

SETTINGS = {
    "beam 32 (defaults)": {"beam_width": 32},
    "beam 16": {"beam_width": 16},
    "beam 32, beam_prune_logp -5": {"beam_width": 32, "beam_prune_logp": -5.0},
    "beam 32, token_min_logp -3": {"beam_width": 32, "token_min_logp": -3.0},
    "beam 32, token_min_logp -2": {"beam_width": 32, "token_min_logp": -2.0},
}
"""The compared settings: a name and the keyword arguments of ``TOTCAKTProcessorWithLM.decode``."""


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="a trained folder with a language model")
    parser.add_argument("--test_manifest", required=True, help="JSONL {audio, text} of the test clips")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--out", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = TOTCAKTForCTC.from_pretrained(args.model_dir).eval()
    processor = TOTCAKTProcessorWithLM.from_pretrained(args.model_dir)
    records = read_manifest_records(args.test_manifest)
    paths = [record["audio"] for record in records]
    references = [normalize_transcript(record["text"]) for record in records]
    cpu = torch.device("cpu")
    forward = round_robin(
        {"forward": lambda: manifest_logits(model, processor, paths, batch_size=1)}, 1, cpu, measure_memory=False
    )
    logits = forward.results["forward"]
    forward_seconds = statistics.median(forward.wall["forward"])

    def decode(options):
        return [processor.decode(frames, **options).text for frames in logits]

    timings = round_robin(
        {name: functools.partial(decode, options) for name, options in SETTINGS.items()},
        args.repeats,
        cpu,
        measure_memory=False,
    )
    metric = load_cer_metric()
    results = {}
    for name, options in SETTINGS.items():
        seconds = statistics.median(timings.wall[name])
        results[name] = {
            "options": options,
            "decode_median_s": seconds,
            "test_cer": float(metric.compute(predictions=timings.results[name], references=references)),
            "share_of_end_to_end": seconds / (forward_seconds + seconds),
        }
        print(
            f"{name:32s} {seconds:6.2f} s  CER {results[name]['test_cer']:.4f}  "
            f"share {100 * results[name]['share_of_end_to_end']:.1f} %",
            flush=True,
        )
    report = {
        "model_dir": args.model_dir,
        "test_manifest": args.test_manifest,
        "clips": len(records),
        "threads": 1,
        "repeats": args.repeats,
        "forward_s": forward_seconds,
        "settings": results,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
