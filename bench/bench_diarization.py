"""Who spoke when, measured: DER (pyannote.metrics), words under the right speaker, speaker counts,
speaker-attributed WER, known speakers, and what diarization costs beside plain transcription.

Conversations are joined from real LibriSpeech speech of the speakers the stand-in embedding model
was not fitted on (``tests.speech.conversation``): the 10 pairs of 5 speakers (8 turns each), 5
triples (9 turns) and the 5 quadruples (12 turns). Each is sent to a bridge started here with the
bridge's own settings (``DEFAULT_MODEL``, ``MODELS_DIR``, ``CATALOG_FILE``, ``DIARIZATION_*``) as
``gpt-4o-transcribe-diarize`` / ``diarized_json``, and again as a plain transcription, side by side.
Then a 10-minute recording (conversations one after another) is timed both ways.

    .venv/bin/python -m bench.bench_diarization [--quick]

DER: collar 0.25 s each side of a reference boundary, overlap skipped (as NIST md-eval -c 0.25),
the hypothesis being the answer's segments. "Words right": the share of each utterance's words in
a segment whose speaker maps (the DER's optimal mapping) to the utterance's speaker, over all words.
SA-WER: each reference speaker's words against the text of the segments mapped to them.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
import wave
from pathlib import Path

import httpx
import numpy as np

from adapters.managed_websocket import free_port
from bench.bench_stack import Services, wait_http
from tests.helpers import data_url, diarization_score, wer
from tests.speech import (
    HELD_OUT_SPEAKERS,
    conversation,
    librispeech_samples,
    librispeech_text,
    speaker_utterances,
    speech_span,
    write_wav16,
)

DIARIZE = "gpt-4o-transcribe-diarize"


class Bridge:
    """Uploads to the bench's bridge: (answer, seconds)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = httpx.Client(timeout=1800)

    def post(self, path: Path, **data: object) -> tuple[dict, float]:
        with path.open("rb") as fh:
            t = time.perf_counter()
            r = self.client.post(self.url + "/v1/audio/transcriptions", files={"file": ("a.wav", fh)}, data=data)
            elapsed = time.perf_counter() - t
        r.raise_for_status()
        return r.json(), elapsed


Plan = list[tuple[list[str], int]]


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_diarization", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 conversations and a 2-minute recording")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-diarization-"))
    services = Services(work)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "LOG_LEVEL": "warning", "BRIDGE_METRICS_PORT": "0", "BRIDGE_HOST": "127.0.0.1",
           "BRIDGE_PORT": str(port), "SPEED_CHECK": "false"}
    plan: Plan = [(list(p), 8) for p in itertools.combinations(HELD_OUT_SPEAKERS, 2)]
    plan += [(list(t), 9) for t in itertools.combinations(HELD_OUT_SPEAKERS, 3)][:5]
    plan += [(list(q), 12) for q in itertools.combinations(HELD_OUT_SPEAKERS, 4)]
    if args.quick:
        plan = [plan[0], plan[10], plan[15]]
    try:
        proc = services.start("bridge", [sys.executable, "-m", "bridge"], env)
        wait_http(url + "/health", proc, timeout=300)
        bridge = Bridge(url)
        conversations(bridge, plan, work)
        known_speakers(bridge, plan[:10] if not args.quick else plan[:1], work)
        long_recording(bridge, plan, work, 120 if args.quick else 600)
    finally:
        services.stop()
    return 0


def conversations(bridge: Bridge, plan: Plan, work: Path) -> None:
    """Each conversation diarized and plain: its scores, then the means by number of speakers."""
    print("| conversation | seconds | speakers found | DER | words right | SA-WER | WER plain "
          "| time diarized / plain |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    by_size: dict[int, list[dict[str, float]]] = {}
    ratios = []
    for speakers, turns in plan:
        path, rows = conversation(work / f"{'-'.join(speakers)}.wav", speakers, turns)
        answer, t_diarized = bridge.post(path, model=DIARIZE, response_format="diarized_json")
        plain, t_plain = bridge.post(path, model="whisper-1")
        s = diarization_score(rows, answer["segments"], answer["duration"])
        reference = " ".join(librispeech_text(u) for *_, u in rows)
        s["wer"] = wer(reference, plain["text"])
        by_size.setdefault(len(speakers), []).append(s)
        ratios.append(t_diarized / t_plain)
        print(f"| {'+'.join(speakers)} | {answer['duration']:.0f} | {s['found']} | {s['der']:.3f} | "
              f"{s['words_right']:.3f} | {s['sa_wer']:.3f} | {s['wer']:.3f} | "
              f"{t_diarized:.1f} / {t_plain:.1f} s |")
    print("\n| speakers | conversations | mean DER | max DER | count right | mean words right | mean SA-WER |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n, scores in sorted(by_size.items()):
        print(f"| {n} | {len(scores)} | {statistics.mean(s['der'] for s in scores):.3f} | "
              f"{max(s['der'] for s in scores):.3f} | {sum(s['found'] == n for s in scores)}/{len(scores)} | "
              f"{statistics.mean(s['words_right'] for s in scores):.3f} | "
              f"{statistics.mean(s['sa_wer'] for s in scores):.3f} |")
    print(f"\ntime diarized / plain, per conversation: median {statistics.median(ratios):.2f}x")


def known_speakers(bridge: Bridge, plan: Plan, work: Path) -> None:
    """Known speakers: each speaker's reference from an utterance the conversation does not use."""
    right = total = 0
    for speakers, turns in plan:
        path, rows = conversation(work / f"known-{'-'.join(speakers)}.wav", speakers, turns)
        names = {s: f"speaker {s}" for s in speakers}
        refs = [data_url(speech_span(librispeech_samples(speaker_utterances(s)[-1]))[: 16000 * 9])
                for s in speakers]
        answer, _ = bridge.post(path, model=DIARIZE, response_format="diarized_json",
                                **{"known_speaker_names[]": list(names.values()), "known_speaker_references[]": refs})
        for start, end, speaker, utterance in rows:
            words = len(librispeech_text(utterance).split())
            said = max(answer["segments"], key=lambda seg: min(end, seg["end"]) - max(start, seg["start"]))
            right += words * (said["speaker"] == names[speaker])
            total += words
    print(f"known speakers: {right / total:.3f} of words under the right name")


def long_recording(bridge: Bridge, plan: Plan, work: Path, target: int) -> None:
    """What speakers cost on a long recording: conversations one after another, ``target`` seconds."""
    parts: list[np.ndarray] = []
    seconds = 0.0
    for speakers, turns in itertools.cycle(plan):
        path, _ = conversation(work / "part.wav", speakers, turns, seed=len(parts))
        with wave.open(str(path)) as w:
            samples = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768
        parts.append(samples)
        seconds += len(samples) / 16000
        if seconds >= target:
            break
    long = write_wav16(work / "long.wav", np.concatenate(parts)[: int(target * 16000)])
    _, t_plain = bridge.post(long, model="whisper-1")
    _, t_diarized = bridge.post(long, model=DIARIZE, response_format="diarized_json")
    _, t_plain2 = bridge.post(long, model="whisper-1")
    t_plain = (t_plain + t_plain2) / 2  # before and after: the machine's drift shared out
    print(f"{target} s recording: plain {t_plain:.1f} s, diarized {t_diarized:.1f} s: "
          f"diarization adds {100 * (t_diarized / t_plain - 1):.0f} %")


if __name__ == "__main__":
    sys.exit(main())
