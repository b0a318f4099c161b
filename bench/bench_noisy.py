"""Noisy long audio: what the piece guard (``bridge.guard``) does, in one run.

Builds about 100 s of Festival sentences with pauses, mixed with babble (four streams of reversed
sentences) and pink noise at each SNR asked, and keeps the true text. For each file it measures:
the raw engine (sherpa-onnx's in-process recognizer, the bridge's model and threads) on the audio
cut by hand at sentence boundaries into pieces of at most 25 s; the bridge with the guard; the same
bridge with ``GUARD_PIECES=false``. WER, time, and the guard's counts (pieces retried, kept,
unreliable) for each.

    .venv/bin/python -m bench.bench_noisy [--snr 20 10 0] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from adapters.managed_websocket import free_port
from bench.bench_stack import Services, in_process_recognizer, recognize, wait_http
from bridge.config import load_settings
from bridge.models.catalog import Catalog
from bridge.models.model_store import ModelStore
from tests.helpers import wer
from tests.speech import HARVARD, festival_wav, read_wav16, write_wav16

RATE = 16000


def trim(a: np.ndarray, level: float = 2e-3) -> np.ndarray:
    loud = np.flatnonzero(np.abs(a) > level)
    return a[loud[0]:loud[-1] + 1]


def build(seed: int = 7) -> tuple[np.ndarray, np.ndarray, list[tuple[str, int, int]]]:
    """(speech, noise of the same length and unit power, truth as (sentence, start, end))."""
    rng = np.random.default_rng(seed)
    clips = [trim(read_wav16(festival_wav(s))) for s in HARVARD]
    parts, truth, pos = [], [], 0
    for k in range(36):
        i = k % len(HARVARD)
        gap = np.zeros(int([0.3, 0.5, 0.8][k % 3] * RATE), np.float32)
        truth.append((HARVARD[i], pos, pos + len(clips[i])))
        parts += [clips[i], gap]
        pos += len(clips[i]) + len(gap)
    speech = np.concatenate(parts)
    n = len(speech)

    def babble_stream() -> np.ndarray:
        out: list[np.ndarray] = []
        while sum(map(len, out)) < n:
            out.append(clips[int(rng.integers(len(clips)))][::-1])
        return np.concatenate(out)[:n]

    streams = [babble_stream() for _ in range(4)]
    return speech, babble_and_pink(streams, pink_noise(n, rng)), truth


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x.astype(np.float64) ** 2))


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    white = rng.standard_normal(n + 1)
    freqs = np.fft.rfftfreq(n + 1)
    freqs[0] = freqs[1]
    return np.fft.irfft(np.fft.rfft(white) / np.sqrt(freqs), n + 1)[:n]


def babble_and_pink(streams: list[np.ndarray], pink: np.ndarray) -> np.ndarray:
    """The babble streams summed, plus the pink noise at the same power: unit power."""
    return unit(unit(np.sum(streams, axis=0)) + unit(pink))


def mix(speech: np.ndarray, noise: np.ndarray, snr: float | None) -> np.ndarray:
    if snr is None:
        return speech
    power = np.mean(speech.astype(np.float64) ** 2)
    out = speech + noise * np.sqrt(power / 10 ** (snr / 10))
    return (out / max(1.0, float(np.abs(out).max()))).astype(np.float32)


def hand_cut(truth: list[tuple[str, int, int]], limit: float = 25.0) -> list[tuple[int, int]]:
    pieces: list[list[int]] = []
    for _, a, b in truth:
        if pieces and b - pieces[-1][0] <= limit * RATE:
            pieces[-1][1] = b
        else:
            pieces.append([a, b])
    return [(max(0, a - RATE // 5), b + RATE // 5) for a, b in pieces]


def start_bridges(services: Services, env: dict[str, str], prefix: str = "") -> dict[str, str]:
    """Two bridges with the bridge's settings, one with ``GUARD_PIECES=false``."""
    urls = {}
    for name, extra in (("guard", {}), ("no guard", {"GUARD_PIECES": "false"})):
        port = free_port()
        proc = services.start(prefix + name.replace(" ", "-"), [sys.executable, "-m", "bridge"],
                              {**env, "BRIDGE_HOST": "127.0.0.1", "BRIDGE_PORT": str(port), **extra})
        urls[name] = f"http://127.0.0.1:{port}"
        wait_http(urls[name] + "/health", proc, timeout=300)
    return urls


def timed_answers(client: httpx.Client, url: str, path: Path, rounds: int) -> tuple[str, float, dict[str, float]]:
    """``path`` sent ``rounds`` times: (the text, the median time, the guard's counts per request)."""
    before = client.get(url + "/health").json()["guard"] or {}
    times, text = [], ""
    for _ in range(rounds):
        with path.open("rb") as fh:
            t = time.perf_counter()
            r = client.post(url + "/v1/audio/transcriptions", files={"file": ("a.wav", fh)})
            times.append(time.perf_counter() - t)
        text = r.json()["text"]
    after = client.get(url + "/health").json()["guard"] or {}
    counts = {k: (after.get(k, 0) - before.get(k, 0)) / rounds for k in ("retried", "improved", "unreliable")}
    return text, statistics.median(times), counts


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_noisy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--snr", type=float, nargs="+", default=[20, 10, 0])
    ap.add_argument("--rounds", type=int, default=3, help="timings per bridge and file (median)")
    args = ap.parse_args()
    settings = load_settings()
    spec = Catalog.load(settings.catalog_file).get(settings.default_model)
    store = ModelStore(settings.models_dir)
    store.ensure(spec)
    recognizer = in_process_recognizer(spec, store.path_for(spec.id), settings.sherpa_num_threads)

    def raw(samples: np.ndarray) -> str:
        return recognize(recognizer, samples)

    speech, noise, truth = build()
    reference = " ".join(s for s, _, _ in truth)
    work = Path(tempfile.mkdtemp(prefix="bench-noisy-"))
    services = Services(work)
    env = {**os.environ, "LOG_LEVEL": "warning", "BRIDGE_METRICS_PORT": "0", "MODELS_DIR": str(settings.models_dir),
           "DEFAULT_MODEL": spec.id}
    try:
        urls = start_bridges(services, env)
        client = httpx.Client(timeout=900)
        print(f"{len(speech) / RATE:.0f} s of Festival speech, {spec.id}; hand cut = whole sentences in pieces "
              "of at most 25 s\n")
        print("| SNR | raw, hand cut: WER | bridge, no guard: WER / time | bridge with guard: WER / time "
              "| pieces retried / kept / unreliable |")
        print("| --- | --- | --- | --- | --- |")
        for snr in [None, *args.snr]:
            audio = mix(speech, noise, snr)
            path = write_wav16(work / f"noisy-{snr}.wav", audio)
            raw_text = " ".join(raw(audio[a:b]) for a, b in hand_cut(truth))
            cells = []
            counts = {}
            for name in ("no guard", "guard"):
                text, seconds, counts[name] = timed_answers(client, urls[name], path, args.rounds)
                cells.append(f"{wer(reference, text):.3f} / {seconds:.2f} s")
            c = counts["guard"]
            label = "clean" if snr is None else f"{snr:g} dB"
            print(f"| {label} | {wer(reference, raw_text):.3f} | {cells[0]} | {cells[1]} | "
                  f"{c['retried']:g} / {c['improved']:g} / {c['unreliable']:g} |")
    finally:
        services.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
