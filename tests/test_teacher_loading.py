"""Loading the teacher: a masked-LM checkpoint loads without transformers' key report, a checkpoint that lacks
encoder weights is refused instead of running with random ones."""

import logging

import pytest
from safetensors.torch import load_file, save_file
from tiny_models import make_teacher
from transformers import BertConfig, BertForMaskedLM, BertTokenizer

from modeling_tot_cakt import load_teacher


def masked_lm_teacher(directory):
    """A tiny BertForMaskedLM (like the demo's teacher and bert-base-chinese: heads `cls.*`, no pooler)."""
    base = make_teacher(directory / "base")
    config = BertConfig.from_pretrained(base)
    BertForMaskedLM(config).save_pretrained(directory / "mlm")
    BertTokenizer.from_pretrained(base).save_pretrained(directory / "mlm")
    return directory / "mlm"


def test_a_masked_lm_checkpoint_loads_without_the_key_report(tmp_path, caplog):
    folder = masked_lm_teacher(tmp_path)
    with caplog.at_level(logging.INFO):
        teacher, _ = load_teacher(str(folder))
    assert type(teacher).__name__ == "BertModel"
    assert "LOAD REPORT" not in caplog.text and "UNEXPECTED" not in caplog.text
    assert logging.getLogger("transformers.modeling_utils").level == logging.NOTSET  # restored


def test_a_checkpoint_without_encoder_weights_is_refused(tmp_path):
    folder = masked_lm_teacher(tmp_path)
    weights = load_file(folder / "model.safetensors")
    dropped = [key for key in weights if "encoder.layer.0.attention.self.query" in key]
    assert dropped
    save_file({key: value for key, value in weights.items() if key not in dropped}, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks 2 weights its encoder needs .*attention\.self\.query"):
        load_teacher(str(folder))
