"""Tiny models, vocabularies and audio for fast CPU tests (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from datasets import Dataset
from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizer, TrainingArguments

from modeling_tot_cakt import TOTCAKTConfig, TOTCAKTForCTC, create_processor
from modeling_tot_cakt.processing_tot_cakt import vocabulary_from_characters
from modeling_tot_cakt.training.collator import DataCollatorCTCWithTeacher
from modeling_tot_cakt.training.trainer import TOTCAKTTrainer

CHARACTERS = "你好中国人大学生天上地下"
TEACHER_HIDDEN = 24

TINY_WAV2VEC2 = dict(
    model_type="wav2vec2",
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(16, 16),
    conv_stride=(5, 4),
    conv_kernel=(10, 8),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
    feat_extract_norm="layer",
    do_stable_layer_norm=True,
    mask_time_prob=0.0,
    layerdrop=0.0,
)
TINY_HUBERT = {**TINY_WAV2VEC2, "model_type": "hubert"}
TINY_WAVLM = {**TINY_WAV2VEC2, "model_type": "wavlm", "num_buckets": 16, "max_bucket_distance": 64}
TINY_WAV2VEC2_BERT = dict(
    model_type="wav2vec2-bert",
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    output_hidden_size=32,
    conv_depthwise_kernel_size=3,
    feature_projection_input_dim=160,
    add_adapter=True,
    num_adapter_layers=1,
    adapter_stride=2,
    adapter_kernel_size=3,
    mask_time_prob=0.0,
    layerdrop=0.0,
)


def write_vocab(directory: Path) -> Path:
    """A CTC vocabulary `{[PAD]: 0, [UNK]: 1, |: 2, chars...}` in `directory/vocab.json`."""
    vocab = vocabulary_from_characters(CHARACTERS)
    path = Path(directory) / "vocab.json"
    path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    return path


def make_teacher(directory: Path, masked_lm: bool = True, seed: int = 0) -> Path:
    """A randomly initialised 1-layer BERT with a character vocab.txt, saved in HF format: with its masked-LM head
    (as the demo's teacher is; the distillation reads it), or without it. Its weights are drawn with `seed`, so
    they are the same whichever test builds it first."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CHARACTERS]
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    BertTokenizer(str(directory / "vocab.txt")).save_pretrained(directory)
    config = BertConfig(
        vocab_size=len(tokens),
        hidden_size=TEACHER_HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        teacher = (BertForMaskedLM if masked_lm else BertModel)(config)
    teacher.save_pretrained(directory)
    return directory


def make_model(encoder_config: dict | None = None, alignment: str = "tot", teacher_dir: Path | None = None, **kwargs):
    """A tiny TOT-CAKT model over the test vocabulary (15 symbols); `kwargs` set or override config fields."""
    config = TOTCAKTConfig(
        encoder_config=dict(encoder_config or TINY_WAV2VEC2),
        vocab_size=len(CHARACTERS) + 3,
        teacher_name_or_path=str(teacher_dir) if teacher_dir else "bert-base-chinese",
        alignment=alignment,
        **{"teacher_hidden_size": TEACHER_HIDDEN, "adapter_hidden_size": 16, **kwargs},
    )
    return TOTCAKTForCTC(config)


def make_processor(directory: Path, model: TOTCAKTForCTC):
    return create_processor(write_vocab(directory), encoder_config=model.config.encoder_config)


def write_wav(path: Path, seconds: float = 1.0, sampling_rate: int = 16000, seed: int = 0) -> Path:
    """A chirp plus a little noise, 16-bit PCM."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sampling_rate)) / sampling_rate
    audio = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.01 * rng.standard_normal(t.shape)
    sf.write(path, audio.astype(np.float32), sampling_rate, subtype="PCM_16")
    return Path(path)


def one_step_trainer(model: TOTCAKTForCTC, processor, rows: list[dict], output_dir: Path):
    """A `TOTCAKTTrainer` that takes one optimiser step (lr 1e-2) over ``rows`` on the CPU, saving nothing."""
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=1,
        per_device_train_batch_size=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,
        save_strategy="no",
        learning_rate=1e-2,
    )
    return TOTCAKTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=DataCollatorCTCWithTeacher(processor),
    )


def save_emitting_model(model: TOTCAKTForCTC, directory: Path):
    """
    Bias `model`'s head so that, untrained, it emits characters rather than only blanks, and save it with its
    processor in `directory/saved`. Returns `(processor, folder)`.
    """
    with torch.no_grad():
        model.lm_head.bias.copy_(torch.linspace(-1, 1, model.config.vocab_size))
        model.lm_head.bias[0] = -5
    processor = make_processor(directory, model)
    folder = Path(directory) / "saved"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return processor, folder
