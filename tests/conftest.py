"""Shared fixtures: small synthetic speech corpora on disk (audiofolder + manifests, AISHELL-1 layout)
and a tiny teacher. Everything is generated; nothing is downloaded."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny_models import CHARACTERS, TINY_WAV2VEC2, make_teacher

# The test models are tiny: extra intra-op threads cannot speed them up, but on a loaded machine
# their spin-waiting slows every step down by an order of magnitude.
torch.set_num_threads(1)

SAMPLING_RATE = 16000
# The tiny encoder for training runs, at 200 frames per second (hop 80) instead of 800: CTC over
# short frame sequences visibly lowers its loss within a few steps, and each step is cheap.
TRAINING_ENCODER = {**TINY_WAV2VEC2, "conv_stride": (10, 8), "conv_kernel": (20, 16)}
# Each "character" is a tone with its own pitch: the acoustic model can learn the mapping quickly.
CORPUS_CHARACTERS = CHARACTERS[:4]
TONE_HZ = {character: 300.0 + 250.0 * index for index, character in enumerate(CORPUS_CHARACTERS)}
TONE_SECONDS = 0.12
GAP_SECONDS = 0.04


def synthesize(text: str, rng: np.random.Generator, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Audio for `text`: per character a tone (with a harmonic) then a short gap, over faint noise."""
    t = np.arange(int(TONE_SECONDS * sampling_rate)) / sampling_rate
    envelope = np.hanning(len(t))
    gap = np.zeros(int(GAP_SECONDS * sampling_rate))
    pieces = [gap]
    for character in text:
        frequency = TONE_HZ[character]
        tone = np.sin(2 * np.pi * frequency * t) + 0.3 * np.sin(4 * np.pi * frequency * t)
        pieces += [0.5 * envelope * tone, gap]
    audio = np.concatenate(pieces)
    return (audio + 0.005 * rng.standard_normal(audio.shape)).astype(np.float32)


def random_texts(count: int, rng: np.random.Generator) -> list[str]:
    return ["".join(rng.choice(list(CORPUS_CHARACTERS), size=rng.integers(2, 5))) for _ in range(count)]


@dataclass
class SpeechCorpus:
    """A generated corpus: `root` is an audiofolder (`train/`, `test/` with metadata.csv)."""

    root: Path
    train_manifest: Path  # CSV, columns audio,text, paths relative to the manifest
    eval_manifest: Path  # JSON Lines, absolute paths
    train_texts: list[str]
    eval_texts: list[str]


def write_split(directory: Path, texts: list[str], rng: np.random.Generator) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, text in enumerate(texts):
        path = directory / f"utt{index:03d}.wav"
        sf.write(path, synthesize(text, rng), SAMPLING_RATE, subtype="PCM_16")
        paths.append(path)
    with open(directory / "metadata.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "text"])
        writer.writerows([path.name, text] for path, text in zip(paths, texts))
    return paths


@pytest.fixture(scope="session")
def speech_corpus(tmp_path_factory) -> SpeechCorpus:
    """24 training and 6 test utterances of 2-4 tone "characters", as audiofolder and as manifests."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("speech_corpus")
    train_texts, eval_texts = random_texts(24, rng), random_texts(6, rng)
    train_paths = write_split(root / "train", train_texts, rng)
    eval_paths = write_split(root / "test", eval_texts, rng)
    train_manifest = root / "train.csv"
    with open(train_manifest, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["audio", "text"])
        writer.writerows([path.relative_to(root).as_posix(), text] for path, text in zip(train_paths, train_texts))
    eval_manifest = root / "test.jsonl"
    eval_manifest.write_text(
        "".join(
            json.dumps({"audio": str(path), "text": text}, ensure_ascii=False) + "\n"
            for path, text in zip(eval_paths, eval_texts)
        ),
        encoding="utf-8",
    )
    return SpeechCorpus(root, train_manifest, eval_manifest, train_texts, eval_texts)


@dataclass
class AishellCorpus:
    root: Path  # the data_aishell folder
    transcripts: dict[str, str]  # utterance id -> space separated transcript, for every split


@pytest.fixture(scope="session")
def aishell_corpus(tmp_path_factory) -> AishellCorpus:
    """AISHELL-1's published layout: wav/{train,dev,test}/<speaker>/<utt>.wav plus the transcript file.
    One training wav has no transcript line, as happens in the real corpus."""
    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("data_aishell")
    transcripts = {}
    for split, speakers in (("train", ("S0002", "S0003")), ("dev", ("S0724",)), ("test", ("S0764",))):
        for speaker in speakers:
            directory = root / "wav" / split / speaker
            directory.mkdir(parents=True)
            for index, text in enumerate(random_texts(3, rng)):
                utt_id = f"BAC009{speaker}W{index + 121:04d}"
                sf.write(directory / f"{utt_id}.wav", synthesize(text, rng), SAMPLING_RATE, subtype="PCM_16")
                transcripts[utt_id] = " ".join(text)
    sf.write(root / "wav" / "train" / "S0002" / "BAC009S0002W0999.wav", synthesize("你好", rng), SAMPLING_RATE)
    (root / "transcript").mkdir()
    (root / "transcript" / "aishell_transcript_v0.8.txt").write_text(
        "".join(f"{utt_id} {text}\n" for utt_id, text in sorted(transcripts.items())), encoding="utf-8"
    )
    return AishellCorpus(root, transcripts)


@pytest.fixture()
def bad_rows_manifest(tmp_path) -> Path:
    """A CSV manifest of six rows: one good, then each kind of bad row that must be skipped and counted:
    a missing file, an undecodable file, a file with no samples, an empty transcript, and a transcript
    that normalises to nothing. A second good file backs the two bad transcripts."""
    rng = np.random.default_rng(2)
    sf.write(tmp_path / "good.wav", synthesize("你好", rng), SAMPLING_RATE)
    sf.write(tmp_path / "other.wav", synthesize("中国", rng), SAMPLING_RATE)
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), SAMPLING_RATE)
    (tmp_path / "corrupt.wav").write_bytes(b"not a wav file at all")
    rows = [
        ("good.wav", "你好。"),
        ("missing.wav", "你好"),
        ("corrupt.wav", "你好"),
        ("empty.wav", "你好"),
        ("other.wav", ""),
        ("other.wav", "，！？"),
    ]
    with open(tmp_path / "bad.csv", "w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows([("audio", "text"), *rows])
    return tmp_path / "bad.csv"


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A 1-layer BERT (hidden size 24) with a character vocab.txt, saved like a Hub checkpoint."""
    return make_teacher(tmp_path_factory.mktemp("teacher"))
