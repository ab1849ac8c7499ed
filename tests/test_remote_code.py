"""The saved folder works through `trust_remote_code` (AutoModelForCTC, AutoModel and the pipeline) in a process
where this package cannot be imported."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny_models import TINY_WAV2VEC2_BERT, make_model, save_emitting_model, write_wav

CODE_FILES = {"configuration_tot_cakt.py", "feature_extraction_tot_cakt.py", "modeling_tot_cakt.py", "tot.py"}
EXTRACTOR = {"wav2vec2": "TOTCAKTFeatureExtractor", "wav2vec2-bert": "TOTCAKTLogMelFeatureExtractor"}
STOCK_EXTRACTOR = {"wav2vec2": "Wav2Vec2FeatureExtractor", "wav2vec2-bert": "SeamlessM4TFeatureExtractor"}

# The start of a script for a fresh interpreter: makes `modeling_tot_cakt` unimportable.
BLOCK_PACKAGE = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_tot_cakt" or name.startswith("modeling_tot_cakt."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
            return None

    sys.meta_path.insert(0, BlockPackage())
    try:
        import modeling_tot_cakt  # noqa: F401
        raise SystemExit("the package is still importable")
    except ModuleNotFoundError:
        pass
    """
)
# Runs in a fresh interpreter without the package: loads and transcribes.
FRESH_PROCESS = BLOCK_PACKAGE + textwrap.dedent(
    """
    import numpy as np, soundfile as sf, torch
    from transformers import AutoFeatureExtractor, AutoModel, AutoModelForCTC, AutoProcessor, pipeline

    source, wav, reference = sys.argv[1], sys.argv[2], sys.argv[3]
    model = AutoModelForCTC.from_pretrained(source, trust_remote_code=True).eval()
    assert "transformers_modules" in type(model).__module__, type(model).__module__
    ref = np.load(reference)
    base = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
    assert "transformers_modules" in type(base).__module__, type(base).__module__
    with torch.no_grad():
        logits = model(torch.from_numpy(ref["inputs"]), attention_mask=torch.from_numpy(ref["mask"])).logits
        features = base(torch.from_numpy(ref["inputs"]), attention_mask=torch.from_numpy(ref["mask"]))
    asr = pipeline("automatic-speech-recognition", model=source, trust_remote_code=True)
    audio, rate = sf.read(wav, dtype="float32")
    result = asr({"raw": audio, "sampling_rate": rate}, return_timestamps="char")
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
    extractors = {
        "pipeline": asr.feature_extractor,
        "processor": processor.feature_extractor,
        "auto": AutoFeatureExtractor.from_pretrained(source, trust_remote_code=True),
    }
    # The clip is 16-bit PCM: its int16 samples are the float32 ones times 32768.
    pcm, _ = sf.read(wav, dtype="int16")
    key = processor.feature_extractor.model_input_names[0]
    try:
        pcm_text = asr({"raw": pcm, "sampling_rate": rate})["text"]
        pcm_features = processor(audio=pcm, sampling_rate=rate)[key][0]
        pcm_feature_diff = float(np.abs(pcm_features - processor(audio=audio, sampling_rate=rate)[key][0]).max())
    except Exception as error:  # a stock log-mel extractor (a folder saved by an earlier version) overflows
        pcm_text, pcm_feature_diff = type(error).__name__, None
    print(json.dumps({
        "extractors": {
            name: [type(x).__name__, type(x).__module__.split(".")[0]] for name, x in extractors.items()
        },
        "pcm_text": pcm_text,
        "pcm_feature_diff": pcm_feature_diff,
        "max_logit_diff": float((logits - torch.from_numpy(ref["logits"])).abs().max()),
        "text": result["text"],
        "chunks": [c["text"] for c in result["chunks"]],
        "class": type(model).__name__,
        "base_class": type(base).__name__,
        "max_feature_diff": float((features.last_hidden_state - torch.from_numpy(ref["features"])).abs().max()),
        "package_modules": sorted(m for m in sys.modules if m.split(".")[0] == "modeling_tot_cakt"),
        "remote_modules": sorted(m for m in sys.modules if m.startswith("transformers_modules") and "tot" in m),
    }, ensure_ascii=False))
    """
)


@pytest.fixture(params=["wav2vec2", "wav2vec2-bert"])
def saved_model(request, tmp_path):
    """A tiny trained-for-nothing model + processor saved with save_pretrained, and a reference forward pass."""
    torch.manual_seed(0)
    encoder = TINY_WAV2VEC2_BERT if request.param == "wav2vec2-bert" else None
    return save_with_reference(make_model(encoder).eval(), tmp_path)


def save_with_reference(model, tmp_path):
    """
    Save `model` and its processor in `tmp_path/saved`, with a clip and the model's inputs, logits and features on it:
    `(folder, wav, reference.npz, expected transcript)`.
    """
    processor, folder = save_emitting_model(model, tmp_path)
    wav = write_wav(tmp_path / "clip.wav", seconds=1.5)
    audio, rate = sf.read(wav, dtype="float32")
    inputs = processor(audio=audio, sampling_rate=rate, return_tensors="pt")
    key = model.main_input_name
    with torch.no_grad():
        logits = model(inputs[key], attention_mask=inputs["attention_mask"]).logits
        features = model.tot_cakt(inputs[key], attention_mask=inputs["attention_mask"]).last_hidden_state
    expected = processor.batch_decode(logits.argmax(-1))[0]
    np.savez(
        tmp_path / "reference.npz",
        inputs=inputs[key].numpy(),
        mask=inputs["attention_mask"].numpy(),
        logits=logits.numpy(),
        features=features.numpy(),
    )
    return folder, wav, tmp_path / "reference.npz", expected


def run_fresh(source, wav, reference, env_extra, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra)
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(source), str(wav), str(reference)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_save_pretrained_writes_auto_map_and_code_files(saved_model):
    folder = saved_model[0]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_tot_cakt.TOTCAKTConfig",
        "AutoModel": "modeling_tot_cakt.TOTCAKTModel",
        "AutoModelForCTC": "modeling_tot_cakt.TOTCAKTForCTC",
    }
    assert {p.name for p in folder.iterdir()} >= CODE_FILES
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    extractor = json.loads((folder / "processor_config.json").read_text())["feature_extractor"]
    name = EXTRACTOR[config["encoder_config"]["model_type"]]
    assert extractor["feature_extractor_type"] == name
    assert extractor["auto_map"] == {"AutoFeatureExtractor": f"feature_extraction_tot_cakt.{name}"}


def test_fresh_process_loads_folder_and_transcribes(saved_model, tmp_path):
    folder, wav, reference, expected = saved_model
    out = run_fresh(
        folder, wav, reference, {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}, tmp_path
    )
    assert out["class"] == "TOTCAKTForCTC" and out["base_class"] == "TOTCAKTModel"
    assert out["max_logit_diff"] < 1e-5 and out["max_feature_diff"] < 1e-5
    assert out["text"] == expected and expected
    assert "".join(out["chunks"]) == expected
    assert out["package_modules"] == [] and out["remote_modules"]
    # The feature extractor is the package's, loaded as remote code, and takes 16-bit PCM as its float samples.
    name = EXTRACTOR[json.loads((folder / "config.json").read_text())["encoder_config"]["model_type"]]
    assert out["extractors"] == {use: [name, "transformers_modules"] for use in ("pipeline", "processor", "auto")}
    assert out["pcm_feature_diff"] == 0.0 and out["pcm_text"] == expected


def test_fresh_process_runs_a_model_whose_ctc_head_reads_the_adapter(tmp_path):
    """The adapted-features variant ships its adapter: the remote code rebuilds it from config.json and gives the
    same logits and transcript, with no teacher anywhere (the config names a folder that does not exist)."""
    torch.manual_seed(0)
    model = make_model(teacher_dir=tmp_path / "no-such-teacher", ctc_input="adapter").eval()
    folder, wav, reference, expected = save_with_reference(model, tmp_path)
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    out = run_fresh(folder, wav, reference, env, tmp_path)
    assert out["class"] == "TOTCAKTForCTC" and out["package_modules"] == [] and out["remote_modules"]
    assert out["max_logit_diff"] < 1e-5 and out["max_feature_diff"] < 1e-5
    assert out["text"] == expected and expected


def test_fresh_process_loads_a_folder_saved_with_a_stock_feature_extractor(saved_model, tmp_path):
    """A folder saved before the package had its own feature extractor (stock class, no auto_map, no
    feature_extraction_tot_cakt.py) still loads and transcribes float samples as before."""
    folder, wav, reference, expected = saved_model
    model_type = json.loads((folder / "config.json").read_text())["encoder_config"]["model_type"]
    processor_config = json.loads((folder / "processor_config.json").read_text())
    del processor_config["feature_extractor"]["auto_map"]
    processor_config["feature_extractor"]["feature_extractor_type"] = STOCK_EXTRACTOR[model_type]
    (folder / "processor_config.json").write_text(json.dumps(processor_config))
    (folder / "feature_extraction_tot_cakt.py").unlink()
    out = run_fresh(
        folder, wav, reference, {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}, tmp_path
    )
    assert out["max_logit_diff"] < 1e-5 and out["text"] == expected
    stock = [STOCK_EXTRACTOR[model_type], "transformers"]
    assert out["extractors"] == {use: stock for use in ("pipeline", "processor", "auto")}
    # Integer PCM as transformers' stock extractors take it (docs/BAD_INPUT.md): the raw-waveform one normalises
    # the scale away (float64 features, which the model casts); the log-mel one overflows.
    if model_type == "wav2vec2":
        assert out["pcm_text"] == expected and 0 < out["pcm_feature_diff"] < 1e-5
    else:
        assert out["pcm_text"] == "OverflowError"


def test_fresh_process_loads_repo_id_from_hub_cache_offline(saved_model, tmp_path):
    """A Hub-style cache (models--org--name/snapshots/<commit>) resolves by repo id with HF_HUB_OFFLINE=1."""
    folder, wav, reference, expected = saved_model
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tot-cakt--tiny-test"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = run_fresh("tot-cakt/tiny-test", wav, reference, env, tmp_path)
    assert out["class"] == "TOTCAKTForCTC" and out["base_class"] == "TOTCAKTModel"
    assert out["max_logit_diff"] < 1e-5 and out["max_feature_diff"] < 1e-5
    assert out["text"] == expected and out["pcm_text"] == expected
    assert {module for _, module in out["extractors"].values()} == {"transformers_modules"}


# What the files copied for trust_remote_code may import: no network, subprocess or file-system modules
# (numpy and safetensors come with transformers; safetensors' `safe_open` reads the header of the weights file that
# transformers itself loads with it, to name a damaged one); of `os`, only the read-only `sysconf` (the solver's
# physical-memory check).
ALLOWED_IMPORTS = {
    *("__future__", "contextlib", "dataclasses", "math", "numbers", "os", "typing", "warnings"),
    *("numpy", "safetensors", "torch", "transformers"),
}
ALLOWED_OS_NAMES = {"sysconf"}
FORBIDDEN_BUILTINS = {"open", "eval", "exec", "compile", "__import__"}
FORBIDDEN_CALLS = {"torch.load", "torch.hub.load", "torch.save"}


def test_copied_code_files_import_only_torch_and_transformers(saved_model):
    import ast

    folder = saved_model[0]
    copied = sorted(folder.glob("*.py"))
    assert {p.name for p in copied} == CODE_FILES
    for path in copied:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import of a sibling file: must itself be a copied file
                    assert f"{node.module}.py" in CODE_FILES, (path.name, node.module)
                    continue
                roots = {node.module.split(".")[0]}
                if node.module == "os":
                    assert {alias.name for alias in node.names} <= ALLOWED_OS_NAMES, (path.name, node.lineno)
            elif isinstance(node, ast.Call):
                if isinstance(node.func, ast.Name):
                    assert node.func.id not in FORBIDDEN_BUILTINS, (path.name, node.lineno, node.func.id)
                assert ast.unparse(node.func) not in FORBIDDEN_CALLS, (path.name, node.lineno)
                continue
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os":
                assert node.attr in ALLOWED_OS_NAMES, (path.name, node.lineno, f"os.{node.attr}")
                continue
            else:
                continue
            assert roots <= ALLOWED_IMPORTS, (path.name, node.lineno, roots)


# Modules that unpickle, which can run arbitrary code from a downloaded file.
PICKLE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve"}


def test_nothing_in_the_repository_unpickles():
    """Weights and cached teacher features are read as safetensors: no source file imports a pickle module,
    calls `torch.load` without `weights_only=True`, or `np.load` with `allow_pickle=True`."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sources = [
        root / "train_hf.py",
        *(root / "modeling_tot_cakt").rglob("*.py"),
        *(root / "benchmarks").rglob("*.py"),
        *(root / "tests").rglob("*.py"),
    ]
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                assert not {alias.name.split(".")[0] for alias in node.names} & PICKLE_MODULES, (path, node.lineno)
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] not in PICKLE_MODULES, (path, node.lineno)
            elif isinstance(node, ast.Call):
                function = ast.unparse(node.func)
                keywords = {keyword.arg: ast.unparse(keyword.value) for keyword in node.keywords}
                if function.endswith("torch.load"):
                    assert keywords.get("weights_only") == "True", (path, node.lineno, function)
                if function in ("np.load", "numpy.load"):
                    assert keywords.get("allow_pickle", "False") == "False", (path, node.lineno)


def test_fresh_process_loads_a_graph_matching_model_and_transcribes(tmp_path):
    """A model trained with alignment="tot_gmot" keeps its graph-matching fields in config.json, and the remote
    code (whose configuration checks them) loads it where the package is not installed and transcribes."""
    torch.manual_seed(0)
    model = make_model(alignment="tot_gmot", gmot_alpha=0.3, gmot_max_outer=7).eval()
    folder, wav, reference, expected = save_with_reference(model, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert (config["alignment"], config["gmot_alpha"], config["gmot_max_outer"]) == ("tot_gmot", 0.3, 7)
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    out = run_fresh(folder, wav, reference, env, tmp_path)
    assert out["class"] == "TOTCAKTForCTC" and out["package_modules"] == [] and out["remote_modules"]
    assert out["max_logit_diff"] < 1e-5 and out["text"] == expected and expected
