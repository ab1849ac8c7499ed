"""A clip's transcript is the same alone and in any batch, for every encoder family and without a language model.

Padding a clip in a batch must change neither its valid frames (the group normalisation of a raw-waveform
encoder's first convolution is taken over the clip's own samples) nor what is decoded after them (the frames past a
clip's end are a certain blank), so transformers' stock pipeline and any greedy decoder of the logits write the same
text alone and batched.
"""

import numpy as np
import pytest
import torch
from tiny_models import TINY_WAV2VEC2, TINY_WAV2VEC2_BERT, make_model, save_emitting_model
from transformers import pipeline

from modeling_tot_cakt.modeling_tot_cakt import ClipGroupNorm

ENCODERS = {
    "raw waveform, layer norm": TINY_WAV2VEC2,
    "raw waveform, group norm (wav2vec2-base)": {**TINY_WAV2VEC2, "feat_extract_norm": "group"},
    "log-mel (Wav2Vec2-BERT)": TINY_WAV2VEC2_BERT,
}


def sound(seconds: float, seed: int) -> np.ndarray:
    """A tone whose loudness changes every 0.1 s, with noise in its quiet parts: each seed says something else."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    envelope = np.repeat(rng.uniform(0, 1, size=int(seconds * 10) + 1), 1600)[: len(t)]
    tone = np.sin(2 * np.pi * rng.uniform(100, 2000) * t)
    return (0.3 * envelope * tone + 0.3 * (1 - envelope) * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module", params=list(ENCODERS), ids=list(ENCODERS))
def folder(request, tmp_path_factory):
    """A saved tiny model of the family (no language model) whose head emits characters, and three clips."""
    tmp_path = tmp_path_factory.mktemp("batch")
    torch.manual_seed(0)
    processor, saved = save_emitting_model(make_model(ENCODERS[request.param]).eval(), tmp_path)
    clips = [sound(seconds, seed) for seed, seconds in enumerate((0.6, 1.5, 1.0))]
    return saved, processor, clips


def test_the_stock_pipeline_writes_a_clips_transcript_alone_and_in_a_batch_alike(folder):
    saved, _, clips = folder
    asr = pipeline("automatic-speech-recognition", model=str(saved), trust_remote_code=True)
    alone = [asr({"raw": clip, "sampling_rate": 16000})["text"] for clip in clips]
    batched = [out["text"] for out in asr([{"raw": clip, "sampling_rate": 16000} for clip in clips], batch_size=3)]
    assert batched == alone
    assert len(set(alone)) == 3  # the clips say different things: the comparison can tell them apart


def test_windows_of_a_long_clip_batched_give_the_transcript_of_one_window_at_a_time(folder):
    saved, _, clips = folder
    asr = pipeline("automatic-speech-recognition", model=str(saved), trust_remote_code=True)
    audio = {"raw": np.concatenate(clips * 2), "sampling_rate": 16000}  # 6.2 s: its last window is short (padded)
    windows = {"chunk_length_s": 1.6, "stride_length_s": 0.4}
    one_at_a_time = asr(dict(audio), batch_size=1, **windows)["text"]
    assert asr(dict(audio), batch_size=4, **windows)["text"] == one_at_a_time


def test_a_padded_clips_logits_are_its_own_then_a_certain_blank(folder):
    saved, processor, clips = folder
    from transformers import AutoModelForCTC

    model = AutoModelForCTC.from_pretrained(saved, trust_remote_code=True).eval()
    batch = processor(audio=[clips[0], clips[1]], sampling_rate=16000, padding=True, return_tensors="pt")
    alone = processor(audio=clips[0], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        padded_logits = model(**batch).logits[0]
        own = model(**alone).logits[0]
    frames = own.shape[0]
    assert padded_logits.shape[0] > frames
    # A clip alone is what transformers' encoder makes of it (no mask: the stock normalisations run).
    with torch.no_grad():
        stock = model(alone[model.main_input_name]).logits[0]
    torch.testing.assert_close(own, stock, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(padded_logits[:frames], own, atol=2e-4, rtol=1e-4)
    blank = torch.full((model.config.vocab_size,), -1e4)
    blank[model.config.pad_token_id] = 0.0
    assert torch.equal(padded_logits[frames:], blank.expand(padded_logits.shape[0] - frames, -1))
    # The processor's greedy batch decode of the padded batch equals each clip's own.
    texts = processor.batch_decode(model(**batch).logits.argmax(-1))
    assert texts[0] == processor.decode(own.argmax(-1))


def test_clip_group_norm_is_group_norm_alone_and_each_clips_own_statistics_in_a_batch():
    torch.manual_seed(0)
    norm = ClipGroupNorm(2, 4, affine=True)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        norm.bias.copy_(torch.tensor([0.0, 0.1, -0.2, 0.3]))
    short, long = torch.randn(4, 5), torch.randn(4, 9)
    reference = torch.nn.GroupNorm(2, 4, affine=True)
    reference.load_state_dict(norm.state_dict())  # same parameter names as the layer it replaces
    batch = torch.zeros(2, 4, 9)
    batch[0, :, :5], batch[1] = short, long
    assert torch.allclose(norm(batch), reference(batch))  # no lengths given: nn.GroupNorm
    norm.clip_lengths = torch.tensor([5, 9])
    out = norm(batch)
    torch.testing.assert_close(out[0, :, :5], reference(short[None])[0])
    torch.testing.assert_close(out[1], reference(long[None])[0])
    assert torch.equal(out[0, :, 5:], torch.zeros(4, 4) + norm.bias[:, None])  # padding: the bias alone
    # A hand-made case: one channel per group, values 1 and 3 then padding: mean 2, variance 1.
    single = ClipGroupNorm(1, 1, eps=0.0, affine=False)
    single.clip_lengths = torch.tensor([2])
    assert single(torch.tensor([[[1.0, 3.0, 100.0]]])).tolist() == [[[-1.0, 1.0, 0.0]]]


@pytest.mark.parametrize("family, replaced", [(name, count) for name, count in zip(ENCODERS, (0, 1, 2))])
def test_the_clip_aware_normalisations_keep_the_encoders_checkpoint_names(family, replaced):
    """group norm: the first convolution's; Wav2Vec2-BERT with its one adapter layer: the two in front of its convolutions."""
    from transformers import AutoConfig, AutoModel

    model = make_model(ENCODERS[family])
    stock = AutoModel.from_config(AutoConfig.for_model(**ENCODERS[family]))
    assert len(model.tot_cakt.clip_norms) == replaced
    assert set(model.tot_cakt.encoder.state_dict()) == set(stock.state_dict())
    batch = torch.zeros(2, 8000) if family.startswith("raw") else torch.zeros(2, 30, 160)
    model(
        batch,
        attention_mask=torch.tensor([[1] * batch.shape[1], [1] * (batch.shape[1] // 2) + [0] * (batch.shape[1] // 2)]),
    )
    assert all(norm.clip_lengths is None for norm in model.tot_cakt.clip_norms)  # reset after each forward
