import numpy as np
import pytest
import soundfile as sf

from modeling_tot_cakt.training import audio
from modeling_tot_cakt.training.audio import (
    AudioDecodingError,
    decode_audio,
    downmix,
    load_audio,
    resample,
    validate_waveform,
)


def tone(frequency, seconds, rate):
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def dominant_frequency(waveform, rate):
    spectrum = np.abs(np.fft.rfft(waveform))
    return np.fft.rfftfreq(len(waveform), 1 / rate)[spectrum.argmax()]


def test_path_bytes_and_datasets_dict_decode_alike(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, tone(440, 0.5, 16000), 16000)
    from_path = load_audio(str(path), 16000)
    from_bytes = load_audio(path.read_bytes(), 16000)
    from_dict = load_audio({"path": "ignored-when-bytes-are-given.wav", "bytes": path.read_bytes()}, 16000)
    from_dict_path = load_audio({"path": str(path), "bytes": None}, 16000)
    assert from_path.dtype == np.float32 and from_path.shape == (8000,)
    for other in (from_bytes, from_dict, from_dict_path):
        np.testing.assert_array_equal(from_path, other)


def test_stereo_is_downmixed_and_resampled(tmp_path):
    path = tmp_path / "stereo.flac"
    left, right = tone(500, 1.0, 8000), tone(1500, 1.0, 8000)
    sf.write(path, np.stack([left, right], axis=1), 8000)
    waveform = load_audio(path, 16000)
    assert waveform.ndim == 1 and len(waveform) == 16000
    spectrum = np.abs(np.fft.rfft(waveform))
    freqs = np.fft.rfftfreq(len(waveform), 1 / 16000)
    # Both channels survive the mix, at their own pitch, with equal weight.
    strongest = sorted(freqs[np.argsort(spectrum)[-2:]])
    assert strongest == pytest.approx([500, 1500], abs=2)


def test_resample_keeps_pitch_and_duration():
    waveform = resample(tone(1000, 0.5, 44100), 44100, 16000)
    assert len(waveform) == 8000
    assert dominant_frequency(waveform, 16000) == pytest.approx(1000, abs=3)
    same = tone(1000, 0.1, 16000)
    assert resample(same, 16000, 16000) is same


def test_downmix_averages_channels():
    np.testing.assert_allclose(downmix(np.array([[1.0, 3.0], [0.0, -2.0]])), [2.0, -1.0])


def test_missing_file(tmp_path):
    with pytest.raises(AudioDecodingError, match="not found"):
        load_audio(tmp_path / "nope.wav", 16000)


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    with pytest.raises(AudioDecodingError, match="Cannot decode audio .*corrupt.wav"):
        load_audio(path, 16000)


def test_empty_and_silent_and_non_finite_audio(tmp_path):
    empty, silent, broken = tmp_path / "empty.wav", tmp_path / "silent.wav", tmp_path / "nan.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    sf.write(silent, np.zeros(1600, dtype=np.float32), 16000)
    sf.write(broken, np.array([0.1, np.nan, 0.2], dtype=np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioDecodingError, match="empty.wav has no samples"):
        load_audio(empty, 16000)
    with pytest.raises(AudioDecodingError, match="silence"):
        load_audio(silent, 16000)
    with pytest.raises(AudioDecodingError, match="NaN"):
        load_audio(broken, 16000)


def test_entry_without_path_or_bytes():
    with pytest.raises(AudioDecodingError, match="needs a 'path' or 'bytes'"):
        decode_audio({"path": None, "bytes": None})
    with pytest.raises(AudioDecodingError, match="Cannot decode audio from a int"):
        decode_audio(3)


def test_validate_returns_good_waveform_unchanged():
    waveform = tone(300, 0.1, 16000)
    assert validate_waveform(waveform) is waveform


def test_in_memory_integer_arrays_decode_like_the_file(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, tone(440, 0.5, 8000), 8000, subtype="PCM_16")
    integers, rate = sf.read(path, dtype="int16")
    from_array = load_audio({"array": integers, "sampling_rate": rate}, 16000)
    np.testing.assert_array_equal(from_array, load_audio(str(path), 16000))
    stereo = np.stack([integers, integers], axis=1)
    np.testing.assert_array_equal(load_audio({"array": stereo, "sampling_rate": rate}, 16000), from_array)
    with pytest.raises(AudioDecodingError, match="needs its 'sampling_rate'"):
        load_audio({"array": integers}, 16000)


# ------------------------------------------------------------------- clips whose contents are absurd
def test_huge_finite_float_samples_are_refused_and_integer_scale_is_not(tmp_path):
    # Samples of 1e30 are finite, but the extractors' squares overflow: zero or NaN features.
    clip = tone(300, 0.5, 16000)
    sf.write(tmp_path / "huge.wav", clip * 1e30, 16000, subtype="FLOAT")
    with pytest.raises(AudioDecodingError, match=r"huge\.wav has samples of magnitude 5e\+29, where audio lies"):
        load_audio(tmp_path / "huge.wav", 16000)
    with pytest.raises(AudioDecodingError, match=r"<audio array> has samples of magnitude 5e\+06"):
        load_audio({"array": clip * 1e7, "sampling_rate": 16000}, 16000)
    # A float file written at 16-bit integer scale is loud, not broken: it is kept as it is.
    sf.write(tmp_path / "int_scale.wav", clip * 2**15, 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(tmp_path / "int_scale.wav", 16000), clip * 2**15)


def with_sampling_rate(wav: bytes, rate: int) -> bytes:
    """A canonical WAV's bytes with the sampling rate of its `fmt ` chunk (bytes 24-27) replaced."""
    return wav[:24] + rate.to_bytes(4, "little") + wav[28:]


@pytest.mark.parametrize("rate", [1, 999, 768_001, 2**31 - 1])
def test_a_header_with_an_absurd_sampling_rate_is_refused_before_resampling(tmp_path, rate):
    path = tmp_path / "a.wav"
    sf.write(path, tone(300, 0.1, 16000), 16000, subtype="PCM_16")
    path.write_bytes(with_sampling_rate(path.read_bytes(), rate))
    assert sf.info(path).samplerate == rate
    with pytest.raises(AudioDecodingError, match=rf"a\.wav claims a sampling rate of {rate} Hz, outside 1000-768000"):
        load_audio(path, 16000)
    with pytest.raises(AudioDecodingError, match=rf"claims a sampling rate of {rate} Hz"):
        load_audio({"array": tone(300, 0.1, 16000), "sampling_rate": rate}, 16000)
    # The ends of the range are sampling rates like any other.
    path.write_bytes(with_sampling_rate(path.read_bytes(), 1000))
    assert len(load_audio(path, 16000)) == 16 * 1600


def test_a_header_claiming_more_frames_than_the_file_holds_is_not_believed(tmp_path):
    path = tmp_path / "claims.flac"
    sf.write(path, tone(300, 1.0, 16000), 16000)
    data = bytearray(path.read_bytes())
    # STREAMINFO's total-samples field is the low 36 bits of bytes 21-25: claim 2**36 - 1 frames.
    field = int.from_bytes(data[21:26], "big") | (2**36 - 1)
    data[21:26] = field.to_bytes(5, "big")
    path.write_bytes(bytes(data))
    assert sf.info(path).frames == 2**36 - 1  # 256 GiB of float32, for a file of about 30 kB
    # Decoding goes block by block, never allocating what the header claims (that is a MemoryError);
    # libsndfile then stumbles at the end of the real data, which names the file.
    with pytest.raises(AudioDecodingError, match=r"Cannot decode audio .*claims\.flac"):
        load_audio(path, 16000)


def test_a_file_that_decodes_to_far_more_than_its_size_is_refused(tmp_path, monkeypatch):
    # 10 s of digital silence compress to a few hundred bytes of FLAC: hundreds of samples per byte.
    sf.write(tmp_path / "bomb.flac", np.zeros(160_000, dtype=np.float32), 16000)
    size = (tmp_path / "bomb.flac").stat().st_size
    assert 160_000 / size > 64
    monkeypatch.setattr(audio, "BLOCK_FRAMES", 1024)  # so that the limit is set by the file's size
    with pytest.raises(
        AudioDecodingError, match=rf"bomb\.flac decodes to more than 64 samples per byte of its {size}"
    ):
        load_audio(tmp_path / "bomb.flac", 16000)


def test_a_long_healthy_recording_decodes_whole(tmp_path):
    """The decode limit scales with the file: 8 minutes of 16-bit WAV (7.68 M samples) are well past the
    64 x 65,536 samples (4.2 M, 4.4 minutes at 16 kHz) that a limit fixed at one block's size would allow."""
    rate, seconds = 16000, 8 * 60
    samples = np.random.default_rng(0).integers(-8000, 8000, size=rate * seconds, dtype=np.int16)
    sf.write(tmp_path / "lecture.wav", samples, rate, subtype="PCM_16")
    assert samples.size > audio.MAX_SAMPLES_PER_BYTE * audio.BLOCK_FRAMES
    waveform = load_audio(tmp_path / "lecture.wav", rate)
    np.testing.assert_array_equal(waveform, samples / np.float32(2**15))
