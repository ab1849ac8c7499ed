"""The demo's orchestration end to end on a tiny corpus, teacher and model (a few seconds of training)."""

import json
import struct

import numpy as np
import pytest
import yaml
from rapidfuzz.distance import Levenshtein

from modeling_tot_cakt.demo import run_demo as demo
from modeling_tot_cakt.demo.synthesis import read_manifest

TINY_ENCODER = {
    "model_type": "wav2vec2-bert",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "output_hidden_size": 32,
    "conv_depthwise_kernel_size": 3,
    "feature_projection_input_dim": 320,
    "mask_time_prob": 0.0,
    "layerdrop": 0.0,
}
TINY_PRESET = {
    "synthesis": {
        "num_sentences": 24,
        "vocab_size": 50,
        "min_chars": 2,
        "max_chars": 4,
        "dev_fraction": 0.125,
        "test_fraction": 0.125,
        "renditions_per_train_sentence": 1,
        "num_workers": 1,
    },
    "teacher": {"num_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "max_steps": 2, "batch_size": 8},
    "train": {
        "encoder_config": json.dumps(TINY_ENCODER),
        "alignment": "tot",
        "adapter_hidden_size": 16,
        "cache_teacher_features": True,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "learning_rate": 1e-3,
        "max_steps": 2,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    },
}


def png_size(path):
    """(width, height) from a PNG header; fails on anything that is not a PNG."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """One demo run on the tiny preset: `(preset, work_dir, report)`."""
    root = tmp_path_factory.mktemp("demo")
    preset_file = root / "demo_tiny.yaml"
    preset_file.write_text(yaml.safe_dump(TINY_PRESET), encoding="utf-8")
    preset = demo.load_preset(preset_file)
    return preset, root / "work", demo.run_demo(preset, root / "work")


def test_demo_report_transcriptions_and_plot(tiny_demo):
    preset, work_dir, report = tiny_demo
    paths = demo.DemoPaths.create(work_dir, preset)
    assert json.loads(paths.report.read_text(encoding="utf-8")) == report
    assert report["preset"] == "tiny"
    assert report["reused"] == {"corpus": False, "teacher": False, "language_model": False, "model": False}
    assert report["evaluation"]["dev"]["utterances"] == 3 and report["evaluation"]["test"]["utterances"] == 3
    # The greedy transcripts behind the homophone/other split score train_hf.py's evaluation CER; batches
    # padded differently may move one arg-max of this 2-step model (measured: 46 vs 45 edits), no more.
    errors = report["test_errors"]
    reference_chars = sum(len(record["text"]) for record in read_manifest(paths.corpus / "test.jsonl"))
    assert errors["reference_chars"] == reference_chars
    assert report["cer"]["test"] == errors["cer"]
    evaluation = demo.evaluate_stage(preset, paths, echo=False)  # train_hf.py's evaluation of the same model
    assert abs(errors["cer"] - evaluation["test"]["cer"]) * reference_chars <= 1 + 1e-9
    assert errors["homophone_cer"] + errors["other_cer"] == pytest.approx(errors["cer"])
    assert report["training"]["steps"] == 2
    # Greedy and LM decodings of the same test set, the LM's weights chosen on dev among the grid.
    lm_errors = report["test_errors_lm"]
    assert lm_errors["reference_chars"] == reference_chars
    assert lm_errors["homophone_cer"] + lm_errors["other_cer"] == pytest.approx(lm_errors["cer"])
    weights = report["decoding"]["weights"]
    assert len(weights["grid"]) == len(demo.LM_DEFAULTS["alphas"]) * len(demo.LM_DEFAULTS["betas"])
    assert weights["cer"] == min(point["cer"] for point in weights["grid"])
    assert report["decoding"]["dev"]["lm"]["cer"] == pytest.approx(weights["cer"], abs=1e-5)
    attrs = json.loads((paths.model / "language_model" / "attrs.json").read_text(encoding="utf-8"))
    assert (attrs["alpha"], attrs["beta"]) == (weights["alpha"], weights["beta"])
    assert report["language_model"]["sentences"] > 0 and report["language_model"]["order"] == 4
    assert set(report["timings_seconds"]) == {
        "synthesis",
        "teacher",
        "training",
        "language model",
        "decoding",
        "transcription",
        "couplings",
        "total",
    }
    assert report["corpus"]["utterances"] == {"train": 18, "dev": 3, "test": 3}
    teacher_report = json.loads((paths.teacher / "teacher_report.json").read_text(encoding="utf-8"))
    assert report["teacher"]["heldout_masked_token_accuracy"] == teacher_report["heldout_masked_token_accuracy"]
    assert report["teacher"]["homophone_choice"] == teacher_report["homophone_choice"]

    test_records = read_manifest(paths.corpus / "test.jsonl")
    transcriptions = report["transcriptions"]
    assert [item["id"] for item in transcriptions] == [record["id"] for record in test_records]
    assert [item["reference"] for item in transcriptions] == [record["text"] for record in test_records]
    for item in transcriptions:
        edits = Levenshtein.distance(item["reference"], item["hypothesis"])
        assert item["cer"] == pytest.approx(round(edits / len(item["reference"]), 4))

    couplings = report["couplings"]
    assert couplings["utterance"] == test_records[0]["id"]
    width, height = png_size(paths.couplings_png)
    assert width > 300 and height > 200
    # Recomputed from the saved model and teacher, the errors are the reported ones, and the two couplings
    # are the solver's TOT and plain-OT plans (not one plan twice).
    models = demo.AlignmentModels(paths.model, paths.teacher)
    record = test_records[0]
    recomputed = models.couplings(demo.load_audio(record["audio"], 16000), record["text"])
    tot_error = demo.alignment_error_seconds(recomputed.tot, recomputed.frame_seconds, record["char_times"])
    ot_error = demo.alignment_error_seconds(recomputed.plain, recomputed.frame_seconds, record["char_times"])
    assert couplings["tot_alignment_error_seconds"] == pytest.approx(tot_error, abs=1e-4)
    assert couplings["ot_alignment_error_seconds"] == pytest.approx(ot_error, abs=1e-4)
    assert not np.allclose(recomputed.tot, recomputed.plain)


def test_a_second_run_reuses_corpus_teacher_and_model(tiny_demo, monkeypatch):
    preset, work_dir, _ = tiny_demo
    paths = demo.DemoPaths.create(work_dir, preset)
    assert demo.synthesize_stage(preset, paths).reused and demo.teacher_stage(preset, paths).reused

    def no_training(*args, **kwargs):
        raise AssertionError("train_hf.py was run although the trained model is complete")

    monkeypatch.setattr(demo, "run_train_script", no_training)
    assert demo.train_stage(preset, paths) is True


def test_changed_training_arguments_or_retrain_train_again(tiny_demo, monkeypatch):
    preset, work_dir, _ = tiny_demo
    paths = demo.DemoPaths.create(work_dir, preset)
    changed = demo.DemoPreset(
        preset.name, preset.source, preset.synthesis, preset.teacher, {**preset.train, "max_steps": 3}
    )
    assert demo.is_trained(paths, demo.training_arguments(preset, paths))
    assert not demo.is_trained(paths, demo.training_arguments(changed, paths))
    calls = []
    monkeypatch.setattr(demo, "run_train_script", lambda arguments, *args, **kwargs: calls.append(arguments))
    assert demo.train_stage(preset, paths, retrain=True) is False
    assert calls and calls[0]["overwrite_output_dir"] is True and calls[0]["max_steps"] == 2


def test_alignment_error_is_zero_for_a_coupling_on_the_syllable_centres():
    import numpy as np

    # Frames of 0.1 s; syllable centres at 0.05 s and 0.25 s lie on the centres of frames 0 and 2.
    coupling = np.zeros((4, 2))
    coupling[0, 0] = coupling[2, 1] = 0.5
    assert demo.alignment_error_seconds(coupling, 0.1, [[0.0, 0.1], [0.2, 0.3]]) == pytest.approx(0.0)
    spread = np.full((4, 2), 1 / 8)  # uniform: mean distance of frames 0.05..0.35 from 0.05 and 0.25
    assert demo.alignment_error_seconds(spread, 0.1, [[0.0, 0.1], [0.2, 0.3]]) == pytest.approx((0.6 + 0.4) / 2 / 4)


def test_presets_ship_and_bad_presets_are_refused(tmp_path):
    for name in demo.PRESETS:
        preset = demo.load_preset(name)
        assert preset.name == name and preset.train["alignment"] == "tot"
    with pytest.raises(ValueError, match="Unknown demo preset"):
        demo.load_preset("nonexistent")
    owned = tmp_path / "owned.yaml"
    owned.write_text(yaml.safe_dump({"train": {"output_dir": "x"}}), encoding="utf-8")
    with pytest.raises(ValueError, match="must not set"):
        demo.load_preset(owned)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump({"synthesis": {"speakers": 3}}), encoding="utf-8")
    with pytest.raises(ValueError, match="unknown synthesis settings"):
        demo.load_preset(unknown)


def test_alignment_benchmark_on_the_demo_model(tiny_demo, tmp_path, monkeypatch):
    """benchmarks/bench_alignment.py measures every coupling of every test utterance and plots examples."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_alignment

    preset, work_dir, _ = tiny_demo
    paths = demo.DemoPaths.create(work_dir, preset)
    report = bench_alignment.main(
        [
            "--models",
            str(paths.model),
            "--corpus_dir",
            str(paths.corpus),
            "--output",
            str(tmp_path / "alignment.json"),
            "--plot",
            str(tmp_path / "alignment.png"),
            "--examples",
            "2",
        ]
    )
    assert json.loads((tmp_path / "alignment.json").read_text(encoding="utf-8")) == report
    (result,) = report["models"]
    assert result["trained_alignment"] == "tot" and result["utterances"] == report["utterances"] == 3
    for name in bench_alignment.COUPLINGS:
        errors = result["per_utterance_seconds"][name]
        assert len(errors) == 3
    # The diagonal prior alone is nearer the spoken syllables than the uniform coupling on every utterance.
    per_utterance = result["per_utterance_seconds"]
    assert all(prior < uniform for prior, uniform in zip(per_utterance["prior_only"], per_utterance["uniform"]))
    png_size(tmp_path / "alignment.png")
    assert [Path(path).name for path in report["example_plots"]] == [
        "alignment_example_0.png",
        "alignment_example_1.png",
    ]
    for path in report["example_plots"]:
        png_size(Path(path))


def test_dev_cer_by_step_keeps_the_periodic_value_at_the_last_step():
    history = [
        {"loss": 3.0, "step": 500},
        {"eval_cer": 0.6, "step": 1000},
        {"eval_cer": 0.7, "step": 2000},
        {"train_runtime": 1.0, "step": 2000},
        {"eval_cer": 0.6, "step": 2000},  # the final evaluation: the best checkpoint (step 1000), logged at step 2000
    ]
    assert demo.dev_cer_by_step(history) == [(1000, 0.6), (2000, 0.7)]
    assert demo.dev_cer_by_step([]) == []


def test_pretrained_encoder_stage_and_training_from_it(tmp_path):
    """An encoder section: CTC pretraining on syllables of other sentences, exported, trained from."""
    from transformers import AutoModel, Wav2Vec2BertModel

    from modeling_tot_cakt.demo.synthesis import heldout_sentences

    train = {key: value for key, value in TINY_PRESET["train"].items() if key != "encoder_config"}
    encoder_synthesis = {**TINY_PRESET["synthesis"], "vocab_size": 0, "num_sentences": 16, "seed": 1}
    encoder_train = {**TINY_PRESET["train"], "alignment": "none", "eval_strategy": "no"}
    del encoder_train["adapter_hidden_size"], encoder_train["cache_teacher_features"]
    preset_file = tmp_path / "demo_pretrained.yaml"
    content = {**TINY_PRESET, "train": train, "encoder": {"synthesis": encoder_synthesis, "train": encoder_train}}
    preset_file.write_text(yaml.safe_dump(content), encoding="utf-8")
    preset = demo.load_preset(preset_file)
    report = demo.run_demo(preset, tmp_path / "work")
    paths = demo.DemoPaths.create(tmp_path / "work", preset)

    encoder_dir = demo.pretrained_encoder_dir(preset, paths)
    encoder_report = report["pretrained_encoder"]
    assert encoder_report["reused"] is False and encoder_report["model_type"] == "wav2vec2-bert"
    assert encoder_report["dev_utterances"] == 2 and encoder_report["steps"] == 2
    assert isinstance(AutoModel.from_pretrained(encoder_dir), Wav2Vec2BertModel)
    train_args = yaml.safe_load((paths.root / "train_args.yaml").read_text(encoding="utf-8"))
    assert train_args["encoder_name_or_path"] == str(encoder_dir)
    # The pretraining corpus speaks none of the character-level corpus' dev/test sentences.
    spoken = {
        record["characters"]
        for split in ("train", "dev", "test")
        for record in read_manifest(paths.encoder_root / "units" / f"{split}.jsonl")
    }
    heldout = heldout_sentences(paths.corpus)
    assert spoken and not any(sentence in text or text in sentence for sentence in heldout for text in spoken)
    assert encoder_report["excluded_sentences"] == len(heldout)

    assert demo.encoder_stage(preset, paths)["reused"] is True
    changed = demo.DemoPreset(
        preset.name,
        preset.source,
        preset.synthesis,
        preset.teacher,
        preset.train,
        {**preset.encoder, "train": {**encoder_train, "max_steps": 3}},
    )
    assert demo.pretrained_encoder_dir(changed, paths) != encoder_dir
    assert demo.training_arguments(changed, paths)["encoder_name_or_path"] != str(encoder_dir)


def test_runs_outside_the_demo_folder_use_the_demo_s_pretrained_encoder(tmp_path):
    """The quality benchmark keeps each run in its own folder but shares the demo's encoder."""
    preset = demo.load_preset("transfer")
    base = demo.DemoPaths.create(tmp_path / "work", preset)
    run = demo.DemoPaths(tmp_path / "run", base.corpus, base.teacher, tmp_path / "run" / "model", base.cache)
    assert demo.pretrained_encoder_dir(preset, run).parent == tmp_path / "run" / "encoder"
    shared = demo.DemoPaths(
        tmp_path / "run", base.corpus, base.teacher, tmp_path / "run" / "model", base.cache, base.encoder_root
    )
    expected = demo.pretrained_encoder_dir(preset, base)
    assert demo.training_arguments(preset, shared)["encoder_name_or_path"] == str(expected)
    assert expected.parent == tmp_path / "work" / "transfer" / "encoder"


def test_transcripts_do_not_depend_on_the_batch(tiny_demo):
    # Featurised clip by clip and padded as features, a clip gets the same frames alone or in any batch
    # (a padded batch of waveforms gives the log-mel extractor's stacked frames a partly padded extra frame).
    preset, work_dir, _ = tiny_demo
    paths = demo.DemoPaths.create(work_dir, preset)
    records = read_manifest(paths.corpus / "train.jsonl")[:12]
    one_by_one = demo.transcribe_manifest(paths.model, records, batch_size=1)
    assert demo.transcribe_manifest(paths.model, records, batch_size=12) == one_by_one
    assert demo.transcribe_manifest(paths.model, records[::-1], batch_size=5) == one_by_one[::-1]


def test_training_budget_leaves_time_for_the_stages_after_training():
    # Reference speed: what is left after 100 s, less the 180 s after training.
    assert demo.training_budget(1200, 100, None) == 1200 - 100 - demo.AFTER_TRAINING_SECONDS
    # A machine that built corpus and teacher 2.5x slower keeps 2.5x as much for the stages after training.
    slow = demo.training_budget(1200, 100, 2.5 * demo.REFERENCE_STAGE_SECONDS)
    assert slow == 1200 - 100 - 2.5 * demo.AFTER_TRAINING_SECONDS
    # A faster machine is not given less reserve than the reference one, and training never gets less than the minimum.
    assert (
        demo.training_budget(1200, 100, 0.5 * demo.REFERENCE_STAGE_SECONDS) == 1200 - 100 - demo.AFTER_TRAINING_SECONDS
    )
    assert demo.training_budget(300, 290, None) == demo.MIN_TRAINING_SECONDS


def test_decoding_scores_the_test_tracks_it_is_given(tiny_demo, tmp_path):
    """A corpus with a second test track has it decoded, greedily and with the LM, as test is."""
    import shutil

    preset, work_dir, report = tiny_demo
    paths = demo.DemoPaths.create(work_dir, preset)
    copy = demo.DemoPaths(
        root=tmp_path, corpus=tmp_path / "corpus", teacher=paths.teacher, model=tmp_path / "model", cache=paths.cache
    )
    shutil.copytree(paths.corpus, copy.corpus)
    shutil.copytree(paths.model, copy.model)
    # The test clips once more as the second track: the same audio must give the same transcripts.
    shutil.copy(copy.corpus / "test.jsonl", copy.corpus / "test_seen_voices.jsonl")
    decoding = demo.decoding_stage(preset, copy, report["language_model"]["arpa"], ("test", "test_seen_voices"))
    assert decoding["test_seen_voices"] == decoding["test"] == report["decoding"]["test"]
    assert set(decoding) == {"weights", "dev", "test", "test_seen_voices", "speed"}
    assert demo.error_split_stage(copy, "test_seen_voices") == {**report["test_errors"], "split": "test_seen_voices"}


def test_text_only_plans_the_corpus_without_making_anything(tmp_path, monkeypatch, capsys):
    from modeling_tot_cakt.demo import synthesis

    # Every clause holds the same four characters, so any split keeps test characters in train; 他 and 她
    # are both read ta1, so half the test characters have a homophone.
    clauses = ["他她天地", "她他地天", "天地他她", "地天她他", "他天她地", "天他地她"]
    monkeypatch.setattr(synthesis, "load_named_clauses", lambda names, fortunes_dir: (clauses, []))
    preset_file = tmp_path / "demo_plan.yaml"
    settings = {
        "num_sentences": 6,
        "vocab_size": 0,
        "dev_fraction": 0.0,
        "test_fraction": 0.34,
        "seen_voices_test": True,
    }
    preset_file.write_text(yaml.safe_dump({"synthesis": settings}), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    info = demo.main(["--preset", str(preset_file), "--text_only"])
    assert info["splits"] == {
        "train": {"sentences": 4, "utterances": 8},
        "dev": {"sentences": 0, "utterances": 0},
        "test": {"sentences": 2, "utterances": 2},
        "test_seen_voices": {"sentences": 2, "utterances": 2},
    }
    track = {"tokens": 8, "tokens_with_homophone": 4, "types": 4, "types_with_homophone": 2}
    assert info["test_tracks"] == {
        name: {**track, "homophone_share": 0.5, "oov_tokens": 0, "oov_share": 0.0}
        for name in ("test", "test_seen_voices")
    }
    assert "test_seen_voices: 0.500 of 8 characters have a homophone" in capsys.readouterr().out
    assert sorted(path.name for path in tmp_path.iterdir()) == ["demo_plan.yaml"]  # no corpus, no work folder


@pytest.mark.parametrize("alignment", ["gmot", "tot_uot"])
def test_the_coupling_picture_adds_the_trained_modes_own_plan(tmp_path, alignment):
    import torch
    from tiny_models import CHARACTERS, make_model, make_teacher, save_emitting_model

    teacher = make_teacher(tmp_path / "teacher")
    torch.manual_seed(0)
    model = make_model(alignment=alignment, teacher_dir=teacher, gmot_alpha=0.0, uot_tau=1e6)
    _, folder = save_emitting_model(model, tmp_path)
    waveform = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    text = CHARACTERS[:4]
    models = demo.AlignmentModels(folder, teacher)
    couplings = models.couplings(waveform, text)
    name, plan = couplings.trained
    assert name == alignment and plan.shape == couplings.tot.shape
    # GM-OT with alpha = 0 is plain OT; TOT with unbalanced marginals of a huge tau is TOT.
    expected = couplings.plain if alignment == "gmot" else couplings.tot
    np.testing.assert_allclose(plan, expected, atol=1e-6)
    # With the configuration's own settings changed, the panel changes with them: it is that mode's plan.
    model.config.update({"gmot_alpha": 0.5, "uot_tau": 0.05})
    model.save_pretrained(folder)
    changed = demo.AlignmentModels(folder, teacher).couplings(waveform, text).trained[1]
    assert np.abs(changed - expected).max() > 0.1 * expected.max()
    record = {
        "id": "u0",
        "pinyin": " ".join(["a1"] * len(text)),
        "char_times": [[0.1 * i, 0.1 * i + 0.1] for i in range(4)],
    }
    path = tmp_path / "couplings.png"
    demo.plot_couplings(couplings, record, path)
    assert [title for title, _ in couplings.panels()] == ["TOT", "plain OT", f"{alignment} (trained mode)"]
    width, _ = png_size(path)
    assert width > 1.4 * 990  # three panels where two are 990 pixels wide
