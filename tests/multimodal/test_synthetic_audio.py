"""Built-in speech: procedural tone-chord speech is deterministic and its digits are separable by a
nearest-centroid classifier on held-out voices; dataset files and JSONL; espeak-ng when installed."""

import json
import re

import numpy as np
import pytest
import soundfile as sf
import torch

from mmtune.errors import MMTuneError
from mmtune.multimodal.audio import load_audio, log_mel, num_audio_tokens
from mmtune.multimodal.synthetic_audio import (
    DIGIT_WORDS,
    DTMF,
    EDGE_SECONDS,
    GAP_SECONDS,
    WORD_SECONDS,
    espeak_available,
    make_spoken_digits_dataset,
    procedural_speech,
    speak,
    word_chord,
)

needs_espeak = pytest.mark.skipif(not espeak_available(),
                                  reason="espeak-ng not installed (apt-get install -y espeak-ng)")


def test_procedural_speech_is_deterministic_and_digit_names_match_digits(tmp_path):
    a = speak("seven three", tmp_path / "a.wav", voice="tone-2", engine="procedural")
    b = speak("7 3", tmp_path / "b.wav", voice="tone-2", engine="procedural")
    assert a.read_bytes() == b.read_bytes()
    c = speak("7 3", tmp_path / "c.wav", voice="tone-5", engine="procedural")
    assert c.read_bytes() != a.read_bytes()
    info = sf.info(str(a))
    assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "PCM_16"


@pytest.mark.parametrize("text", ["5", "1 2 3 4", "zero nine"])
def test_default_voice_duration(text):
    k = len(text.split())
    expected = 2 * round(EDGE_SECONDS * 16000) + k * round(WORD_SECONDS * 16000) + (k - 1) * round(
        GAP_SECONDS * 16000)
    assert len(procedural_speech(text)) == expected


def test_digit_tones_sit_at_dtmf_frequencies():
    for d, (lo, hi) in DTMF.items():
        wave = procedural_speech(d)
        spectrum = np.abs(np.fft.rfft(wave, n=16000))  # 1 Hz bins
        top2 = sorted(np.argsort(spectrum)[-2:])
        assert abs(top2[0] - lo) <= 2 and abs(top2[1] - hi) <= 2, d


def test_other_words_get_stable_chords_outside_dtmf_bands():
    assert word_chord("hello") == word_chord("HELLO")
    lo, hi = word_chord("hello")
    assert 300 <= lo <= 650 and 1600 <= hi <= 3000
    assert word_chord("seven") == word_chord("7") == (852.0, 1209.0)


def test_digits_are_separable_on_held_out_voices():
    """A nearest-centroid classifier on mean log-Mel, fit on voices 0-3, is perfect on voices 4-7."""
    def embed(digit, voice):
        feats = log_mel(procedural_speech(DIGIT_WORDS[digit], voice=f"tone-{voice}"))  # (T, 80)
        loud = feats.logsumexp(dim=1) > feats.logsumexp(dim=1).median()  # frames inside the tone
        v = feats[loud].mean(0)
        return v - v.mean()

    centroids = torch.stack([torch.stack([embed(d, v) for v in range(4)]).mean(0) for d in range(10)])
    correct = 0
    for d in range(10):
        for v in range(4, 8):
            correct += int(torch.cdist(embed(d, v)[None], centroids).argmin()) == d
    assert correct == 40


def test_make_spoken_digits_dataset(tmp_path):
    recs = make_spoken_digits_dataset(12, seed=3, root=tmp_path / "ds", engine="procedural", max_digits=4)
    assert len(recs) == 12 and len({r["id"] for r in recs}) == 12
    lines = [json.loads(x) for x in (tmp_path / "ds" / "spoken_digits.jsonl").read_text().splitlines()]
    assert len(lines) == 12
    for rec, line in zip(recs, lines):
        assert not rec["audio"].startswith("/") and rec["audio"] == line["audio"]
        assert re.fullmatch(r"\d( \d){0,3}", rec["transcript"])
        human, gpt = line["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<audio>")
        assert gpt == {"from": "gpt", "value": rec["transcript"]}
        wave = load_audio(tmp_path / "ds" / rec["audio"])
        expected = procedural_speech(" ".join(rec["transcript"].split()), voice=rec["voice"])
        np.testing.assert_allclose(wave, np.clip(expected, -1, 1), atol=1 / 32768 + 1e-7)  # 16-bit PCM
        assert num_audio_tokens(len(wave)) >= 2 * len(rec["transcript"].split())  # >= 160 ms per digit
    again = make_spoken_digits_dataset(12, seed=3, root=tmp_path / "ds2", engine="procedural")
    assert [r["transcript"] for r in again] == [r["transcript"] for r in recs]
    other = make_spoken_digits_dataset(12, seed=4, root=tmp_path / "ds3", engine="procedural")
    assert [r["transcript"] for r in other] != [r["transcript"] for r in recs]
    lengths = {len(r["transcript"].split()) for r in recs + other}
    assert lengths <= {1, 2, 3, 4} and len(lengths) > 1


def test_engine_errors():
    with pytest.raises(MMTuneError, match="unknown speech engine 'festival'"):
        make_spoken_digits_dataset(1, 0, "/tmp/unused", engine="festival")
    with pytest.raises(MMTuneError, match="empty text"):
        procedural_speech("   ")
    if not espeak_available():
        with pytest.raises(MMTuneError, match="apt-get install -y espeak-ng"):
            speak("one", "/tmp/unused.wav", engine="espeak")


@needs_espeak
def test_espeak_speak_writes_16k_speech(tmp_path):
    path = speak("three one four", tmp_path / "e.wav", voice="en-us", engine="espeak")
    wave = load_audio(path)
    assert sf.info(str(path)).samplerate == 16000
    assert 0.5 < len(wave) / 16000 < 5.0 and np.abs(wave).max() > 0.05
    recs = make_spoken_digits_dataset(3, seed=0, root=tmp_path / "ds", engine="espeak")
    assert all(r["engine"] == "espeak" and (tmp_path / "ds" / r["audio"]).is_file() for r in recs)
