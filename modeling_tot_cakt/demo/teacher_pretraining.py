"""Offline stand-in for bert-base-chinese: a small character-level BERT pretrained with masked-LM.

Without network access the usual teacher (``bert-base-chinese``) cannot be downloaded, so this
module pretrains a small ``BertForMaskedLM`` on Chinese clauses of the offline text sources
(:mod:`modeling_tot_cakt.demo.text_sources`: ``fortunes-zh`` by default, more with ``text_sources``) and saves it in Hugging Face format:
``AutoModel.from_pretrained(output_dir)`` gives the ``BertModel`` whose hidden states the
speech recogniser learns from, and ``AutoTokenizer.from_pretrained(output_dir)`` a
``BertTokenizer`` that splits Chinese into characters. ``vocab.txt`` follows bert-base-chinese's
layout (``[PAD]`` = 0, ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``, then one character per line).

The speech corpus' dev and test transcripts are *held out*: no training clause contains one of
them or is contained in one (compared after :func:`~modeling_tot_cakt.training.transcripts.normalize_transcript`),
so the teacher has never seen the sentences the recogniser is evaluated on. They serve instead to
measure the teacher: each character of each held-out sentence is masked in turn and predicted
from the rest (``heldout_masked_token_accuracy`` in ``teacher_report.json``), and those spoken as a
syllable that another character of the speech corpus is also read as are chosen among these homophones
(``homophone_choice``, next to the pick-the-most-frequent baseline): the knowledge acoustics lack.

The defaults (2 layers, hidden size 128, 2000 steps of 128 clauses, token embeddings started
from character co-occurrence statistics) are sized to build in a few minutes on a 2-core CPU;
``bert-base-chinese`` by name, or a bigger teacher built with more layers and steps, drops in
unchanged. A folder built with the same settings and the same held-out sentences is reused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertTokenizer,
    DataCollatorForLanguageModeling,
    HfArgumentParser,
    get_linear_schedule_with_warmup,
)
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..training.transcripts import normalize_transcript
from .build_cache import lines_digest, read_complete_report, settings_hash
from .synthesis import HELDOUT_SPLITS, char_readings, heldout_sentences, read_manifest
from .text_sources import char_frequencies, exclude_heldout, load_named_clauses

BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""First lines of ``vocab.txt``, in bert-base-chinese's relative order ([PAD] has id 0)."""

TEACHER_REPORT_FILE = "teacher_report.json"
TEACHER_FILES = (
    TEACHER_REPORT_FILE,
    "config.json",
    "model.safetensors",
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
"""What a teacher folder holds (written by this module, so removed before a rebuild)."""
FORMAT_VERSION = 2
"""Bumped whenever what a given configuration builds changes, so old teachers are rebuilt."""


@dataclass
class TeacherConfig:
    """Settings of the offline teacher (see :meth:`cache_settings` for what the cache key holds)."""

    output_dir: str = field(metadata={"help": "Folder for the model, tokenizer and teacher_report.json."})
    corpus_dir: str | None = field(
        default=None, metadata={"help": "Speech corpus whose dev.jsonl/test.jsonl transcripts are held out."}
    )
    exclude_file: str | None = field(
        default=None, metadata={"help": "Text file with more sentences to hold out, one per line."}
    )
    num_layers: int = field(default=2, metadata={"help": "Transformer layers."})
    hidden_size: int = field(
        default=128, metadata={"help": "Hidden size (the feature size the recogniser's adapter maps to)."}
    )
    num_attention_heads: int = field(default=2, metadata={"help": "Attention heads."})
    dropout: float = field(
        default=0.0, metadata={"help": "Hidden and attention dropout (a short pretraining does not overfit)."}
    )
    min_chars: int = field(default=2, metadata={"help": "Shortest training clause, in characters."})
    max_chars: int = field(
        default=16,
        metadata={
            "help": "Longest training clause, in characters (longer ones, about 1 %% of the clauses, are left out)."
        },
    )
    min_char_count: int = field(
        default=2, metadata={"help": "Characters seen fewer times in the training text become [UNK]."}
    )
    max_vocab_size: int = field(
        default=0,
        metadata={
            "help": "Keep only the K most frequent characters of the training text, plus every character of the "
            "speech corpus (0 = no limit). A smaller output layer learns faster."
        },
    )
    text_sources: list[str] = field(
        default_factory=lambda: ["fortunes-zh"],
        metadata={"help": "Text sources to read (names in modeling_tot_cakt.demo.text_sources.TEXT_SOURCES)."},
    )
    max_steps: int = field(default=2000, metadata={"help": "Optimisation steps."})
    batch_size: int = field(default=128, metadata={"help": "Clauses per step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    warmup_ratio: float = field(
        default=0.1, metadata={"help": "Share of the steps with a linearly rising learning rate."}
    )
    mlm_probability: float = field(default=0.15, metadata={"help": "Share of the tokens masked for training."})
    seed: int = field(default=0, metadata={"help": "Seed for initialisation, batches and masks."})
    fortunes_dir: str | None = field(
        default=None, metadata={"help": "Folder of the fortunes-zh files (default: Debian's)."}
    )
    num_threads: int = field(
        default=1, metadata={"help": "torch CPU threads (more only pays on an otherwise idle machine)."}
    )

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that is out of range."""
        checks = [
            (
                self.corpus_dir is not None or self.exclude_file is not None,
                "give corpus_dir and/or exclude_file: the held-out sentences are needed to keep them out of "
                "training and to measure the teacher",
            ),
            (self.num_layers >= 1 and self.hidden_size >= 1, "num_layers and hidden_size must be >= 1"),
            (
                self.hidden_size % self.num_attention_heads == 0,
                "hidden_size must be a multiple of num_attention_heads",
            ),
            (1 <= self.min_chars <= self.max_chars, "need 1 <= min_chars <= max_chars"),
            (self.min_char_count >= 1, "min_char_count must be >= 1"),
            (self.max_vocab_size >= 0, "max_vocab_size must be >= 0"),
            (bool(self.text_sources), "text_sources must name at least one source"),
            (self.max_steps >= 1 and self.batch_size >= 1, "max_steps and batch_size must be >= 1"),
            (0 < self.mlm_probability < 1, "mlm_probability must be in (0, 1)"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.num_threads >= 1, "num_threads must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Invalid teacher setting: {message} (got {self}).")

    def cache_settings(self) -> dict:
        """The settings that determine the teacher besides the held-out sentences themselves:
        all but ``output_dir``, ``num_threads`` and where the held-out sentences were read."""
        settings = asdict(self)
        for name in ("output_dir", "num_threads", "corpus_dir", "exclude_file"):
            del settings[name]
        return settings


@dataclass
class TeacherSummary:
    """What :func:`build_teacher` made.

    Attributes:
        output_dir: the teacher folder (loadable with ``AutoModel`` / ``AutoTokenizer``).
        report: the parsed ``teacher_report.json``.
        reused: True when an existing teacher with the same settings and held-out set was kept.
    """

    output_dir: Path
    report: dict
    reused: bool


def training_texts(config: TeacherConfig, heldout: Iterable[str]) -> tuple[list[str], int]:
    """The teacher's training clauses: clauses of ``config.text_sources`` within the length bounds,
    each once, held-out sentences removed (see :func:`exclude_heldout`).

    Returns:
        The clauses, and how many were dropped for overlapping a held-out sentence.
    """
    source_clauses, _ = load_named_clauses(config.text_sources, config.fortunes_dir)
    clauses: dict[str, None] = {}
    for clause in map(normalize_transcript, source_clauses):
        if config.min_chars <= len(clause) <= config.max_chars:
            clauses.setdefault(clause)
    return exclude_heldout(list(clauses), heldout)


def write_vocab(
    texts: Iterable[str], min_count: int, path: str | Path, max_size: int = 0, required: Iterable[str] = ()
) -> list[str]:
    """Write a bert-base-chinese style ``vocab.txt``: special tokens, then characters by frequency.

    Args:
        texts: training texts.
        min_count: characters seen fewer times are left out (they become ``[UNK]``).
        path: file to write.
        max_size: keep only this many most frequent characters (0 = no limit) ...
        required: ... plus these characters wherever they occur in ``texts`` at all.

    Returns:
        The vocabulary, one token per id.
    """
    frequencies = [(char, count) for char, count in char_frequencies(texts) if count >= min_count]
    if max_size:
        required = set(required)
        frequencies = [item for rank, item in enumerate(frequencies) if rank < max_size or item[0] in required]
    vocab = list(BERT_SPECIAL_TOKENS) + [char for char, _ in frequencies]
    Path(path).write_text("".join(token + "\n" for token in vocab), encoding="utf-8")
    return vocab


def teacher_settings_hash(config: TeacherConfig, heldout: Sequence[str]) -> str:
    key = {
        "settings": config.cache_settings(),
        "heldout_sha256": lines_digest(heldout),
        "format_version": FORMAT_VERSION,
    }
    return settings_hash(key)


@torch.no_grad()
def cooccurrence_embeddings(
    sequences: Sequence[Sequence[int]], vocab_size: int, dim: int, window: int = 2
) -> torch.Tensor:
    """Token vectors from co-occurrence counts: truncated SVD of the positive PMI matrix.

    ``PPMI_ij = max(0, log(n_ij n / (n_i n_j)))`` over pairs of tokens at most ``window`` apart
    in a sequence; the vectors are ``U_k sqrt(S_k)`` of its rank-``dim`` SVD (Levy & Goldberg,
    "Neural word embedding as implicit matrix factorization", NeurIPS 2014).

    Args:
        sequences: token ids of each training text.
        vocab_size: ``V``.
        dim: ``k``, the vector size.
        window: largest distance of a counted pair.

    Returns:
        ``(V, k)`` float tensor; rows of tokens that never occur are zero.
    """
    counts = torch.zeros(vocab_size, vocab_size)
    ones = torch.ones(1)
    for ids in map(torch.tensor, sequences):
        for distance in range(1, min(window, len(ids) - 1) + 1):
            counts.index_put_((ids[:-distance], ids[distance:]), ones.expand(len(ids) - distance), accumulate=True)
    counts += counts.T.clone()
    row_totals = counts.sum(1, keepdim=True)
    pmi = torch.log(counts * counts.sum() / (row_totals * row_totals.T))
    ppmi = torch.nan_to_num(pmi, nan=0.0, neginf=0.0).clamp_(min=0.0)
    left, singular_values, _ = torch.svd_lowrank(ppmi, q=dim, niter=4)
    return left * singular_values.sqrt()


def initialise_token_embeddings(model: BertForMaskedLM, sequences: Sequence[Sequence[int]]) -> None:
    """Start the (input and tied output) token embeddings from :func:`cooccurrence_embeddings`.

    From BERT's random initialisation a small model spends most of a few-minute CPU budget
    predicting character frequencies only; starting from distributional vectors it learns to use
    the context within that budget. Tokens that never occur keep their random vectors, and the
    vectors are scaled to BERT's initialiser range.
    """
    embeddings = model.get_input_embeddings().weight
    vectors = cooccurrence_embeddings(sequences, embeddings.shape[0], embeddings.shape[1])
    seen = vectors.norm(dim=1) > 0
    with torch.no_grad():
        embeddings[seen] = vectors[seen] * (model.config.initializer_range / vectors[seen].std())


@torch.no_grad()
def masked_token_accuracy(
    model: BertForMaskedLM, tokenizer: BertTokenizer, sentences: Sequence[str], batch_size: int = 512
) -> tuple[float, int]:
    """Accuracy of predicting each token of each sentence with only that token masked.

    Every sentence of ``n`` tokens gives ``n`` inputs with one ``[MASK]`` each; the prediction
    is the arg-max over the vocabulary at the masked position.

    Returns:
        ``(accuracy, number of masked tokens)``.
    """
    inputs, targets = [], []
    for ids in tokenizer(list(sentences))["input_ids"]:
        for position in range(1, len(ids) - 1):  # skip [CLS] and [SEP]
            masked = list(ids)
            masked[position] = tokenizer.mask_token_id
            inputs.append((masked, position))
            targets.append(ids[position])
    if not inputs:
        raise ValueError("masked_token_accuracy needs at least one non-empty sentence.")
    model.eval()
    correct = 0
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [ids for ids, _ in chunk]}, return_tensors="pt")
        logits = model(**batch).logits
        rows = torch.arange(len(chunk))
        positions = torch.tensor([position for _, position in chunk])
        predicted = logits[rows, positions].argmax(-1)
        correct += int((predicted == torch.tensor(targets[start : start + batch_size])).sum())
    return correct / len(inputs), len(inputs)


@dataclass
class HomophoneChoice:
    """One held-out character that has homophones in the speech corpus' inventory.

    Attributes:
        sentence: the held-out sentence.
        position: index of the character in ``sentence``.
        candidates: the character and its homophones (inventory characters with a reading equal to
            its spoken syllable), the character itself first.
    """

    sentence: str
    position: int
    candidates: tuple[str, ...]


def homophone_choices(
    items: Iterable[tuple[str, Sequence[str]]], readings: dict[str, set[str]]
) -> list[HomophoneChoice]:
    """The characters of ``items`` that acoustics alone cannot tell from another inventory character.

    Args:
        items: ``(sentence, syllables)`` pairs, one toneful syllable per character (the manifests' pinyin).
        readings: syllables of every inventory character (:func:`~modeling_tot_cakt.demo.synthesis.char_readings`).

    Returns:
        One :class:`HomophoneChoice` per character spoken as a syllable that another inventory
        character also has; other candidates sorted by code point.
    """
    chars_by_syllable: dict[str, set[str]] = {}
    for char, syllables in readings.items():
        for syllable in syllables:
            chars_by_syllable.setdefault(syllable, set()).add(char)
    choices = []
    for sentence, syllables in items:
        for position, (char, syllable) in enumerate(zip(sentence, syllables, strict=True)):
            others = sorted(chars_by_syllable.get(syllable, set()) - {char})
            if others:
                choices.append(HomophoneChoice(sentence, position, (char, *others)))
    return choices


@torch.no_grad()
def homophone_choice_accuracy(
    model: BertForMaskedLM,
    tokenizer: BertTokenizer,
    choices: Sequence[HomophoneChoice],
    frequencies: dict[str, int],
    batch_size: int = 512,
) -> dict:
    """How often the teacher ranks the right character above its homophones, from context.

    The character is masked and the teacher's logits compared over the candidates it has in its
    vocabulary (one it lacks cannot be chosen; a right character it lacks counts as wrong). The
    baseline picks the candidate with the highest ``frequencies`` count, what a recogniser that
    knows only character frequencies would write; its ties go to the lowest code point, so the
    right character gets no credit for a tie.

    Returns:
        ``{"accuracy", "frequency_baseline_accuracy", "choices", "mean_candidates"}``.
    """
    if not choices:
        raise ValueError("homophone_choice_accuracy needs at least one character with a homophone.")
    vocab = tokenizer.get_vocab()
    model.eval()
    correct = baseline_correct = 0
    for start in range(0, len(choices), batch_size):
        chunk = choices[start : start + batch_size]
        encoded = tokenizer([choice.sentence for choice in chunk], padding=True, return_tensors="pt")
        positions = torch.tensor([choice.position + 1 for choice in chunk])  # after [CLS]
        rows = torch.arange(len(chunk))
        encoded["input_ids"][rows, positions] = tokenizer.mask_token_id
        logits = model(**encoded).logits[rows, positions]
        for row, choice in enumerate(chunk):
            known = [char for char in choice.candidates if char in vocab]
            if choice.candidates[0] in vocab:
                scores = logits[row, [vocab[char] for char in known]]
                correct += known[int(scores.argmax())] == choice.candidates[0]
            ranked = sorted(choice.candidates, key=lambda char: (-frequencies.get(char, 0), char))
            baseline_correct += ranked[0] == choice.candidates[0]
    return {
        "accuracy": round(correct / len(choices), 4),
        "frequency_baseline_accuracy": round(baseline_correct / len(choices), 4),
        "choices": len(choices),
        "mean_candidates": round(sum(len(choice.candidates) for choice in choices) / len(choices), 2),
    }


def corpus_homophone_choices(corpus_dir: str | Path, heldout: Iterable[str]) -> tuple[list[HomophoneChoice], dict]:
    """Homophone choices of a speech corpus' held-out sentences, and its training character counts.

    The inventory is every character of the corpus with the readings the synthesiser spoke
    (the manifests' ``pinyin``); the counts come from the training transcripts.
    """
    records = {split: read_manifest(Path(corpus_dir) / f"{split}.jsonl") for split in ("train", *HELDOUT_SPLITS)}
    spoken = {record["text"]: record["pinyin"].split() for split in records for record in records[split]}
    readings = char_readings(spoken.items())
    heldout = set(heldout)
    items = sorted((text, syllables) for text, syllables in spoken.items() if text in heldout)
    frequencies = dict(char_frequencies(record["text"] for record in records["train"]))
    return homophone_choices(items, readings), frequencies


def pretrain_masked_lm(
    model: BertForMaskedLM, tokenizer: BertTokenizer, texts: Sequence[str], config: TeacherConfig
) -> list[float]:
    """Masked-LM training with AdamW and a linear warm-up/decay schedule.

    The token embeddings start from co-occurrence statistics (:func:`initialise_token_embeddings`).
    Batches group texts of similar length (transformers' ``LengthGroupedSampler``; short clauses
    would otherwise be mostly padding), epoch after epoch until ``config.max_steps``. Masking is
    transformers' ``DataCollatorForLanguageModeling`` (80 % [MASK], 10 % random, 10 % kept) and
    the loss the cross-entropy of ``model.cls`` at the masked positions.

    Returns:
        The loss of every step.
    """
    if not texts:
        raise ValueError("No training text for the teacher: check fortunes_dir, min_chars and max_chars.")
    encodings = [{"input_ids": ids} for ids in tokenizer(list(texts))["input_ids"]]
    initialise_token_embeddings(model, [encoding["input_ids"] for encoding in encodings])
    sampler = LengthGroupedSampler(
        config.batch_size,
        lengths=[len(encoding["input_ids"]) for encoding in encodings],
        generator=torch.Generator().manual_seed(config.seed),
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=config.mlm_probability, seed=config.seed)
    loader = DataLoader(encodings, batch_size=config.batch_size, sampler=sampler, collate_fn=collator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(
        optimizer, round(config.warmup_ratio * config.max_steps), config.max_steps
    )
    losses: list[float] = []
    model.train()
    with tqdm(total=config.max_steps, desc="teacher masked-LM", unit="step") as progress:
        while len(losses) < config.max_steps:
            for batch in loader:
                labels = batch.pop("labels")
                masked = labels != -100
                # The prediction head runs on the masked positions only: the loss of
                # BertForMaskedLM's forward without projecting the other ~85 % onto the vocabulary.
                hidden = model.bert(**batch).last_hidden_state
                loss = torch.nn.functional.cross_entropy(model.cls(hidden[masked]), labels[masked])
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
                losses.append(loss.item())
                progress.update()
                if len(losses) == config.max_steps:
                    break
    return losses


def _load_complete_teacher(output_dir: Path, expected_hash: str) -> TeacherSummary | None:
    needed = ("config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json")
    report = read_complete_report(output_dir, TEACHER_REPORT_FILE, expected_hash, needed)
    return None if report is None else TeacherSummary(output_dir, report, reused=True)


def build_teacher(config: TeacherConfig, reuse_only: bool = False) -> TeacherSummary | None:
    """Pretrain (or reuse) the offline teacher; see the module docstring. With ``reuse_only`` nothing is trained:
    the result is the complete teacher of these settings, or None.

    Output in ``config.output_dir``: ``config.json`` + ``model.safetensors`` (a
    ``BertForMaskedLM``; ``AutoModel`` loads its ``BertModel``), the tokenizer files with
    ``vocab.txt``, and ``teacher_report.json`` (settings, hash, data counts, accuracy, time).

    Raises:
        ValueError: invalid settings, or no held-out sentence was found.
        FileNotFoundError: fortunes-zh, the corpus manifests or the exclude file is missing.
    """
    config.validate()
    heldout = heldout_sentences(config.corpus_dir, config.exclude_file)
    if not heldout:
        raise ValueError(
            f"No held-out sentences in corpus_dir={config.corpus_dir!r} / exclude_file={config.exclude_file!r}."
        )
    output_dir = Path(config.output_dir)
    key = teacher_settings_hash(config, heldout)
    cached = _load_complete_teacher(output_dir, key)
    if cached is not None or reuse_only:
        return cached

    start = time.perf_counter()
    # Old files go first: the report marks a complete folder, and a stale tokenizer.json would
    # win over the new vocab.txt when the tokenizer is loaded below.
    for name in TEACHER_FILES:
        (output_dir / name).unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        report = _train_and_save(config, heldout, output_dir)
    finally:
        torch.set_num_threads(threads)
    report = {"format_version": FORMAT_VERSION, "settings_hash": key, **report}
    report["build_seconds"] = round(time.perf_counter() - start, 1)
    (output_dir / TEACHER_REPORT_FILE).write_text(
        json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    return TeacherSummary(output_dir, report, reused=False)


def _train_and_save(config: TeacherConfig, heldout: Sequence[str], output_dir: Path) -> dict:
    """Make the vocabulary, pretrain, measure and save the teacher; return the report's body."""
    torch.manual_seed(config.seed)
    texts, num_excluded = training_texts(config, heldout)
    corpus_manifest = Path(config.corpus_dir) / "train.jsonl" if config.corpus_dir else None
    has_corpus = corpus_manifest is not None and corpus_manifest.is_file()
    corpus_chars = {char for record in read_manifest(corpus_manifest) for char in record["text"]} if has_corpus else ()
    vocab = write_vocab(
        texts, config.min_char_count, output_dir / "vocab.txt", max_size=config.max_vocab_size, required=corpus_chars
    )
    max_length = config.max_chars + 2  # [CLS] + characters + [SEP]
    # from_pretrained on the folder that holds only vocab.txt yet: the one constructor that
    # reads a vocab.txt in transformers 4 and 5 alike.
    tokenizer = BertTokenizer.from_pretrained(output_dir, do_lower_case=False, model_max_length=max_length)
    model = BertForMaskedLM(
        BertConfig(
            vocab_size=len(vocab),
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_attention_heads,
            intermediate_size=4 * config.hidden_size,
            hidden_dropout_prob=config.dropout,
            attention_probs_dropout_prob=config.dropout,
            max_position_embeddings=max(max_length, max(map(len, heldout)) + 2),
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    losses = pretrain_masked_lm(model, tokenizer, texts, config)
    heldout_accuracy, heldout_tokens = masked_token_accuracy(model, tokenizer, heldout)
    train_sample = texts[:: max(1, len(texts) // len(heldout))][: len(heldout)]
    train_accuracy, _ = masked_token_accuracy(model, tokenizer, train_sample)
    homophones = None
    if has_corpus:
        choices, frequencies = corpus_homophone_choices(config.corpus_dir, heldout)
        homophones = homophone_choice_accuracy(model, tokenizer, choices, frequencies) if choices else None

    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return {
        "settings": asdict(config),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "training_clauses": len(texts),
        "training_characters": sum(map(len, texts)),
        "excluded_overlapping_clauses": num_excluded,
        "heldout_sentences": len(heldout),
        "heldout_characters_missing_from_vocab": sorted(set("".join(heldout)) - set(vocab)),
        "vocab_size": len(vocab),
        "parameters": model.num_parameters(),
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "heldout_masked_token_accuracy": round(heldout_accuracy, 4),
        "heldout_masked_tokens": heldout_tokens,
        "train_masked_token_accuracy": round(train_accuracy, 4),
        "homophone_choice": homophones,
        "loss_curve": [
            round(sum(losses[at : at + 100]) / len(losses[at : at + 100]), 3) for at in range(0, len(losses), 100)
        ],
    }


def main(args: Sequence[str] | None = None) -> TeacherSummary:
    """Command line: ``python -m modeling_tot_cakt.demo.teacher_pretraining --corpus_dir DIR --output_dir DIR [settings]``."""
    (config,) = HfArgumentParser(TeacherConfig).parse_args_into_dataclasses(args)
    summary = build_teacher(config)
    report = summary.report
    verb = "Reused" if summary.reused else "Built"
    print(
        f"{verb} teacher in {summary.output_dir}: {report['parameters'] / 1e6:.2f} M parameters, "
        f"{report['vocab_size']} tokens, {report['training_clauses']} training clauses "
        f"({report['excluded_overlapping_clauses']} left out for overlapping "
        f"{report['heldout_sentences']} held-out sentences)."
    )
    print(
        f"  held-out masked-token accuracy {report['heldout_masked_token_accuracy']:.3f} "
        f"over {report['heldout_masked_tokens']} tokens (train sample {report['train_masked_token_accuracy']:.3f}); "
        f"built in {report['build_seconds']} s"
    )
    if report.get("homophone_choice"):
        choice = report["homophone_choice"]
        print(
            f"  homophone choice {choice['accuracy']:.3f} (most-frequent baseline "
            f"{choice['frequency_baseline_accuracy']:.3f}) over {choice['choices']} held-out characters"
        )
    return summary


if __name__ == "__main__":
    main()
