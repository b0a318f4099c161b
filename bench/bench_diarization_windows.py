"""Benchmark: speakers of long recordings found window by window (``DIARIZATION_WINDOW_SECONDS``)
against the whole recording at once, side by side in one run: DER, words under the right speaker,
speakers found, and the bridge's peak RSS over idle while it answers.

Two bridges in front of the stand-in engine that answers at once (the engine does not change who
spoke when; with a model without token times the answer's segments are the speaker turns), with
the test stand-ins of the diarization models (``../shared/models/diarization/``, clustering
threshold 0.45 as in the tests): one diarizes each recording whole, one in windows of
``--window`` seconds. The recordings: the 20 conversations of ``bench_diarization`` (49-101 s,
so 30 s windows cut each into 2-4), and all of them one after another (about 27 minutes, 5
speakers who come back again and again: windows of 600 s must find the same speakers in each).

    .venv/bin/python -m bench.bench_diarization_windows [--window 30] [--long-window 600]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from adapters.managed_websocket import free_port
from bench.bench_stack import Services, Watch, standin_models, wait_http
from tests.helpers import diarization_score
from tests.speech import HELD_OUT_SPEAKERS, conversation, read_wav16, write_wav16

ROOT = Path(__file__).resolve().parent.parent
def recordings(work: Path) -> list[tuple[str, Path, list[tuple[float, float, str, str]]]]:
    """The 20 conversations, then all of them one after another."""
    plan = [(list(p), 8) for p in itertools.combinations(HELD_OUT_SPEAKERS, 2)]
    plan += [(list(t), 9) for t in itertools.combinations(HELD_OUT_SPEAKERS, 3)][:5]
    plan += [(list(q), 12) for q in itertools.combinations(HELD_OUT_SPEAKERS, 4)]
    out = []
    parts, rows, at = [], [], 0.0
    for speakers, turns in plan:
        path, talk_rows = conversation(work / f"{'-'.join(speakers)}.wav", speakers, turns)
        out.append(("+".join(speakers), path, talk_rows))
        samples = read_wav16(path)
        parts.append(samples)
        rows += [(round(a + at, 3), round(b + at, 3), s, u) for a, b, s, u in talk_rows]
        at += len(samples) / 16000
    out.append(("all 20, one after another", write_wav16(work / "all.wav", np.concatenate(parts)), rows))
    return out


def start_bridge(services: Services, env: dict[str, str], name: str, window: float) -> tuple[str, int]:
    port = free_port()
    proc = services.start(name, [sys.executable, "-m", "bridge"],
                          {**env, "BRIDGE_HOST": "127.0.0.1", "BRIDGE_PORT": str(port),
                           "DIARIZATION_WINDOW_SECONDS": str(window)})
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc, timeout=120)
    return url, proc.pid


def diarize(url: str, path: Path, pid: int) -> tuple[dict, float, float]:
    """The answer, its seconds, and the bridge's peak RSS over idle (MB) while it answered."""
    watch = Watch([psutil.Process(pid)], interval=0.02)
    idle = watch.rss()
    with watch, path.open("rb") as fh:
        started = time.perf_counter()
        r = httpx.post(url + "/v1/audio/transcriptions", files={"file": (path.name, fh)},
                       data={"model": "gpt-4o-transcribe-diarize", "response_format": "diarized_json"}, timeout=3600)
        elapsed = time.perf_counter() - started
    r.raise_for_status()
    return r.json(), elapsed, (watch.peak - idle) / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--window", type=float, default=30.0, help="window for the conversations (s)")
    ap.add_argument("--long-window", type=float, default=600.0, help="window for the long recording (s)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-diarization-windows-"))
    services = Services(work)
    engine_port = free_port()
    env = {**os.environ, "LOG_LEVEL": "warning", "BRIDGE_METRICS_PORT": "0", "SPEED_CHECK": "false",
           "ENGINE_ADAPTER": "websocket", "ENGINE_URL": f"ws://127.0.0.1:{engine_port}", "SHERPA_MAX_UTTERANCE": "3600",
           "MAX_UPLOAD_BYTES": str(2**30), **standin_models(work)}
    try:
        services.start("engine", [sys.executable, "-m", "bench.instant_engine", "--port", str(engine_port),
                                  "--words-per-second", "2.5"], env)
        whole_url, whole_pid = start_bridge(services, env, "whole", 100000)
        short_url, short_pid = start_bridge(services, env, "short", args.window)
        long_url, long_pid = start_bridge(services, env, "long", args.long_window)
        print("| recording | s | whole: DER, words right, found | windows: DER, words right, found "
              "| seconds whole / windows | peak MB whole / windows |\n|---|---|---|---|---|---|")
        ders: dict[str, list[float]] = {"whole": [], "windows": []}
        for name, path, rows in recordings(work):
            windowed = (long_url, long_pid) if name.startswith("all") else (short_url, short_pid)
            cells, times, peaks = [], [], []
            for label, (url, pid) in (("whole", (whole_url, whole_pid)), ("windows", windowed)):
                answer, seconds, peak = diarize(url, path, pid)
                s = diarization_score(rows, answer["segments"], answer["duration"])
                cells.append(f"{100 * s['der']:.1f} %, {100 * s['words_right']:.1f} %, {s['found']}")
                times.append(seconds)
                peaks.append(peak)
                if not name.startswith("all"):
                    ders[label].append(s["der"])
            print(f"| {name} | {rows[-1][1]:.0f} | {cells[0]} | {cells[1]} | {times[0]:.1f} / {times[1]:.1f} "
                  f"| +{peaks[0]:.0f} / +{peaks[1]:.0f} |", flush=True)
        print(f"\nconversations, mean DER: whole {100 * statistics.mean(ders['whole']):.1f} %, windows of "
              f"{args.window:g} s {100 * statistics.mean(ders['windows']):.1f} %; long recording windows of "
              f"{args.long_window:g} s")
    finally:
        services.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
