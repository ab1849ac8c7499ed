"""Damaged saved folders: a cut-off weights file, a config.json that is not a TOT-CAKT configuration or does not
fit the weights, a vocab.json that does not fit config.vocab_size. Every loader names the file and says what to
do: `from_pretrained` (the package's classes, and the code copied next to the weights for `trust_remote_code`,
also in a process where the package cannot be imported), the pipeline, and `train_hf.py` continuing a saved
model or resuming a checkpoint. Also the format checks of `saved_files.py` on hand-made files."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_remote_code import BLOCK_PACKAGE
from test_train_hf import run_training
from tiny_models import make_model, make_processor
from transformers import AutoModel, AutoModelForCTC, PreTrainedModel, pipeline

from modeling_tot_cakt import TOTCAKTForCTC, TOTCAKTModel
from modeling_tot_cakt.training.saved_files import (
    file_problem,
    folder_problem,
    safetensors_problem,
    write_file_manifest,
    write_json_atomically,
)
from modeling_tot_cakt.training.trainer import check_saved_model


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A saved CTC model (15 outputs) with its processor and code files."""
    folder = tmp_path_factory.mktemp("pristine") / "model"
    model = make_model(alignment="none")
    model.save_pretrained(folder)
    make_processor(folder, model).save_pretrained(folder)
    return folder


@pytest.fixture()
def folder(pristine, tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(pristine, copy)
    return copy


def cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text(encoding="utf-8"))
    change(value)
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")


def config_without(key: str):
    return lambda folder: edit_json(folder / "config.json", lambda config: config.pop(key))


def config_with(key: str, value):
    return lambda folder: edit_json(folder / "config.json", lambda config: config.update({key: value}))


WEIGHTS_CUT = "model.safetensors (or a shard its model.safetensors.index.json names) is cut off or damaged"
NOT_JSON = "The config.json of '{folder}' is not valid JSON: it was cut off or damaged"
NOT_A_CONFIG = "The config.json of '{folder}' is not a valid TOT-CAKT configuration"
NOT_FITTING = "The weights in model.safetensors of '{folder}' do not have the shapes its config.json describes"
CUT_WEIGHTS = "The weights of '{folder}' cannot be read: its " + WEIGHTS_CUT
# damage -> (how, what the message says, whether transformers' AutoConfig reads the damaged file before the
# model's code runs: config.json's own values are then refused by transformers or the configuration class)
DAMAGES = {
    "weights cut in half": (
        lambda f: cut(f / "model.safetensors", os.path.getsize(f / "model.safetensors") // 2),
        CUT_WEIGHTS,
        False,
    ),
    "weights cut inside the header": (lambda f: cut(f / "model.safetensors", 100), CUT_WEIGHTS, False),
    "weights empty": (lambda f: cut(f / "model.safetensors", 0), CUT_WEIGHTS, False),
    "config cut off": (lambda f: cut(f / "config.json", 40), NOT_JSON, True),
    "config is a list": (lambda f: (f / "config.json").write_text("[1, 2]"), NOT_A_CONFIG, True),
    "vocab_size a string": (
        config_with("vocab_size", "15"),
        NOT_A_CONFIG + " (ValueError: TOTCAKTConfig.vocab_size",
        True,
    ),
    "unknown encoder type": (config_with("encoder_config", {"model_type": "nope"}), NOT_A_CONFIG, True),
    "config without encoder_config": (
        config_without("encoder_config"),
        "The config.json of '{folder}' has no encoder_config (the acoustic encoder's configuration)",
        False,
    ),
    "config without vocab_size": (
        config_without("vocab_size"),
        NOT_FITTING + " (it has no vocab_size)|{folder}/vocab.json has 15 symbols but the model's config.json says",
        False,
    ),
    # The base model has no CTC head: its weights fit, the vocabulary does not (here and above).
    "config with another vocab_size": (
        config_with("vocab_size", 20),
        NOT_FITTING + "|{folder}/vocab.json has 15 symbols but the model's config.json says vocab_size=20",
        False,
    ),
    "vocab.json with an extra symbol": (
        lambda f: edit_json(f / "vocab.json", lambda vocab: vocab.update({"猫": len(vocab)})),
        "{folder}/vocab.json has 16 symbols but the model's config.json says vocab_size=15",
        False,
    ),
    "vocab.json without a symbol": (
        lambda f: edit_json(f / "vocab.json", lambda vocab: vocab.pop("你")),
        "{folder}/vocab.json has 14 symbols but the model's config.json says vocab_size=15",
        False,
    ),
    "vocab.json cut off": (
        lambda f: cut(f / "vocab.json", 20),
        "{folder}/vocab.json cannot be read as the model's CTC vocabulary",
        False,
    ),
}


def assert_names(error: pytest.ExceptionInfo, message: str, folder: Path) -> None:
    """The error is a ValueError saying one of `message`'s |-separated texts and what to do."""
    text = str(error.value)
    assert error.type is ValueError, text
    assert any(option.format(folder=folder) in text for option in message.split("|")), text
    assert "Put back" in text or "Copy the folder again" in text, text


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_folder_is_named_by_every_model_loader(folder, damage):
    change, message, read_by_auto_config = DAMAGES[damage]
    change(folder)
    loaders = [lambda: TOTCAKTForCTC.from_pretrained(folder), lambda: TOTCAKTModel.from_pretrained(folder)]
    if not read_by_auto_config:
        loaders += [
            lambda: AutoModelForCTC.from_pretrained(folder, trust_remote_code=True),
            lambda: AutoModel.from_pretrained(folder, trust_remote_code=True),
        ]
    for load in loaders:
        with pytest.raises(ValueError) as error:
            load()
        assert_names(error, message, folder)


def test_the_pipeline_names_a_vocabulary_that_does_not_fit_the_weights(folder):
    """transformers' pipeline wraps the model's error in its own; the file and the sizes are in it."""
    edit_json(folder / "vocab.json", lambda vocab: vocab.update({"猫": len(vocab)}))
    with pytest.raises(ValueError, match=f"{folder}/vocab.json has 16 symbols but the model's config.json says"):
        pipeline("automatic-speech-recognition", model=str(folder), trust_remote_code=True)


def test_an_intact_folder_passes_the_checks_and_loads(folder):
    check_saved_model(str(folder))  # raises nothing
    assert TOTCAKTForCTC.from_pretrained(folder).config.vocab_size == 15
    (folder / "vocab.json").unlink()  # a model without its processor has no vocabulary to check
    assert TOTCAKTForCTC.from_pretrained(folder).lm_head.out_features == 15


def poison(weights_file: Path, name: str, value: float, every: int = 7) -> str:
    """Set every `every`-th value of the weight `name` in `weights_file` to `value`; returns how the error counts
    them (`"<n> NaN and 0 infinite values among its <size>"`)."""
    weights = load_file(weights_file)
    weights[name].view(-1)[::every] = value
    save_file(weights, weights_file, metadata={"format": "pt"})
    changed, size = -(-weights[name].numel() // every), weights[name].numel()
    nan, inf = (changed, 0) if math.isnan(value) else (0, changed)
    return f"{nan} NaN and {inf} infinite values among its {size}"


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_non_finite_weights_are_named_at_load_by_every_loader(folder, value):
    """A head holding NaN used to load without a word and transcribe everything as ''. Every loader names the
    tensor, the file and what to do; the base model, which has no head, loads."""
    counts = poison(folder / "model.safetensors", "lm_head.weight", value)
    expected = (
        f"The weights of '{folder}' hold non-finite values: lm_head.weight in {folder}/model.safetensors has {counts}."
    )
    loaders = [
        lambda: TOTCAKTForCTC.from_pretrained(folder),
        lambda: AutoModelForCTC.from_pretrained(folder, trust_remote_code=True),
        lambda: pipeline("automatic-speech-recognition", model=str(folder), trust_remote_code=True),
    ]
    for load in loaders:
        with pytest.raises(ValueError) as error:
            load()
        assert expected in str(error.value) and "Copy the folder again" in str(error.value), str(error.value)
    assert TOTCAKTModel.from_pretrained(folder).encoder is not None


def test_non_finite_weights_of_a_sharded_save_name_their_shard(tmp_path):
    model = make_model(alignment="none")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    name = "tot_cakt.encoder.encoder.layers.0.feed_forward.output_dense.weight"
    shard = tmp_path / index[name]
    assert len(set(index.values())) > 1
    counts = poison(shard, name, float("nan"))
    with pytest.raises(ValueError, match=re.escape(f"hold non-finite values: {name} in {shard} has {counts}.")):
        TOTCAKTForCTC.from_pretrained(tmp_path)
    base_name = name.removeprefix("tot_cakt.")  # the base model's own name for it, in the same shard
    with pytest.raises(ValueError, match=re.escape(f"hold non-finite values: {base_name} in {shard} has {counts}.")):
        TOTCAKTModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "damage",
    [
        "config is a list",
        "config without encoder_config",
        "vocab.json with an extra symbol",
        "vocab.json cut off",
        "config cut off",
    ],
)
def test_check_saved_model_names_the_file_that_does_not_fit(folder, damage):
    change, message, _ = DAMAGES[damage]
    change(folder)
    with pytest.raises(ValueError) as error:
        check_saved_model(str(folder))
    assert_names(error, message, folder)


# Loads each folder of its arguments without the package, as remote code, and prints the error's first line.
FRESH_PROCESS = BLOCK_PACKAGE + textwrap.dedent(
    """
    from transformers import AutoModelForCTC

    for folder in sys.argv[1:]:
        try:
            AutoModelForCTC.from_pretrained(folder, trust_remote_code=True)
            print("LOADED")
        except ValueError as error:
            print(str(error).splitlines()[0])
    """
)


def test_the_copied_code_names_damaged_files_where_the_package_is_not_installed(pristine, tmp_path):
    cut_weights, extra_symbol, nan_head = tmp_path / "cut", tmp_path / "vocab", tmp_path / "nan"
    for copy in (cut_weights, extra_symbol, nan_head):
        shutil.copytree(pristine, copy)
    cut(cut_weights / "model.safetensors", 1000)
    edit_json(extra_symbol / "vocab.json", lambda vocab: vocab.update({"猫": len(vocab)}))
    counts = poison(nan_head / "model.safetensors", "lm_head.weight", float("nan"))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(cut_weights), str(extra_symbol), str(nan_head)],
        cwd=tmp_path,
        env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()[-3:]
    assert lines[0].startswith(f"The weights of '{cut_weights}' cannot be read: its {WEIGHTS_CUT}"), lines
    assert lines[1].startswith(f"{extra_symbol}/vocab.json has 16 symbols but the model's config.json says"), lines
    assert lines[2].startswith(
        f"The weights of '{nan_head}' hold non-finite values: lm_head.weight in {nan_head}/model.safetensors has {counts}."
    ), lines


def test_continuing_or_resuming_a_model_whose_vocabulary_does_not_fit_stops_before_training(
    folder, speech_corpus, tmp_path
):
    edit_json(folder / "vocab.json", lambda vocab: vocab.update({"猫": len(vocab)}))
    arguments = [
        "--dataset_name",
        speech_corpus.root,
        "--do_train",
        "--max_steps",
        1,
        "--use_cpu",
        "--report_to",
        "none",
    ]
    with pytest.raises(ValueError, match=f"{folder}/vocab.json has 16 symbols but the model's config.json says"):
        run_training("--output_dir", tmp_path / "continued", "--model_name_or_path", folder, *arguments)
    checkpoint = tmp_path / "checkpoint-1"
    shutil.copytree(folder, checkpoint)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    with pytest.raises(ValueError, match=f"{checkpoint}/vocab.json has 16 symbols"):
        run_training("--output_dir", tmp_path / "resumed", "--resume_from_checkpoint", checkpoint, *arguments)
    assert not (tmp_path / "continued" / "model.safetensors").exists()


# ------------------------------------------------------------------------------ format checks of saved files
def test_safetensors_files_are_whole_only_with_every_byte_their_header_describes(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(3, 4), "b": torch.zeros(5)}, path)
    size = os.path.getsize(path)
    assert safetensors_problem(path) is None
    data = path.read_bytes()
    for keep in (size - 1, size // 2, 9, 3, 0):
        path.write_bytes(data[:keep])
        assert str(path) in safetensors_problem(path), keep
    path.write_bytes(data + b"\0")  # bytes no tensor covers
    assert (
        safetensors_problem(path)
        == f"{path} has {size + 1} bytes but its header describes {size}: it was cut off or damaged"
    )
    path.write_bytes(b"weights!" + b"x" * 100)  # not a safetensors file at all
    assert "is cut off or is not a safetensors file" in safetensors_problem(path)


def test_torch_and_json_files_are_checked_by_their_format(tmp_path):
    archive, state, other = tmp_path / "optimizer.pt", tmp_path / "trainer_state.json", tmp_path / "README.md"
    torch.save({"state": torch.arange(100)}, archive)
    write_json_atomically(state, {"global_step": 3}, indent=2)
    other.write_text("anything")
    assert [file_problem(path) for path in (archive, state, other)] == [None, None, None]
    cut(archive, os.path.getsize(archive) - 10)
    assert file_problem(archive).startswith(
        f"{archive} ({os.path.getsize(archive)} bytes) is not a complete torch file"
    )
    cut(state, 5)
    assert file_problem(state).startswith(f"{state} is not valid JSON")
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file


def test_a_manifest_records_every_file_and_a_changed_size_is_named(tmp_path):
    torch.save({"step": 1}, tmp_path / "scheduler.pt")
    (tmp_path / "notes.txt").write_text("12345")
    write_file_manifest(tmp_path)
    assert folder_problem(tmp_path) is None
    (tmp_path / "notes.txt").write_text("1234")  # no format check can see this: only the manifest
    assert (
        folder_problem(tmp_path)
        == f"{tmp_path / 'notes.txt'} has 4 bytes but 5 were written: it was cut off or changed"
    )
    (tmp_path / "notes.txt").unlink()
    assert folder_problem(tmp_path) == f"{tmp_path / 'notes.txt'} is missing (the save recorded it with 5 bytes)"
    assert folder_problem(tmp_path, required=(("scheduler.pt",), ("model.safetensors", "weights.bin"))).endswith(
        "is missing (the save recorded it with 5 bytes)"
    )
    write_file_manifest(tmp_path)
    assert folder_problem(tmp_path, required=(("model.safetensors", "weights.bin"),)) == (
        f"{tmp_path} has no model.safetensors or weights.bin"
    )


@pytest.mark.parametrize(
    "damage, named",
    [
        ("weights cut in half", "model/model.safetensors: "),
        ("config cut off", "is not valid JSON"),
        (
            "config with another vocab_size",
            "lm_head.bias (15,) instead of (20,); lm_head.weight (15, 32) instead of (20, 32)",
        ),
    ],
)
def test_damage_is_diagnosed_from_the_files_whatever_the_loading_error_says(folder, monkeypatch, damage, named):
    """The diagnosis reads the files themselves: a loading error worded in any way gets the same message, and a
    sound folder's error is passed on untouched."""
    reworded = RuntimeError("loading failed (a message no diagnosis can match)")

    def failing_load(cls, *args, **kwargs):
        raise reworded

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(failing_load))
    with pytest.raises(RuntimeError) as pristine_error:
        TOTCAKTForCTC.from_pretrained(folder)
    assert pristine_error.value is reworded
    change, message, _ = DAMAGES[damage]
    change(folder)
    with pytest.raises(ValueError) as error:
        TOTCAKTForCTC.from_pretrained(folder)
    assert_names(error, message, folder)
    assert named in str(error.value) and error.value.__cause__ is reworded


def test_a_file_larger_than_the_manifest_records_is_named_like_a_smaller_one(tmp_path):
    """A file grown after the save (appended to, replaced by another) is as untrustworthy as a cut-off one."""
    (tmp_path / "notes.txt").write_text("12345")
    write_file_manifest(tmp_path)
    (tmp_path / "notes.txt").write_text("123456")  # no format check can see this either
    assert (
        folder_problem(tmp_path)
        == f"{tmp_path / 'notes.txt'} has 6 bytes but 5 were written: it was cut off or changed"
    )
