"""End-to-end runs of train_hf.py (in-process, tiny encoder and teacher, generated audio) and the
Trainer's own behaviour (loss components, non-finite losses)."""

import importlib.util
import json
import logging
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from conftest import TRAINING_ENCODER
from datasets import Dataset
from huggingface_hub import metadata_load
from tiny_models import TINY_WAV2VEC2, TINY_WAV2VEC2_BERT, make_model, make_processor, one_step_trainer
from transformers import (
    AutoModelForCTC,
    AutoProcessor,
    HfArgumentParser,
    SeamlessM4TFeatureExtractor,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
)

from modeling_tot_cakt import TOTCAKTConfig, TOTCAKTFeatureExtractor, TOTCAKTLogMelFeatureExtractor
from modeling_tot_cakt.training.model_card import public_config
from modeling_tot_cakt.training.trainer import build_model, parse_encoder_config

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_hf", ROOT / "train_hf.py")
train_hf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_hf)


def run_training(*args):
    with mock.patch.object(sys, "argv", ["train_hf.py", *map(str, args)]):
        return train_hf.main()


def common_args(output_dir, teacher, cache_dir, encoder=TRAINING_ENCODER):
    return [
        "--output_dir",
        output_dir,
        "--encoder_config",
        json.dumps(encoder),
        "--teacher_name_or_path",
        teacher,
        "--adapter_hidden_size",
        16,
        "--per_device_train_batch_size",
        4,
        "--per_device_eval_batch_size",
        8,
        "--learning_rate",
        "5e-3",
        "--logging_steps",
        1,
        "--report_to",
        "none",
        "--use_cpu",
        "--seed",
        0,
        "--disable_tqdm",
        "true",
        "--cache_dir",
        cache_dir,
    ]


def train_logs(output_dir):
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return state, [entry for entry in state["log_history"] if "loss" in entry]


def test_training_run_learns_evaluates_and_saves_a_pipeline_ready_model(speech_corpus, tiny_teacher, tmp_path):
    out = tmp_path / "out"
    results = run_training(
        *common_args(out, tiny_teacher, tmp_path / "cache"),
        "--dataset_name",
        speech_corpus.root,
        "--eval_split_name",
        "test",
        "--do_train",
        "--do_eval",
        "--max_steps",
        16,
        "--eval_strategy",
        "steps",
        "--eval_steps",
        8,
        "--save_steps",
        8,
        "--load_best_model_at_end",
        "--report_to",
        "tensorboard",
    )
    state, logs = train_logs(out)
    assert state["global_step"] == 16
    # The loss goes down, and its components are logged next to it.
    first, last = np.mean([e["loss"] for e in logs[:3]]), np.mean([e["loss"] for e in logs[-3:]])
    assert last < 0.5 * first
    for entry in logs:
        assert {"ctc_loss", "ot_loss", "align_loss"} <= entry.keys()
        weighted = entry["ctc_loss"] + 0.1 * entry["ot_loss"] + 0.3 * entry["align_loss"]  # the config's weights
        assert entry["loss"] == pytest.approx(weighted, rel=1e-4)
        # The solver's diagnostics are logged too: converged plans (tot_tol 1e-4) within the default budget; the
        # error is measured on the returned plan, which may differ from the tested one by float32 rounding.
        assert entry["solver_marginal_error"] < 1e-4 + 1e-6 and 1 <= entry["solver_iterations"] <= 1000
    evals = [entry for entry in state["log_history"] if "eval_cer" in entry]
    assert len(evals) == 2 and all({"eval_ctc_loss", "eval_ot_loss", "eval_align_loss"} <= e.keys() for e in evals)
    # The best checkpoint is chosen by CER.
    assert state["best_metric"] == min(e["eval_cer"] for e in evals)
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{min(evals, key=lambda e: e['eval_cer'])['step']}")

    eval_results = json.loads((out / "eval_results.json").read_text())
    assert eval_results["eval_cer"] == results["eval"]["eval_cer"] and eval_results["eval_samples"] == 6
    assert {"eval_ctc_loss", "eval_ot_loss", "eval_align_loss"} <= eval_results.keys()
    assert json.loads((out / "train_results.json").read_text())["train_samples"] == 24

    # TensorBoard gets the separate losses for training and evaluation.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = (out / "runs").iterdir()  # TensorBoard's default: output_dir/runs/<date>_<host>
    events = EventAccumulator(str(run_dir)).Reload()
    assert {"train/ctc_loss", "train/ot_loss", "train/align_loss", "eval/ctc_loss", "eval/cer"} <= set(
        events.Tags()["scalars"]
    )

    # The saved folder is a self-contained model: remote code, weights, processor, card.
    code = ("configuration_tot_cakt.py", "feature_extraction_tot_cakt.py", "modeling_tot_cakt.py", "tot.py")
    for name in (*code, "vocab.json", "README.md"):
        assert (out / name).is_file(), name
    model = AutoModelForCTC.from_pretrained(out, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor.feature_extractor) is TOTCAKTFeatureExtractor  # it takes integer PCM too
    waveform, rate = sf.read(speech_corpus.root / "test" / "utt000.wav", dtype="float32")
    inputs = processor(waveform, sampling_rate=rate, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == len(processor.tokenizer) and model.teacher is None
    card = metadata_load(out / "README.md")
    assert card["model-index"][0]["results"][0]["metrics"][0]["value"] == results["eval"]["eval_cer"]
    # The card names the local teacher by its folder: the training machine's paths are not published.
    card_text = (out / "README.md").read_text(encoding="utf-8")
    assert f"`{tiny_teacher.name}` (a local model)" in card_text and str(tiny_teacher) not in card_text
    # So does the config.json --push_to_hub uploads; the local one keeps the path, for attach_teacher().
    assert json.loads((out / "config.json").read_text())["teacher_name_or_path"] == str(tiny_teacher)
    assert json.loads(public_config(out))["teacher_name_or_path"] == tiny_teacher.name

    # A saved model is a starting point: its vocabulary and weights carry over.
    more = tmp_path / "more"
    run_training(
        "--model_name_or_path",
        out,
        "--output_dir",
        more,
        "--dataset_name",
        speech_corpus.root,
        "--do_train",
        "--max_steps",
        1,
        "--per_device_train_batch_size",
        4,
        "--learning_rate",
        "1e-4",
        "--logging_steps",
        1,
        "--report_to",
        "none",
        "--use_cpu",
        "--cache_dir",
        tmp_path / "cache",
    )
    assert (more / "vocab.json").read_text() == (out / "vocab.json").read_text()
    assert train_logs(more)[1][0]["loss"] < logs[0]["loss"]


def test_resume_continues_from_the_last_checkpoint(aishell_corpus, tiny_teacher, tmp_path, caplog):
    out = tmp_path / "out"
    args = [
        *common_args(out, tiny_teacher, tmp_path / "cache"),
        "--aishell_dir",
        aishell_corpus.root,
        "--do_train",
        "--alignment",
        "ot",
        "--save_steps",
        3,
        "--activation_checkpointing",
        "--max_train_samples",
        5,
    ]
    run_training(*args, "--max_steps", 3)
    assert (out / "checkpoint-3").is_dir()
    with caplog.at_level(logging.INFO):
        results = run_training(*args, "--max_steps", 6, "--do_predict")
    assert f"resuming training at {out / 'checkpoint-3'}" in caplog.text
    state, logs = train_logs(out)
    assert state["global_step"] == 6
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4, 5, 6]  # steps 1-3 were not trained again
    assert json.loads((out / "config.json").read_text())["alignment"] == "ot"
    assert json.loads((out / "train_results.json").read_text())["train_samples"] == 5
    # --do_predict scores AISHELL-1's test split.
    test_results = json.loads((out / "test_results.json").read_text())
    assert test_results["test_samples"] == 3 and test_results["test_cer"] == results["test"]["test_cer"]
    (result,) = metadata_load(out / "README.md")["model-index"][0]["results"]
    assert result["dataset"] == {"name": "AISHELL-1", "type": "aishell-1", "split": "test"}


def test_log_mel_encoder_cached_teacher_features_and_bad_rows(
    speech_corpus, bad_rows_manifest, tiny_teacher, tmp_path, caplog
):
    out, teacher_cache = tmp_path / "out", tmp_path / "teacher_cache"
    with (
        caplog.at_level(logging.WARNING, logger="modeling_tot_cakt"),
        mock.patch("modeling_tot_cakt.training.model_card.HfApi") as api_class,
    ):
        api_class.return_value.create_repo.return_value = SimpleNamespace(repo_id="someone/tiny")
        results = run_training(
            *common_args(out, tiny_teacher, tmp_path / "cache", encoder=TINY_WAV2VEC2_BERT),
            "--train_manifest",
            bad_rows_manifest,
            "--eval_manifest",
            speech_corpus.eval_manifest,
            "--do_train",
            "--do_eval",
            "--max_steps",
            2,
            "--per_device_train_batch_size",
            1,
            "--cache_teacher_features",
            "--teacher_cache_dir",
            teacher_cache,
            "--push_to_hub",
            "--hub_model_id",
            "someone/tiny",
            "--hub_token",
            "hf_test",
            # SpecAugment of the Wav2Vec2-BERT (log-mel) encoder, set from the command line.
            "--mask_time_prob",
            0.05,
            "--mask_time_length",
            2,
        )
    assert "train: skipped 5 of 6 rows" in caplog.text
    assert math.isfinite(results["eval"]["eval_align_loss"])
    # One cached feature file per distinct usable transcript of both splits.
    texts = {"你好"} | set(speech_corpus.eval_texts)  # the two bad transcripts are not cached
    assert len(list(teacher_cache.rglob("*.safetensors"))) == len(texts)
    # The upload goes through HfApi in one commit, with the rendered card and the log-mel feature extractor's code.
    api = api_class.return_value
    api.create_repo.assert_called_once_with("someone/tiny", private=None, exist_ok=True, repo_type="model")
    (repo_id, operations), _ = api.create_commit.call_args
    uploaded = {operation.path_in_repo: operation.path_or_fileobj for operation in operations}
    assert repo_id == "someone/tiny" and uploaded["README.md"] == str(out / "README.md")
    assert {"model.safetensors", "processor_config.json", "feature_extraction_tot_cakt.py"} <= uploaded.keys()
    assert json.loads(uploaded["config.json"])["teacher_name_or_path"] == tiny_teacher.name
    assert metadata_load(out / "README.md")["tags"][:3] == ["automatic-speech-recognition", "ctc", "tot-cakt"]
    encoder_config = json.loads((out / "config.json").read_text())["encoder_config"]
    assert (encoder_config["model_type"], encoder_config["mask_time_prob"]) == ("wav2vec2-bert", 0.05)
    processor_config = json.loads((out / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "Wav2Vec2BertProcessor"
    assert processor_config["feature_extractor"]["feature_extractor_type"] == "TOTCAKTLogMelFeatureExtractor"


def test_yaml_arguments_streaming_and_gradient_accumulation(speech_corpus, tiny_teacher, tmp_path):
    out = tmp_path / "out"
    arguments = {
        "output_dir": str(out),
        "encoder_config": json.dumps(TRAINING_ENCODER),
        "teacher_name_or_path": str(tiny_teacher),
        "alignment": "none",
        "train_manifest": str(speech_corpus.train_manifest),
        "streaming": True,
        "do_train": True,
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "logging_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "cache_dir": str(tmp_path / "cache"),
    }
    config_file = tmp_path / "args.yaml"
    config_file.write_text(yaml.safe_dump(arguments), encoding="utf-8")
    run_training(config_file)
    state, logs = train_logs(out)
    assert state["global_step"] == 2
    for entry in logs:
        # With alignment "none" the loss is the CTC loss: averaged, not summed, over accumulated batches.
        assert entry["loss"] == pytest.approx(entry["ctc_loss"], rel=1e-4) and "ot_loss" not in entry


def test_build_model_from_a_pretrained_encoder_or_a_saved_model(tiny_teacher, tmp_path):
    encoder = Wav2Vec2Model(Wav2Vec2Config(**{k: v for k, v in TINY_WAV2VEC2.items() if k != "model_type"}))
    encoder.save_pretrained(tmp_path / "encoder")
    model = build_model(
        vocab_size=9,
        pad_token_id=0,
        encoder_name_or_path=str(tmp_path / "encoder"),
        encoder_overrides={"mask_time_prob": 0.3, "layerdrop": None},
        config_overrides={"alignment": "ot", "teacher_name_or_path": str(tiny_teacher), "tot_lambda2": None},
    )
    for name, tensor in encoder.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[name], tensor)
    config = model.config
    assert config.encoder_config.mask_time_prob == 0.3 and config.encoder_config.layerdrop == encoder.config.layerdrop
    assert (config.vocab_size, config.alignment, config.tot_lambda2) == (9, "ot", TOTCAKTConfig().tot_lambda2)
    assert config.teacher_hidden_size == 24  # read from the teacher's configuration

    model.save_pretrained(tmp_path / "saved")
    again = build_model(
        vocab_size=9,
        pad_token_id=0,
        model_name_or_path=str(tmp_path / "saved"),
        encoder_overrides={"layerdrop": 0.2},
        config_overrides={"tot_lambda1": 0.5},
    )
    assert again.config.encoder_config.layerdrop == 0.2 and again.config.tot_lambda1 == 0.5
    assert again.config.alignment == "ot"
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], tensor)
    with pytest.raises(ValueError, match="at most one of"):
        build_model(vocab_size=9, pad_token_id=0, model_name_or_path="a", encoder_config={"model_type": "wav2vec2"})


def test_adapter_flags_build_the_model_and_a_continued_model_keeps_its_architecture(tiny_teacher, tmp_path):
    (args,) = HfArgumentParser(train_hf.TOTCAKTArguments).parse_args_into_dataclasses(
        ["--ctc_input", "adapter", "--adapter_type", "linear", "--teacher_name_or_path", str(tiny_teacher)]
    )
    model = build_model(
        vocab_size=9, pad_token_id=0, encoder_config=TINY_WAV2VEC2, config_overrides=args.config_overrides()
    )
    assert (model.config.ctc_input, model.config.adapter_type, model.config.teacher_hidden_size) == (
        "adapter",
        "linear",
        24,
    )
    assert [type(layer) for layer in model.adapter.layers] == [torch.nn.Linear] and model.lm_head.in_features == 24
    model.save_pretrained(tmp_path / "saved")
    saved = {"vocab_size": 9, "pad_token_id": 0, "model_name_or_path": str(tmp_path / "saved")}
    for name, value in (("ctc_input", "encoder"), ("adapter_type", "mlp")):
        with pytest.raises(ValueError, match=rf"{name}='{value}' \(--{name}\) differs from the model being continued"):
            build_model(**saved, config_overrides={name: value})
    # The saved values may be repeated, and a linear adapter has no hidden layers to resize.
    again = build_model(**saved, config_overrides={"ctc_input": "adapter", "adapter_num_layers": 3})
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], tensor)


@pytest.mark.parametrize(
    "encoder, stock_cls, package_cls",
    [
        (TINY_WAV2VEC2, Wav2Vec2FeatureExtractor, TOTCAKTFeatureExtractor),
        (TINY_WAV2VEC2_BERT, SeamlessM4TFeatureExtractor, TOTCAKTLogMelFeatureExtractor),
    ],
    ids=["wav2vec2", "wav2vec2-bert"],
)
def test_a_stock_feature_extractor_saved_by_an_earlier_version_is_replaced_by_the_packages(
    tmp_path, encoder, stock_cls, package_cls
):
    """Continuing or resuming a model whose folder holds a stock feature extractor (no auto_map) trains and saves
    with the package's class, of the same settings: the same features for float samples, and integer PCM scaled."""
    processor = make_processor(tmp_path, make_model(encoder))
    settings = {k: v for k, v in processor.feature_extractor.to_dict().items() if k != "feature_extractor_type"}
    processor.feature_extractor = stock_cls(**settings)  # what earlier versions saved
    old = tmp_path / "old"
    processor.save_pretrained(old)
    saved = json.loads((old / "processor_config.json").read_text())["feature_extractor"]
    assert saved["feature_extractor_type"] == stock_cls.__name__ and "auto_map" not in saved
    model_args = SimpleNamespace(model_name_or_path=str(old), cache_dir=None, token=None)
    training_args = SimpleNamespace(output_dir=str(tmp_path / "out"), should_save=False)
    clip = np.random.default_rng(0).uniform(-0.5, 0.5, 4000).astype(np.float32)
    for resume_checkpoint in (None, str(old)):
        loaded = train_hf.load_processor(model_args, None, training_args, {}, resume_checkpoint, None)
        assert type(loaded.feature_extractor) is package_cls
        name = loaded.feature_extractor.model_input_names[0]
        np.testing.assert_array_equal(
            loaded(audio=clip, sampling_rate=16000)[name][0], processor(audio=clip, sampling_rate=16000)[name][0]
        )
        np.testing.assert_array_equal(
            loaded(audio=np.round(clip * 2**15).astype(np.int16), sampling_rate=16000)[name][0],
            loaded(audio=np.round(clip * 2**15) / 2**15, sampling_rate=16000)[name][0],
        )
    loaded.save_pretrained(tmp_path / "new")
    saved = json.loads((tmp_path / "new" / "processor_config.json").read_text())["feature_extractor"]
    assert saved["auto_map"] == {"AutoFeatureExtractor": f"feature_extraction_tot_cakt.{package_cls.__name__}"}
    assert {k: v for k, v in saved.items() if k not in ("auto_map", "feature_extractor_type")} == settings


def test_parse_encoder_config(tmp_path):
    assert parse_encoder_config('{"model_type": "hubert", "hidden_size": 32}') == {
        "model_type": "hubert",
        "hidden_size": 32,
    }
    (tmp_path / "config.json").write_text(json.dumps(TRAINING_ENCODER))
    assert parse_encoder_config(str(tmp_path / "config.json")) == json.loads(json.dumps(TRAINING_ENCODER))
    with pytest.raises(ValueError, match="needs a JSON object with a 'model_type'"):
        parse_encoder_config('{"hidden_size": 32}')
    with pytest.raises(ValueError, match="must be a JSON object or the path of a JSON file"):
        parse_encoder_config("hidden_size=32")


def test_argument_errors(speech_corpus, tmp_path):
    data = ("--output_dir", tmp_path, "--do_train", "--dataset_name", speech_corpus.root)
    with pytest.raises(ValueError, match="exactly one data source"):
        run_training(
            "--output_dir",
            tmp_path,
            "--do_train",
            "--dataset_name",
            speech_corpus.root,
            "--train_manifest",
            speech_corpus.train_manifest,
        )
    with pytest.raises(ValueError, match="--streaming needs --max_steps"):
        run_training("--output_dir", tmp_path, "--do_train", "--dataset_name", speech_corpus.root, "--streaming")
    with pytest.raises(ValueError, match="--hub_teacher_id names the teacher on the Hub: give a repository id"):
        run_training(*data, "--hub_teacher_id", tmp_path / "teachers" / "bert")
    (tmp_path / "stray.txt").write_text("x")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        run_training("--output_dir", tmp_path, "--do_train", "--dataset_name", speech_corpus.root)


def test_push_to_hub_uploads_a_config_that_names_the_teacher_publicly(tmp_path, caplog):
    """--push_to_hub (huggingface_hub mocked): a local teacher is named by --hub_teacher_id, else by its folder name
    with a warning saying so; the output folder's config.json keeps the path."""
    teacher = tmp_path / "teachers" / "my-bert"
    model = make_model(teacher_dir=teacher)
    model.save_pretrained(tmp_path / "out")
    for hub_teacher_id, published in ((None, "my-bert"), ("someone/my-bert", "someone/my-bert")):
        training_args = SimpleNamespace(
            output_dir=str(tmp_path / "out"),
            hub_token="hf_x",
            hub_private_repo=None,
            hub_revision=None,
            hub_teacher_id=hub_teacher_id,
        )
        caplog.clear()
        with mock.patch("modeling_tot_cakt.training.model_card.HfApi") as api_class, caplog.at_level(logging.WARNING):
            api_class.return_value.create_repo.return_value = SimpleNamespace(repo_id="someone/m")
            api_class.return_value.create_commit.return_value = SimpleNamespace(commit_url="url")
            assert train_hf.push_model_to_hub(model.config, "m", training_args) == "url"
        (_, operations), _ = api_class.return_value.create_commit.call_args
        (config,) = [op.path_or_fileobj for op in operations if op.path_in_repo == "config.json"]
        assert json.loads(config)["teacher_name_or_path"] == published and str(tmp_path).encode() not in config
        warned = "names the local teacher" in caplog.text and "pass --hub_teacher_id" in caplog.text
        assert warned == (hub_teacher_id is None)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["teacher_name_or_path"] == str(teacher)


def test_nonfinite_loss_skips_the_update(tmp_path, caplog):
    model = make_model(alignment="none")
    processor = make_processor(tmp_path, model)
    rng = np.random.default_rng(0)
    row = {"labels": processor.tokenizer("你好").input_ids, "input_length": 4000, "text": "你好"}
    rows = [{**row, "input_values": rng.standard_normal(4000).astype(np.float32)} for _ in range(4)]
    forward, calls = model.forward, []

    def forward_with_one_nan(*args, **kwargs):
        output = forward(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            output.loss = output.loss * float("nan")
        return output

    model.forward = forward_with_one_nan
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = one_step_trainer(model, processor, rows, tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="modeling_tot_cakt.training.trainer"):
        trainer.train()
    assert "Non-finite loss" in caplog.text and trainer.nonfinite_loss_batches == 1
    assert trainer.state.log_history[0]["nonfinite_loss_batches"] == 1
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter, before[name], msg=name)
    assert trainer.model_accepts_loss_kwargs is False


@pytest.mark.parametrize("nan_batches, alignment", [(None, "none"), (None, "tot_uot"), (1, "none")])
def test_a_run_whose_every_update_was_skipped_fails_with_the_cause(tmp_path, nan_batches, alignment):
    """Every batch non-finite: the run fails, naming the cause to look at; one bad batch of two does not."""
    model = make_model(alignment="none")
    model.config.alignment, model.config.tot_lambda1 = alignment, 1000.0  # what the run says; the forward is CTC
    processor = make_processor(tmp_path, model)
    rng = np.random.default_rng(0)
    row = {"labels": processor.tokenizer("你好").input_ids, "input_length": 4000, "text": "你好"}
    rows = [{**row, "input_values": rng.standard_normal(4000).astype(np.float32)} for _ in range(4)]
    forward, calls = model.forward, []

    def forward_with_nan(*args, **kwargs):
        output = forward(*args, **kwargs)
        calls.append(1)
        if nan_batches is None or len(calls) <= nan_batches:
            output.loss = output.loss * float("nan")
        return output

    model.forward = forward_with_nan
    trainer = one_step_trainer(model, processor, rows, tmp_path / "out")
    trainer.args.max_steps = 2
    trainer.train()
    if nan_batches is not None:
        train_hf.check_updates_were_made(trainer, start_step=0)  # the second batch was trained on
        return
    expected = (
        "lower --tot_lambda1 or raise --uot_tau" if alignment == "tot_uot" else "a non-finite ctc_loss points at"
    )
    with pytest.raises(RuntimeError, match=rf"Every one of the 2 training batches had a non-finite loss.*{expected}"):
        train_hf.check_updates_were_made(trainer, start_step=0)


def test_an_order_reward_that_overflows_the_unbalanced_plan_stops_the_run_and_saves_nothing(
    speech_corpus, tiny_teacher, tmp_path
):
    out = tmp_path / "out"
    arguments = [*common_args(out, tiny_teacher, tmp_path / "cache"), "--dataset_name", speech_corpus.root]
    arguments += ["--alignment", "tot_uot", "--tot_lambda1", 1000, "--do_train", "--max_steps", 2]
    with pytest.raises(ValueError, match=r"tot_sinkhorn's plan is not finite .* lower lambda1, raise tau"):
        run_training(*arguments)
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()


def test_the_unbalanced_and_graph_matching_alignment_flags_reach_the_model_configuration(monkeypatch, tmp_path):
    monkeypatch.setattr(
        sys, "argv", ["train_hf.py", "--output_dir", str(tmp_path), "--alignment", "tot_uot", "--uot_tau", "0.25"]
    )
    _, method_args, _, _ = train_hf.parse_arguments()
    config = TOTCAKTConfig(**{k: v for k, v in method_args.config_overrides().items() if v is not None})
    assert (config.alignment, config.uot_tau) == ("tot_uot", 0.25)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "train_hf.py",
            "--output_dir",
            str(tmp_path),
            "--alignment",
            "gmot",
            "--gmot_alpha",
            "0.7",
            "--gmot_max_outer",
            "7",
        ],
    )
    _, method_args, _, _ = train_hf.parse_arguments()
    config = TOTCAKTConfig(**{k: v for k, v in method_args.config_overrides().items() if v is not None})
    assert (config.alignment, config.gmot_alpha, config.gmot_max_outer) == ("gmot", 0.7, 7)
    monkeypatch.setattr(sys, "argv", ["train_hf.py", "--output_dir", str(tmp_path), "--alignment", "gw"])
    with pytest.raises(SystemExit):
        train_hf.parse_arguments()


@pytest.mark.parametrize(
    "flags, refused",
    [
        (
            ["--alignment", "tot", "--uot_tau", "5"],
            r"'tot', which does not read --uot_tau: --uot_tau is read by "
            r"--alignment uot/tot_uot",
        ),
        (
            ["--alignment", "tot", "--gmot_alpha", "0.9"],
            r"does not read --gmot_alpha: --gmot_alpha is read by "
            r"--alignment gmot/tot_gmot",
        ),
        (["--alignment", "none", "--tot_lambda2", "0.2"], r"'none', which does not read --tot_lambda2"),
        (["--alignment", "ot", "--tot_lambda1", "3", "--tot_sigma", "2"], r"does not read --tot_lambda1, --tot_sigma"),
        (["--alignment", "tot_uot", "--uot_tau", "5", "--tot_lambda1", "3"], None),
        (["--alignment", "none", "--ctc_loss_weight", "2"], None),
    ],
)
def test_alignment_flags_that_the_alignment_does_not_read_are_refused(monkeypatch, tmp_path, flags, refused):
    monkeypatch.setattr(sys, "argv", ["train_hf.py", "--output_dir", str(tmp_path), *flags])
    _, method_args, _, _ = train_hf.parse_arguments()
    config = TOTCAKTConfig(**{k: v for k, v in method_args.config_overrides().items() if v is not None})
    if refused is None:
        train_hf.check_method_flags(method_args, config)
    else:
        with pytest.raises(ValueError, match=refused):
            train_hf.check_method_flags(method_args, config)


def test_evaluation_during_training_reads_the_eval_split_never_the_test_split(speech_corpus, tiny_teacher, tmp_path):
    """The audiofolder's `test` folder is the eval split here and its `train` folder the test split: the evaluation
    the Trainer runs during training has the loss of the eval split, which is scored again at the end."""
    out = tmp_path / "out"
    run_training(
        *common_args(out, tiny_teacher, tmp_path / "cache"),
        "--dataset_name",
        speech_corpus.root,
        "--eval_split_name",
        "test",
        "--test_split_name",
        "train",
        "--alignment",
        "none",
        "--do_train",
        "--do_eval",
        "--do_predict",
        "--max_steps",
        2,
        "--eval_strategy",
        "steps",
        "--eval_steps",
        2,
        "--save_steps",
        2,
    )
    state, _ = train_logs(out)
    (during,) = [entry for entry in state["log_history"] if "eval_loss" in entry]
    after = json.loads((out / "eval_results.json").read_text())
    test = json.loads((out / "test_results.json").read_text())
    assert (after["eval_samples"], test["test_samples"]) == (6, 24)
    assert during["step"] == 2 and during["eval_loss"] == pytest.approx(after["eval_loss"], rel=1e-6)
    assert test["test_loss"] != pytest.approx(after["eval_loss"], rel=1e-3)


# A bigram character model (log10 probabilities) in which 大学 ("university") is likely and 地学 is not.
UNIVERSITY_ARPA = """\\data\\
ngram 1=6
ngram 2=4

\\1-grams:
-1.0\t<unk>\t0
0\t<s>\t-0.3
-1.0\t</s>\t0
-1.0\t大\t-0.3
-1.0\t地\t-0.3
-1.0\t学\t-0.3

\\2-grams:
-0.1\t大 学
-0.3\t<s> 大
-0.3\t<s> 地
-0.3\t学 </s>

\\end\\
"""


def test_language_model_weights_are_chosen_on_the_eval_split_never_on_test(tmp_path, monkeypatch):
    """Every clip is heard as 地学 (地 slightly above 大, then 学). The eval split says 大学, which the language model
    restores (its weight > 0); the test split says 地学, which it spoils (best weight 0). Weights tuned on eval decode
    eval without error and test with one; tuned on test, they would be 0 and the errors the other way round."""
    output_dir = tmp_path / "out"
    model = make_model(alignment="none")
    processor = make_processor(tmp_path, model)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    ids = processor.tokenizer.get_vocab()
    heard = np.full((4, len(ids)), 1e-4)
    heard[0, ids["地"]], heard[0, ids["大"]], heard[1, 0], heard[2, ids["学"]], heard[3, 0] = 0.55, 0.45, 1, 1, 1
    logits = np.log(heard / heard.sum(-1, keepdims=True)).astype(np.float32)
    monkeypatch.setattr(train_hf, "feature_logits", lambda model, processor, features: [logits] * len(features))
    arpa = tmp_path / "university.arpa"
    arpa.write_text(UNIVERSITY_ARPA, encoding="utf-8")
    splits = {
        "eval": Dataset.from_dict({"input_values": [[0.0]] * 2, "text": ["大学"] * 2}),
        "test": Dataset.from_dict({"input_values": [[0.0]] * 3, "text": ["地学"] * 3}),
    }
    args = train_hf.TOTCAKTTrainingArguments(output_dir=str(output_dir), report_to="none", use_cpu=True)
    trainer = train_hf.TOTCAKTTrainer(model=model, args=args)
    model_args = SimpleNamespace(language_model=str(arpa), lm_beam_width=8)
    results = train_hf.score_with_language_model(trainer, processor, splits, model_args, args)
    evaluation, test = results["eval_lm"], results["test_lm"]
    assert (evaluation["eval_cer_greedy"], evaluation["eval_cer_lm"]) == (0.5, 0.0)
    assert (test["test_cer_greedy"], test["test_cer_lm"]) == (0.0, 0.5)
    assert evaluation["lm_alpha"] > 0
    attrs = json.loads((output_dir / "language_model" / "attrs.json").read_text(encoding="utf-8"))
    assert (attrs["alpha"], attrs["beta"]) == (evaluation["lm_alpha"], evaluation["lm_beta"])


def test_the_best_checkpoint_is_the_one_with_the_lowest_cer(tmp_path):
    """With --load_best_model_at_end and nothing else said, a lower CER is better, whatever the loss does."""
    argv = ["train_hf.py", "--output_dir", str(tmp_path), "--load_best_model_at_end", "--eval_strategy", "steps"]
    argv += ["--save_strategy", "steps", "--report_to", "none", "--use_cpu"]
    with mock.patch.object(sys, "argv", argv):
        *_, training_args = train_hf.parse_arguments()
    evaluation_set = Dataset.from_dict({"text": ["你好"]})  # the Trainer wants one with --eval_strategy steps
    trainer = train_hf.TOTCAKTTrainer(
        model=make_model(alignment="none"), args=training_args, eval_dataset=evaluation_set
    )
    evaluations = [  # (metrics, whether they are the best so far)
        ({"eval_cer": 0.5, "eval_loss": 3.0}, True),
        ({"eval_cer": 0.7, "eval_loss": 1.0}, False),  # a lower loss, a higher CER
        ({"eval_cer": 0.3, "eval_loss": 5.0}, True),
        ({"eval_cer": 0.4, "eval_loss": 0.5}, False),
    ]
    for step, (metrics, best) in enumerate(evaluations, start=1):
        trainer.state.global_step = step
        assert trainer._determine_best_metric(metrics, trial=None) is best, metrics
    assert (trainer.state.best_metric, trainer.state.best_global_step) == (0.3, 3)


def test_max_duration_in_seconds_removes_the_longer_clips(speech_corpus, tmp_path):
    model = make_model(alignment="none")
    processor = make_processor(tmp_path, model)
    raw = {
        "eval": train_hf.normalize_split(
            train_hf.load_speech_split("eval", manifest=str(speech_corpus.eval_manifest), cache_dir=str(tmp_path)),
            "eval",
        )
    }
    lengths = sorted(len(sf.read(path)[0]) for path in raw["eval"]["audio"])
    keep = next(k for k in range(2, len(lengths)) if lengths[k - 1] < lengths[k])  # a gap between two clips
    training_args = train_hf.TOTCAKTTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")

    def kept(seconds: float) -> list[int]:
        data_args = train_hf.DataTrainingArguments(max_duration_in_seconds=seconds, overwrite_cache=True)
        featurized = train_hf.featurize_datasets(raw, model, processor, data_args, training_args)
        return sorted(featurized["eval"]["input_length"])

    limit = (lengths[keep - 1] + lengths[keep]) / 2 / 16000
    assert kept(limit) == lengths[:keep]
    assert kept(lengths[-1] / 16000 + 0.01) == lengths
