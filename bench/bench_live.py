"""Live dictation latency: a real recording sent to the bridge's ``/v1/realtime`` at real-time pace
in 100 ms chunks (server VAD, ``silence_duration_ms`` 500), and for each turn the time from the end
of its audio (``audio_end_ms`` on the sending clock) to its ``completed`` event, beside the engine's
own time for that turn's audio (the raw engine with the bridge's flags, fed the same samples, after
the live run). Everything on loopback, in one run.

    .venv/bin/python -m bench.bench_live [--audio FILE] [--rounds 3]

The default recording is Beckett's "Ever tried. Ever failed." (``moonshine-cpp``'s test data).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import websockets
from websockets.sync.client import connect as sync_connect

from adapters.managed_websocket import free_port
from adapters.sherpa_protocol import parse_reply, utterance_frames
from bench.__main__ import start_raw_engine
from bench.bench_stack import Services, wait_http
from bridge.config import load_settings
from bridge.models.catalog import Catalog
from bridge.models.model_store import ModelStore

CHUNK_SECONDS = 0.1


def decode(path: Path, rate: int) -> bytes:
    return subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-ac", "1", "-ar", str(rate),
                           "-f", "s16le", "pipe:1"], capture_output=True, check=True).stdout


async def live_run(url: str, pcm24: bytes) -> list[dict]:
    """Send at real-time pace; returns per turn: item, audio_start_ms, audio_end_ms, latency s."""
    chunk = int(24000 * CHUNK_SECONDS) * 2
    turns: dict[str, dict] = {}
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
            "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                               "silence_duration_ms": 500}}}}}))
        started = time.monotonic()

        async def send() -> None:
            for i in range(0, len(pcm24), chunk):
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(pcm24[i:i + chunk]).decode()}))
                await asyncio.sleep(max(0.0, (i + chunk) / 48000 - (time.monotonic() - started)))
            await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))

        sender = asyncio.create_task(send())
        cleared = False
        async for message in ws:
            event = json.loads(message)
            now = time.monotonic() - started
            kind = event["type"]
            if kind == "input_audio_buffer.speech_started":
                turns[event["item_id"]] = {"item": event["item_id"], "start_ms": event["audio_start_ms"]}
            elif kind == "input_audio_buffer.speech_stopped":
                turns[event["item_id"]]["end_ms"] = event["audio_end_ms"]
            elif kind == "conversation.item.input_audio_transcription.completed":
                turn = turns[event["item_id"]]
                turn["latency"] = now - turn["end_ms"] / 1000
                turn["text"] = event["transcript"]
            elif kind == "input_audio_buffer.cleared":
                cleared = True
            elif kind == "error":
                raise RuntimeError(event)
            if cleared and all("latency" in t for t in turns.values()):
                break
        await sender
    return list(turns.values())


def engine_seconds(url: str, samples: np.ndarray, rounds: int) -> float:
    times = []
    with sync_connect(url, max_size=None) as ws:
        for _ in range(rounds):
            t = time.perf_counter()
            for frame in utterance_frames(samples):
                ws.send(frame)
            parse_reply(ws.recv())
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_live", description=__doc__.split("\n\n")[0])
    ap.add_argument("--audio", type=Path)
    ap.add_argument("--rounds", type=int, default=3, help="engine timings per turn (median)")
    args = ap.parse_args()
    if args.audio is None:
        import moonshine_cpp

        args.audio = Path(moonshine_cpp.__file__).parent / "test-data" / "beckett.wav"
    settings = load_settings()
    spec = Catalog.load(settings.catalog_file).get(settings.default_model)
    store = ModelStore(settings.models_dir)
    store.ensure(spec)
    work = Path(tempfile.mkdtemp(prefix="bench-live-"))
    services = Services(work)
    env = {**os.environ, "LOG_LEVEL": "warning", "BRIDGE_METRICS_PORT": "0", "MODELS_DIR": str(settings.models_dir),
           "DEFAULT_MODEL": spec.id}
    try:
        raw_port, _ = start_raw_engine(services, settings, spec, store.path_for(spec.id), env)
        port = free_port()
        bridge = services.start("bridge", [sys.executable, "-m", "bridge"],
                                {**env, "BRIDGE_HOST": "127.0.0.1", "BRIDGE_PORT": str(port)})
        wait_http(f"http://127.0.0.1:{port}/health", bridge, timeout=300)
        pcm24 = decode(args.audio, 24000) + b"\0" * 48000 * 2
        samples = np.frombuffer(decode(args.audio, 16000), dtype="<i2").astype(np.float32) / 32768
        samples = np.concatenate([samples, np.zeros(32000, dtype=np.float32)])
        turns = asyncio.run(live_run(f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription", pcm24))
        raw_url = f"ws://127.0.0.1:{raw_port}"
        engine_seconds(raw_url, samples[:16000], 1)  # warm-up
        rows = []
        for t in turns:
            piece = samples[int(t["start_ms"] * 16):int(t["end_ms"] * 16)]
            t["engine"] = engine_seconds(raw_url, piece, args.rounds)
            rows.append(t)
    finally:
        services.stop()
    print(f"Live dictation, {spec.id} on {settings.sherpa_provider}, {args.audio.name}, 100 ms chunks at real-time "
          "pace, server VAD (silence 500 ms)\n")
    print("| turn | audio ms | end of audio -> completed | engine alone | difference | text |")
    print("| --- | --- | --- | --- | --- | --- |")
    for i, t in enumerate(rows, 1):
        print(f"| {i} | {t['start_ms']}-{t['end_ms']} | {t['latency'] * 1000:.0f} ms | {t['engine'] * 1000:.0f} ms | "
              f"{(t['latency'] - t['engine']) * 1000:.0f} ms | {t['text']} |")
    lat = statistics.median(t["latency"] for t in rows)
    diff = statistics.median(t["latency"] - t["engine"] for t in rows)
    print(f"\nMedian over {len(rows)} turns: {lat * 1000:.0f} ms from the end of a turn's audio to its text; "
          f"{diff * 1000:.0f} ms more than the engine alone takes for it.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
