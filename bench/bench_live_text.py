"""Live text (``gpt-live-transcribe``): how soon the words show while a person talks, how stable
they are, and what the passes cost the engine and the uploads beside them.

Turns are real read speech (LibriSpeech utterances of 5-30 s from ``../shared/data``), sent in
100 ms chunks at real-time pace through one session (``turn_detection: null``; the client commits
each turn when its audio ends, as OpenAI asks for this model). For each engine (Moonshine on this
machine's cores; the instant stand-in engine for a GPU, so that only the bridge's own lag shows):

- lag: for each word of a turn's ``completed`` transcript, the time from the moment its audio was
  sent to the delta that carried it. A word's place in the audio is estimated by spreading the
  transcript's characters over the speech the VAD (Silero, as the bridge runs it) finds in the turn;
  no forced aligner runs here. p50 and p95 over all words.
- stability: WER of the turn's deltas joined against its ``completed``, and the share of words that
  came only after the commit;
- cost: CPU seconds of the engine process (and of the bridge) per second of audio, live text
  against the same session with ``gpt-transcribe`` (text at each commit only), and the seconds of
  audio the live passes sent to the engine per second of audio (what a GPU's time follows);
- uploads: the latency of a 6 s upload repeated during a live session, against the same uploads
  with no session.

The tiny-tdt stand-in (``--engine tiny-tdt``: parakeet v2's flags on the real engine, random
words) shows what the engine's token times do: passes that start after the last agreed word (its
lag and WER say nothing of words; its engine time does). ``--no-pauses`` shortens each turn's pauses
to 0.15 s (run-on speech, where only token times can cut); ``--compare DIR`` runs the same rows with
another checkout's bridge (a git worktree of an earlier commit) beside.

    .venv/bin/python -m bench.bench_live_text [--engine moonshine|instant|tiny-tdt|both] [--turns 6]
        [--delay low] [--no-pauses] [--compare DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import difflib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import websockets

from adapters.managed_websocket import free_port
from bench.bench_stack import ROOT, Services, cpu_model, wait_http
from bridge.config import load_settings
from bridge.live_text import DELAYS
from bridge.models.catalog import Catalog
from bridge.models.model_store import ModelStore
from bridge.vad import SpeechDetector, find_vad_model
from tests.helpers import pcm24_of, wer
from tests.model_standins import install_standin, tiny_tdt_spec
from tests.speech import LIBRISPEECH, librispeech_samples, without_pauses, write_wav16

RATE = 16000
CHUNK = 0.1  # seconds per append, as a browser's worklet sends
TURN_SECONDS = (5.0, 30.0)


@dataclass
class TurnLog:
    samples: np.ndarray
    started: float = 0.0  # when the turn's first sample was spoken (its first chunk sent minus CHUNK)
    committed: float = 0.0
    item: str = ""
    deltas: list[tuple[float, str]] = field(default_factory=list)
    transcript: str | None = None


def pick_turns(count: int) -> list[np.ndarray]:
    """LibriSpeech utterances of 5-30 s, varied in length, in a fixed order."""
    out = []
    for path in sorted(LIBRISPEECH.glob("*.flac")):
        samples = librispeech_samples(path.stem)
        if TURN_SECONDS[0] <= len(samples) / RATE <= TURN_SECONDS[1]:
            out.append(samples)
    step = max(1, len(out) // count)
    return out[::step][:count]


async def live_session(url: str, turns: list[np.ndarray], model: str, delay: str | None) -> list[TurnLog]:
    """One session, the turns sent one after another at real-time pace, each committed at its end."""
    logs = [TurnLog(t) for t in turns]
    by_item: dict[str, TurnLog] = {}
    pending: dict[str, list[tuple[float, str]]] = {}  # deltas that came before their turn's commit was known
    transcription: dict[str, object] = {"model": model}
    if delay:
        transcription["delay"] = delay
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": 24000}, "transcription": transcription,
                      "turn_detection": None}}}}))
        committed = 0

        async def receive() -> None:
            nonlocal committed
            async for message in ws:
                now, event = time.monotonic(), json.loads(message)
                kind = event["type"]
                if kind == "error":
                    raise RuntimeError(event)
                if kind == "input_audio_buffer.committed":
                    log = logs[committed]
                    committed += 1
                    log.item = event["item_id"]
                    by_item[log.item] = log
                    log.deltas = pending.pop(log.item, []) + log.deltas
                elif kind == "conversation.item.input_audio_transcription.delta":
                    target = by_item.get(event["item_id"])
                    (target.deltas if target else pending.setdefault(event["item_id"], [])).append(
                        (now, event["delta"]))
                elif kind == "conversation.item.input_audio_transcription.completed":
                    by_item[event["item_id"]].transcript = event["transcript"]
                    if all(log.transcript is not None for log in logs):
                        return

        receiver = asyncio.create_task(receive())
        step = int(24000 * CHUNK) * 2
        for log in logs:
            pcm = pcm24_of(log.samples)
            log.started = time.monotonic()
            for i in range(0, len(pcm), step):
                due = log.started + (i + step) / 48000  # a chunk leaves once it has been spoken
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(pcm[i:i + step]).decode()}))
            log.committed = time.monotonic()
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        await asyncio.wait_for(receiver, 600)
    return logs


def word_ends(samples: np.ndarray, text: str, detector: SpeechDetector) -> list[float]:
    """Where each word of ``text`` ends in the turn (s): its characters spread over the speech the VAD found."""
    spans = detector.speech_segments(samples) or [(0, len(samples))]
    speech = sum(b - a for a, b in spans)
    words = text.split()
    total = sum(len(w) + 1 for w in words) or 1
    ends, done = [], 0
    for word in words:
        done += len(word) + 1
        left = done / total * speech
        for a, b in spans:
            if left <= b - a:
                ends.append((a + left) / RATE)
                break
            left -= b - a
        else:
            ends.append(spans[-1][1] / RATE)
    return ends


def score(logs: list[TurnLog], detector: SpeechDetector) -> dict[str, float]:
    """Lag p50/p95 (s), deltas' WER against completed, share of words only after the commit."""
    lags: list[float] = []
    late = total = 0
    refs, hyps = [], []
    for log in logs:
        final = log.transcript or ""
        sent = [(t, w) for t, text in log.deltas for w in text.split()]
        refs.append(final)
        hyps.append(" ".join(text for _, text in log.deltas))
        words = final.split()
        plain = [w.strip(".,;:!?\"'").lower() for w in words]
        matcher = difflib.SequenceMatcher(None, [w.strip(".,;:!?\"'").lower() for _, w in sent], plain,
                                          autojunk=False)
        arrived: dict[int, float] = {}
        for block in matcher.get_matching_blocks():
            for k in range(block.size):
                arrived[block.b + k] = sent[block.a + k][0]
        ends = word_ends(log.samples, final, detector)
        for k, end in enumerate(ends):
            at = arrived.get(k, max((t for t, _ in log.deltas), default=log.committed))
            lags.append(at - (log.started + end))
            late += at > log.committed
            total += 1
    lags.sort()
    return {"p50": statistics.median(lags) if lags else 0.0,
            "p95": lags[int(0.95 * (len(lags) - 1))] if lags else 0.0,
            "wer": wer(refs, hyps) * 100, "late": late / max(1, total) * 100, "words": total}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pass_audio(metrics_url: str) -> float:
    """Seconds of audio the bridge's live passes have sent to the engine (its metrics)."""
    for line in httpx.get(metrics_url).text.splitlines():
        if line.startswith("stt_bridge_live_pass_audio_seconds_total "):
            return float(line.split()[1])
    return float("nan")


def children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


class Uploads:
    """A 6 s upload, one after another with a 1 s gap, until stopped; their latencies."""

    def __init__(self, url: str, path: Path) -> None:
        self.url, self.path = url, path
        self.latencies: list[float] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with httpx.Client(timeout=300) as client:
            while not self.stopping.is_set():
                t = time.monotonic()
                r = client.post(self.url + "/v1/audio/transcriptions", data={"model": "gpt-transcribe"},
                                files={"file": ("u.wav", self.path.read_bytes())})
                r.raise_for_status()
                self.latencies.append(time.monotonic() - t)
                self.stopping.wait(1.0)

    def __enter__(self) -> Uploads:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join()


def bench_engine(name: str, env: dict[str, str], turns: list[np.ndarray], delay: str, work: Path,
                 detector: SpeechDetector, tree: Path = ROOT) -> list[str]:
    """The rows of one engine behind a bridge started from ``tree`` (this checkout or another)."""
    services = Services(work)
    port = free_port()
    rows: list[str] = []
    if tree != ROOT:
        name = f"{name} ({tree.name})"
    try:
        metrics_port = free_port()
        bridge = services.start(f"bridge-{name}", [sys.executable, "-m", "bridge"],
                                {**env, "BRIDGE_HOST": "127.0.0.1", "BRIDGE_PORT": str(port),
                                 "BRIDGE_METRICS_PORT": str(metrics_port)}, cwd=tree)
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        http = f"http://127.0.0.1:{port}"
        wait_http(http + "/health", bridge, timeout=300)
        ws = f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription"
        engine = children(bridge.pid)
        audio = sum(len(t) for t in turns) / RATE
        for label, model, pace in (("text at each commit (gpt-transcribe)", "gpt-transcribe", None),
                                   (f"live text (gpt-live-transcribe, delay {delay})", "gpt-live-transcribe", delay)):
            before = [cpu_seconds(p) for p in [bridge.pid, *engine]]
            heard_before = pass_audio(metrics)
            logs = asyncio.run(live_session(ws, turns, model, pace))
            after = [cpu_seconds(p) for p in [bridge.pid, *engine]]
            s = score(logs, detector)
            engine_cpu = sum(after[1:]) - sum(before[1:])
            heard = pass_audio(metrics) - heard_before
            rows.append(f"| {name} | {label} | {s['p50']:.2f} s | {s['p95']:.2f} s | {s['wer']:.1f} % | "
                        f"{s['late']:.0f} % | {engine_cpu / audio:.2f} | {heard / audio:.2f} | "
                        f"{(after[0] - before[0]) / audio:.3f} |")
            print(rows[-1], flush=True)
        upload = write_wav16(work / "upload.wav", turns[0][: 6 * RATE])
        with Uploads(http, upload) as alone:
            time.sleep(min(60.0, audio / 2))
        with Uploads(http, upload) as beside:
            asyncio.run(live_session(ws, turns[: max(1, len(turns) // 2)], "gpt-live-transcribe", delay))
        rows.append(f"| {name} | 6 s upload: median latency alone {statistics.median(alone.latencies):.2f} s, "
                    f"beside a live session {statistics.median(beside.latencies):.2f} s (n = {len(alone.latencies)}, "
                    f"{len(beside.latencies)}) | | | | | | | |")
        print(rows[-1], flush=True)
    finally:
        services.stop()
    return rows


def tiny_tdt_env(work: Path) -> dict[str, str]:
    """A model store and catalog with tiny-tdt as parakeet v2's entry, and the settings that serve it."""
    spec = tiny_tdt_spec("tiny-tdt-v2")
    install_standin(ModelStore(work / "tdt-models"), spec)
    catalog = work / "tdt-catalog.json"
    catalog.write_text(json.dumps([spec.model_dump()]))
    return {"MODELS_DIR": str(work / "tdt-models"), "CATALOG_FILE": str(catalog), "DEFAULT_MODEL": spec.id,
            "SHERPA_NUM_THREADS": "1"}


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_live_text", description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=["moonshine", "instant", "tiny-tdt", "both"], default="both")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--delay", choices=list(DELAYS), default="low")
    ap.add_argument("--no-pauses", action="store_true", help="shorten each turn's pauses to 0.15 s")
    ap.add_argument("--compare", type=Path, help="another checkout whose bridge runs the same rows beside")
    args = ap.parse_args()
    settings = load_settings()
    spec = Catalog.load(settings.catalog_file).get(settings.default_model)
    store = ModelStore(settings.models_dir)
    store.ensure(spec)
    vad_model = find_vad_model(settings.vad_model)
    if vad_model is None:
        raise SystemExit("no Silero model found: the bench places words on the speech it finds")
    detector = SpeechDetector(vad_model)
    turns = pick_turns(args.turns)
    if args.no_pauses:
        turns = [without_pauses(t) for t in turns]
    work = Path(tempfile.mkdtemp(prefix="bench-live-text-"))
    env = {**os.environ, "LOG_LEVEL": "warning", "MODELS_DIR": str(settings.models_dir),
           "DEFAULT_MODEL": spec.id}
    trees = [ROOT, *([args.compare.resolve()] if args.compare else [])]
    print(f"Live text, {len(turns)} LibriSpeech turns ({sum(len(t) for t in turns) / RATE:.0f} s, "
          f"{', '.join(f'{len(t) / RATE:.1f}' for t in turns)} s{', pauses shortened' if args.no_pauses else ''}), "
          f"sent at real-time pace in 100 ms chunks, one session; CPU: {cpu_model()}, {os.cpu_count()} cores\n")
    print("| engine | session | lag p50 | lag p95 | deltas vs completed (WER) | words only after the commit "
          "| engine CPU s per audio s | audio s passes sent per audio s | bridge CPU s per audio s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for tree in trees:
        if args.engine in ("moonshine", "both"):
            bench_engine(spec.id, env, turns, args.delay, work, detector, tree)
        if args.engine == "tiny-tdt":
            bench_engine("tiny-tdt (parakeet v2 flags)", {**env, **tiny_tdt_env(work)}, turns, args.delay, work,
                         detector, tree)
        if args.engine in ("instant", "both"):
            bench_instant(env, turns, args.delay, work, detector, tree)
    return 0


def bench_instant(env: dict[str, str], turns: list[np.ndarray], delay: str, work: Path, detector: SpeechDetector,
                  tree: Path) -> None:
    services = Services(work)
    port = free_port()
    try:
        services.start("instant-engine", [sys.executable, "-m", "bench.instant_engine", "--port", str(port),
                                          "--words-per-second", "2.5"], env)
        time.sleep(1.0)
        bench_engine("instant stand-in", {**env, "ENGINE_ADAPTER": "websocket",
                                          "ENGINE_URL": f"ws://127.0.0.1:{port}", "SPEED_CHECK": "false"},
                     turns, delay, work, detector, tree)
    finally:
        services.stop()


if __name__ == "__main__":
    sys.exit(main())
