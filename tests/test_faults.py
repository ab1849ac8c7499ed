"""Faults during training: a run of train_hf.py killed with SIGKILL at any moment, also while it writes a
checkpoint, resumes from its last complete checkpoint when the same command is run again; half-written
checkpoints are never loaded; non-finite gradients never reach the weights."""

import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TRAINING_ENCODER
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from test_train_hf import common_args, run_training
from tiny_models import make_model, make_processor, one_step_trainer
from transformers import AutoModelForCTC
from transformers.trainer_pt_utils import get_length_grouped_indices

from modeling_tot_cakt.training.output_lock import LOCK_FILE, OutputDirectoryLockedError
from modeling_tot_cakt.training.saved_files import FILE_MANIFEST, write_file_manifest
from modeling_tot_cakt.training.trainer import (
    FINAL_SAVE_DIR,
    INCOMPLETE_CHECKPOINTS_DIR,
    EpochSeededLengthGroupedSampler,
    checkpoint_problem,
    is_complete_checkpoint,
    last_complete_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 40
RUN_TIMEOUT_S = 120


def train_command(output_dir: Path, corpus: Path, teacher: Path, cache_dir: Path) -> list[str]:
    """The same command for every attempt: a checkpoint after every step, the two newest kept."""
    return [
        sys.executable,
        str(ROOT / "train_hf.py"),
        "--output_dir",
        str(output_dir),
        "--dataset_name",
        str(corpus),
        "--encoder_config",
        json.dumps(TRAINING_ENCODER),
        "--teacher_name_or_path",
        str(teacher),
        "--adapter_hidden_size",
        "16",
        "--do_train",
        "--max_steps",
        str(MAX_STEPS),
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "5e-3",
        "--save_steps",
        "1",
        "--save_total_limit",
        "2",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--use_cpu",
        "--seed",
        "0",
        "--disable_tqdm",
        "true",
        "--cache_dir",
        str(cache_dir),
    ]


@pytest.fixture()
def start():
    """Start a run in the background, its output going to a log file; runs still alive at the end are killed."""
    processes = []

    def start_run(command: list[str], log: Path) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        with open(log, "w") as handle:
            processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT))
        return processes[-1]

    yield start_run
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def checkpoint_steps(output_dir: Path) -> dict[int, Path]:
    return {int(path.name.split("-")[1]): path for path in output_dir.glob("checkpoint-*") if path.is_dir()}


def finished_steps(output_dir: Path) -> list[int]:
    """Steps whose checkpoint was written to the end, judged independently of the library: its
    trainer_state.json parses and records that step, and its weights open as safetensors."""
    steps = []
    for step, path in checkpoint_steps(output_dir).items():
        try:
            state = json.loads((path / "trainer_state.json").read_text())
            with safe_open(str(path / "model.safetensors"), "pt") as weights:
                weights.keys()
        except (OSError, ValueError, SafetensorError):
            continue
        if state["global_step"] == step:
            steps.append(step)
    return sorted(steps)


def wait_for(process: subprocess.Popen, condition, log: Path):
    """Poll `condition()` every millisecond until it returns something truthy; fail if the run ends first."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if process.poll() is not None:
            pytest.fail(f"the run ended (rc={process.returncode}) too early:\n{log.read_text()[-3000:]}")
        time.sleep(0.001)
    process.kill()
    pytest.fail("the run did not get there in time")


def kill_while_saving(process: subprocess.Popen, output_dir: Path, log: Path) -> Path:
    """SIGKILL the run while it writes a checkpoint. As soon as the newest checkpoint folder lacks its
    trainer_state.json, the run is stopped (SIGSTOP) and looked at again: killed if the folder is still
    unfinished, continued otherwise (it finished between the two looks) until the next one. (Older
    folders are skipped: they may be lacking files because the Trainer is deleting them.)"""

    def unfinished(path: Path) -> bool:
        return path.is_dir() and not (path / "trainer_state.json").exists()

    def caught() -> Path | None:
        steps = checkpoint_steps(output_dir)
        newest = steps[max(steps)] if steps else None
        if newest is None or not unfinished(newest):
            return None
        os.kill(process.pid, signal.SIGSTOP)
        if unfinished(newest):
            process.kill()
            process.wait()
            return newest
        os.kill(process.pid, signal.SIGCONT)
        return None

    return wait_for(process, caught, log)


def test_killed_runs_resume_from_the_last_complete_checkpoint(speech_corpus, tiny_teacher, tmp_path, start):
    out, rng = tmp_path / "out", random.Random(0)
    command = train_command(out, speech_corpus.root, tiny_teacher, tmp_path / "cache")

    # 1. Killed while it writes a checkpoint: usually its first, so that nothing complete is left to resume from.
    first_log = tmp_path / "first.log"
    half_written = kill_while_saving(start(command, first_log), out, first_log)
    assert not is_complete_checkpoint(half_written)
    complete_before = finished_steps(out)

    # 2. The same command sets the half-written checkpoint aside and trains again, from the last complete
    # checkpoint if there is one, else afresh; it is killed at a random moment a few steps later.
    second_log = tmp_path / "second.log"
    second = start(command, second_log)
    target = rng.randint(max(complete_before, default=0) + 3, MAX_STEPS - 5)
    wait_for(second, lambda: max(checkpoint_steps(out), default=0) >= target, second_log)
    time.sleep(rng.uniform(0.0, 0.05))
    second.kill()
    second.wait()
    text = second_log.read_text()
    assert f"{half_written} is incomplete" in text
    assert not is_complete_checkpoint(out / INCOMPLETE_CHECKPOINTS_DIR / half_written.name)
    assert (out / INCOMPLETE_CHECKPOINTS_DIR / half_written.name).is_dir()
    if complete_before:
        assert f"resuming training at {out / f'checkpoint-{complete_before[-1]}'}" in text
    else:
        assert "resuming training" not in text

    # 3. The same command again: it resumes from the newest complete checkpoint and finishes.
    resume_step = finished_steps(out)[-1]
    assert resume_step >= target - 1
    third_log = tmp_path / "third.log"
    third = start(command, third_log)
    assert third.wait(timeout=RUN_TIMEOUT_S) == 0, third_log.read_text()[-3000:]
    assert f"resuming training at {out / f'checkpoint-{resume_step}'}" in third_log.read_text()

    # Every step was trained exactly once in the history the final state carries, and the step count is right.
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == MAX_STEPS
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == list(range(1, MAX_STEPS + 1))
    # Only complete checkpoints are left; the unfinished ones, moved aside meanwhile, are gone with the run's end.
    assert sorted(checkpoint_steps(out)) == finished_steps(out) == [MAX_STEPS - 1, MAX_STEPS]
    assert not (out / INCOMPLETE_CHECKPOINTS_DIR).exists()
    assert last_complete_checkpoint(out) == str(out / f"checkpoint-{MAX_STEPS}")
    # Weights are written as safetensors only, in the model folder and in every checkpoint.
    assert not list(out.rglob("pytorch_model*.bin"))
    assert all((path / "model.safetensors").is_file() for path in checkpoint_steps(out).values())
    model = AutoModelForCTC.from_pretrained(out)
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())


def make_checkpoint(path: Path, *, state: str | None = None, weights: bool = True) -> Path:
    """A checkpoint folder as a Trainer writes it (weights, optimizer, scheduler, RNG states, trainer state), or a
    part of one: without its trainer_state.json when `state` is None, without its weights unless `weights`."""
    path.mkdir(parents=True)
    if weights:
        save_file({"lm_head.weight": torch.arange(6.0).reshape(2, 3)}, path / "model.safetensors")
    torch.save({"state": {0: {"exp_avg": torch.ones(3)}}}, path / "optimizer.pt")
    torch.save({"last_epoch": 1}, path / "scheduler.pt")
    torch.save({"python": 1}, path / "rng_state.pth")
    if state is not None:
        (path / "trainer_state.json").write_text(state)
    return path


def test_last_complete_checkpoint_skips_and_sets_aside_unfinished_folders(tmp_path, caplog):
    good = json.dumps({"global_step": 2})
    make_checkpoint(tmp_path / "checkpoint-2", state=good)
    make_checkpoint(tmp_path / "checkpoint-3", state=good, weights=False)  # killed before the weights
    make_checkpoint(tmp_path / "checkpoint-4", state='{"global_step": 4, "log_hi')  # killed mid-state
    make_checkpoint(tmp_path / "checkpoint-10", state=None)  # killed before the state
    make_checkpoint(tmp_path / "checkpoint-1", state=good)
    (tmp_path / "checkpoint-11").write_text("a file, not a checkpoint")
    make_checkpoint(tmp_path / "checkpoint-best", state=good)
    make_checkpoint(tmp_path / INCOMPLETE_CHECKPOINTS_DIR / "checkpoint-10", state="earlier kill")

    assert last_complete_checkpoint(tmp_path, set_aside_incomplete=False) == str(tmp_path / "checkpoint-2")
    assert (tmp_path / "checkpoint-10").is_dir()  # left in place when told so
    with caplog.at_level(logging.WARNING, logger="modeling_tot_cakt.training.trainer"):
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == [
        "checkpoint-1",
        "checkpoint-11",
        "checkpoint-2",
        "checkpoint-best",
    ]
    assert sorted(path.name for path in (tmp_path / INCOMPLETE_CHECKPOINTS_DIR).iterdir()) == [
        "checkpoint-10",
        "checkpoint-3",
        "checkpoint-4",
    ]
    assert not (tmp_path / INCOMPLETE_CHECKPOINTS_DIR / "checkpoint-10" / "trainer_state.json").exists()  # replaced
    assert caplog.text.count("is incomplete or damaged, it is not resumed from") == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    assert last_complete_checkpoint(empty) is None


def test_an_unfinished_checkpoint_given_to_resume_from_is_refused(speech_corpus, tmp_path):
    half_written = make_checkpoint(tmp_path / "checkpoint-7", state=None)
    with pytest.raises(ValueError, match="checkpoint-7 is not a complete checkpoint"):
        run_training(
            "--output_dir",
            tmp_path / "out",
            "--dataset_name",
            speech_corpus.root,
            "--do_train",
            "--resume_from_checkpoint",
            half_written,
        )


def test_a_checkpoint_with_a_cut_off_optimizer_given_to_resume_from_is_refused_naming_the_file(
    speech_corpus, tmp_path
):
    checkpoint = make_checkpoint(tmp_path / "checkpoint-7", state=json.dumps({"global_step": 7}))
    write_file_manifest(checkpoint)
    cut_off(checkpoint / "optimizer.pt")
    with pytest.raises(
        ValueError, match=rf"checkpoint-7 is not a complete checkpoint: {checkpoint / 'optimizer.pt'} has "
    ):
        run_training(
            "--output_dir", tmp_path / "out", "--dataset_name", speech_corpus.root, "--do_train",
            "--resume_from_checkpoint", checkpoint,
        )  # fmt: skip


def test_nonfinite_gradients_with_a_finite_loss_skip_the_update(tmp_path, caplog):
    model = make_model(alignment="none")
    processor = make_processor(tmp_path, model)
    rng = np.random.default_rng(0)
    row = {"labels": processor.tokenizer("你好").input_ids, "input_length": 4000, "text": "你好"}
    rows = [{**row, "input_values": rng.standard_normal(4000).astype(np.float32)} for _ in range(2)]
    # An overflow in the backward pass: one gradient turns NaN while the loss stays finite.
    model.lm_head.bias.register_hook(lambda gradient: gradient * float("nan"))
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    trainer = one_step_trainer(model, processor, rows, tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="modeling_tot_cakt.training.trainer"):
        trainer.train()
    (log,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert math.isfinite(log["loss"]) and trainer.nonfinite_loss_batches == 0
    assert "Non-finite gradients with a finite loss at step 0" in caplog.text
    assert trainer.gradient_guard.skipped_steps == 1 and log["nonfinite_grad_steps"] == 1
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter, before[name], msg=name)


RESUME_STEPS = 15  # 24 clips in batches of 4: 6 steps an epoch, so the run ends in its third epoch
KILL_AFTER = 8  # a checkpoint in the middle of the second epoch


def logged_losses(output_dir: Path) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def printed_training_steps(log: Path) -> int:
    """The optimizer steps one process made: with --logging_steps 1, one printed training log each."""
    return sum(line.startswith("{") and "'loss'" in line for line in log.read_text().splitlines())


def test_a_killed_run_resumes_exactly_where_the_uninterrupted_run_went_on(
    speech_corpus, tiny_teacher, tmp_path, start
):
    """With the default group_by_length sampling, a run killed mid-epoch and run again makes exactly the
    missing optimizer steps, on the same batches: its per-step losses and final weights are those of a run
    that was never interrupted."""

    def command(out: Path) -> list[str]:
        base = train_command(out, speech_corpus.root, tiny_teacher, tmp_path / "cache")
        base[base.index("--max_steps") + 1] = str(RESUME_STEPS)
        base[base.index("--save_steps") + 1] = "4"
        return base

    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    reference_log = tmp_path / "reference.log"
    assert start(command(reference), reference_log).wait(timeout=RUN_TIMEOUT_S) == 0, reference_log.read_text()
    assert printed_training_steps(reference_log) == RESUME_STEPS

    first = start(command(interrupted), tmp_path / "first.log")
    wait_for(first, lambda: KILL_AFTER in finished_steps(interrupted), tmp_path / "first.log")
    first.kill()
    first.wait()
    resumed_log = tmp_path / "resumed.log"
    assert start(command(interrupted), resumed_log).wait(timeout=RUN_TIMEOUT_S) == 0, resumed_log.read_text()
    assert f"resuming training at {interrupted / f'checkpoint-{KILL_AFTER}'}" in resumed_log.read_text()
    assert printed_training_steps(resumed_log) == RESUME_STEPS - KILL_AFTER

    expected, got = logged_losses(reference), logged_losses(interrupted)
    assert list(got) == list(range(1, RESUME_STEPS + 1))
    assert got == pytest.approx(expected, rel=1e-6, abs=0)
    with (
        safe_open(str(reference / "model.safetensors"), "pt") as a,
        safe_open(str(interrupted / "model.safetensors"), "pt") as b,
    ):
        names = sorted(a.keys())
        assert names == sorted(b.keys())
        for name in names:
            torch.testing.assert_close(b.get_tensor(name), a.get_tensor(name), rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize(("older", "newer"), [(9, 10), (99, 100)])
def test_the_last_complete_checkpoint_is_the_highest_step_not_the_last_name(tmp_path, older, newer):
    good = json.dumps({"global_step": 1})
    make_checkpoint(tmp_path / f"checkpoint-{older}", state=good)
    make_checkpoint(tmp_path / f"checkpoint-{newer}", state=good)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / f"checkpoint-{newer}")
    shutil.rmtree(tmp_path / f"checkpoint-{newer}")
    make_checkpoint(tmp_path / f"checkpoint-{newer}", state=None)  # killed while saving it
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / f"checkpoint-{older}")


def write_manifest(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("audio,text\n" + "".join(f"{audio},{text}\n" for audio, text in rows), encoding="utf-8")
    return path


def test_resuming_keeps_the_checkpoints_vocabulary_when_the_transcripts_change(
    speech_corpus, tiny_teacher, tmp_path, caplog
):
    wavs = sorted(str(path) for path in (speech_corpus.root / "train").glob("*.wav"))
    first = write_manifest(tmp_path / "first.csv", [(wav, text) for wav, text in zip(wavs, speech_corpus.train_texts)])
    # The new transcripts drop the first character and bring a new one: a vocabulary rebuilt from them
    # would give most characters other ids.
    dropped = min("".join(speech_corpus.train_texts))
    changed = write_manifest(
        tmp_path / "changed.csv",
        [(wav, text.replace(dropped, "天")) for wav, text in zip(wavs, speech_corpus.train_texts)],
    )
    out = tmp_path / "out"
    args = [*common_args(out, tiny_teacher, tmp_path / "cache"), "--alignment", "none", "--do_train"]
    run_training(*args, "--train_manifest", first, "--max_steps", 2, "--save_steps", 2)
    vocabulary = (out / "checkpoint-2" / "vocab.json").read_text(encoding="utf-8")
    assert dropped in json.loads(vocabulary)

    # Resumed in the same folder, or from the checkpoint into a new one: the checkpoint's vocabulary.
    with caplog.at_level(logging.WARNING):
        run_training(*args, "--train_manifest", changed, "--max_steps", 3)
    assert json.loads((out / "vocab.json").read_text(encoding="utf-8")) == json.loads(vocabulary)
    assert "out of vocabulary, 1 distinct: 天" in caplog.text
    elsewhere = tmp_path / "elsewhere"
    other_args = [*common_args(elsewhere, tiny_teacher, tmp_path / "cache"), "--alignment", "none", "--do_train"]
    run_training(
        *other_args, "--train_manifest", changed, "--max_steps", 3, "--resume_from_checkpoint", out / "checkpoint-2"
    )
    assert json.loads((elsewhere / "vocab.json").read_text(encoding="utf-8")) == json.loads(vocabulary)
    assert train_state_steps(elsewhere) == [1, 2, 3]


def train_state_steps(output_dir: Path) -> list[int]:
    return sorted(logged_losses(output_dir))


LOCK_HOLDER = """
import sys, time
from modeling_tot_cakt.training.output_lock import lock_output_dir
with lock_output_dir(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_run_on_the_same_output_dir_is_refused_and_a_dead_runs_lock_is_not(speech_corpus, tmp_path, start):
    out = tmp_path / "out"
    arguments = ["--output_dir", out, "--dataset_name", speech_corpus.root, "--do_train", "--preprocessing_only"]
    arguments += ["--encoder_config", json.dumps(TRAINING_ENCODER), "--alignment", "none", "--use_cpu"]
    holder_log = tmp_path / "holder.log"
    holder = start([sys.executable, "-c", LOCK_HOLDER, str(out)], holder_log)
    wait_for(holder, lambda: "locked" in holder_log.read_text(), holder_log)
    with pytest.raises(OutputDirectoryLockedError, match=rf"Another training run \(pid {holder.pid} on .*\) is using"):
        run_training(*arguments)
    assert sorted(path.name for path in out.iterdir()) == [LOCK_FILE]  # nothing else was touched

    holder.kill()  # SIGKILL: the lock file stays, with the dead process's pid in it
    holder.wait()
    assert str(holder.pid) in (out / LOCK_FILE).read_text()
    run_training(*arguments)
    assert (out / "vocab.json").is_file()


def test_a_leftover_temporary_vocabulary_does_not_stop_a_rerun(speech_corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "vocab.json.4242.tmp").write_text('{"[PAD]": 0, "[UN')  # a run killed while writing it
    run_training(
        "--output_dir",
        out,
        "--dataset_name",
        speech_corpus.root,
        "--do_train",
        "--preprocessing_only",
        "--encoder_config",
        json.dumps(TRAINING_ENCODER),
        "--alignment",
        "none",
        "--use_cpu",
    )
    assert not (out / "vocab.json.4242.tmp").exists()
    assert set(json.loads((out / "vocab.json").read_text(encoding="utf-8"))) >= set("".join(speech_corpus.train_texts))


def test_the_length_grouped_order_is_a_function_of_seed_and_epoch_only():
    lengths = [int(length) for length in np.random.default_rng(0).integers(1000, 9000, size=50)]
    sampler = EpochSeededLengthGroupedSampler(8, lengths, seed=3)
    torch.manual_seed(0)
    first = list(sampler)
    torch.manual_seed(1)  # the global RNG, which the stock sampler draws from, plays no part
    assert list(sampler) == first
    reference = get_length_grouped_indices(lengths, 8, generator=torch.Generator().manual_seed(3))
    assert first == reference and sorted(first) == list(range(50))
    sampler.set_epoch(1)
    second_epoch = list(sampler)
    assert second_epoch != first and second_epoch == list(EpochSeededLengthGroupedSampler(8, lengths, seed=4))


def test_running_a_finished_command_again_trains_no_further(speech_corpus, tiny_teacher, tmp_path, caplog):
    """transformers' Trainer resumed at --max_steps within an epoch trains one step more; train_hf.py does not."""
    out = tmp_path / "out"
    args = [*common_args(out, tiny_teacher, tmp_path / "cache"), "--dataset_name", speech_corpus.root]
    args += ["--alignment", "none", "--do_train", "--max_steps", 3, "--save_steps", 3]
    run_training(*args)
    weights = load_file(out / "model.safetensors")
    with caplog.at_level(logging.INFO):
        run_training(*args)
    assert sorted(logged_losses(out)) == [1, 2, 3] and not (out / "checkpoint-4").exists()
    assert f"{out / 'checkpoint-3'} holds step 3: training is finished" in caplog.text
    for name, tensor in load_file(out / "model.safetensors").items():
        torch.testing.assert_close(tensor, weights[name], rtol=0, atol=0, msg=name)


def cut_off(path: Path, keep: float = 0.5) -> None:
    """Keep the first `keep` share of a file's bytes, as a kill or a full disk in the middle of writing it does."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


CHECKPOINT_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "model.safetensors", "trainer_state.json")


@pytest.mark.parametrize("manifest", [True, False], ids=["with-manifest", "earlier-version"])
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_checkpoint_with_a_file_cut_off_is_not_resumed_from(tmp_path, caplog, name, manifest):
    """Every file of a checkpoint must be whole: a cut-off optimizer.pt, scheduler, RNG state, weights or state sends
    the resume to the previous checkpoint, with a warning naming the file; with or without the manifest that
    TOTCAKTTrainer writes last (checkpoints of earlier versions have none)."""
    state = json.dumps({"global_step": 1, "log_history": [{"loss": 1.0, "step": 1}] * 20})
    for step in (1, 2):
        make_checkpoint(tmp_path / f"checkpoint-{step}", state=state)
        if manifest:
            write_file_manifest(tmp_path / f"checkpoint-{step}")
    newest = tmp_path / "checkpoint-2"
    assert checkpoint_problem(newest) is None
    cut_off(newest / name)
    assert str(newest / name) in checkpoint_problem(newest)
    with caplog.at_level(logging.WARNING, logger="modeling_tot_cakt.training.trainer"):
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-1")
    assert f"{newest} is incomplete or damaged, it is not resumed from: {newest / name}" in caplog.text
    assert (tmp_path / INCOMPLETE_CHECKPOINTS_DIR / "checkpoint-2" / name).is_file()


def test_a_file_missing_from_a_checkpoint_its_manifest_lists_makes_it_incomplete(tmp_path):
    """transformers resumes without an optimizer state when optimizer.pt is missing: the manifest says it was written."""
    checkpoint = make_checkpoint(tmp_path / "checkpoint-1", state=json.dumps({"global_step": 1}))
    write_file_manifest(checkpoint)
    assert json.loads((checkpoint / FILE_MANIFEST).read_text())["files"]["optimizer.pt"] > 0
    (checkpoint / "optimizer.pt").unlink()
    problem = checkpoint_problem(checkpoint)
    assert problem.startswith(f"{checkpoint / 'optimizer.pt'} is missing (the save recorded it with ")
    (checkpoint / "optimizer.pt").write_bytes(b"")
    assert f"{checkpoint / 'optimizer.pt'} has 0 bytes but" in checkpoint_problem(checkpoint)


def resume_args(out: Path, corpus: Path, teacher: Path, cache: Path, max_steps: int) -> list:
    args = [*common_args(out, teacher, cache), "--dataset_name", corpus, "--alignment", "none", "--do_train"]
    return [*args, "--max_steps", max_steps, "--save_steps", 1]


def test_a_truncated_optimizer_state_sends_the_rerun_to_the_previous_checkpoint(
    speech_corpus, tiny_teacher, tmp_path, caplog
):
    out = tmp_path / "out"
    run_training(*resume_args(out, speech_corpus.root, tiny_teacher, tmp_path / "cache", 3))
    for step in (1, 2, 3):  # every checkpoint lists its files, each with its size
        listed = json.loads((out / f"checkpoint-{step}" / FILE_MANIFEST).read_text())["files"]
        assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "model.safetensors", "trainer_state.json"} <= set(
            listed
        )
        assert listed == {
            path.name: path.stat().st_size
            for path in (out / f"checkpoint-{step}").iterdir()
            if path.name != FILE_MANIFEST
        }
    cut_off(out / "checkpoint-3" / "optimizer.pt")
    with caplog.at_level(logging.INFO):
        run_training(*resume_args(out, speech_corpus.root, tiny_teacher, tmp_path / "cache", 4))
    assert f"{out / 'checkpoint-3'} is incomplete or damaged, it is not resumed from: {out / 'checkpoint-3'}" in (
        caplog.text
    )
    assert "optimizer.pt" in caplog.text and f"resuming training at {out / 'checkpoint-2'}" in caplog.text
    assert train_state_steps(out) == [1, 2, 3, 4]  # steps 3 and 4 trained again from checkpoint-2
    assert checkpoint_problem(out / "checkpoint-4") is None


def test_a_kill_during_the_final_save_is_completed_by_the_rerun(speech_corpus, tiny_teacher, tmp_path, monkeypatch):
    """The final model, trainer state and train metrics are staged and moved together: killed while moving them,
    output_dir never holds the new weights without the state and metrics, and the same command run again moves
    the rest, with the train metrics (run time included) of the run that trained."""
    out = tmp_path / "out"
    args = resume_args(out, speech_corpus.root, tiny_teacher, tmp_path / "cache", 3)
    moved, replace = [], os.replace

    def killed_while_moving(source, target):
        if Path(source).parent.name == FINAL_SAVE_DIR and Path(target).parent.name != FINAL_SAVE_DIR:
            if len(moved) == 2:
                raise KeyboardInterrupt  # stands for SIGKILL: nothing after this line runs
            moved.append(Path(target).name)
        replace(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", killed_while_moving)
        with pytest.raises(KeyboardInterrupt):
            run_training(*args)
    assert moved == ["all_results.json", "train_results.json"]  # state and metrics go first, weights last
    assert not (out / "model.safetensors").exists() and (out / FINAL_SAVE_DIR / "model.safetensors").is_file()
    staged_metrics = json.loads((out / "train_results.json").read_text())
    assert staged_metrics["train_samples"] == 24 and "train_runtime" in staged_metrics

    run_training(*args)
    assert not (out / FINAL_SAVE_DIR).exists()
    assert json.loads((out / "train_results.json").read_text()) == staged_metrics
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    final = load_file(out / "model.safetensors")
    for name, tensor in load_file(out / "checkpoint-3" / "model.safetensors").items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=0, msg=name)


def test_weights_left_without_state_and_metrics_are_completed_by_the_rerun(
    speech_corpus, tiny_teacher, tmp_path, caplog
):
    """A run killed after its last checkpoint and before its train metrics were saved (as earlier versions left
    it: the weights without trainer_state.json, train_results.json, all_results.json): the rerun writes them,
    the metrics recovered from the trainer state and said to be."""
    out = tmp_path / "out"
    args = resume_args(out, speech_corpus.root, tiny_teacher, tmp_path / "cache", 3)
    run_training(*args)
    complete = json.loads((out / "train_results.json").read_text())
    for name in ("trainer_state.json", "train_results.json", "all_results.json"):
        (out / name).unlink()
    with caplog.at_level(logging.WARNING):
        run_training(*args)
    assert "was stopped before it saved its train metrics" in caplog.text
    recovered = json.loads((out / "train_results.json").read_text())
    losses = logged_losses(out)
    assert sorted(losses) == [1, 2, 3]
    assert recovered["train_loss"] == pytest.approx(sum(losses.values()) / 3, rel=1e-9)
    assert recovered["train_loss"] == pytest.approx(complete["train_loss"], abs=1e-4)  # logged losses are rounded
    assert set(recovered) == {"epoch", "train_loss", "train_samples"}  # the run time is lost with the killed run
    assert (recovered["epoch"], recovered["train_samples"]) == (complete["epoch"], complete["train_samples"])
    assert json.loads((out / "all_results.json").read_text()) == recovered


def test_running_a_finished_command_again_keeps_the_best_model(speech_corpus, tiny_teacher, tmp_path):
    """With --load_best_model_at_end the saved model is the best checkpoint's; the same command run again (training
    finished) saves that model again, not the last checkpoint's weights."""
    out = tmp_path / "out"
    args = [*common_args(out, tiny_teacher, tmp_path / "cache"), "--dataset_name", speech_corpus.root]
    args += ["--alignment", "none", "--do_train", "--do_eval", "--eval_split_name", "test", "--max_steps", 3]
    args += ["--eval_strategy", "steps", "--eval_steps", 1, "--save_steps", 1, "--load_best_model_at_end"]
    # The highest evaluation loss as "best": the first checkpoint, as the loss goes down.
    args += ["--metric_for_best_model", "loss", "--greater_is_better", "true"]
    run_training(*args)
    best = json.loads((out / "trainer_state.json").read_text())["best_model_checkpoint"]
    assert best is not None and Path(best).name != "checkpoint-3"  # the test needs a best model other than the last
    saved = load_file(out / "model.safetensors")
    run_training(*args)
    for name, tensor in load_file(Path(best) / "model.safetensors").items():
        torch.testing.assert_close(load_file(out / "model.safetensors")[name], tensor, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0, msg=name)
