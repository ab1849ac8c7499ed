"""Beam-search decoding with a character n-gram language model: the alphabet that makes every character a word,
the LM's effect on hand-made logits, KenLM's estimator, the saved folder through remote code and the pipeline."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf
import torch
from pyctcdecode import Alphabet, BeamSearchDecoderCTC, LanguageModel
from tiny_models import make_model, save_emitting_model, write_wav

from modeling_tot_cakt import TOTCAKTForCTC
from modeling_tot_cakt.processing_tot_cakt import (
    create_feature_extractor,
    create_tokenizer,
    vocabulary_from_characters,
)
from modeling_tot_cakt.processing_tot_cakt_lm import TOTCAKTProcessorWithLM, build_decoder, decoder_labels
from modeling_tot_cakt.training.language_model import (
    arpa_unigrams,
    attach_language_model,
    estimate_character_lm,
    greedy_transcripts,
    tune_weights,
)

# A hand-made bigram model (log10 probabilities): 公司 ("company") is likely, its homophone 工司 is not
# (工 then 司 backs off: -0.3 + -1.0 = -1.3 against -0.1).
TINY_ARPA = """\\data\\
ngram 1=8
ngram 2=7

\\1-grams:
-1.0\t<unk>\t0
0\t<s>\t-0.3
-1.0\t</s>\t0
-1.0\t公\t-0.3
-1.0\t工\t-0.3
-1.0\t司\t-0.3
-1.0\t人\t-0.3
-1.0\t大\t-0.3

\\2-grams:
-0.1\t公 司
-0.3\t<s> 公
-0.3\t<s> 工
-0.3\t司 人
-0.3\t司 大
-0.3\t人 </s>
-0.3\t大 </s>

\\end\\
"""


@pytest.fixture
def tokenizer(tmp_path):
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps(vocabulary_from_characters("公工司人大"), ensure_ascii=False), encoding="utf-8")
    return create_tokenizer(vocab)


@pytest.fixture
def arpa(tmp_path):
    path = tmp_path / "tiny.arpa"
    path.write_text(TINY_ARPA, encoding="utf-8")
    return path


def frames(tokenizer, *distributions):
    """Log-probabilities, one row per dict {character or "" (blank): probability}; the rest share 1e-4."""
    ids = tokenizer.get_vocab()
    rows = []
    for distribution in distributions:
        row = np.full(len(tokenizer), 1e-4)
        for char, probability in distribution.items():
            row[ids[char] if char else tokenizer.pad_token_id] = probability
        rows.append(np.log(row / row.sum()))
    return np.stack(rows).astype(np.float32)


def lm_processor(tokenizer, arpa, alpha=0.5, beta=0.0):
    decoder = build_decoder(tokenizer, arpa, arpa_unigrams(arpa), alpha=alpha, beta=beta)
    return TOTCAKTProcessorWithLM(create_feature_extractor(), tokenizer, decoder)


BLANK = {"": 1.0}
# 工 is heard slightly better than its homophone 公; then 司.
HOMOPHONE = ({"工": 0.55, "公": 0.45}, BLANK, {"司": 1.0}, BLANK)


def test_alphabet_makes_every_character_a_word(tokenizer):
    assert tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) == [
        "[PAD]", "[UNK]", "|", "人", "公", "司", "大", "工"
    ]  # fmt: skip
    assert decoder_labels(tokenizer) == ["", "▁⁇▁", "▁", "▁人", "▁公", "▁司", "▁大", "▁工"]


def test_beam_search_with_the_lm_chooses_the_likely_homophone_where_greedy_does_not(tokenizer, arpa):
    logits = frames(tokenizer, *HOMOPHONE)
    processor = lm_processor(tokenizer, arpa)
    assert greedy_transcripts(tokenizer, [logits]) == ["工司"]
    assert processor.decode(logits, alpha=0.0).text == "工司"  # the beam search alone follows the acoustics
    assert processor.decode(logits).text == "公司"
    batch = processor.batch_decode(np.stack([logits, logits]), frame_lengths=[4, 1])
    assert batch.text == ["公司", "工"]


def test_characters_are_scored_as_the_beam_grows(tokenizer, arpa):
    """After 工/公 and 司 come near-ties (人 or 大) that fill a narrow beam with acoustically better hypotheses.
    Scored character by character, 公 beats 工 as soon as 司 follows it and its beams survive; scored once per
    utterance (the stock alphabet: no word boundary in Mandarin, so the utterance is one word) every hypothesis
    is one unknown word until the end, the narrow beam keeps only 工 and the LM cannot bring 公 back."""
    ties = [{"人": 0.51, "大": 0.49}, BLANK] * 4
    logits = frames(tokenizer, *HOMOPHONE, *ties)
    processor = lm_processor(tokenizer, arpa)
    assert processor.decode(logits, beam_width=2).text.startswith("公司")

    import kenlm

    plain_labels = ["", "⁇", " ", *tokenizer.convert_ids_to_tokens(list(range(3, len(tokenizer))))]
    per_utterance = BeamSearchDecoderCTC(
        Alphabet(plain_labels, is_bpe=False),
        LanguageModel(kenlm.Model(str(arpa)), unigrams=arpa_unigrams(arpa), alpha=0.5, beta=0.0),
    )
    assert per_utterance.decode(logits, beam_width=2).startswith("工司")


def test_a_hotword_phrase_wins_in_a_narrow_beam_only_with_the_hotword(tokenizer, arpa):
    """工 is heard better than 公 and the LM weight is 0: only the phrase 公司, boosted as a sequence, turns it."""
    logits = frames(tokenizer, *HOMOPHONE)
    processor = lm_processor(tokenizer, arpa)
    assert processor.decode(logits, alpha=0.0, beam_width=2).text == "工司"
    assert processor.decode(logits, alpha=0.0, beam_width=2, hotwords=["公司"]).text == "公司"
    assert processor.decode(logits, alpha=0.0, beam_width=2, hotwords=["公 司"]).text == "公司"  # spaces ignored
    assert processor.decode(logits, alpha=0.0, beam_width=2, hotwords=["公司"], hotword_weight=0.0).text == "工司"
    # Without an n-gram model in the processor the hotwords get a beam search of their own.
    plain = TOTCAKTProcessorWithLM(create_feature_extractor(), tokenizer, None)
    assert plain.decode(logits).text == "工司"
    assert plain.decode(logits, hotwords=["公司"], beam_width=2).text == "公司"


def test_a_hotwords_characters_elsewhere_are_not_boosted(tokenizer, arpa):
    """公 followed by 人, not 司: the phrase 公司 is not there, and 公 alone earns nothing (pyctcdecode's word
    hotwords would boost every 公 of "公 司")."""
    logits = frames(tokenizer, {"工": 0.55, "公": 0.45}, BLANK, {"人": 1.0}, BLANK)
    processor = lm_processor(tokenizer, arpa)
    without = processor.decode(logits, alpha=0.0, beam_width=4)
    with_hotword = processor.decode(logits, alpha=0.0, beam_width=4, hotwords=["公司"])
    assert without.text == with_hotword.text == "工人"
    assert with_hotword.lm_score == pytest.approx(without.lm_score)


def test_the_completed_phrase_earns_the_weight_and_a_broken_prefix_nothing(tokenizer, arpa):
    """The score a hypothesis ends with: +weight per completed phrase, no trace of a prefix that broke off."""
    processor = lm_processor(tokenizer, arpa)
    logits = frames(tokenizer, {"公": 1.0}, BLANK, {"司": 1.0}, BLANK, {"公": 1.0}, BLANK, {"人": 1.0})
    plain = processor.decode(logits, alpha=0.0, beam_width=4)
    boosted = processor.decode(logits, alpha=0.0, beam_width=4, hotwords=["公司"], hotword_weight=3.0)
    assert plain.text == boosted.text == "公司公人"
    assert boosted.lm_score - plain.lm_score == pytest.approx(3.0)


def test_hotwords_the_model_cannot_write_are_refused(tokenizer, arpa):
    processor = lm_processor(tokenizer, arpa)
    logits = frames(tokenizer, *HOMOPHONE)
    with pytest.raises(ValueError, match=r"The hotword '北京' has characters the model cannot write: \['京', '北'\]"):
        processor.decode(logits, hotwords=["北京"])
    with pytest.raises(ValueError, match="must be a list of phrases"):
        processor.decode(logits, hotwords="公司")


def test_n_best_hypotheses_with_scores_and_character_offsets(tokenizer, arpa):
    logits = frames(tokenizer, *HOMOPHONE)
    processor = lm_processor(tokenizer, arpa)
    best = processor.decode(logits, beam_width=8, output_char_offsets=True)
    assert best.text == "公司"
    assert best.char_offsets == [
        {"char": "公", "start_offset": 0, "end_offset": 1},
        {"char": "司", "start_offset": 2, "end_offset": 3},
    ]
    listed = processor.decode(logits, beam_width=8, n_best=3, output_char_offsets=True)
    # The beam prunes the rest (every other character is 1e-4 likely): two hypotheses, best first.
    assert listed.text == ["公司", "工司"] and listed.lm_score[0] > listed.lm_score[1]
    assert (listed.lm_score[0], listed.logit_score[0]) == (best.lm_score, best.logit_score)
    # The homophone is heard better (higher acoustic score) and loses on the language model.
    assert listed.logit_score[1] > listed.logit_score[0]
    assert [item["char"] for item in listed.char_offsets[1]] == ["工", "司"]


def test_decoding_in_processes_gives_the_transcripts_of_one(tokenizer, arpa):
    rng = np.random.default_rng(0)
    batch = np.log(rng.dirichlet(np.full(len(tokenizer), 0.3), size=(6, 12))).astype(np.float32)
    processor = lm_processor(tokenizer, arpa)
    lengths = [12, 7, 12, 3, 9, 12]
    one = processor.batch_decode(batch, frame_lengths=lengths, beam_width=8, hotwords=["公司"])
    forked = processor.batch_decode(batch, frame_lengths=lengths, beam_width=8, hotwords=["公司"], num_processes=2)
    assert forked.text == one.text and forked.lm_score == one.lm_score
    assert one.text[3] == processor.decode(batch[3, :3], beam_width=8, hotwords=["公司"]).text


def test_decoder_alphabet_must_match_the_tokenizer(tokenizer, arpa, tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps(vocabulary_from_characters("公工司人"), ensure_ascii=False), encoding="utf-8")
    decoder = build_decoder(create_tokenizer(other), arpa, arpa_unigrams(arpa), alpha=0.5, beta=0.0)
    with pytest.raises(ValueError, match=r"alphabet \(alphabet.json\) does not match the tokenizer"):
        TOTCAKTProcessorWithLM(create_feature_extractor(), tokenizer, decoder)


def test_weights_are_chosen_by_the_dev_grid(tokenizer, arpa):
    processor = lm_processor(tokenizer, arpa)
    logits = [frames(tokenizer, *HOMOPHONE)]
    tuned = tune_weights(processor, logits, ["公司"], alphas=(0.0, 0.5), betas=(0.0,), beam_width=8)
    assert [point["cer"] for point in tuned["grid"]] == [0.5, 0.0]
    assert (tuned["alpha"], tuned["beta"], tuned["cer"]) == (0.5, 0.0, 0.0)


def test_kenlm_estimator_writes_a_character_model(tmp_path):
    texts = ["我是中国人。", "他是美国人", "  ", "中国人，好！"] * 3
    arpa = estimate_character_lm(texts, tmp_path / "lm" / "chars.arpa", order=3)
    assert sorted(arpa_unigrams(arpa)) == sorted(set("我是中国人他美好"))
    header = arpa.read_text(encoding="utf-8").split("\n\n")[0]
    assert "ngram 3=" in header
    import kenlm

    model = kenlm.Model(str(arpa))
    # Seen bigrams are likelier than the same characters in an unseen order.
    assert model.score("中 国 人", bos=True, eos=True) > model.score("人 国 中", bos=True, eos=True)
    assert [path.name for path in arpa.parent.iterdir()] == ["chars.arpa"]  # no scratch files left


def test_estimator_refuses_empty_text(tmp_path):
    with pytest.raises(ValueError, match="No text"):
        estimate_character_lm(["，。！", ""], tmp_path / "empty.arpa")


# Runs in a fresh interpreter that cannot import this package (and, with BLOCK_LM=1, nor pyctcdecode/kenlm; with
# WITHOUT_TRANSFORMERS_LM=1 the stock pipeline's pyctcdecode branch, deprecated for v6, fails when reached).
FRESH_PROCESS = textwrap.dedent(
    """
    import importlib.abc, json, os, sys

    blocked = ("modeling_tot_cakt",) + (("pyctcdecode", "kenlm") if os.environ.get("BLOCK_LM") else ())

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, Block())
    import numpy as np, soundfile as sf, torch
    from transformers import AutoModelForCTC, AutoProcessor, AutomaticSpeechRecognitionPipeline, pipeline

    if os.environ.get("WITHOUT_TRANSFORMERS_LM"):
        stock_init, stock_forward = AutomaticSpeechRecognitionPipeline.__init__, AutomaticSpeechRecognitionPipeline._forward

        def init_without_lm(self, *args, decoder=None, **kwargs):
            assert decoder is None, "a decoder reached the stock pipeline"
            stock_init(self, *args, **kwargs)

        def forward_without_lm(self, *args, **kwargs):
            assert self.type != "ctc_with_lm", "the stock pipeline's LM branch ran"
            return stock_forward(self, *args, **kwargs)

        AutomaticSpeechRecognitionPipeline.__init__ = init_without_lm
        AutomaticSpeechRecognitionPipeline._forward = forward_without_lm

    source, wav = sys.argv[1], sys.argv[2]
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
    model = AutoModelForCTC.from_pretrained(source, trust_remote_code=True).eval()
    audio, rate = sf.read(wav, dtype="float32")
    inputs = processor(audio=audio, sampling_rate=rate, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0].numpy()
    asr = pipeline("automatic-speech-recognition", model=source, trust_remote_code=True)
    result = asr({"raw": audio, "sampling_rate": rate}, return_timestamps="char")
    print(json.dumps({
        "processor": [type(processor).__name__, type(processor).__module__.split(".")[0]],
        "pipeline": type(asr).__name__,
        "has_decoder": processor.decoder is not None,
        "processor_text": processor.decode(logits).text,
        "greedy_text": "".join(processor.tokenizer.decode(logits.argmax(-1)).split()),
        "text": result["text"],
        "chunks": [chunk["text"] for chunk in result["chunks"]],
        "package_modules": sorted(m for m in sys.modules if m.split(".")[0] == "modeling_tot_cakt"),
    }, ensure_ascii=False))
    """
)


@pytest.fixture(scope="module")
def folder_with_lm(tmp_path_factory):
    """A tiny model whose head favours characters over blanks, saved, with a character LM attached."""
    tmp_path = tmp_path_factory.mktemp("lm_folder")
    torch.manual_seed(0)
    processor, folder = save_emitting_model(make_model().eval(), tmp_path)
    characters = list(processor.tokenizer.get_vocab())[3:]
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(characters, size=6)) for _ in range(50)]
    arpa = estimate_character_lm(texts, tmp_path / "chars.arpa", order=3)
    attach_language_model(folder, arpa, alpha=0.8, beta=0.5)
    return folder, write_wav(tmp_path / "clip.wav", seconds=1.5)


def run_fresh(folder, wav, **env_extra):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra)
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(folder), str(wav)],
        cwd=folder.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_attached_folder_holds_the_decoder_files(folder_with_lm):
    folder = folder_with_lm[0]
    assert json.loads((folder / "alphabet.json").read_text(encoding="utf-8"))["is_bpe"] is True
    lm_files = sorted(path.name for path in (folder / "language_model").iterdir())
    assert lm_files[0] == "attrs.json" and lm_files[-1] == "unigrams.txt" and len(lm_files) == 3
    attrs = json.loads((folder / "language_model" / "attrs.json").read_text(encoding="utf-8"))
    assert (attrs["alpha"], attrs["beta"]) == (0.8, 0.5)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["custom_pipelines"]["automatic-speech-recognition"]["impl"] == (
        "processing_tot_cakt_lm.TOTCAKTSpeechRecognitionPipeline"
    )
    processor_config = json.loads((folder / "processor_config.json").read_text(encoding="utf-8"))
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_tot_cakt_lm.TOTCAKTProcessorWithLM"
    assert (folder / "processing_tot_cakt_lm.py").is_file()


def test_fresh_process_decodes_with_the_lm_through_processor_and_pipeline(folder_with_lm):
    folder, wav = folder_with_lm
    out, _ = run_fresh(folder, wav)
    assert out["processor"] == ["TOTCAKTProcessorWithLM", "transformers_modules"]
    assert out["pipeline"] == "TOTCAKTSpeechRecognitionPipeline" and out["has_decoder"]
    assert out["package_modules"] == []
    # The LM changes this clip's transcript, and the pipeline gives the processor's LM transcript, unspaced.
    assert out["processor_text"] != out["greedy_text"]
    assert out["text"] == out["processor_text"] and " " not in out["text"]
    assert "".join(out["chunks"]) == out["text"] and all(len(chunk) == 1 for chunk in out["chunks"])
    # The same decoding as the package's own processor in this process.
    processor = TOTCAKTProcessorWithLM.from_pretrained(folder)
    model = TOTCAKTForCTC.from_pretrained(folder).eval()
    audio, rate = sf.read(wav, dtype="float32")
    with torch.no_grad():
        logits = model(**processor(audio=audio, sampling_rate=rate, return_tensors="pt")).logits[0].numpy()
    assert processor.decode(logits).text == out["text"]


def test_the_pipeline_decodes_with_the_lm_where_the_stock_lm_branch_is_gone(folder_with_lm):
    folder, wav = folder_with_lm
    out, _ = run_fresh(folder, wav, WITHOUT_TRANSFORMERS_LM="1")
    assert out["has_decoder"] and out["processor_text"] != out["greedy_text"]
    assert out["text"] == out["processor_text"]
    assert "".join(out["chunks"]) == out["text"]


def test_a_clips_lm_transcript_does_not_depend_on_its_batch_and_hotwords_reach_the_pipeline(folder_with_lm, tmp_path):
    from transformers import pipeline

    folder = folder_with_lm[0]
    asr = pipeline("automatic-speech-recognition", model=str(folder), trust_remote_code=True)
    clips = [
        sf.read(write_wav(tmp_path / f"{i}.wav", seconds, seed=i))[0] for i, seconds in enumerate((0.6, 1.5, 1.0))
    ]
    clips = [{"raw": clip.astype(np.float32), "sampling_rate": 16000} for clip in clips]
    alone = [asr(dict(clip))["text"] for clip in clips]
    batched = [output["text"] for output in asr([dict(clip) for clip in clips], batch_size=3)]
    assert batched == alone and len(set(alone)) == 3
    # The same transcript as the processor's beam search on the clip's own logits.
    processor = TOTCAKTProcessorWithLM.from_pretrained(folder)
    model = TOTCAKTForCTC.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(**processor(audio=clips[0]["raw"], sampling_rate=16000, return_tensors="pt")).logits[0].numpy()
    assert alone[0] == processor.decode(logits).text
    # decoder_kwargs reach the beam search: a hotword made of the clip's characters in another order wins.
    target = alone[1][::-1]
    boosted = asr(dict(clips[1]), decoder_kwargs={"hotwords": [target], "hotword_weight": 1000.0, "beam_width": 64})
    assert boosted["text"] == processor.decode(
        model(**processor(audio=clips[1]["raw"], sampling_rate=16000, return_tensors="pt")).logits[0].detach().numpy(),
        hotwords=[target], hotword_weight=1000.0, beam_width=64,
    ).text  # fmt: skip
    assert boosted["text"] != alone[1]


def test_long_audio_in_windows_with_the_lm_joins_them_as_the_stock_pipeline_does(folder_with_lm, tmp_path):
    """A joined multi-sentence clip in overlapping windows. The model's head is sharpened (weights x 200, no bias,
    the unknown token and the delimiter never chosen: near one-hot posteriors that change from frame to frame), so
    a beam search with the language model weighted 0 finds the arg-max path: the LM pipeline must then write what
    the stock greedy pipeline writes from the same windows, i.e. join the windows' logits with the same overlaps
    cut, in batches of windows too."""
    import shutil

    from transformers import AutomaticSpeechRecognitionPipeline, pipeline

    folder = tmp_path / "sharp"
    shutil.copytree(folder_with_lm[0], folder)
    model = TOTCAKTForCTC.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight.mul_(200.0)
        model.lm_head.bias.zero_()
        model.lm_head.bias[1:3] = -1e4  # [UNK] and "|" (ids 1, 2): pyctcdecode scores them apart
    model.save_pretrained(folder)
    clip = np.concatenate([sf.read(write_wav(tmp_path / f"{i}.wav", 1.5, seed=i))[0] for i in range(3)])
    audio = {"raw": clip.astype(np.float32), "sampling_rate": 16000}
    windows = {"chunk_length_s": 1.6, "stride_length_s": 0.4}
    asr = pipeline("automatic-speech-recognition", model=str(folder), trust_remote_code=True)
    stock = AutomaticSpeechRecognitionPipeline(
        model=asr.model, tokenizer=asr.tokenizer, feature_extractor=asr.feature_extractor
    )
    greedy = "".join(stock(dict(audio), **windows)["text"].split())
    zero_lm = asr(dict(audio), decoder_kwargs={"alpha": 0.0, "beta": 0.0}, **windows)["text"]
    # One character in 2,400 may differ where two characters nearly tie on a frame (the beam sums the paths,
    # greedy takes each frame's arg-max); a window joined with its overlap kept or cut twice changes hundreds.
    import jiwer

    assert len(greedy) >= 1000 and jiwer.cer(greedy, zero_lm) < 0.002
    assert greedy != "".join(stock(dict(audio))["text"].split())  # the windows do change what is heard
    in_batches = asr(dict(audio), decoder_kwargs={"alpha": 0.0, "beta": 0.0}, batch_size=3, **windows)["text"]
    assert jiwer.cer(zero_lm, in_batches) < 0.002


def test_without_pyctcdecode_and_kenlm_loading_says_what_to_install_and_decodes_greedily(folder_with_lm):
    folder, wav = folder_with_lm
    out, stderr = run_fresh(folder, wav, BLOCK_LM="1")
    assert not out["has_decoder"]
    assert "pip install --no-deps pyctcdecode==0.5.0" in stderr
    assert out["processor_text"] == out["greedy_text"] == out["text"]


def test_copied_lm_code_file_imports_only_what_decoding_needs(folder_with_lm):
    import ast

    allowed = {
        "__future__",
        "dataclasses",
        "json",
        "multiprocessing",
        "os",
        "shutil",
        "numpy",
        "transformers",
        "huggingface_hub",
        "pyctcdecode",
        "kenlm",
    }
    tree = ast.parse((folder_with_lm[0] / "processing_tot_cakt_lm.py").read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "the LM code file is copied alone: no relative imports"
            roots.add(node.module.split(".")[0])
    assert roots <= allowed, roots - allowed


def test_train_hf_scores_eval_and_test_greedily_and_with_the_language_model(speech_corpus, tmp_path):
    from test_train_hf import common_args, run_training

    arpa = estimate_character_lm(speech_corpus.train_texts, tmp_path / "chars.arpa", order=3)
    out = tmp_path / "out"
    results = run_training(
        *common_args(out, "unused-teacher", tmp_path / "cache"),
        "--alignment",
        "none",
        "--train_manifest",
        speech_corpus.train_manifest,
        "--eval_manifest",
        speech_corpus.eval_manifest,
        "--test_manifest",
        speech_corpus.eval_manifest,
        "--do_train",
        "--do_eval",
        "--do_predict",
        "--max_steps",
        6,
        "--language_model",
        arpa,
        "--lm_beam_width",
        8,
    )
    lm_results = json.loads((out / "eval_lm_results.json").read_text(encoding="utf-8"))
    # The greedy decoding behind the split is the Trainer's evaluation; eval and test are the same clips here.
    assert lm_results["eval_cer_greedy"] == pytest.approx(results["eval"]["eval_cer"], abs=1e-6)
    assert results["test_lm"]["test_cer_lm"] == pytest.approx(lm_results["eval_cer_lm"])
    assert lm_results["eval_greedy_homophone_cer"] + lm_results["eval_greedy_other_cer"] == pytest.approx(
        lm_results["eval_cer_greedy"]
    )
    attrs = json.loads((out / "language_model" / "attrs.json").read_text(encoding="utf-8"))
    assert (attrs["alpha"], attrs["beta"]) == (lm_results["lm_alpha"], lm_results["lm_beta"])


def test_a_missing_kenlm_estimator_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KENLM_BIN", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(FileNotFoundError, match=r"lmplz was not found: build KenLM's estimator with `make kenlm`"):
        estimate_character_lm(["中国人"], tmp_path / "lm.arpa")


def test_a_file_that_is_not_arpa_is_refused(tmp_path):
    path = tmp_path / "text.arpa"
    path.write_text("中 国 人\n", encoding="utf-8")
    with pytest.raises(ValueError, match="has no 1-grams: not an ARPA language model"):
        arpa_unigrams(path)


def test_train_hf_language_model_arguments_are_checked_first(speech_corpus, arpa, tmp_path):
    from test_train_hf import run_training

    data = ("--output_dir", tmp_path / "out", "--do_train", "--dataset_name", speech_corpus.root)
    with pytest.raises(ValueError, match="--language_model needs --do_eval"):
        run_training(*data, "--language_model", arpa)
    with pytest.raises(ValueError, match="is not a file: give an ARPA character model"):
        run_training(*data, "--do_eval", "--language_model", tmp_path / "missing.arpa")


def test_weights_chosen_on_the_built_decoder_are_the_ones_saved_and_the_model_is_built_once(tmp_path, monkeypatch):
    from modeling_tot_cakt.training import language_model

    torch.manual_seed(0)
    processor, folder = save_emitting_model(make_model().eval(), tmp_path)
    characters = list(processor.tokenizer.get_vocab())[3:]
    texts = ["".join(np.random.default_rng(0).choice(characters, size=6)) for _ in range(20)]
    arpa = estimate_character_lm(texts, tmp_path / "chars.arpa", order=2)
    builds = []
    original = language_model.binary_language_model
    monkeypatch.setattr(language_model, "binary_language_model", lambda *args: builds.append(args) or original(*args))
    seen = []

    def choose(with_lm):
        seen.append(with_lm.decoder.alpha)  # the decoder is built with the defaults
        return 1.25, 2.5

    with_lm = language_model.attach_language_model(folder, arpa, choose_weights=choose)
    assert len(builds) == 1 and seen == [0.5]
    attrs = json.loads((folder / "language_model" / "attrs.json").read_text(encoding="utf-8"))
    assert (attrs["alpha"], attrs["beta"]) == (1.25, 2.5)
    assert (with_lm.decoder.alpha, with_lm.decoder.beta) == (1.25, 2.5)
    # Decoding without explicit weights uses the chosen ones, not those the decoder was built with.
    logits = np.log(np.full((6, len(processor.tokenizer)), 1e-3, dtype=np.float32))
    with_lm.decode(logits, beam_width=4)
    assert (with_lm.decoder.alpha, with_lm.decoder.beta) == (1.25, 2.5)


def damaged_copy(folder, tmp_path, damage):
    """A copy of the attached model folder, `damage(copy)` applied."""
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(folder, copy)
    damage(copy)
    return copy


def halve_unigrams(folder):
    path = folder / "language_model" / "unigrams.txt"
    unigrams = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(unigrams[: len(unigrams) // 2]) + "\n", encoding="utf-8")


def write_attrs(folder, **attrs):
    path = folder / "language_model" / "attrs.json"
    path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), **attrs}), encoding="utf-8")


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda f: next((f / "language_model").glob("*.bin")).write_bytes(b"\x93garbage" * 64), r"\.bin is not a KenLM"),
        (lambda f: (f / "language_model" / "attrs.json").write_text("{alpha: 1", encoding="utf-8"), r"attrs\.json is not valid JSON"),
        (lambda f: write_attrs(f, alpha=float("nan")), r"weight alpha must be a finite number in \[0, 100\], got nan"),
        (lambda f: write_attrs(f, alpha=float("inf")), r"weight alpha must be a finite number in \[0, 100\], got inf"),
        (lambda f: write_attrs(f, beta=-1e400), r"weight beta must be a finite number in \[-100, 100\], got -inf"),
        (lambda f: write_attrs(f, alpha="0.5"), r"weight alpha must be a finite number in \[0, 100\], got '0\.5'"),
        (lambda f: write_attrs(f, alpha=1e30), r"weight alpha must be a finite number in \[0, 100\], got 1e\+30"),
        (lambda f: write_attrs(f, alpha=-0.5), r"weight alpha must be .* got -0\.5"),
        (lambda f: (f / "language_model" / "unigrams.txt").write_text("", encoding="utf-8"), r"unigram list .* leaves out 12 characters"),
        (lambda f: halve_unigrams(f), r"unigram list .* leaves out 6 characters"),
        (lambda f: (f / "alphabet.json").write_text('["a"]', encoding="utf-8"), r"alphabet\.json holds a list"),
    ],
)  # fmt: skip
def test_a_damaged_language_model_folder_is_named(folder_with_lm, tmp_path, damage, message):
    folder = damaged_copy(folder_with_lm[0], tmp_path, damage)
    with pytest.raises(ValueError, match=message):
        TOTCAKTProcessorWithLM.from_pretrained(folder)


def test_a_permuted_alphabet_is_refused_by_the_processor_and_the_pipeline(folder_with_lm, tmp_path):
    from transformers import pipeline

    def permute(copy):
        alphabet = json.loads((copy / "alphabet.json").read_text(encoding="utf-8"))
        alphabet["labels"][3], alphabet["labels"][4] = alphabet["labels"][4], alphabet["labels"][3]
        (copy / "alphabet.json").write_text(json.dumps(alphabet, ensure_ascii=False), encoding="utf-8")

    folder = damaged_copy(folder_with_lm[0], tmp_path, permute)
    with pytest.raises(ValueError, match="does not match the tokenizer.*first difference at token id 3"):
        TOTCAKTProcessorWithLM.from_pretrained(folder)
    with pytest.raises(ValueError, match="does not match the tokenizer.*first difference at token id 3"):
        pipeline("automatic-speech-recognition", model=str(folder), trust_remote_code=True)


@pytest.mark.parametrize("weights", [{"alpha": float("nan")}, {"alpha": float("inf")}, {"beta": float("-inf")}])
def test_attach_refuses_non_finite_weights_and_leaves_the_folder_alone(tmp_path, weights):
    torch.manual_seed(0)
    processor, folder = save_emitting_model(make_model().eval(), tmp_path)
    arpa = estimate_character_lm([list(processor.tokenizer.get_vocab())[3] * 4], tmp_path / "chars.arpa", order=2)
    with pytest.raises(ValueError, match="must be a finite number"):
        attach_language_model(folder, arpa, **weights)
    assert not (folder / "language_model").exists() and not (folder / "alphabet.json").exists()


def test_attach_refuses_a_language_model_over_other_characters(tmp_path):
    torch.manual_seed(0)
    _, folder = save_emitting_model(make_model().eval(), tmp_path)
    arpa = estimate_character_lm(["abc", "bca", "cab"], tmp_path / "latin.arpa", order=2)
    with pytest.raises(ValueError, match=r"None of the 3 characters of .*latin\.arpa .* is in the model's vocabulary"):
        attach_language_model(folder, arpa)
