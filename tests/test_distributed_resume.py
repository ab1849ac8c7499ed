"""A two-process data-parallel run (gloo on CPU, through `accelerate launch`) killed mid-epoch and run again
goes on exactly as the run that was never interrupted. Under DDP the Trainer skips the trained batches through
a wrapper that accelerate's `set_epoch` does not reach: the epoch-seeded sampler must still get its epoch."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import TRAINING_ENCODER
from safetensors.torch import load_file
from test_faults import finished_steps, logged_losses, printed_training_steps

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 11  # 24 clips, 2 per process and step: 6 steps an epoch
KILL_AFTER = 8  # the second epoch's third step
TIMEOUT_S = 300


def ddp_command(output_dir: Path, corpus: Path, teacher: Path) -> list[str]:
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    return [
        *(accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"),
        *("--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29531"),
        *(str(ROOT / "train_hf.py"), "--use_cpu", "--dataset_name", str(corpus)),
        *("--encoder_config", json.dumps(TRAINING_ENCODER), "--teacher_name_or_path", str(teacher)),
        *("--adapter_hidden_size", "16", "--output_dir", str(output_dir), "--do_train"),
        *("--max_steps", str(MAX_STEPS), "--per_device_train_batch_size", "2", "--save_steps", "4"),
        *("--logging_steps", "1", "--learning_rate", "5e-3", "--report_to", "none", "--disable_tqdm", "true"),
        *("--seed", "0", "--ddp_find_unused_parameters", "false"),
    ]


def signal_all(processes: list[psutil.Process], signal_number: int) -> None:
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal_number)


def test_a_killed_ddp_run_resumes_exactly_where_the_uninterrupted_run_went_on(speech_corpus, tiny_teacher, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"

    def run(output_dir: Path, log: Path) -> None:
        with open(log, "w") as handle:
            code = subprocess.run(
                ddp_command(output_dir, speech_corpus.root, tiny_teacher),
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                timeout=TIMEOUT_S,
            ).returncode
        assert code == 0, log.read_text()[-4000:]

    run(reference, tmp_path / "reference.log")
    with open(tmp_path / "killed.log", "w") as handle:
        launcher = subprocess.Popen(
            ddp_command(interrupted, speech_corpus.root, tiny_teacher),
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    try:
        # The workers run in sessions of their own: the whole process tree is stopped as soon as checkpoint-8
        # starts to appear, killed once its trainer_state.json is written to the end, continued otherwise.
        deadline, state = time.monotonic() + TIMEOUT_S, interrupted / f"checkpoint-{KILL_AFTER}" / "trainer_state.json"
        while True:
            assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
            if state.exists():
                processes = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
                signal_all(processes, signal.SIGSTOP)
                if KILL_AFTER in finished_steps(interrupted):
                    signal_all(processes, signal.SIGKILL)
                    break
                signal_all(processes, signal.SIGCONT)
            time.sleep(0.002)
    finally:
        launcher.kill()
        launcher.wait()
    resumed_log = tmp_path / "resumed.log"
    run(interrupted, resumed_log)
    assert f"resuming training at {interrupted / f'checkpoint-{KILL_AFTER}'}" in resumed_log.read_text()
    assert printed_training_steps(resumed_log) == MAX_STEPS - KILL_AFTER

    assert list(logged_losses(interrupted)) == list(range(1, MAX_STEPS + 1))
    assert logged_losses(interrupted) == pytest.approx(logged_losses(reference), rel=1e-6, abs=0)
    weights, reference_weights = (
        load_file(interrupted / "model.safetensors"),
        load_file(reference / "model.safetensors"),
    )
    assert weights.keys() == reference_weights.keys()
    for name, tensor in reference_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
