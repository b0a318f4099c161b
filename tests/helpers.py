from __future__ import annotations

import base64
import io
import re
import subprocess
import threading
import time
import wave
from pathlib import Path
from typing import Any

import httpx
import jiwer
import numpy as np
import openai
import pytest
from pyannote.core import Annotation, Segment, Timeline
from pyannote.metrics.diarization import DiarizationErrorRate

from tests.speech import librispeech_text


def normalize(text: str) -> str:
    text = text.lower().replace("'", "")
    text = re.sub(r"[^a-z0-9 ]+", " ", text)
    return " ".join(text.split())


def wer(reference: str | list[str], hypothesis: str | list[str]) -> float:
    refs = [reference] if isinstance(reference, str) else reference
    hyps = [hypothesis] if isinstance(hypothesis, str) else hypothesis
    return float(jiwer.wer([normalize(r) for r in refs], [normalize(h) for h in hyps]))


def transcribe(url: str, path: Path, timeout: float = 120, headers: dict[str, str] | None = None,
               **fields: str) -> httpx.Response:
    with path.open("rb") as fh:
        return httpx.post(url + "/v1/audio/transcriptions", files={"file": (path.name, fh)},
                          data=fields, timeout=timeout, headers=headers)


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


class Watcher:
    """Samples, every 20 ms in a thread, the RSS of process trees and the bytes of files under
    folders, and keeps each one's peak: what a bound on memory and temporary disk is asserted on.

    ``trees``: name -> (pid, pids to leave out, e.g. the engine child, whose memory is the model's)."""

    def __init__(self, trees: dict[str, tuple[int, set[int]]], folders: dict[str, Path]) -> None:
        import threading

        self.trees, self.folders = trees, folders
        self.start_rss = {name: self.rss(name) for name in trees}
        self.peak_rss = dict(self.start_rss)
        self.peak_bytes = {name: 0 for name in folders}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self, name: str) -> float:
        import psutil

        pid, skip = self.trees[name]
        try:
            root = psutil.Process(pid)
            procs = [root] + [c for c in root.children(recursive=True) if c.pid not in skip]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / 2**20

    def folder_bytes(self, name: str) -> int:
        """Bytes of the files under the folder, and of the unnamed ones (deleted, still open) that the
        tree of the same name holds open there: the decoded audio of a request (``SampleFile``)."""
        import os

        total = 0
        for folder, _, files in os.walk(self.folders[name]):  # a folder deleted meanwhile is skipped
            for file in files:
                try:
                    total += os.stat(os.path.join(folder, file)).st_size
                except OSError:
                    pass  # deleted while walking
        if name in self.trees:
            total += sum(size for _, size in open_unnamed_files(self.trees[name][0], self.folders[name]))
        return total

    def _run(self) -> None:
        while not self._done.is_set():
            for name in self.trees:
                self.peak_rss[name] = max(self.peak_rss[name], self.rss(name))
            for name in self.folders:
                self.peak_bytes[name] = max(self.peak_bytes[name], self.folder_bytes(name))
            self._done.wait(0.02)

    def growth(self, name: str) -> float:
        """Peak RSS above the start, MB."""
        return self.peak_rss[name] - self.start_rss[name]

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def open_unnamed_files(pid: int, folder: Path) -> list[tuple[str, int]]:
    """(path, bytes) of the deleted files under ``folder`` that process ``pid`` or its children still
    hold open: disk that is freed only when they close them."""
    import os

    import psutil

    found = []
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for proc in procs:
        fds = Path(f"/proc/{proc.pid}/fd")
        try:
            links = list(fds.iterdir())
        except OSError:
            continue
        for link in links:
            try:
                target = os.readlink(link)
                if target.startswith(str(folder)) and target.endswith(" (deleted)"):
                    found.append((target, os.stat(link).st_size))
            except OSError:
                pass  # closed meanwhile
    return found


def pcm24(path: Path, silence_after: float = 1.5) -> bytes:
    pcm = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-ac", "1", "-ar", "24000",
                          "-f", "s16le", "pipe:1"], capture_output=True, check=True).stdout
    return pcm + b"\0" * int(48000 * silence_after)


def pcm24_of(samples: np.ndarray) -> bytes:
    """16 kHz float32 samples as a live session's 24 kHz pcm16 (linear interpolation; the session
    resamples back)."""
    n = int(len(samples) * 1.5)
    resampled = np.interp(np.arange(n) / 1.5, np.arange(len(samples)), samples)
    return (np.clip(resampled, -1, 1) * 32767).astype("<i2").tobytes()


def g711(path: Path, law: str, silence_after: float = 1.5) -> bytes:
    """``path`` as 8 kHz G.711 (``law``: "mulaw" or "alaw"), made by FFmpeg, with silence after it."""
    return subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-af",
                           f"apad=pad_dur={silence_after}", "-ac", "1", "-ar", "8000", "-f", law, "pipe:1"],
                          capture_output=True, check=True).stdout


# Live input formats: the session's format object and the bytes in 100 ms.
LIVE_FORMATS = {"pcm16": ({"type": "audio/pcm", "rate": 24000}, 4800),
                "pcmu": ({"type": "audio/pcmu"}, 800), "pcma": ({"type": "audio/pcma"}, 800)}


def live_turns(url: str, key: str, pcm: bytes, *, commit_at_end: bool = False, fmt: str = "pcm16") -> list[str]:
    """One live session through the SDK at ``url`` (a proxy), the audio (in ``fmt``, see
    ``LIVE_FORMATS``) sent in 100 ms chunks (faster than real time: turns are found on the audio's
    own clock); the completed turns' transcripts in order. The session ends with a clear, or
    (``commit_at_end``) with a commit then a clear, as a client does when its recording stops."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    completed: list[str] = []
    audio_format, chunk = LIVE_FORMATS[fmt]
    with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        session: Any = {"type": "transcription", "audio": {"input": {
            "format": audio_format, "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}}
        conn.session.update(session=session)

        def send() -> None:
            for i in range(0, len(pcm), chunk):
                conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + chunk]).decode())
                time.sleep(0.01)
            if commit_at_end:
                conn.input_audio_buffer.commit()
            conn.input_audio_buffer.clear()

        sender = threading.Thread(target=send)
        sender.start()
        committed, cleared = 0, False
        for event in conn:
            if event.type == "error":
                pytest.fail(f"error event: {event}")
            committed += event.type == "input_audio_buffer.committed"
            cleared = cleared or event.type == "input_audio_buffer.cleared"
            if event.type == "conversation.item.input_audio_transcription.completed":
                completed.append(event.transcript)
            if cleared and committed == len(completed):
                break
        sender.join()
    return completed


def sdk_client(proxy: Any, timeout: float = 300) -> openai.OpenAI:
    """The openai SDK pointed at a test proxy, with its key; no retries (a test sees each answer)."""
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=proxy.key, max_retries=0, timeout=timeout)


def diarization_score(rows: list[tuple[float, float, str, str]], segments: list[dict],
                      duration: float) -> dict[str, Any]:
    """A diarized answer's ``segments`` (dicts) against reference ``rows`` (start, end, speaker,
    LibriSpeech utterance): ``der`` (pyannote.metrics, collar 0.25 s each side, overlap skipped),
    ``words_right`` (the share of the reference's words in segments whose speaker maps to theirs
    under the DER's optimal ``mapping``), speakers ``found``, and ``sa_wer`` (each speaker's words
    against the text of the segments mapped to them)."""
    reference, hypothesis = Annotation(), Annotation()
    for start, end, speaker, _ in rows:
        reference[Segment(start, end)] = speaker
    for i, seg in enumerate(segments):
        hypothesis[Segment(seg["start"], seg["end"]), i] = seg["speaker"]
    metric = DiarizationErrorRate(collar=0.5, skip_overlap=True)
    der = metric(reference, hypothesis, uem=Timeline([Segment(0, duration)]))
    mapping = metric.optimal_mapping(reference, hypothesis)
    right = total = 0
    for start, end, speaker, utterance in rows:
        words = len(librispeech_text(utterance).split())
        total += words
        overlaps: dict[str, float] = {}
        for seg in segments:
            overlap = min(end, seg["end"]) - max(start, seg["start"])
            if overlap > 0:
                overlaps[seg["speaker"]] = overlaps.get(seg["speaker"], 0) + overlap
        if overlaps and mapping.get(max(overlaps, key=lambda s: overlaps[s])) == speaker:
            right += words
    errors = words_total = 0.0
    for speaker in {r[2] for r in rows}:
        ref = " ".join(librispeech_text(u) for _, _, s, u in rows if s == speaker)
        hyp = " ".join(seg["text"] for seg in segments if mapping.get(seg["speaker"]) == speaker)
        n = len(ref.split())
        errors += wer(ref, hyp) * n if hyp else n
        words_total += n
    return {"der": der, "words_right": right / total, "found": len({s["speaker"] for s in segments}),
            "sa_wer": errors / words_total, "mapping": mapping}


def data_url(samples: np.ndarray) -> str:
    """16 kHz samples as a WAV data URL (a known speaker's reference)."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return "data:audio/wav;base64," + base64.b64encode(buffer.getvalue()).decode()
