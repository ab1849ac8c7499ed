"""Two-process data-parallel training on CPU through `accelerate launch`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import TRAINING_ENCODER

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_ddp_with_the_frozen_teacher_and_transport_losses(speech_corpus, tiny_teacher, tmp_path):
    out = tmp_path / "out"
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    # accelerate's `--cpu` launcher starts a single process unless MPI is set up; its torchrun-based
    # launcher (`--multi_gpu`) plus the script's `--use_cpu` gives gloo DDP on CPU.
    command = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "train_hf.py"),
        "--use_cpu",
        "--dataset_name",
        speech_corpus.root,
        "--eval_split_name",
        "test",
        "--encoder_config",
        json.dumps(TRAINING_ENCODER),
        "--teacher_name_or_path",
        tiny_teacher,
        "--adapter_hidden_size",
        "16",
        "--output_dir",
        out,
        "--do_train",
        "--do_eval",
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "2",
        "--per_device_eval_batch_size",
        "2",
        "--logging_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--cache_dir",
        tmp_path / "cache",
        # Every trainable parameter must get a gradient in every step (the teacher is not a
        # parameter of the model); DDP would stop with an error otherwise.
        "--ddp_find_unused_parameters",
        "false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([str(part) for part in command], env=env, capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    output = result.stdout + result.stderr
    assert "Process rank: 0" in output and "Process rank: 1" in output and "distributed: True" in output

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    train_logs = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(train_logs) == 2 and all({"ctc_loss", "ot_loss", "align_loss"} <= entry.keys() for entry in train_logs)
    eval_results = json.loads((out / "eval_results.json").read_text())
    assert eval_results["eval_samples"] == 6 and {"eval_cer", "eval_ot_loss", "eval_align_loss"} <= eval_results.keys()
    # 24 utterances, 2 per process per step: one step sees 4 utterances, so 4 steps are 2/3 of an epoch.
    assert abs(state["epoch"] - 4 / 6) < 1e-6
    assert (out / "model.safetensors").is_file() and (out / "modeling_tot_cakt.py").is_file()
