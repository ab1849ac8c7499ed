import json
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results
from tiny_models import make_model
from transformers import TrainingArguments

from modeling_tot_cakt.training.model_card import (
    UPLOAD_IGNORE_PATTERNS,
    cer_result,
    is_hub_id,
    public_config,
    public_name,
    public_teacher,
    push_folder_to_hub,
    render_model_card,
    training_hyperparameters,
)

TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "README_TEMPLATE.md"


def render(tmp_path, alignment="tot", config_kwargs=None, **kwargs):
    config = make_model(alignment=alignment, **(config_kwargs or {})).config
    args = TrainingArguments(
        output_dir=str(tmp_path),
        learning_rate=3e-4,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        use_cpu=True,
    )
    defaults = dict(
        model_name="tot-cakt-aishell",
        repo_id="someone/tot-cakt-aishell",
        encoder_name_or_path="facebook/wav2vec2-base",
        datasets=["someone/aishell1", str(tmp_path)],
        dataset_description="AISHELL-1 (`train` split)",
        results=[
            cer_result(0.0812, "AISHELL-1", "aishell-1", "dev"),
            cer_result(0.0915, "AISHELL-1", "aishell-1", "test"),
        ],
        hyperparameters=training_hyperparameters(args, 1234, config),
    )
    return render_model_card(TEMPLATE, config, **{**defaults, **kwargs})


def test_metadata(tmp_path):
    card = render(tmp_path)
    card.save(tmp_path / "README.md")
    metadata = metadata_load(tmp_path / "README.md")
    assert metadata["language"] == "zh" and metadata["license"] == "apache-2.0"
    assert metadata["pipeline_tag"] == "automatic-speech-recognition" and metadata["library_name"] == "transformers"
    assert {"automatic-speech-recognition", "ctc", "tot-cakt", "optimal-transport"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["someone/aishell1"]  # the local folder is not a Hub dataset
    assert metadata["base_model"] == "facebook/wav2vec2-base"
    assert metadata["teacher_model"] == "bert-base-chinese"
    name, results = model_index_to_eval_results(metadata["model-index"])
    assert name == "tot-cakt-aishell"
    assert [(r.dataset_split, r.metric_type, r.metric_value) for r in results] == [
        ("dev", "cer", 0.0812),
        ("test", "cer", 0.0915),
    ]
    reloaded = ModelCard.load(tmp_path / "README.md")
    assert reloaded.data.eval_results[1].task_type == "automatic-speech-recognition"


def test_local_teacher_and_encoder_are_not_recorded_as_hub_ids(tmp_path):
    config = make_model(teacher_dir=tmp_path).config
    card = render_model_card(TEMPLATE, config, model_name="m", repo_id="someone/m", encoder_name_or_path=str(tmp_path))
    assert card.data.to_dict().keys().isdisjoint({"teacher_model", "base_model", "model-index", "datasets"})
    assert "No evaluation was run" in card.text
    # A local encoder did start the model (it was not trained from scratch); the card names it by its folder.
    assert f"The encoder was initialised from a local checkpoint, `{tmp_path.name}`." in card.text


def test_local_models_are_named_by_their_folder_not_their_path(tmp_path):
    teacher, encoder = tmp_path / "models" / "my-bert", tmp_path / "models" / "my-encoder"
    teacher.mkdir(parents=True)
    encoder.mkdir()
    config = make_model(teacher_dir=teacher).config
    text = render_model_card(
        TEMPLATE, config, model_name="m", repo_id="someone/m", encoder_name_or_path=str(encoder) + "/"
    ).text
    assert str(tmp_path) not in text
    assert "from the frozen language model\n`my-bert` (a local model)." in text
    assert "initialised from a local checkpoint, `my-encoder`." in text
    assert public_name(str(teacher)) == "my-bert" and public_name("bert-base-chinese") == "bert-base-chinese"
    assert public_name(None) is None


def test_usage_shows_the_soundfile_route_next_to_the_file_path(tmp_path):
    text = render(tmp_path).text
    soundfile_route = (
        'audio, rate = sf.read("speech.wav", dtype="float32")  # float samples in [-1, 1]\n'
        'print(asr({"raw": audio, "sampling_rate": rate})["text"])'
    )
    assert soundfile_route in text and "import soundfile as sf" in text
    assert '`asr("speech.wav")`, but then transformers decodes it with the `ffmpeg`' in text


def test_text(tmp_path):
    text = render(tmp_path).text
    assert 'pipeline("automatic-speech-recognition", model="someone/tot-cakt-aishell", trust_remote_code=True)' in text
    assert "| AISHELL-1 | test | 9.15 % |" in text
    assert "temporal-order-preserving optimal transport" in text and "## Limitations" in text
    assert "| learning_rate | 0.0003 |" in text and "| total_train_batch_size | 16 |" in text
    assert "| training_steps | 1234 |" in text and "| tot_lambda1 | 1.0 |" in text
    assert "{{" not in text and "{%" not in text


def test_baseline_card_does_not_claim_a_teacher(tmp_path):
    card = render(tmp_path, alignment="none")
    assert "CTC-only baseline" in card.text and "trained without a teacher" in card.text
    assert "bert-base-chinese" not in card.text and "tot_lambda1" not in card.text
    assert "teacher_model" not in card.data.to_dict()


def test_card_says_what_the_ctc_head_reads_and_describes_the_adapter(tmp_path):
    text = render(tmp_path).text
    assert "An adapter (a LayerNorm and 2 linear layers of width 16 with GELU, from 32 to 24 features)" in text
    assert "the CTC head reads the encoder's frames, and the adapter serves training\nonly" in text
    assert "| ctc_input | encoder |" in text and "| adapter_type | mlp |" in text
    adapted = render(tmp_path, config_kwargs={"ctc_input": "adapter", "adapter_type": "linear"}).text
    assert (
        "At inference the model is the encoder, the adapter (one linear projection from 32 to 24 features) and the "
        "CTC head, which reads the\nadapter's output" in adapted
    )
    assert "the CTC head reads these adapted features" in adapted and "Wav2Vec2ForCTC" not in adapted
    assert "| ctc_input | adapter |" in adapted and "| adapter_type | linear |" in adapted
    baseline = render(tmp_path, alignment="none", config_kwargs={"ctc_input": "adapter"}).text
    assert "without a teacher. Its CTC head reads the output of an adapter (a LayerNorm and 2 linear" in baseline
    assert "adapter_type" not in render(tmp_path, alignment="none").text


def test_ot_baseline_is_named(tmp_path):
    assert "trained with **OT-CAKT**" in render(tmp_path, alignment="ot").text


def test_is_hub_id(tmp_path):
    assert is_hub_id("bert-base-chinese") and is_hub_id("facebook/wav2vec2-base")
    assert not is_hub_id(str(tmp_path)) and not is_hub_id("a/b/c") and not is_hub_id(None)


def saved_output_dir(tmp_path, teacher: str) -> Path:
    """What train_hf.py leaves in output_dir, with training state beside the model."""
    out = tmp_path / "out"
    make_model(teacher_dir=teacher).save_pretrained(out)
    (out / "README.md").write_text("card", encoding="utf-8")
    for name in ("checkpoint-2/model.safetensors", "incomplete_checkpoints/checkpoint-3/config.json", "runs/x/events"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    for name in ("training_args.bin", ".train_hf.lock", "vocab.json.12.tmp"):
        (out / name).write_text("x")
    return out


def push_with_mocked_hub(out, **kwargs) -> tuple[mock.MagicMock, dict[str, bytes]]:
    """push_folder_to_hub with huggingface_hub's HfApi mocked: the mock and the uploaded files' contents."""
    with mock.patch("modeling_tot_cakt.training.model_card.HfApi") as api_class:
        api = api_class.return_value
        api.create_repo.return_value = SimpleNamespace(repo_id="someone/m")
        api.create_commit.return_value = SimpleNamespace(commit_url="https://huggingface.co/someone/m/commit/1")
        url = push_folder_to_hub(out, "m", token="hf_x", private=True, **kwargs)
    assert url.endswith("/commit/1")
    (args, call) = api.create_commit.call_args
    assert args[0] == "someone/m" and call["commit_message"] == "Upload TOT-CAKT model"
    uploaded = {}
    for operation in args[1]:
        source = operation.path_or_fileobj
        uploaded[operation.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
    return api_class, uploaded


def test_upload_goes_through_hf_api_in_one_commit_without_training_state(tmp_path):
    teacher = tmp_path / "teachers" / "my-bert"
    out = saved_output_dir(tmp_path, str(teacher))
    api_class, uploaded = push_with_mocked_hub(out)
    api_class.assert_called_once_with(token="hf_x")
    api_class.return_value.create_repo.assert_called_once_with("m", private=True, exist_ok=True, repo_type="model")
    assert set(uploaded) == {
        "config.json",
        "configuration_tot_cakt.py",
        "modeling_tot_cakt.py",
        "tot.py",
        "model.safetensors",
        "README.md",
        "runs/x/events",
    }
    assert uploaded["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert {"checkpoint-*", "training_args.bin", "incomplete_checkpoints/**", ".train_hf.lock"} <= set(
        UPLOAD_IGNORE_PATTERNS
    )


def test_the_uploaded_config_names_a_local_teacher_by_its_folder_or_hub_teacher_id(tmp_path):
    """The training machine's path stays in the local config.json (attach_teacher, --model_name_or_path) and
    never reaches the Hub."""
    teacher = tmp_path / "teachers" / "my-bert"
    out = saved_output_dir(tmp_path, str(teacher))
    local = json.loads((out / "config.json").read_text())
    assert local["teacher_name_or_path"] == str(teacher)
    for hub_teacher_id, published in ((None, "my-bert"), ("someone/my-bert", "someone/my-bert")):
        _, uploaded = push_with_mocked_hub(out, hub_teacher_id=hub_teacher_id)
        assert str(tmp_path).encode() not in uploaded["config.json"]
        assert json.loads(uploaded["config.json"]) == {**local, "teacher_name_or_path": published}
        assert json.loads(public_config(out, hub_teacher_id)) == json.loads(uploaded["config.json"])
    assert json.loads((out / "config.json").read_text()) == local  # unchanged
    # A Hub teacher is named as it is; --hub_teacher_id also names the teacher in the model card.
    hub = saved_output_dir(tmp_path / "hub", "bert-base-chinese")
    assert json.loads(public_config(hub))["teacher_name_or_path"] == "bert-base-chinese"
    assert public_teacher(str(teacher)) == "my-bert" and public_teacher(str(teacher), "a/b") == "a/b"
    card = render_model_card(
        TEMPLATE,
        make_model(teacher_dir=teacher).config,
        model_name="m",
        repo_id="x/m",
        hub_teacher_id="someone/my-bert",
    )
    assert card.data.to_dict()["teacher_model"] == "someone/my-bert" and str(tmp_path) not in card.text


@pytest.mark.parametrize("precision, expected", [({}, "fp32"), ({"bf16": True}, "bf16")])
def test_precision_row(tmp_path, precision, expected):
    args = SimpleNamespace(
        **{
            **vars(TrainingArguments(output_dir=str(tmp_path), use_cpu=True)),
            "bf16": False,
            "fp16": False,
            **precision,
            "world_size": 1,
        }
    )
    assert training_hyperparameters(args, 1, make_model().config)["mixed_precision"] == expected


@pytest.mark.parametrize(
    "alignment, extra_rows",
    [
        ("tot", {"tot_lambda1", "tot_sigma"}),
        ("ot", set()),
        ("uot", {"uot_tau"}),
        ("gmot", {"gmot_alpha", "gmot_max_outer"}),
        ("tot_gmot", {"tot_lambda1", "tot_sigma", "gmot_alpha", "gmot_max_outer"}),
    ],
)
def test_mode_specific_rows_appear_only_in_their_modes(tmp_path, alignment, extra_rows):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    values = dict(uot_tau=0.4, gmot_alpha=0.7, gmot_max_outer=9, tot_lambda1=0.6, tot_sigma=2.0)
    config = make_model(alignment=alignment, **values).config
    rows = training_hyperparameters(args, 1, config)
    assert set(values) & set(rows) == extra_rows
    assert {name: rows[name] for name in extra_rows} == {name: values[name] for name in extra_rows}
