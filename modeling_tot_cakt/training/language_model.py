"""Character n-gram language models for beam-search decoding: estimated by KenLM, attached to a saved model.

1. :func:`estimate_character_lm` writes the text one normalised sentence a line, characters separated by
   spaces, and runs KenLM's own estimator (``lmplz``, modified Kneser-Ney) on it: an ARPA file in which every
   word is one character.
2. :func:`attach_language_model` saves it beside a trained model as pyctcdecode's ``alphabet.json`` and
   ``language_model/`` with a [`~modeling_tot_cakt.processing_tot_cakt_lm.TOTCAKTProcessorWithLM`] and its
   code file, and names the package's pipeline in ``config.json`` (``custom_pipelines``), so that
   ``AutoProcessor`` and ``pipeline("automatic-speech-recognition", ..., trust_remote_code=True)`` decode with it.
3. :func:`tune_weights` picks the LM weight ``alpha`` and the per-character bonus ``beta`` on a dev set by a
   small grid, never on test.

KenLM's estimator is not on PyPI as a binary: ``make kenlm`` builds ``lmplz`` from the ``kenlm`` sdist (CMake and
Boost from the system's packages) into the virtual environment's ``bin``. Command line::

    python -m modeling_tot_cakt.training.language_model estimate --text corpus.txt --output lm.arpa --order 4
    python -m modeling_tot_cakt.training.language_model attach --model_dir outputs/model --arpa lm.arpa \\
        --dev_manifest dev.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..processing_tot_cakt_lm import (
    UNKNOWN_LABEL,
    WORD_START,
    TOTCAKTProcessorWithLM,
    TOTCAKTSpeechRecognitionPipeline,
    build_decoder,
)
from .audio import load_audio
from .error_analysis import split_errors, spoken_syllables
from .trainer import CTCCharacterErrorRate, load_cer_metric
from .transcripts import normalize_transcript

logger = logging.getLogger(__name__)

UNKNOWN_CHARACTER = CTCCharacterErrorRate.UNKNOWN_CHARACTER

KENLM_BUILD_HINT = (
    "build KenLM's estimator with `make kenlm` (CMake and Boost from apt, the sources from the kenlm sdist), "
    "or put lmplz on PATH or in $KENLM_BIN"
)
# The pipeline a folder with a language model names in config.json, for `pipeline(..., trust_remote_code=True)`.
CUSTOM_PIPELINES = {
    "automatic-speech-recognition": {
        "impl": f"processing_tot_cakt_lm.{TOTCAKTSpeechRecognitionPipeline.__name__}",
        "pt": ["AutoModelForCTC"],
        "tf": [],
        "type": "audio",
    }
}
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
DEFAULT_BETAS = (0.0, 1.0, 2.0)


def find_kenlm_binary(name: str = "lmplz") -> str:
    """The path of a KenLM program: in ``$KENLM_BIN``, beside this Python (the venv's ``bin``), or on PATH."""
    candidates = [os.environ.get("KENLM_BIN"), str(Path(sys.executable).parent)]
    for folder in candidates:
        if folder and os.access(os.path.join(folder, name), os.X_OK):
            return os.path.join(folder, name)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"KenLM's {name} was not found: {KENLM_BUILD_HINT}.")
    return found


def character_lines(texts: Iterable[str]) -> Iterable[str]:
    """Each text normalised as transcripts are (:func:`normalize_transcript`), as space-separated characters;
    texts left empty are skipped."""
    for text in texts:
        characters = normalize_transcript(text)
        if characters:
            yield " ".join(characters)


def estimate_character_lm(
    texts: Iterable[str], output_path: str | os.PathLike, order: int = 4, memory: str = "10%"
) -> Path:
    """
    Estimate a character n-gram model (modified Kneser-Ney, KenLM's ``lmplz``) on `texts` and write it as ARPA.

    Args:
        texts: sentences (any Mandarin text; normalised here like the transcripts).
        output_path: the ARPA file to write (written to a temporary name, then renamed).
        order: the n-gram order.
        memory: ``lmplz -S``: without it lmplz reserves most of the machine's memory.

    Raises:
        FileNotFoundError: lmplz is not built.
        ValueError: no text left after normalisation.
        RuntimeError: lmplz failed (its last output lines are in the message).
    """
    lmplz = find_kenlm_binary("lmplz")
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_path.parent) as scratch:
        text_file = Path(scratch) / "text.txt"
        with text_file.open("w", encoding="utf-8") as handle:
            lines = sum(handle.write(line + "\n") > 0 for line in character_lines(texts))
        if lines == 0:
            raise ValueError("No text to estimate a language model on: every sentence was empty after normalisation.")
        partial = Path(scratch) / output_path.name
        command = [lmplz, "-o", str(order), "-S", memory, "-T", scratch, "--discount_fallback"]
        command += ["--text", str(text_file), "--arpa", str(partial)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-8:])
            raise RuntimeError(f"lmplz failed (exit status {result.returncode}) on {lines} lines:\n{tail}")
        os.replace(partial, output_path)
    logger.info(f"Estimated a {order}-gram character model on {lines} sentences: {output_path}")
    return output_path


def arpa_unigrams(arpa_path: str | os.PathLike) -> list[str]:
    """The words (here: characters) of an ARPA file's 1-gram section, without ``<s>``, ``</s>`` and ``<unk>``."""
    unigrams, in_section = [], False
    with open(arpa_path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line == "\\1-grams:":
                in_section = True
            elif in_section and (line.startswith("\\") or not line):
                break
            elif in_section:
                word = line.split("\t")[1]
                if word not in ("<s>", "</s>", "<unk>"):
                    unigrams.append(word)
    if not unigrams:
        raise ValueError(f"{arpa_path} has no 1-grams: not an ARPA language model.")
    return unigrams


def binary_language_model(arpa_path: str | os.PathLike, binary_path: str | os.PathLike) -> Path:
    """KenLM's binary form of an ARPA model (``build_binary``): loads in a fraction of the time, quietly."""
    result = subprocess.run([find_kenlm_binary("build_binary"), str(arpa_path), str(binary_path)], capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"build_binary failed on {arpa_path}: {result.stderr.decode(errors='replace')[-2000:]}")
    return Path(binary_path)


def attach_language_model(
    model_dir: str | os.PathLike,
    arpa_path: str | os.PathLike,
    alpha: float = 0.5,
    beta: float = 1.0,
    choose_weights: Callable[[TOTCAKTProcessorWithLM], tuple[float, float]] | None = None,
) -> TOTCAKTProcessorWithLM:
    """
    Save the character model `arpa_path` with weights `alpha`, `beta` into the saved model folder `model_dir`:
    pyctcdecode's ``alphabet.json`` and ``language_model/``, the processor as a [`TOTCAKTProcessorWithLM`] (with
    its code file and ``auto_map``), and ``custom_pipelines`` in ``config.json``. `choose_weights`, given the
    processor with the model (weights `alpha`, `beta`), returns the weights to save instead (e.g. chosen on a dev
    set by :func:`tune_weights`): the decoder is built once and saved once. Returns the processor.
    """
    from transformers import AutoProcessor

    model_dir = Path(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    unigrams = arpa_unigrams(arpa_path)
    known = set(unigrams) & set(processor.tokenizer.get_vocab())
    if not known:
        raise ValueError(
            f"None of the {len(unigrams)} characters of {arpa_path} (e.g. {', '.join(sorted(unigrams)[:5])}) is in "
            f"the model's vocabulary ({model_dir}/vocab.json): this language model was estimated on other text. "
            "Estimate one on Mandarin text written with the model's characters."
        )
    with tempfile.TemporaryDirectory() as scratch:
        kenlm_file = binary_language_model(arpa_path, Path(scratch) / f"{Path(arpa_path).stem}.bin")
        decoder = build_decoder(processor.tokenizer, kenlm_file, unigrams, alpha=alpha, beta=beta)
        with_lm = TOTCAKTProcessorWithLM(processor.feature_extractor, processor.tokenizer, decoder)
        if choose_weights is not None:
            alpha, beta = choose_weights(with_lm)
            decoder.set_weights(alpha, beta)
        with_lm.save_pretrained(model_dir)
    config_file = model_dir / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["custom_pipelines"] = CUSTOM_PIPELINES
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return with_lm


def manifest_logits(model, processor, audio_paths: Sequence[str], batch_size: int = 32) -> list[np.ndarray]:
    """
    The CTC logits of each clip, ``(frames, vocab)`` over its valid frames only, in the given order.

    Each clip is featurised on its own, as ``train_hf.py`` featurises its rows (see :func:`feature_logits`).
    """
    extractor = processor.feature_extractor
    rate = extractor.sampling_rate
    input_name = extractor.model_input_names[0]
    features = [extractor(load_audio(path, rate), sampling_rate=rate)[input_name][0] for path in audio_paths]
    return feature_logits(model, processor, features, batch_size)


@torch.no_grad()
def feature_logits(model, processor, features: Sequence, batch_size: int = 32) -> list[np.ndarray]:
    """
    The CTC logits of each clip's features (one array per clip, as ``train_hf.py`` stores them), ``(frames,
    vocab)`` over its valid frames only, in the given order.

    Batches of similar length are padded from the features (``feature_extractor.pad``, as the training collator
    does): the log-mel extractor, given a padded batch of waveforms, marks a stacked frame valid when its second
    10 ms frame is, so a clip would get a partly padded extra frame and a transcript that depends on its batch.
    """
    extractor = processor.feature_extractor
    input_name = extractor.model_input_names[0]
    order = sorted(range(len(features)), key=lambda index: len(features[index]))
    logits: list[np.ndarray] = [np.empty(0)] * len(features)
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        inputs = extractor.pad(
            [{input_name: features[index]} for index in chunk], return_tensors="pt", return_attention_mask=True
        )
        inputs = {name: value.to(model.device) for name, value in inputs.items()}
        batch_logits = model(**inputs).logits
        lengths = model.frame_mask(batch_logits.shape[1], inputs["attention_mask"]).sum(-1)
        for index, utterance, length in zip(chunk, batch_logits.float().cpu().numpy(), lengths.tolist()):
            logits[index] = utterance[:length]
    return logits


def greedy_transcripts(tokenizer, logits: Sequence[np.ndarray]) -> list[str]:
    """Arg-max CTC transcripts (repeats collapsed, blanks removed), without spaces; an unknown token is one
    character, as in ``train_hf.py``'s CER (``CTCCharacterErrorRate.UNKNOWN_CHARACTER``)."""
    texts = ["".join(tokenizer.decode(utterance.argmax(-1)).split()) for utterance in logits]
    return [text.replace(tokenizer.unk_token, UNKNOWN_CHARACTER) for text in texts]


def lm_transcripts(processor: TOTCAKTProcessorWithLM, logits: Sequence[np.ndarray], **decode_kwargs) -> list[str]:
    """Beam-search transcripts of each utterance's logits (``decode_kwargs``: beam_width, alpha, beta); an
    unknown token (pyctcdecode writes ``⁇``) is one character, as in :func:`greedy_transcripts`."""
    texts = [processor.decode(utterance, **decode_kwargs).text for utterance in logits]
    return [text.replace(UNKNOWN_LABEL.strip(WORD_START), UNKNOWN_CHARACTER) for text in texts]


def tune_weights(
    processor: TOTCAKTProcessorWithLM,
    logits: Sequence[np.ndarray],
    references: Sequence[str],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    betas: Sequence[float] = DEFAULT_BETAS,
    beam_width: int = 32,
) -> dict:
    """
    The LM weight and per-character bonus with the lowest CER on `logits` / `references` (a dev set), by a grid.

    Returns:
        ``{"alpha", "beta", "cer", "beam_width", "grid": [{"alpha", "beta", "cer"}, ...]}``; ties go to the
        earlier grid point (the lighter weight).
    """
    metric = load_cer_metric()
    references = [normalize_transcript(text) for text in references]
    grid = []
    for alpha, beta in itertools.product(alphas, betas):
        hypotheses = lm_transcripts(processor, logits, beam_width=beam_width, alpha=alpha, beta=beta)
        cer = float(metric.compute(predictions=hypotheses, references=references))
        grid.append({"alpha": alpha, "beta": beta, "cer": round(cer, 5)})
        logger.info(f"alpha {alpha}, beta {beta}: dev CER {cer:.4f}")
    best = min(grid, key=lambda point: point["cer"])
    return {**best, "beam_width": beam_width, "grid": grid}


def decoding_speed(processor: TOTCAKTProcessorWithLM, logits: Sequence[np.ndarray], beam_width: int) -> dict:
    """Seconds to decode `logits` greedily and with the language model, side by side, and their ratio."""
    start = time.perf_counter()
    greedy_transcripts(processor.tokenizer, logits)
    greedy = time.perf_counter() - start
    start = time.perf_counter()
    lm_transcripts(processor, logits, beam_width=beam_width)
    beam = time.perf_counter() - start
    return {
        "utterances": len(logits),
        "beam_width": beam_width,
        "greedy_seconds": round(greedy, 4),
        "lm_seconds": round(beam, 4),
        "lm_over_greedy": round(beam / max(greedy, 1e-9), 1),
    }


def decode_and_score(
    processor,
    model_dir: str | os.PathLike,
    arpa_path: str | os.PathLike,
    logits: dict[str, Sequence[np.ndarray]],
    references: dict[str, Sequence[str]],
    tune_split: str,
    syllables: dict[str, Sequence[Sequence[str]]] | None = None,
    readings: dict | None = None,
    beam_width: int = 32,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    betas: Sequence[float] = DEFAULT_BETAS,
) -> dict:
    """
    Decode each split's `logits` greedily and with the character model `arpa_path`, whose weight and bonus are
    chosen on `tune_split` (a dev set) by a grid; attach it to `model_dir` with them; split the errors of each
    decoding against `references` into homophone substitutions, tone errors and the rest
    (:func:`~modeling_tot_cakt.training.error_analysis.split_errors`; the spoken syllables are `syllables`, or
    pypinyin's reading of the references).

    Returns:
        ``{"weights": tune_weights(...), <split>: {"greedy": split, "lm": split}, ..., "speed": decoding_speed(...)}``
        with the speed measured on the last split.
    """
    chosen = {}

    def choose(with_lm):
        chosen.update(tune_weights(with_lm, logits[tune_split], references[tune_split], alphas, betas, beam_width))
        return chosen["alpha"], chosen["beta"]

    with_lm = attach_language_model(model_dir, arpa_path, choose_weights=choose)
    result = {"weights": chosen}
    for split, split_logits in logits.items():
        texts = [normalize_transcript(text) for text in references[split]]
        spoken = syllables[split] if syllables else [spoken_syllables(text) for text in texts]
        decodings = {
            "greedy": greedy_transcripts(processor.tokenizer, split_logits),
            "lm": lm_transcripts(with_lm, split_logits, beam_width=beam_width),
        }
        result[split] = {
            name: split_errors(texts, hypotheses, spoken, readings).as_dict() for name, hypotheses in decodings.items()
        }
    result["speed"] = decoding_speed(with_lm, split_logits, beam_width)
    return result


def read_manifest_records(path: str | os.PathLike) -> list[dict]:
    """The ``{"audio", "text"}`` rows of a JSONL manifest, audio paths resolved against the manifest's folder."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("audio"), str) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}, line {number}: a row needs string fields 'audio' and 'text'.")
            row["audio"] = str(Path(path).parent / row["audio"])
            records.append(row)
    return records


def tune_and_attach(
    model_dir: str | os.PathLike,
    arpa_path: str | os.PathLike,
    dev_records: Sequence[dict],
    beam_width: int = 32,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    betas: Sequence[float] = DEFAULT_BETAS,
) -> dict:
    """Choose alpha and beta on `dev_records` (``{"audio", "text"}``), then attach the model with them.
    Returns :func:`tune_weights`' result."""
    from ..modeling_tot_cakt import TOTCAKTForCTC

    tuned = {}

    def choose(with_lm):
        model = TOTCAKTForCTC.from_pretrained(model_dir)
        logits = manifest_logits(model, with_lm, [record["audio"] for record in dev_records])
        texts = [record["text"] for record in dev_records]
        tuned.update(tune_weights(with_lm, logits, texts, alphas, betas, beam_width))
        return tuned["alpha"], tuned["beta"]

    attach_language_model(model_dir, arpa_path, choose_weights=choose)
    return tuned


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    estimate = commands.add_parser("estimate", help="Estimate a character n-gram model on a text file (lmplz).")
    estimate.add_argument("--text", required=True, help="UTF-8 text, one sentence a line, any Mandarin text.")
    estimate.add_argument("--output", required=True, help="The ARPA file to write.")
    estimate.add_argument("--order", type=int, default=4, help="n-gram order (default 4).")
    estimate.add_argument("--memory", default="10%", help="lmplz -S: memory it may use (default 10%%).")
    attach = commands.add_parser("attach", help="Save a character model with a trained model folder.")
    attach.add_argument("--model_dir", required=True, help="train_hf.py's output folder.")
    attach.add_argument("--arpa", required=True, help="The character model (from `estimate`).")
    attach.add_argument("--dev_manifest", help="JSONL {audio, text} to choose alpha and beta on (never test).")
    attach.add_argument("--alpha", type=float, default=0.5, help="LM weight without --dev_manifest.")
    attach.add_argument("--beta", type=float, default=1.0, help="Bonus per character without --dev_manifest.")
    attach.add_argument("--beam_width", type=int, default=32, help="Beam width of the dev grid.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "estimate":
        with open(args.text, encoding="utf-8") as handle:
            estimate_character_lm(handle, args.output, order=args.order, memory=args.memory)
    elif args.dev_manifest:
        tuned = tune_and_attach(args.model_dir, args.arpa, read_manifest_records(args.dev_manifest), args.beam_width)
        print(json.dumps({name: tuned[name] for name in ("alpha", "beta", "cer", "beam_width")}))
    else:
        attach_language_model(args.model_dir, args.arpa, alpha=args.alpha, beta=args.beta)


if __name__ == "__main__":
    main()
