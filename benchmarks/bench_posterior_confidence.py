#!/usr/bin/env python
"""How sure a trained model's CTC posteriors are of the character at the frames where it writes one.

At every frame whose most probable symbol is not the blank, the posterior renormalised over the non-blank symbols:
its largest probability (``top1``) and its entropy in nats, averaged over those frames of the first
``--utterances`` utterances of a manifest. Read next to the LM decoding of the same models: a beam search adds the
LM's log-probability to these, so the flatter they are, the more the LM decides (docs/RESULTS.md, "With the
language model"). For each ``<runs_dir>/<method>-seed<N>/model`` of ``--methods`` and ``--seeds``.

    python benchmarks/bench_posterior_confidence.py --runs_dir outputs/bench_quality/knowledge/dose3000 \\
        --methods none tot_kd tot_kd_deep --manifest outputs/demo/knowledge/corpus/test.jsonl \\
        --out docs/results/posterior_confidence.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from transformers import AutoModelForCTC, AutoProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from benchmarks.common import environment, write_json


def nonblank_confidence(probs: torch.Tensor, blank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(top1, entropy)`` of each frame of ``probs`` ``(T, V)`` whose most probable symbol is not `blank`: the
    largest probability and the entropy (nats) of its distribution renormalised over the non-blank symbols."""
    frames = probs[probs.argmax(-1) != blank].double()
    frames[:, blank] = 0.0
    frames = frames / frames.sum(-1, keepdim=True)
    entropy = -(frames * frames.clamp_min(1e-300).log()).sum(-1)
    return frames.max(-1).values.numpy(), entropy.numpy()


def model_confidence(model_dir: Path, rows: list[dict], audio_root: Path) -> dict:
    """Mean `nonblank_confidence` of the model in `model_dir` over the utterances `rows` (manifest records)."""
    model = AutoModelForCTC.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    top1, entropy = [], []
    for row in rows:
        audio, rate = sf.read(audio_root / row["audio"], dtype="float32")
        inputs = processor.feature_extractor(audio, sampling_rate=rate, return_tensors="pt")
        with torch.no_grad():
            probs = model(**inputs).logits.softmax(-1)[0]
        frame_top1, frame_entropy = nonblank_confidence(probs, processor.tokenizer.pad_token_id)
        top1.append(frame_top1)
        entropy.append(frame_entropy)
    top1, entropy = np.concatenate(top1), np.concatenate(entropy)
    return {"frames": int(top1.size), "top1": float(top1.mean()), "entropy_nats": float(entropy.mean())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs_dir", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--manifest", type=Path, required=True, help="JSONL with audio paths relative to it")
    parser.add_argument("--utterances", type=int, default=120)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/results/posterior_confidence.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with args.manifest.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line, _ in zip(handle, range(args.utterances))]
    results = {}
    for method in args.methods:
        runs = []
        for seed in args.seeds:
            record = model_confidence(args.runs_dir / f"{method}-seed{seed}" / "model", rows, args.manifest.parent)
            runs.append({"seed": seed, **record})
            print(f"{method} seed {seed}: top1 {record['top1']:.3f}, entropy {record['entropy_nats']:.3f} nats")
        results[method] = {
            "runs": runs,
            "top1": float(np.mean([run["top1"] for run in runs])),
            "entropy_nats": float(np.mean([run["entropy_nats"] for run in runs])),
        }
    meta = {**environment(torch.device("cpu"), args.threads), "args": {k: str(v) for k, v in vars(args).items()}}
    write_json(args.out, meta, results)
    return results


if __name__ == "__main__":
    main()
