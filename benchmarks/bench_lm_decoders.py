"""Two beam-search decoders with the same character n-gram model, side by side on one model's logits.

pyctcdecode (what ``TOTCAKTProcessorWithLM`` runs: every character a word, LM weight ``alpha`` and a bonus
``beta`` per character) against flashlight-text's lexicon-free decoder (KenLM over the CTC tokens directly; LM
weight only, it has no per-token bonus). Each decoder's weights are chosen on dev by a grid at the same beam
width; then test CER and decoding seconds (one thread) are measured on the same logits.

    python benchmarks/bench_lm_decoders.py --model outputs/demo/quick/model \\
        --dev_manifest outputs/demo/quick/corpus/dev.jsonl --test_manifest outputs/demo/quick/corpus/test.jsonl \\
        --arpa outputs/demo/language_model/chars-4gram-*.arpa --out docs/results/lm_decoders.json

flashlight-text is not a dependency of the package: ``pip install flashlight-text`` to run this.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import jiwer
import numpy as np
import torch
from transformers import AutoProcessor

from modeling_tot_cakt import TOTCAKTForCTC
from modeling_tot_cakt.processing_tot_cakt_lm import TOTCAKTProcessorWithLM, build_decoder, join_characters
from modeling_tot_cakt.training.language_model import (
    DEFAULT_ALPHAS,
    DEFAULT_BETAS,
    arpa_unigrams,
    binary_language_model,
    manifest_logits,
    read_manifest_records,
)
from modeling_tot_cakt.training.transcripts import normalize_transcript


def cer(references, hypotheses) -> float:
    return float(jiwer.cer(list(references), [hypothesis or " " for hypothesis in hypotheses]))


def log_probabilities(logits: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(torch.log_softmax(torch.from_numpy(logits), -1).numpy(), dtype=np.float32)


class FlashlightDecoder:
    """flashlight-text's lexicon-free CTC decoder with a KenLM model over the tokenizer's characters."""

    def __init__(self, tokenizer, kenlm_path: Path, beam_width: int):
        from flashlight.lib.text.decoder import KenLM
        from flashlight.lib.text.dictionary import Dictionary

        self.tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.dictionary = Dictionary()
        for token in self.tokens:
            self.dictionary.add_entry(token)
        self.language_model = KenLM(str(kenlm_path), self.dictionary)
        self.blank, self.silence = tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("|")
        self.beam_width = beam_width

    def decode(self, logits: np.ndarray, alpha: float) -> str:
        from flashlight.lib.text.decoder import CriterionType, LexiconFreeDecoder, LexiconFreeDecoderOptions

        options = LexiconFreeDecoderOptions(
            beam_size=self.beam_width,
            beam_size_token=min(self.beam_width, len(self.tokens)),  # the tokens tried a frame, like the beam
            beam_threshold=25.0,  # drop hypotheses this far below the best, as pyctcdecode's beam_prune_logp -10
            lm_weight=alpha,
            sil_score=0.0,
            log_add=False,
            criterion_type=CriterionType.CTC,
        )
        decoder = LexiconFreeDecoder(options, self.language_model, self.silence, self.blank, [])
        emissions = log_probabilities(logits)
        best = decoder.decode(emissions.ctypes.data, emissions.shape[0], emissions.shape[1])[0]
        path = [token for token, _ in itertools.groupby(best.tokens) if token not in (self.blank, self.silence, -1)]
        return "".join(self.tokens[token] for token in path)


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dev_manifest", required=True)
    parser.add_argument("--test_manifest", required=True)
    parser.add_argument("--arpa", required=True)
    parser.add_argument("--beam_width", type=int, default=32)
    parser.add_argument("--out", default="docs/results/lm_decoders.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    model, processor = TOTCAKTForCTC.from_pretrained(args.model).eval(), AutoProcessor.from_pretrained(args.model)
    records = {"dev": read_manifest_records(args.dev_manifest), "test": read_manifest_records(args.test_manifest)}
    logits = {split: manifest_logits(model, processor, [r["audio"] for r in rows]) for split, rows in records.items()}
    references = {split: [normalize_transcript(r["text"]) for r in rows] for split, rows in records.items()}
    greedy = {
        split: [join_characters(processor.tokenizer.decode(item.argmax(-1))) for item in logits[split]]
        for split in logits
    }
    report = {
        "beam_width": args.beam_width,
        "utterances": {split: len(rows) for split, rows in records.items()},
        "greedy_test_cer": cer(references["test"], greedy["test"]),
    }
    with tempfile.TemporaryDirectory() as scratch:
        kenlm_path = binary_language_model(args.arpa, Path(scratch) / "chars.bin")
        decoder = build_decoder(processor.tokenizer, kenlm_path, arpa_unigrams(args.arpa), alpha=0.5, beta=0.0)
        with_lm = TOTCAKTProcessorWithLM(processor.feature_extractor, processor.tokenizer, decoder)

        def pyctcdecode_texts(split, alpha, beta):
            decoded = [
                with_lm.decode(item, beam_width=args.beam_width, alpha=alpha, beta=beta) for item in logits[split]
            ]
            return [output.text for output in decoded]

        grid = {
            (a, b): cer(references["dev"], pyctcdecode_texts("dev", a, b))
            for a in DEFAULT_ALPHAS
            for b in DEFAULT_BETAS
        }
        (alpha, beta), dev_cer = min(grid.items(), key=lambda item: item[1])
        texts, seconds = timed(pyctcdecode_texts, "test", alpha, beta)
        report["pyctcdecode"] = {
            "alpha": alpha, "beta": beta, "dev_cer": dev_cer, "test_cer": cer(references["test"], texts),
            "test_seconds": seconds,
        }  # fmt: skip

        flashlight = FlashlightDecoder(processor.tokenizer, kenlm_path, args.beam_width)

        def flashlight_texts(split, alpha):
            return [flashlight.decode(item, alpha) for item in logits[split]]

        grid = {a: cer(references["dev"], flashlight_texts("dev", a)) for a in DEFAULT_ALPHAS}
        alpha, dev_cer = min(grid.items(), key=lambda item: item[1])
        texts, seconds = timed(flashlight_texts, "test", alpha)
        report["flashlight"] = {
            "alpha": alpha, "dev_cer": dev_cer, "test_cer": cer(references["test"], texts), "test_seconds": seconds,
        }  # fmt: skip
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
