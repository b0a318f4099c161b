"""Benchmark: the bridge's own cost and the time to first text, side by side in one run.

    .venv/bin/python bench/bench_first_text.py --engine instant   # the bridge's own cost
    .venv/bin/python bench/bench_first_text.py --engine real      # Moonshine on CPU
    .venv/bin/python bench/bench_first_text.py                    # both
    ... --compare DIR [--compare-env VAD_THREADS=2]                 # another checkout's bridge beside

``instant``: a stand-in engine that answers at once (``bench.instant_engine``), so that everything
measured is the bridge's: two bridges in front of it, one per decoder (``AUDIO_DECODER=pyav``, the
default, and ``ffmpeg``), rounds interleaved. Median latency at concurrency 1 for a 10 s mp3 and a
10 s webm/opus; throughput at concurrency 4 for 10 s clips; a 10-minute 48 kHz stereo mp3; and the
floor: decoding the same files in this process with the workers' own code.

``real``: the engine the bridge starts (Moonshine on CPU by default, default tuning), a raw engine
started with the same flags, and the two bridges: a 44 s 48 kHz recording streamed (time of the first
delta against the whole), and a 10 s clip at concurrency 1 through each bridge against the raw engine.

Prints JSON. Needs Festival and sox (the speech is rendered like the tests').
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapters.managed_websocket import SERVER_BINARY, EngineSupervisor, find_binary, free_port  # noqa: E402
from adapters.websocket import ConnectionPool  # noqa: E402
from bench.bench_long import speech  # noqa: E402
from bench.bench_stack import Services, raw_one, wait_http  # noqa: E402
from bridge.config import load_settings  # noqa: E402
from bridge.decoding.stream import cap_samples  # noqa: E402
from bridge.models.catalog import Catalog  # noqa: E402
from bridge.models.model_store import ModelStore  # noqa: E402
from tests.speech import write_wav16  # noqa: E402


def encode(src: Path, dst: Path, *args: str) -> Path:
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(src), *args, str(dst)], check=True)
    return dst


def prepare(work: Path) -> dict[str, Path]:
    wav10 = write_wav16(work / "ten.wav", speech(10))
    wav44 = write_wav16(work / "forty-four.wav", speech(44))
    wav600 = write_wav16(work / "ten-minutes.wav", speech(600))
    return {
        "mp3_10s": encode(wav10, work / "ten.mp3", "-ar", "44100", "-ac", "2", "-b:a", "128k"),
        "webm_10s": encode(wav10, work / "ten.webm", "-c:a", "libopus", "-b:a", "32k"),
        "wav_10s": wav10,
        "mp3_44s_48k": encode(wav44, work / "forty-four.mp3", "-ar", "48000", "-ac", "2", "-b:a", "128k"),
        "mp3_600s_48k": encode(wav600, work / "ten-minutes.mp3", "-ar", "48000", "-ac", "2", "-b:a", "128k"),
    }


def in_process_decode(path: Path) -> float:
    """The floor: the decoder workers' own code (PyAV), run here, no process or pipe around it."""
    import av

    from bridge.decoding.pyav_worker import decode

    t = time.perf_counter()
    decode(av, str(path), cap_samples(600), io.BytesIO())
    return time.perf_counter() - t


def decoded(path: Path) -> np.ndarray:
    """``path`` as the decoder workers decode it (16 kHz mono 16-bit), as float32."""
    import av

    from bridge.decoding.pyav_worker import decode

    out = io.BytesIO()
    decode(av, str(path), cap_samples(600), out)
    data, samples = out.getvalue(), []
    while data:
        kind, size = struct.unpack("<cI", data[:5])
        if kind == b"a":
            samples.append(np.frombuffer(data[5:5 + size], dtype="<i2").astype(np.float32) / np.float32(32768))
        data = data[5 + size:]
    return np.concatenate(samples)


def ffmpeg_process_decode(path: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-ac", "1", "-ar", "16000",
                    "-f", "f32le", "pipe:1"], check=True, capture_output=True)
    return time.perf_counter() - t


FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


def post(client: httpx.Client, url: str, path: Path, response_format: str = "json") -> float:
    t = time.perf_counter()
    r = client.post(url + "/v1/audio/transcriptions", files={"file": (path.name, path.read_bytes())},
                    data={"response_format": response_format})
    r.raise_for_status()
    return time.perf_counter() - t


def throughput(url: str, path: Path, seconds: float, concurrency: int, total: int) -> float:
    clients = [httpx.Client(timeout=600) for _ in range(concurrency)]
    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda i: post(clients[i % concurrency], url, path), range(total)))
    elapsed = time.perf_counter() - t
    for c in clients:
        c.close()
    return total * seconds / elapsed


def first_delta(url: str, path: Path) -> tuple[float, float]:
    t = time.perf_counter()
    first = 0.0
    with httpx.stream("POST", url + "/v1/audio/transcriptions", files={"file": (path.name, path.read_bytes())},
                      data={"stream": "true"}, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"transcript.text.delta"' in line and not first:
                first = time.perf_counter() - t
    return first, time.perf_counter() - t


def interleaved(rounds: int, runs: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Median of each, the kinds taking turns so that drift in machine load hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(run())
    return {k: statistics.median(v) for k, v in times.items()}


class Stack(Services):
    """Processes started for the run, stopped at the end; bridges from this or another tree."""

    def bridge(self, name: str, env: dict[str, str], tree: Path = ROOT) -> str:
        port = free_port()
        env = {**env, "BRIDGE_HOST": "127.0.0.1", "BRIDGE_PORT": str(port), "BRIDGE_METRICS_PORT": "0"}
        proc = self.start(name, [sys.executable, "-m", "bridge"], env, cwd=tree)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", proc)
        return url


def bench_instant(files: dict[str, Path], work: Path, rounds: int, compare: Path | None,
                  compare_env: dict[str, str]) -> dict[str, object]:
    stack = Stack(work)
    try:
        port = free_port()
        stack.start("instant-engine", [sys.executable, "-m", "bench.instant_engine", "--port", str(port),
                                       "--words-per-second", "2.5"], dict(os.environ))
        # The stand-in is as fast as a GPU and takes no CPU, like a GPU engine.
        env = {**os.environ, "ENGINE_ADAPTER": "websocket", "ENGINE_URL": f"ws://127.0.0.1:{port}",
               "LOG_LEVEL": "warning", "DEFAULT_MODEL": "moonshine-base-en"}
        time.sleep(1)
        urls = {"pyav": stack.bridge("instant-pyav", {**env, "AUDIO_DECODER": "pyav"}),
                "ffmpeg": stack.bridge("instant-ffmpeg", {**env, "AUDIO_DECODER": "ffmpeg"})}
        if compare is not None:
            urls["compared"] = stack.bridge("instant-compared", {**env, **compare_env}, tree=compare)
        client = httpx.Client(timeout=600)
        for url in urls.values():  # warm up
            for f in files.values():
                post(client, url, f)
        out: dict[str, object] = {}
        for clip in ("mp3_10s", "webm_10s"):
            path = files[clip]
            med = interleaved(rounds, {
                "in_process_decode": lambda p=path: in_process_decode(p),  # type: ignore[misc]
                "ffmpeg_process_decode": lambda p=path: ffmpeg_process_decode(p),  # type: ignore[misc]
                **{f"bridge_{k}": (lambda u=u, p=path: post(client, u, p)) for k, u in urls.items()},  # type: ignore[misc]
            })
            out[f"{clip}_c1_median_ms"] = {k: round(v * 1000, 1) for k, v in med.items()}
            added = med["bridge_pyav"] - med["in_process_decode"]
            out[f"{clip}_c1_bridge_pyav_over_decode_ms"] = round(added * 1000, 1)
        tput: dict[str, list[float]] = {k: [] for k in urls}
        for _ in range(3):
            for k, u in urls.items():
                tput[k].append(throughput(u, files["mp3_10s"], 10.0, 4, 40))
        out["mp3_10s_c4_audio_s_per_s"] = {k: round(statistics.median(v), 1) for k, v in tput.items()}
        long = files["mp3_600s_48k"]
        med = interleaved(max(2, rounds // 4), {
            "in_process_decode": lambda: in_process_decode(long),
            **{f"bridge_{k}": (lambda u=u: post(client, u, long)) for k, u in urls.items()},  # type: ignore[misc]
        })
        out["mp3_600s_48k_seconds"] = {k: round(v, 3) for k, v in med.items()}
        out["mp3_600s_48k_audio_s_per_s"] = {k: round(600 / v, 1) for k, v in med.items()}
        # Every response format of the long file, the default decoder (and the compared bridge).
        timed = {k: u for k, u in urls.items() if k != "ffmpeg"}
        med = interleaved(max(2, rounds // 4), {
            f"{fmt} bridge_{k}": (lambda u=u, f=fmt: post(client, u, long, f))  # type: ignore[misc]
            for fmt in FORMATS for k, u in timed.items()
        })
        out["mp3_600s_48k_audio_s_per_s_by_format"] = {k: round(600 / v, 1) for k, v in med.items()}
        client.close()
        return out
    finally:
        stack.stop()


def bench_real(files: dict[str, Path], work: Path, rounds: int, compare: Path | None,
               compare_env: dict[str, str]) -> dict[str, object]:
    settings = load_settings()
    catalog = Catalog.load(settings.catalog_file)
    spec = catalog.get(settings.default_model)
    store = ModelStore(settings.models_dir)
    store.ensure(spec)
    stack = Stack(work)
    try:
        env = {**os.environ, "LOG_LEVEL": "warning"}
        urls = {"pyav": stack.bridge("real-pyav", {**env, "AUDIO_DECODER": "pyav"}),
                "ffmpeg": stack.bridge("real-ffmpeg", {**env, "AUDIO_DECODER": "ffmpeg"})}
        if compare is not None:
            urls["compared"] = stack.bridge("real-compared", {**env, **compare_env}, tree=compare)
        # The raw engine, started with exactly the flags the bridge gives its child.
        sup = EngineSupervisor(spec.engine_model(store.path_for(spec.id)), binary=find_binary(SERVER_BINARY, None),
                               provider=settings.sherpa_provider, num_threads=settings.sherpa_num_threads,
                               num_work_threads=settings.sherpa_num_work_threads,
                               max_batch_size=1 if not spec.engine_batches else settings.sherpa_max_batch_size,
                               max_utterance_seconds=spec.max_piece_seconds + 5, ready_timeout=120,
                               max_restarts=0, restart_window=1, pool=ConnectionPool("ws://127.0.0.1:0", 1, 60))
        raw_port = free_port()
        stack.start("raw-engine", sup.command(raw_port), dict(os.environ))
        raw_url = f"ws://127.0.0.1:{raw_port}"
        clip = decoded(files["mp3_10s"])  # the very samples the bridge hands its engine
        deadline = time.monotonic() + 60
        while True:
            try:
                asyncio.run(raw_one(raw_url, clip))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        client = httpx.Client(timeout=600)
        for url in urls.values():
            post(client, url, files["mp3_10s"])
        med = interleaved(rounds, {
            "raw_engine": lambda: asyncio.run(raw_one(raw_url, clip)),
            **{f"bridge_{k}": (lambda u=u: post(client, u, files["mp3_10s"])) for k, u in urls.items()},  # type: ignore[misc]
        })
        out: dict[str, object] = {
            "model": spec.id,
            "mp3_10s_c1_median_ms": {k: round(v * 1000, 1) for k, v in med.items()},
            "mp3_10s_c1_added_over_raw_ms": {k: round((med[f"bridge_{k}"] - med["raw_engine"]) * 1000, 1)
                                             for k in urls},
        }
        for name in ("pyav", "compared") if compare is not None else ("pyav",):
            streamed = [first_delta(urls[name], files["mp3_44s_48k"]) for _ in range(3)]
            first, total = sorted(streamed)[1]
            out[f"mp3_44s_48k_streamed_{name}"] = {"first_delta_s": round(first, 3), "total_s": round(total, 3),
                                                   "first_over_total": round(first / total, 3)}
        client.close()
        return out
    finally:
        stack.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description="the bridge's own cost and the time to first text")
    ap.add_argument("--engine", choices=["instant", "real", "both"], default="both")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--compare", type=Path, help="another checkout of the project (e.g. a git worktree of an "
                    "older commit): its bridge is measured beside this one's, as 'compared'")
    ap.add_argument("--compare-env", action="append", default=[], metavar="NAME=VALUE",
                    help="a setting for the compared bridge only (its best settings may differ), e.g. VAD_THREADS=2")
    args = ap.parse_args()
    compare_env = dict(item.split("=", 1) for item in args.compare_env)
    work = Path(tempfile.mkdtemp(prefix="bench-first-text-"))
    os.environ.setdefault("MODELS_DIR", str(ROOT / "models"))
    files = prepare(work)
    result: dict[str, object] = {"machine_cores": os.cpu_count(), "rounds": args.rounds}
    if args.engine in ("instant", "both"):
        result["instant_engine"] = bench_instant(files, work, args.rounds, args.compare, compare_env)
    if args.engine in ("real", "both"):
        result["real_engine"] = bench_real(files, work, args.rounds, args.compare, compare_env)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
