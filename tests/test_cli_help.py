"""Every command-line entry point prints its help and exits 0 (help strings are %-formatted by argparse)."""

import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

MODULES = [
    "modeling_tot_cakt.demo.synthesis",
    "modeling_tot_cakt.demo.teacher_pretraining",
    "modeling_tot_cakt.demo",
    "modeling_tot_cakt.training.export_onnx",
]
SCRIPTS = ["train_hf.py"] + sorted(str(path.relative_to(REPO)) for path in (REPO / "benchmarks").glob("bench_*.py"))


def _run_help(monkeypatch, capsys, run, name):
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "usage:" in out and "--help" in out


@pytest.mark.parametrize("module", MODULES)
def test_module_help(module, monkeypatch, capsys):
    _run_help(monkeypatch, capsys, lambda: runpy.run_module(module, run_name="__main__", alter_sys=True), module)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help(script, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / Path(script).parent))
    _run_help(monkeypatch, capsys, lambda: runpy.run_path(str(REPO / script), run_name="__main__"), script)
