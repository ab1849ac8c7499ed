import socket

import evaluate
import numpy as np
import pytest
from tiny_models import write_vocab
from transformers import EvalPrediction

from modeling_tot_cakt import create_tokenizer
from modeling_tot_cakt.training.trainer import CER_METRIC_PATH, CTCCharacterErrorRate, load_cer_metric


@pytest.fixture(scope="module")
def cer():
    return load_cer_metric()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return create_tokenizer(write_vocab(tmp_path_factory.mktemp("vocab")))


def test_loads_by_path_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("this test has no network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    metric = evaluate.load(CER_METRIC_PATH)
    assert metric.compute(predictions=["今天天汽好"], references=["今天天气很好"]) == pytest.approx(2 / 6)


def test_corpus_level_rate(cer):
    # 1 substitution + 1 deletion over 6 reference characters, then 1 insertion over 2.
    assert cer.compute(predictions=["今天天汽好", "你好啊"], references=["今天天气很好", "你好"]) == pytest.approx(
        3 / 8
    )
    assert cer.compute(predictions=["你好"], references=["你好"]) == 0.0
    assert cer.compute(predictions=[""], references=["你好"]) == 1.0


def test_empty_reference_is_an_error(cer):
    with pytest.raises(ValueError, match="empty references; references \\[1\\]"):
        cer.compute(predictions=["a", "b"], references=["a", ""])


def test_ctc_predictions_collapse_but_references_do_not(tokenizer, cer):
    ni, hao, zhong = tokenizer.convert_tokens_to_ids(["你", "好", "中"])
    # Greedy CTC frames: "你 你 _ 你 好 好" -> 你你好; padding frames are -100.
    predictions = np.array([[ni, ni, 0, ni, hao, hao, -100, -100]])
    labels = np.array([[ni, ni, hao, -100]])  # a reference with a real double character: 你你好
    metric = CTCCharacterErrorRate(tokenizer, cer)
    assert metric.decode(predictions, group_tokens=True) == ["你你好"]
    assert metric.decode(labels, group_tokens=False) == ["你你好"]
    assert metric(EvalPrediction(predictions=predictions, label_ids=labels)) == {"cer": 0.0}
    wrong = np.array([[zhong, 0, hao, -100, -100, -100, -100, -100]])
    assert metric(EvalPrediction(predictions=wrong, label_ids=labels)) == {"cer": pytest.approx(2 / 3)}


def test_unknown_character_counts_once(tokenizer, cer):
    ni = tokenizer.convert_tokens_to_ids("你")
    labels = np.array([[ni, tokenizer.unk_token_id]])  # "你" + an out-of-vocabulary character
    predictions = np.array([[ni, 0]])
    assert CTCCharacterErrorRate(tokenizer, cer)(EvalPrediction(predictions=predictions, label_ids=labels)) == {
        "cer": 0.5
    }
