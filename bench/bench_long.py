"""Benchmark: 600 s of speech through the stack against the raw engine fed the same pieces one
after another over one connection, in one run. Also the real-time factor and the bridge's peak
RSS growth (engine child excluded) during the upload.

Two raw baselines run beside the stack: the engine exactly as the bridge starts it (same threads
per model run), and the same engine with every usable core on each model run, which is the best a
single connection can do.

    .venv/bin/python bench/bench_long.py [--seconds 600] [--threads N --connections N]  # 0 = auto

Needs Festival (the speech is rendered like the tests'). Set DEFAULT_MODEL, MODELS_DIR and
SHERPA_PROVIDER=cuda to measure parakeet on a GPU, where the parallel pieces are batched.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapters.managed_websocket import SERVER_BINARY, EngineSupervisor, find_binary, free_port  # noqa: E402
from adapters.sherpa_protocol import parse_reply, utterance_frames  # noqa: E402
from adapters.websocket import ConnectionPool  # noqa: E402
from bench.bench_stack import Watch, wait_http  # noqa: E402
from bridge.config import BridgeSettings, load_settings, usable_cores  # noqa: E402
from bridge.models.catalog import Catalog, ModelSpec  # noqa: E402
from bridge.models.model_store import ModelStore  # noqa: E402
from bridge.transcription import plan_cuts  # noqa: E402
from bridge.vad import SpeechDetector, find_vad_model  # noqa: E402
from tests.speech import HARVARD, festival_wav, read_wav16, write_wav16  # noqa: E402


def speech(seconds: float) -> np.ndarray:
    pauses = [0.3, 0.6, 1.0, 1.5, 2.5, 0.4, 0.8]
    parts, total, i = [], 0, 0
    while total < seconds * 16000:
        clip = read_wav16(festival_wav(HARVARD[i % len(HARVARD)]))
        gap = np.zeros(int(pauses[i % len(pauses)] * 16000), dtype=np.float32)
        parts += [clip, gap]
        total += len(clip) + len(gap)
        i += 1
    return np.concatenate(parts)[: int(seconds * 16000)]


async def raw_sequential(url: str, samples: np.ndarray, plan: list[tuple[int, int]]) -> float:
    async with websockets.connect(url, max_size=None, compression=None) as ws:
        t = time.perf_counter()
        for a, b in plan:
            for frame in utterance_frames(samples[a:b]):
                await ws.send(frame)
            parse_reply(await ws.recv())
        return time.perf_counter() - t


def raw_engine(spec: ModelSpec, store: ModelStore, tuning: BridgeSettings,
               threads: int) -> tuple[subprocess.Popen[bytes], str]:
    """The raw engine, started with the flags the bridge gives its child and ``threads``; its URL."""
    sup = EngineSupervisor(spec.engine_model(store.path_for(spec.id)), binary=find_binary(SERVER_BINARY, None),
                           provider=tuning.sherpa_provider, num_threads=threads,
                           num_work_threads=tuning.sherpa_num_work_threads,
                           max_batch_size=tuning.sherpa_max_batch_size,
                           max_utterance_seconds=spec.max_piece_seconds + 5, ready_timeout=120, max_restarts=0,
                           restart_window=1, pool=ConnectionPool("ws://127.0.0.1:0", 1, 60))
    port = free_port()
    proc = subprocess.Popen(sup.command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"ws://127.0.0.1:{port}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--threads", type=int, default=0, help="threads per model run; 0: the bridge's default")
    ap.add_argument("--connections", type=int, default=0, help="engine connections; 0: the bridge's default")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-long-"))
    models_dir = Path(os.environ.get("MODELS_DIR", work / "models"))
    model_id = os.environ.get("DEFAULT_MODEL", "moonshine-base-en")
    provider = os.environ.get("SHERPA_PROVIDER", "cpu")
    spec = Catalog.load().get(model_id)
    store = ModelStore(models_dir)
    store.ensure(spec)
    samples = speech(args.seconds)
    wav = write_wav16(work / "speech.wav", samples)
    vad_model = find_vad_model(None)
    detector = SpeechDetector(vad_model) if vad_model else None
    plan = asyncio.run(plan_cuts(samples, spec.max_piece_seconds, detector))

    tuning = load_settings(sherpa_provider=provider, sherpa_num_threads=args.threads,
                           engine_connections=args.connections)

    raw_same, raw_same_url = raw_engine(spec, store, tuning, tuning.sherpa_num_threads)
    all_threads = max(tuning.sherpa_num_threads, usable_cores())
    raw_all, raw_all_url = raw_engine(spec, store, tuning, all_threads)
    bport = free_port()
    bridge = subprocess.Popen([sys.executable, "-m", "bridge"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL,
                              env={**os.environ, "MODELS_DIR": str(models_dir), "DEFAULT_MODEL": model_id,
                                   "SHERPA_PROVIDER": provider, "SHERPA_NUM_THREADS": str(args.threads),
                                   "ENGINE_CONNECTIONS": str(args.connections), "BRIDGE_HOST": "127.0.0.1",
                                   "BRIDGE_PORT": str(bport), "BRIDGE_METRICS_PORT": "0", "LOG_LEVEL": "warning"})
    url = f"http://127.0.0.1:{bport}"
    try:
        wait_http(url + "/health", bridge)
        time.sleep(1.0)
        # Warm every engine.
        for raw_url in (raw_same_url, raw_all_url):
            asyncio.run(raw_sequential(raw_url, samples, plan[:1]))
        httpx.post(url + "/v1/audio/transcriptions", files={"file": ("w.wav", wav.read_bytes()[:16000 * 2 * 5])},
                   timeout=120)
        watch = Watch([psutil.Process(bridge.pid)], interval=0.02)
        base_rss = watch.rss()
        with watch:
            t = time.perf_counter()
            with wav.open("rb") as fh:
                r = httpx.post(url + "/v1/audio/transcriptions", files={"file": fh}, timeout=3600)
            stack_s = time.perf_counter() - t
        r.raise_for_status()
        raw_s = asyncio.run(raw_sequential(raw_same_url, samples, plan))
        raw_all_s = asyncio.run(raw_sequential(raw_all_url, samples, plan))
    finally:
        for p in (bridge, raw_same, raw_all):
            p.terminate()
            p.wait(30)
    speech_s = sum(b - a for a, b in plan) / 16000
    print(json.dumps({
        "model": model_id, "provider": provider, "precision": spec.precision, "audio_seconds": args.seconds,
        "pieces": len(plan), "seconds_sent_to_engine": round(speech_s, 1), "vad": detector is not None,
        "stack_seconds": round(stack_s, 2), "raw_sequential_seconds": round(raw_s, 2),
        "raw_over_stack": round(raw_s / stack_s, 3),
        f"raw_{all_threads}_threads_sequential_seconds": round(raw_all_s, 2),
        f"raw_{all_threads}_threads_over_stack": round(raw_all_s / stack_s, 3),
        "stack_rtf": round(stack_s / args.seconds, 4),
        "bridge_peak_rss_growth_mb": round((watch.peak - base_rss) / 2**20, 1),
        "connections": tuning.engine_connections, "threads": tuning.sherpa_num_threads,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
