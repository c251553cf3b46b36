"""Built-in speech with no downloads: spoken-digit clips for tests, demos and tiny training runs.

Two engines:

- ``espeak``: the ``espeak-ng`` speech synthesiser when installed (apt package ``espeak-ng``);
  ``espeak-ng -w out.wav`` writes 22.05 kHz mono, which :func:`~mmtune.multimodal.audio.load_audio`
  resamples to 16 kHz.
- ``procedural``: needs nothing. Each word is a two-tone chord with a raised-cosine envelope,
  words separated by short silences. Digits use the DTMF keypad pairs (ITU-T Q.23: rows 697,
  770, 852, 941 Hz x columns 1209, 1336, 1477 Hz), which are far apart on the Mel scale, so a
  tiny model can learn to tell them apart; digit names ("seven") sound like the digit ("7").
  Any other word gets a deterministic chord from a CRC32 of the word (300-650 Hz x 1600-3000
  Hz, outside the DTMF bands). A ``voice`` name changes tempo (x0.8-1.25), loudness, a pitch
  shift small enough (<= 1.5%) to keep DTMF pairs distinct (adjacent rows differ by >= 9%), and
  a low white-noise floor (about 28-39 dB below the tones), all derived from the voice name, so equal
  inputs give byte-equal files.

:func:`make_spoken_digits_dataset` writes clips plus a LLaVA-style JSONL whose human turn holds
an ``<audio>`` tag and whose answer is the digit string.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import MMTuneError
from .audio import SAMPLE_RATE, load_audio

ENGINES = ("auto", "espeak", "procedural")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# ITU-T Q.23 DTMF keypad: digit -> (row Hz, column Hz).
DTMF = {"1": (697, 1209), "2": (697, 1336), "3": (697, 1477), "4": (770, 1209), "5": (770, 1336),
        "6": (770, 1477), "7": (852, 1209), "8": (852, 1336), "9": (852, 1477), "0": (941, 1336)}
ESPEAK_VOICES = ("en", "en-us", "en+m3", "en+f2", "en-us+m5", "en+f4")
PROCEDURAL_VOICES = tuple(f"tone-{i}" for i in range(8))
AUDIO_TAG = "<audio>"
PROMPT = "Transcribe the digits."

WORD_SECONDS = 0.22  # tone length of one word at tempo 1
GAP_SECONDS = 0.08  # silence between words
EDGE_SECONDS = 0.05  # silence before the first and after the last word
RAMP_SECONDS = 0.015  # raised-cosine attack/release; avoids clicks (broadband energy) at tone edges


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def _resolve_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise MMTuneError(f"unknown speech engine '{engine}'; valid: {', '.join(ENGINES)}")
    if engine == "auto":
        return "espeak" if espeak_available() else "procedural"
    if engine == "espeak" and not espeak_available():
        raise MMTuneError("engine 'espeak' needs the espeak-ng binary, which is not on PATH; install it with "
                          "`apt-get install -y espeak-ng` or use engine='procedural'")
    return engine


def _canonical(word: str) -> str:
    w = word.lower()
    return str(DIGIT_WORDS.index(w)) if w in DIGIT_WORDS else w


def word_chord(word: str) -> tuple[float, float]:
    """(low Hz, high Hz) of a word's tone: DTMF for digits and digit names, else from CRC32(word)."""
    w = _canonical(word)
    if w in DTMF:
        return tuple(float(f) for f in DTMF[w])
    h = zlib.crc32(w.encode("utf-8"))
    return 300.0 + 50.0 * (h % 8), 1600.0 + 100.0 * ((h >> 3) % 15)


def _voice_params(voice: str | None) -> dict:
    if voice is None:
        return dict(tempo=1.0, pitch=1.0, gain=0.8, noise=0.0)
    r = random.Random(zlib.crc32(voice.encode("utf-8")))
    return dict(tempo=r.uniform(0.8, 1.25), pitch=r.uniform(0.985, 1.015), gain=r.uniform(0.5, 0.9),
                noise=r.uniform(0.005, 0.01))


def procedural_speech(text: str, voice: str | None = None, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """float32 waveform of ``text`` as tone chords (see module docstring); deterministic."""
    words = text.split()
    if not words:
        raise MMTuneError("cannot speak an empty text")
    p = _voice_params(voice)
    n_word = int(round(WORD_SECONDS / p["tempo"] * sample_rate))
    n_gap = int(round(GAP_SECONDS / p["tempo"] * sample_rate))
    n_edge = int(round(EDGE_SECONDS * sample_rate))
    n_ramp = int(round(RAMP_SECONDS * sample_rate))
    env = np.ones(n_word)
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(n_ramp) / n_ramp)
    env[:n_ramp], env[-n_ramp:] = ramp, ramp[::-1]
    t = np.arange(n_word) / sample_rate
    parts = [np.zeros(n_edge)]
    for i, word in enumerate(words):
        lo, hi = (f * p["pitch"] for f in word_chord(word))
        parts.append(0.5 * p["gain"] * env * (np.sin(2 * np.pi * lo * t) + np.sin(2 * np.pi * hi * t)))
        parts.append(np.zeros(n_gap if i < len(words) - 1 else n_edge))
    wave = np.concatenate(parts)
    if p["noise"]:
        key = " ".join(_canonical(w) for w in words)  # "seven" and "7" give the same clip
        rng = np.random.default_rng(zlib.crc32(f"{voice}\0{key}".encode()))
        wave = wave + p["noise"] * rng.standard_normal(wave.shape)
    return wave.astype(np.float32)


def _espeak_wave(text: str, voice: str | None) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "espeak.wav"
        cmd = ["espeak-ng", "-w", str(out)] + (["-v", voice] if voice else []) + ["--", text]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0 or not out.is_file():
            raise MMTuneError(f"espeak-ng failed (exit {proc.returncode}) for voice {voice!r}: "
                              f"{proc.stderr.strip()[:300]}; list voices with `espeak-ng --voices`")
        return load_audio(out, SAMPLE_RATE)


def speak(text: str, path: str | os.PathLike, voice: str | None = None, engine: str = "auto") -> Path:
    """Synthesize ``text`` to a 16 kHz mono 16-bit wav at ``path``; returns the path.

    ``engine``: "espeak" (espeak-ng; ``voice`` is an espeak voice such as "en-us" or "en+f3"),
    "procedural" (tone chords; ``voice`` is any name), or "auto" (espeak-ng if installed).
    """
    import soundfile as sf

    engine = _resolve_engine(engine)
    wave = _espeak_wave(text, voice) if engine == "espeak" else procedural_speech(text, voice)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(wave, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")
    return path


def make_spoken_digits_dataset(n: int, seed: int, root: str | os.PathLike, engine: str = "auto",
                               min_digits: int = 1, max_digits: int = 4,
                               jsonl_name: str = "spoken_digits.jsonl") -> list[dict]:
    """Write ``n`` clips of random digit strings under ``root/audio`` and a JSONL at ``root/jsonl_name``.

    Returns records ``{"id", "audio" (path relative to root), "transcript" ("3 7 1"), "engine",
    "voice"}``. The JSONL holds LLaVA-style records
    ``{"id", "audio", "conversations": [{"from": "human", "value": "<audio>\\nTranscribe the
    digits."}, {"from": "gpt", "value": "3 7 1"}]}``. Digits and voices are drawn from
    ``random.Random(seed)``; the same arguments give the same files.
    """
    if n < 1 or not 1 <= min_digits <= max_digits:
        raise MMTuneError(f"need n >= 1 and 1 <= min_digits <= max_digits; got n={n}, "
                          f"min_digits={min_digits}, max_digits={max_digits}")
    engine = _resolve_engine(engine)
    voices = ESPEAK_VOICES if engine == "espeak" else PROCEDURAL_VOICES
    root = Path(root)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records, lines = [], []
    for i in range(n):
        digits = [str(rng.randrange(10)) for _ in range(rng.randint(min_digits, max_digits))]
        voice = rng.choice(voices)
        rel = f"audio/{seed}-{i:05d}.wav"
        speak(" ".join(DIGIT_WORDS[int(d)] for d in digits), root / rel, voice=voice, engine=engine)
        transcript = " ".join(digits)
        rec = {"id": f"digits-{seed}-{i:05d}", "audio": rel, "transcript": transcript, "engine": engine,
               "voice": voice}
        records.append(rec)
        lines.append(json.dumps({"id": rec["id"], "audio": rel, "conversations": [
            {"from": "human", "value": f"{AUDIO_TAG}\n{PROMPT}"}, {"from": "gpt", "value": transcript}]}))
    (root / jsonl_name).write_text("\n".join(lines) + "\n")
    return records
