#!/usr/bin/env python
"""How much of each teacher target kind is character identity.

For the token features a TOT-CAKT model is aligned to -- ``teacher_target="states"`` (each position's state in
the transcript) and ``"masked_states"`` (each position's state with that position masked: what its context
predicts there) -- the share of their variance that the character at the position explains: ``R^2 = 1 -
SS_within / SS_total``, with each character's mean feature as the prediction (in sample, over every position of
the transcripts; characters seen once explain their feature fully, so they are left out). Also the mean cosine
between two occurrences of the same character, and between any two positions (what it is read against). For the trained teacher in
``--teacher`` and for a randomly initialised copy of it (same architecture and tokenizer, ``--seed``).

    python benchmarks/bench_teacher_targets.py --teacher outputs/demo/quick/teacher \\
        --manifest outputs/demo/quick/corpus/train.jsonl --transcripts 1000 --out docs/results/teacher_targets.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from modeling_tot_cakt import TOTCAKTConfig, TOTCAKTForCTC
from modeling_tot_cakt.modeling_tot_cakt import load_teacher

TARGETS = ("states", "masked_states")


def transcripts(manifest: Path, count: int) -> list[str]:
    texts = []
    with manifest.open(encoding="utf-8") as handle:
        for line in handle:
            text = json.loads(line)["text"]
            if text and text not in texts:
                texts.append(text)
            if len(texts) == count:
                break
    return texts


def token_features(teacher, tokenizer, target: str, texts: list[str], batch_size: int = 64):
    """`(features (P, D), token ids (P,))` over every kept position of `texts`."""
    config = TOTCAKTConfig(
        encoder_config={"model_type": "wav2vec2", "num_hidden_layers": 1},
        teacher_hidden_size=teacher.config.hidden_size,
        teacher_target=target,
    )
    model = TOTCAKTForCTC(config)
    model.attach_teacher(teacher, tokenizer)
    features, ids = [], []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start : start + batch_size], padding=True, return_tensors="pt")
        hidden, mask = model.teacher_token_features(encoded["input_ids"], encoded["attention_mask"])
        features.append(hidden[mask])
        ids.append(encoded["input_ids"][:, 1:][mask])
    return torch.cat(features), torch.cat(ids)


def identity_share(features: torch.Tensor, ids: torch.Tensor) -> dict:
    """R^2 of the per-character means and the mean cosine between occurrences of a character, over characters
    seen at least twice."""
    positions = defaultdict(list)
    for index, token in enumerate(ids.tolist()):
        positions[token].append(index)
    repeated = [index for indices in positions.values() if len(indices) > 1 for index in indices]
    features, ids = features[repeated].double(), ids[repeated]
    means = torch.zeros(int(ids.max()) + 1, features.shape[1], dtype=features.dtype).index_add_(0, ids, features)
    counts = torch.bincount(ids, minlength=means.shape[0]).clamp_min(1)
    means = means / counts[:, None]
    within = ((features - means[ids]) ** 2).sum()
    total = ((features - features.mean(0)) ** 2).sum()
    unit = torch.nn.functional.normalize(features, dim=-1)
    sums = torch.zeros_like(means).index_add_(0, ids, unit)
    # Mean over pairs of different occurrences of the same character: (|sum|^2 - n) / (n (n - 1)) per character.
    n = torch.bincount(ids, minlength=means.shape[0]).double()
    pairs = n * (n - 1)
    kept = pairs > 0
    same = ((sums[kept] ** 2).sum(-1) - n[kept]) / pairs[kept]
    return {
        "r2_character_identity": float(1 - within / total),
        "cosine_same_character": float((same * pairs[kept]).sum() / pairs[kept].sum()),
        "cosine_any_two_positions": float((unit.sum(0).square().sum() - len(unit)) / (len(unit) * (len(unit) - 1))),
        "positions": len(repeated),
        "characters": int(kept.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True, help="JSONL manifest with a 'text' field.")
    parser.add_argument("--transcripts", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the untrained teacher's weights.")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    trained, tokenizer = load_teacher(str(args.teacher))
    torch.manual_seed(args.seed)
    untrained = AutoModel.from_config(AutoConfig.from_pretrained(args.teacher))
    texts = transcripts(args.manifest, args.transcripts)
    results = {}
    for name, teacher in (("trained", trained), ("untrained", untrained)):
        for target in TARGETS:
            results[f"{name} {target}"] = identity_share(*token_features(teacher.eval(), tokenizer, target, texts))
            row = results[f"{name} {target}"]
            print(
                f"{name:9s} {target:13s} R2 {row['r2_character_identity']:.3f}  same-character cosine "
                f"{row['cosine_same_character']:.3f}, any two {row['cosine_any_two_positions']:.3f}  ({row['positions']} positions, {row['characters']} characters)"
            )
    if args.out:
        meta = {"teacher": str(args.teacher), "manifest": str(args.manifest), "transcripts": len(texts)}
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
