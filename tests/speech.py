"""Deterministic test speech: sentences rendered by Festival (voice cmu_us_slt) and converted
with ``sox -D`` (no dither), cached under .cache/test-audio by content."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "test-audio"

HARVARD = [
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
]


def festival_wav(text: str) -> Path:
    """16 kHz mono 16-bit WAV of ``text``."""
    CACHE.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(("slt-v1:" + text).encode()).hexdigest()[:16]
    out = CACHE / f"{key}.wav"
    if out.is_file():
        return out
    raw = CACHE / f"{key}.raw.wav"
    subprocess.run(["text2wave", "-eval", "(voice_cmu_us_slt_arctic_hts)", "-o", str(raw)],
                   input=text.encode(), check=True, capture_output=True)
    tmp = CACHE / f"{key}.tmp.wav"
    subprocess.run(["sox", "-D", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(tmp)], check=True)
    raw.unlink()
    tmp.replace(out)
    return out


def read_wav16(path: Path) -> np.ndarray:
    import wave

    with wave.open(str(path)) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0


def write_wav16(path: Path, samples: np.ndarray) -> Path:
    import wave

    pcm = np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    return path


def ffmpeg_convert(src: Path, dst: Path, *args: str) -> Path:
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(src), *args, str(dst)],
                   check=True)
    return dst


def have_festival() -> bool:
    return shutil.which("text2wave") is not None and shutil.which("sox") is not None
