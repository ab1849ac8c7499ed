"""Beam-search decoding with the character language model in one process and in forked processes, side by side.

``TOTCAKTProcessorWithLM.batch_decode(logits, num_processes=N)`` against ``num_processes=1`` on the same logits
(the saved model's, on a manifest's clips), interleaved rounds, median seconds; the transcripts must be equal.

    python benchmarks/bench_lm_processes.py --model outputs/demo/quick/model \\
        --manifest outputs/demo/quick/corpus/test.jsonl --out docs/results/lm_processes.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoProcessor

from modeling_tot_cakt import TOTCAKTForCTC
from modeling_tot_cakt.training.language_model import manifest_logits, read_manifest_records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved model folder with a language model attached")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--beam_width", type=int, default=32)
    parser.add_argument("--processes", type=int, nargs="+", default=[2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="docs/results/lm_processes.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    model, processor = TOTCAKTForCTC.from_pretrained(args.model).eval(), AutoProcessor.from_pretrained(args.model)
    records = read_manifest_records(args.manifest)
    logits = manifest_logits(model, processor, [record["audio"] for record in records])
    lengths = [len(item) for item in logits]
    batch = np.zeros((len(logits), max(lengths), logits[0].shape[1]), dtype=np.float32)
    for row, item in zip(batch, logits):
        row[: len(item)] = item
    settings = [1, *args.processes]
    seconds: dict[int, list[float]] = {n: [] for n in settings}
    texts = {}
    for _ in range(args.rounds):
        for n in settings:
            start = time.perf_counter()
            texts[n] = processor.batch_decode(
                batch, frame_lengths=lengths, beam_width=args.beam_width, num_processes=n
            ).text
            seconds[n].append(time.perf_counter() - start)
    report = {
        "utterances": len(logits),
        "frames": int(sum(lengths)),
        "beam_width": args.beam_width,
        "median_seconds": {str(n): statistics.median(values) for n, values in seconds.items()},
        "speedup": {str(n): statistics.median(seconds[1]) / statistics.median(seconds[n]) for n in args.processes},
        "same_transcripts": {str(n): texts[n] == texts[1] for n in args.processes},
        "rounds": args.rounds,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
