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


# Real read speech with exact transcripts (../shared/data/librispeech/, CC BY 4.0; see its SOURCES.md).
LIBRISPEECH = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "librispeech"


def librispeech_text(utterance: str) -> str:
    """The reference transcript of a LibriSpeech utterance id."""
    for line in (LIBRISPEECH / "transcripts.tsv").read_text().splitlines():
        uid, _, text = line.partition("\t")
        if uid == utterance:
            return text
    raise KeyError(utterance)


def librispeech_samples(utterance: str) -> np.ndarray:
    pcm = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(LIBRISPEECH / f"{utterance}.flac"),
                          "-ac", "1", "-ar", "16000", "-f", "s16le", "pipe:1"], capture_output=True, check=True).stdout
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


def librispeech_loop(path: Path, seconds: float) -> Path:
    """About ``seconds`` of LibriSpeech utterances with pauses of 0.3 to 2 s, as 16 kHz WAV (made once):
    the material of hour-long recordings (``ffmpeg -stream_loop``)."""
    if path.exists():
        return path
    pauses = [0.3, 0.8, 2.0, 0.5, 1.2]
    parts: list[np.ndarray] = []
    total = 0
    for i, uid in enumerate(sorted(p.stem for p in LIBRISPEECH.glob("*.flac"))):
        parts += [librispeech_samples(uid), np.zeros(int(pauses[i % len(pauses)] * 16000), dtype=np.float32)]
        total += len(parts[-2]) + len(parts[-1])
        if total >= seconds * 16000:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_wav16(path, np.concatenate(parts))


# An exchange of lines and one-word answers: the lines are real speech (LibriSpeech), the answers
# Festival's (single words with exact text) spoken quickly, as people answer (sox's tempo 1.8: 0.15 to
# 0.3 s of voice each), each part apart by a pause longer than a turn's silence.
SHORT_REPLIES = [("ls", "1089-134686-0000"), ("tts", "Yes."), ("ls", "1089-134691-0000"), ("tts", "No."),
                 ("ls", "367-130732-0001"), ("tts", "Right."), ("ls", "1089-134686-0001"), ("tts", "Yes."),
                 ("ls", "533-1066-0000"), ("tts", "Okay.")]


def quick_word(text: str, tempo: float = 1.8) -> np.ndarray:
    src = festival_wav(text)
    out = CACHE / f"{src.stem}.tempo{tempo}.wav"
    if not out.is_file():
        tmp = CACHE / f"{src.stem}.tempo{tempo}.tmp.wav"
        subprocess.run(["sox", "-D", str(src), str(tmp), "tempo", str(tempo)], check=True)
        tmp.replace(out)
    return read_wav16(out)


def dialogue_with_short_replies(path: Path, pause: float = 1.0, tail: float = 1.2) -> tuple[Path, str]:
    """A recording of SHORT_REPLIES with ``pause`` seconds of silence between the parts and ``tail``
    after the last; returns it and its reference text."""
    gap = np.zeros(int(16000 * pause), dtype=np.float32)
    parts, words = [gap], []
    for kind, what in SHORT_REPLIES:
        if kind == "ls":
            parts.append(librispeech_samples(what))
            words.append(librispeech_text(what))
        else:
            parts.append(quick_word(what))
            words.append(what)
        parts.append(gap)
    parts[-1] = np.zeros(int(16000 * tail), dtype=np.float32)
    return write_wav16(path, np.concatenate(parts)), " ".join(words)


# Conversations for speaker diarization: LibriSpeech speakers the stand-in embedding model was not
# fitted on (../shared/models/diarization/README.md), each utterance cut to its speech by frame
# energy (as that README's evaluation does), joined with 0.5-1.0 s pauses of -60 dBFS noise.
HELD_OUT_SPEAKERS = ["1688", "2033", "2609", "3080", "3331"]


def speech_span(samples: np.ndarray, margin: float = 0.05) -> np.ndarray:
    frames = max(1, (len(samples) - 400) // 160 + 1)
    energy = np.array([np.mean(samples[i * 160:i * 160 + 400] ** 2) for i in range(frames)])
    db = 10 * np.log10(energy + 1e-12)
    loud = np.flatnonzero(db > max(np.percentile(db, 95) - 35, np.percentile(db, 10) + 6))
    a = max(0, loud[0] * 160 - int(margin * 16000))
    b = min(len(samples), loud[-1] * 160 + 400 + int(margin * 16000))
    return samples[a:b]


def without_pauses(samples: np.ndarray, gap: float = 0.15) -> np.ndarray:
    """``samples`` with every pause shortened to ``gap`` seconds (Silero finds the speech): one turn
    for a server VAD that ends turns after longer silences."""
    from bridge.vad import SpeechDetector, find_vad_model

    model = find_vad_model(None)
    assert model is not None, "the silero-vad package holds the model"
    spans = SpeechDetector(model, min_silence=0.1).speech_segments(samples)
    silence = np.zeros(int(gap * 16000), dtype=np.float32)
    return np.concatenate([part for a, b in spans for part in (samples[a:b], silence)][:-1])


def speaker_utterances(speaker: str) -> list[str]:
    return sorted(p.stem for p in LIBRISPEECH.glob(f"{speaker}-*.flac"))


def conversation(path: Path, speakers: list[str], turns: int, seed: int = 0
                 ) -> tuple[Path, list[tuple[float, float, str, str]]]:
    """``turns`` utterances, the speakers taking turns in order (each utterance used once); returns
    the recording and its reference rows (start s, end s, speaker, utterance id)."""
    rng = np.random.default_rng(seed)
    left = {s: speaker_utterances(s) for s in speakers}
    parts, rows, at = [], [], 0.0

    def pause(seconds: float) -> np.ndarray:
        return (rng.standard_normal(int(seconds * 16000)) * 10 ** (-60 / 20)).astype(np.float32)

    parts.append(pause(0.5))
    at = 0.5
    for k in range(turns):
        speaker = speakers[k % len(speakers)]
        utterance = left[speaker].pop(0)
        clip = speech_span(librispeech_samples(utterance))
        parts.append(clip)
        rows.append((round(at, 3), round(at + len(clip) / 16000, 3), speaker, utterance))
        at += len(clip) / 16000
        gap = float(rng.uniform(0.5, 1.0)) if k + 1 < turns else 0.5
        parts.append(pause(gap))
        at += gap
    return write_wav16(path, np.concatenate(parts)), rows
