"""Audio loading and log-Mel features: counts from docs/reference/multimodal.md#audio-features-and-token-rate, parity with an independent
numpy reference and with transformers' Phi-4 feature extractor, chunking, batching, errors."""

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from mmtune.errors import ConfigError, DataError, MMTuneError
from mmtune.multimodal.audio import (
    AUDIO_FEATURES,
    chunked_log_mel,
    load_audio,
    log_mel,
    mel_filterbank,
    num_audio_tokens,
    num_frames,
    pad_audio_features,
    phi4_log_mel,
)


def _test_signal(n, seed=0):
    """Noise plus two tones: every Mel band holds energy far above the log floor."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.05 * rng.standard_normal(n) + 0.3 * np.sin(2 * np.pi * 440 * t)
            + 0.2 * np.sin(2 * np.pi * 3100 * t)).astype(np.float32)


# ----------------------------------------------------------------------------- counts

@pytest.mark.parametrize("n_samples, frames, tokens", [
    (16000, 98, 13),  # 1 s: (16000-400)//160+1 = 98 -> ceil(98/8) = 13
    (480000, 2998, 375),  # 30 s: published "30 s -> 375 tokens"
    (16000 * 60, 5998, 750),  # 1 min: "750 per minute"
    (16000 * 1800, 179998, 22500),  # 30 min: "30 min -> 22,500"
    (400, 1, 1), (559, 1, 1), (560, 2, 1), (399, 0, 0),
])
def test_frame_and_token_counts(n_samples, frames, tokens):
    assert num_frames(n_samples) == frames
    assert num_audio_tokens(n_samples) == tokens


def test_log_mel_frame_count_matches_formula():
    for n in (400, 401, 559, 560, 561, 1000, 16000, 16001, 16159, 16160):
        assert log_mel(np.zeros(n, np.float32)).shape == (num_frames(n), 80)
        assert phi4_log_mel(np.zeros(n, np.float32)).shape == (num_frames(n), 80)


def test_too_short_audio_raises():
    with pytest.raises(MMTuneError, match="shorter than one analysis window"):
        log_mel(np.zeros(399, np.float32))


# ----------------------------------------------------------------------------- reference parity

def _numpy_htk_filterbank(n_mels=80, n_fft=512, sr=16000):
    """Independent HTK-style filterbank, one triangle at a time (librosa htk=True, norm=None)."""
    def mel(f):
        return 1127.0 * math.log(1.0 + f / 700.0)

    def hz(m):
        return 700.0 * (math.exp(m / 1127.0) - 1.0)

    top = mel(sr / 2)
    edges = [hz(top * i / (n_mels + 1)) for i in range(n_mels + 2)]
    fb = np.zeros((n_fft // 2 + 1, n_mels))
    for m in range(n_mels):
        lo, c, hi = edges[m], edges[m + 1], edges[m + 2]
        for k in range(n_fft // 2 + 1):
            f = k * sr / n_fft
            if lo < f <= c:
                fb[k, m] = (f - lo) / (c - lo)
            elif c < f < hi:
                fb[k, m] = (hi - f) / (hi - c)
    return fb


def _numpy_log_mel(wave, n_mels=80, win=400, hop=160, n_fft=512):
    """Reference: explicit framing, periodic Hann, right zero-pad to n_fft, np.fft.rfft, power."""
    wave = wave.astype(np.float64)
    n = (len(wave) - win) // hop + 1
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    frames = np.stack([wave[t * hop: t * hop + win] * hann for t in range(n)])  # (T, win)
    power = np.abs(np.fft.rfft(frames, n=n_fft, axis=1)) ** 2  # (T, 257)
    return np.log(np.maximum(power @ _numpy_htk_filterbank(n_mels, n_fft), 1e-10))


def test_log_mel_matches_numpy_reference():
    wave = _test_signal(20_937)  # not a whole number of hops
    ours = log_mel(wave).numpy()
    ref = _numpy_log_mel(wave)
    assert ours.shape == ref.shape == (num_frames(len(wave)), 80)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_log_mel_floor_on_silence():
    out = log_mel(np.zeros(4000, np.float32))
    assert torch.allclose(out, torch.full_like(out, math.log(1e-10)))


def test_phi4_log_mel_matches_transformers_feature_extractor():
    from transformers import Phi4MultimodalFeatureExtractor

    wave = _test_signal(33_333, seed=1)
    ref = Phi4MultimodalFeatureExtractor()(wave, sampling_rate=16000, return_tensors="pt")["audio_input_features"][0]
    ours = phi4_log_mel(wave)
    assert ours.shape == ref.shape == (num_frames(len(wave)), 80)
    torch.testing.assert_close(ours, ref.float(), atol=2e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- filterbank

@pytest.mark.parametrize("in_mel_space, f_max", [(False, None), (True, 7690.0)])
def test_mel_filterbank_sanity(in_mel_space, f_max):
    fb = mel_filterbank(80, 512, 16000, f_max=f_max, in_mel_space=in_mel_space).numpy()  # (257, 80)
    assert fb.shape == (257, 80) and (fb >= 0).all()
    assert (fb.max(axis=0) > 0.4).all() and (fb.max(axis=0) <= 1.0).all()  # no empty filter, peak <= 1
    assert (np.diff(fb.argmax(axis=0)) >= 0).all()  # centres ascend with the filter index
    assert (np.diff(fb.argmax(axis=0)[10:]) > 0).all()  # and strictly where filters are wider than a bin
    # Neighbouring triangles are complementary: the columns sum to 1 between the first and last centre.
    m = lambda f: 1127 * np.log1p(f / 700)  # noqa: E731
    top = m(f_max or 8000.0)
    first, last = top / 81, top * 80 / 81
    bins = m(np.arange(257) * 16000 / 512)
    inner = (bins >= first + 1e-9) & (bins <= last - 1e-9)
    np.testing.assert_allclose(fb[inner].sum(axis=1), 1.0, atol=1e-12)
    # Nothing above f_max.
    if f_max:
        assert fb[np.arange(257) * 16000 / 512 >= f_max].sum() == 0


def test_mel_filterbank_rejects_bad_range():
    with pytest.raises(ValueError, match="f_min"):
        mel_filterbank(80, 512, 16000, f_min=9000.0)


# ----------------------------------------------------------------------------- loading

@pytest.mark.parametrize("sr, seconds", [(8000, 1.0), (44100, 1.0), (44100, 0.37), (22050, 0.5), (16000, 0.8)])
def test_load_audio_resamples_to_16k(tmp_path, sr, seconds):
    n = int(round(sr * seconds))
    tone = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(n) / sr)
    path = tmp_path / f"tone_{sr}.wav"
    sf.write(path, tone, sr, subtype="FLOAT")
    wave = load_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert len(wave) == math.ceil(n * 16000 / sr)
    spectrum = np.abs(np.fft.rfft(wave[200:-200]))
    peak_hz = spectrum.argmax() * 16000 / (len(wave) - 400)
    assert abs(peak_hz - 1000) < 16000 / (len(wave) - 400) + 1  # within one FFT bin
    assert abs(np.abs(wave[400:-400]).max() - 0.5) < 0.02  # amplitude kept


def test_load_audio_stereo_flac_to_mono(tmp_path):
    s = 0.4 * np.sin(2 * np.pi * 300 * np.arange(16000) / 16000)
    path = tmp_path / "stereo.flac"
    sf.write(path, np.stack([s, 0.5 * s], axis=1), 16000, subtype="PCM_24")
    wave = load_audio(path)
    assert wave.shape == (16000,)
    np.testing.assert_allclose(wave, 0.75 * s, atol=1e-5)


def test_corrupt_and_missing_audio_name_the_file(tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really a wav file")
    with pytest.raises(DataError, match="broken.wav") as e:
        load_audio(bad)
    assert e.value.reason == "corrupt_audio" and str(bad) in str(e.value)
    with pytest.raises(DataError, match="nope.flac") as e:
        load_audio(tmp_path / "nope.flac")
    assert e.value.reason == "missing_file"


# ----------------------------------------------------------------------------- chunking

def test_chunked_log_mel_equals_whole_clip_and_tokens_add_up():
    wave = _test_signal(16000 * 65 + 1234, seed=2)  # 65.08 s: chunks of 3000, 3000, 505 frames
    chunks = chunked_log_mel(wave, chunk_seconds=30)
    assert [c.shape[0] for c in chunks] == [3000, 3000, num_frames(len(wave)) - 6000]
    torch.testing.assert_close(torch.cat(chunks), log_mel(wave), atol=1e-5, rtol=1e-6)
    assert sum(math.ceil(c.shape[0] / 8) for c in chunks) == num_audio_tokens(len(wave))


@pytest.mark.parametrize("n_samples", [16000 * 1800, 16000 * 1800 + 7777, 480000, 480399, 480400, 400, 12345])
@pytest.mark.parametrize("chunk_seconds", [30.0, 1.0, 0.7])
def test_chunk_boundaries_keep_token_count(n_samples, chunk_seconds):
    """Boundary arithmetic alone (a features stub that only counts frames), up to 30 min of audio."""
    def count(w):
        return torch.zeros(num_frames(w.numel()), 1)

    chunks = chunked_log_mel(torch.zeros(n_samples), chunk_seconds=chunk_seconds, features=count)
    per = int(chunk_seconds * 100) // 8 * 8
    assert all(c.shape[0] == per for c in chunks[:-1]) and 0 < chunks[-1].shape[0] <= per
    assert sum(c.shape[0] for c in chunks) == num_frames(n_samples)
    assert sum(math.ceil(c.shape[0] / 8) for c in chunks) == num_audio_tokens(n_samples)
    if n_samples == 16000 * 1800 and chunk_seconds == 30.0:
        assert len(chunks) == 60 and num_audio_tokens(n_samples) == 22500


def test_chunked_rejects_tiny_chunks():
    with pytest.raises(MMTuneError, match="fewer than 8 frames"):
        chunked_log_mel(np.zeros(16000, np.float32), chunk_seconds=0.05)


# ----------------------------------------------------------------------------- batching

def test_pad_audio_features_lengths_and_mask():
    feats = [torch.randn(t, 80) for t in (13, 40, 1)]
    batch = pad_audio_features(feats, pad_to_multiple_of=8)
    assert batch.features.shape == (3, 40, 80)
    assert batch.lengths.tolist() == [13, 40, 1]
    assert batch.mask.sum(1).tolist() == [13, 40, 1]
    assert batch.token_lengths.tolist() == [2, 5, 1]
    for i, f in enumerate(feats):
        assert torch.equal(batch.features[i, : len(f)], f)
        assert (batch.features[i, len(f):] == 0).all()
    assert pad_audio_features([torch.randn(41, 80)], pad_to_multiple_of=8).features.shape == (1, 48, 80)
    with pytest.raises(MMTuneError, match="one n_mels"):
        pad_audio_features([torch.randn(3, 80), torch.randn(3, 64)])


def test_feature_registry_names():
    assert AUDIO_FEATURES.names() == ["log_mel", "phi4_log_mel"]
    with pytest.raises(ConfigError, match="Did you mean 'log_mel'"):
        AUDIO_FEATURES.get("log_mell")
