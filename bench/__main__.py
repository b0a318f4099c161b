"""``python -m bench``: one command, one table, every figure measured in the same run on the same audio.

    .venv/bin/python -m bench [--quick] [--no-accuracy] [--out bench/results]
    .venv/bin/python -m bench --url https://stt.example.com --key sk-... [--model whisper-1]

Locally it starts, on loopback, everything it compares: sherpa-onnx's Python ``OfflineRecognizer``
in this process (the ceiling: no server, no protocol), the raw sherpa-onnx WebSocket server with the
flags the bridge gives its child, the bridge, the proxy in front of it, and a second bridge in front
of a stand-in engine that answers at once (``bench/instant_engine.py``: what the bridge itself costs),
with a proxy in front of it too (what the proxy itself costs).
Each path gets the same requests at concurrency 1, 4 and 8 (paths interleaved level by level), then
one long upload goes through the bridge for its real-time factor, and recordings of 10 minutes, 1 hour
and 3 hours go through bridges in front of the stand-in, for the time and memory of hours
(``bench/bench_hours.py``). Then (not with ``--quick``) the
accuracy on real read speech: ``bench/bench_real_speech.py``. The model and engine tuning are
the bridge's own settings (``DEFAULT_MODEL``, ``MODELS_DIR``, ``SHERPA_PROVIDER``, ...).

With ``--url`` and ``--key`` it measures a running deployment (a GPU host, through its proxy) with the
same audio instead. The markdown table is printed and written to ``--out`` (``bench/results/``).

The audio is made here, from the speed-check utterance that ships with the bridge
(``bridge/data/speed-check.wav``), repeated with pauses to the length wanted, and sent as 16 kHz WAV.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import psutil

from adapters.managed_websocket import SERVER_BINARY, EngineSupervisor, find_binary, free_port
from adapters.sherpa_protocol import parse_reply, utterance_frames
from adapters.websocket import ConnectionPool
from bench import bench_hours, bench_real_speech
from bench.bench_stack import Services, Watch, cpu_model, in_process_recognizer, recognize, wait_http
from bridge.config import BridgeSettings, load_settings
from bridge.models.catalog import Catalog, ModelSpec
from bridge.models.model_store import ModelStore
from bridge.models.speed_check import PROBE

ROOT = Path(__file__).resolve().parent.parent
RATE = 16000
LEVELS = (1, 4, 8)


@dataclass
class Sizes:
    clip_seconds: float
    requests: dict[int, int]  # by concurrency
    long_seconds: float


FULL = Sizes(10.0, {1: 10, 4: 16, 8: 32}, 600.0)
QUICK = Sizes(3.0, {1: 2, 4: 4, 8: 8}, 30.0)


# ---------------------------------------------------------------------------------------------- audio

def make_audio(seconds: float) -> np.ndarray:
    """The speed-check utterance, repeated with pauses of 0.4 to 1.2 s, cut to ``seconds``."""
    with wave.open(str(PROBE), "rb") as w:
        assert w.getframerate() == RATE and w.getnchannels() == 1 and w.getsampwidth() == 2
        speech = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768
    parts: list[np.ndarray] = []
    total, i = 0, 0
    while total < seconds * RATE:
        gap = np.zeros(int((0.4 + 0.4 * (i % 3)) * RATE), dtype=np.float32)
        parts += [speech, gap]
        total += len(speech) + len(gap)
        i += 1
    return np.concatenate(parts)[: int(seconds * RATE)]


def wav_bytes(samples: np.ndarray) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


# ------------------------------------------------------------------------------------------- targets

@dataclass
class Target:
    """One path to the engine: ``one()`` makes a request and returns when it is answered; ``watched``
    are the processes whose CPU time and memory the row reports (each with its children)."""
    name: str
    one: Callable[[], None]
    watched: list[psutil.Process]
    note: str = ""


def in_process_target(spec: ModelSpec, model_dir: Path, settings: BridgeSettings, samples: np.ndarray) -> Target:
    recognizer = in_process_recognizer(spec, model_dir, settings.sherpa_num_threads, settings.sherpa_provider)

    def one() -> None:
        recognize(recognizer, samples)

    return Target("in-process OfflineRecognizer", one, [psutil.Process()], "the bench process itself")


def raw_target(url: str, samples: np.ndarray, proc: subprocess.Popen[bytes]) -> Target:
    from websockets.sync.client import connect

    local = threading.local()

    def one() -> None:
        if getattr(local, "ws", None) is None:
            local.ws = connect(url, max_size=None, compression=None).__enter__()  # open for the run
        for frame in utterance_frames(samples):
            local.ws.send(frame)
        parse_reply(local.ws.recv())

    return Target("raw sherpa-onnx WebSocket", one, [psutil.Process(proc.pid)])


def http_target(name: str, url: str, data: bytes, watched: list[psutil.Process], headers: dict[str, str],
                model: str = "", note: str = "") -> Target:
    local = threading.local()
    fields = {"model": model} if model else {}

    def one() -> None:
        if getattr(local, "client", None) is None:
            local.client = httpx.Client(timeout=900, headers=headers)
        r = local.client.post(url + "/v1/audio/transcriptions", files={"file": ("clip.wav", data, "audio/wav")},
                              data=fields)
        if r.status_code != 200:
            raise RuntimeError(f"{name}: {r.status_code} {r.text[:300]}")

    return Target(name, one, watched, note)


# ------------------------------------------------------------------------------------------ measuring

@dataclass
class Row:
    path: str
    concurrency: int
    requests: int
    p50_ms: float
    p95_ms: float
    audio_per_s: float
    cpu_s: float
    peak_rss_mb: float
    latencies: list[float] = field(default_factory=list, repr=False)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def measure(target: Target, concurrency: int, requests: int, clip_seconds: float) -> Row:
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if next(counter, None) is None or errors:
                    return
            started = time.perf_counter()
            try:
                target.one()
            except BaseException as exc:  # noqa: BLE001 - reported after the run
                errors.append(exc)
                return
            with lock:
                latencies.append(time.perf_counter() - started)

    with Watch(target.watched) as watch:
        started = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return Row(target.name, concurrency, requests, percentile(latencies, 0.5) * 1000,
               percentile(latencies, 0.95) * 1000, requests * clip_seconds / wall, watch.cpu_seconds,
               watch.peak / 2**20, latencies)


# ------------------------------------------------------------------------------------------ the table

def table(rows: list[Row], header: list[str], ratios: list[str], long_lines: list[str]) -> str:
    out = [*header, "",
           "| path | concurrency | requests | p50 ms | p95 ms | audio s/s | CPU s | peak RSS MB |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r.path} | {r.concurrency} | {r.requests} | {r.p50_ms:.1f} | {r.p95_ms:.1f} | "
                   f"{r.audio_per_s:.2f} | {r.cpu_s:.2f} | {r.peak_rss_mb:.0f} |")
    out += ["", *ratios, *long_lines, ""]
    return "\n".join(out)


def ratio_lines(rows: list[Row], over: str, under: str, label: str) -> list[str]:
    by = {(r.path, r.concurrency): r for r in rows}
    lines = []
    for c in LEVELS:
        a, b = by.get((over, c)), by.get((under, c))
        if a and b:
            lines.append(f"- {label} at concurrency {c}: p50 latency {a.p50_ms / b.p50_ms:.3f}, "
                         f"throughput {a.audio_per_s / b.audio_per_s:.3f}")
    return lines


def cost_lines(rows: list[Row], over: str, under: str, label: str) -> list[str]:
    """What ``over`` adds to ``under`` in milliseconds of p50 latency (the stand-in engine's rows: the
    proxy's own cost; ``bench/bench_proxy.py`` measures it in pairs)."""
    by = {(r.path, r.concurrency): r for r in rows}
    return [f"- {label} at concurrency {c}: p50 {by[(over, c)].p50_ms - by[(under, c)].p50_ms:+.1f} ms"
            for c in LEVELS if (over, c) in by and (under, c) in by]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (the test suite runs this)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the table is written")
    ap.add_argument("--url", help="a running deployment's proxy, e.g. https://stt.example.com (no local services)")
    ap.add_argument("--key", default=os.environ.get("STT_API_KEY", ""), help="API key for --url (or STT_API_KEY)")
    ap.add_argument("--model", default="", help="model field sent with --url (default: none, the loaded model)")
    ap.add_argument("--no-accuracy", action="store_true",
                    help="skip the accuracy section on real speech (bench/bench_real_speech.py; about 35 minutes "
                         "with Moonshine on 2 cores; never run with --quick or --url)")
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    clip = make_audio(sizes.clip_seconds)
    clip_wav = wav_bytes(clip)
    long_wav = wav_bytes(make_audio(sizes.long_seconds))
    stamp = datetime.now(timezone.utc)
    cpu = cpu_model()
    header = [f"# python -m bench{' --quick' if args.quick else ''}: {stamp:%Y-%m-%d %H:%M} UTC",
              "",
              f"Audio: {sizes.clip_seconds:g} s clips (16 kHz WAV), {sizes.long_seconds:g} s for the long upload. "
              f"Client machine: {psutil.cpu_count()} cores ({cpu}), Python {platform.python_version()}."]
    rows: list[Row] = []
    ratios: list[str] = []
    long_lines: list[str] = []

    work = Path(tempfile.mkdtemp(prefix="bench-"))
    services = Services(work)
    try:
        if args.url:
            if not args.key:
                ap.error("--url needs --key (or STT_API_KEY)")
            url = args.url.rstrip("/")
            auth = {"Authorization": f"Bearer {args.key}"}
            health = httpx.get(url + "/health", timeout=10).json()
            bridge = health.get("bridge", {})
            header.append(f"Deployment: {url}, model {bridge.get('model')}, provider {bridge.get('provider')}.")
            targets = [http_target("deployment (proxy)", url, clip_wav, [], auth, args.model)]
            long_target = http_target("deployment (proxy)", url, long_wav, [], auth, args.model)
        else:
            targets, long_target = start_local(services, work, clip, clip_wav, long_wav, header)
        for target in targets:  # warm-up: first runs are slow (allocation, CUDA kernels)
            target.one()
        for c in LEVELS:
            for target in targets:  # each path meets this concurrency once before it is measured
                measure(target, c, c, sizes.clip_seconds)
            for target in targets:
                rows.append(measure(target, c, sizes.requests[c], sizes.clip_seconds))
                print(f"  {target.name} c={c}: p50 {rows[-1].p50_ms:.0f} ms", file=sys.stderr)
        ratios += ratio_lines(rows, "bridge", "raw sherpa-onnx WebSocket", "bridge / raw")
        ratios += ratio_lines(rows, "proxy + bridge", "bridge", "proxy / bridge")
        ratios += ratio_lines(rows, "raw sherpa-onnx WebSocket", "in-process OfflineRecognizer", "raw / in-process")
        ratios += cost_lines(rows, "proxy + bridge, instant engine", "bridge, instant engine", "the proxy's own cost")
        started = time.perf_counter()
        long_target.one()
        elapsed = time.perf_counter() - started
        long_lines.append(f"- {sizes.long_seconds:g} s upload through {long_target.name}: {elapsed:.2f} s, "
                          f"real-time factor {elapsed / sizes.long_seconds:.4f} "
                          f"({sizes.long_seconds / elapsed:.1f} audio s/s)")
        if not args.url:
            services.stop()  # the hours rows start their own bridges, one per request
            services = Services(work)
            hours = [0.5, 1.0] if args.quick else [10.0, 60.0, 180.0]
            long_lines += ["", *bench_hours.run(services, work, hours, ["json"] if args.quick else
                                                ["json", "verbose_json", "srt"])]
        if not (args.quick or args.url or args.no_accuracy):
            services.stop()  # the speed rows' services are done: the accuracy bridges get the cores
            services = Services(work)
            long_lines += ["", *bench_real_speech.run(services, work, [300, 600], 150, [20, 10, 5])]
    finally:
        services.stop()
    text = table(rows, header, ["Ratios (each from this run):", *ratios] if ratios else [], long_lines)
    text += ("\nCPU s and peak RSS are those of the path's own service during its rows, children included: "
             "the bench process for in-process, the engine for raw, the bridge with its engine and decoder "
             "workers, the proxy alone, the stand-in's bridge without the stand-in.\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{stamp:%Y%m%d-%H%M%S}{'-quick' if args.quick else ''}{'-remote' if args.url else ''}.md"
    (args.out / name).write_text(text)
    print(f"written to {args.out / name}", file=sys.stderr)
    return 0


def start_raw_engine(services: Services, settings: BridgeSettings, spec: ModelSpec, model_dir: Path,
                     env: dict[str, str]) -> tuple[int, subprocess.Popen[bytes]]:
    """The sherpa-onnx WebSocket server with exactly the flags the bridge gives its child."""
    sup = EngineSupervisor(spec.engine_model(model_dir), binary=find_binary(SERVER_BINARY, settings.engine_binary_dir),
                           provider=settings.sherpa_provider, num_threads=settings.sherpa_num_threads,
                           num_work_threads=settings.sherpa_num_work_threads,
                           max_batch_size=settings.sherpa_max_batch_size,
                           max_utterance_seconds=spec.max_piece_seconds + 5, ready_timeout=120, max_restarts=0,
                           restart_window=1, pool=ConnectionPool("ws://127.0.0.1:0", 1, 60))
    port = free_port()
    return port, services.start("raw-engine", sup.command(port), env)


def start_local(services: Services, work: Path, clip: np.ndarray, clip_wav: bytes, long_wav: bytes,
                header: list[str]) -> tuple[list[Target], Target]:
    settings = load_settings()
    spec = Catalog.load(settings.catalog_file).get(settings.default_model)
    store = ModelStore(settings.models_dir)
    store.ensure(spec)
    model_dir = store.path_for(spec.id)
    header.append(f"Model {spec.id}, provider {settings.sherpa_provider}, {settings.sherpa_num_threads} thread(s) "
                  f"per model run, {settings.engine_connections} engine connections (the bridge's settings).")
    env = {**os.environ, "LOG_LEVEL": "warning", "BRIDGE_METRICS_PORT": "0", "AUTH_METRICS_PORT": "0",
           "MODELS_DIR": str(settings.models_dir), "DEFAULT_MODEL": spec.id}

    raw_port, raw = start_raw_engine(services, settings, spec, model_dir, env)

    def bridge(name: str, extra: dict[str, str]) -> tuple[str, subprocess.Popen[bytes]]:
        port = free_port()
        proc = services.start(name, [sys.executable, "-m", "bridge"],
                              {**env, "BRIDGE_HOST": "127.0.0.1", "BRIDGE_PORT": str(port), **extra})
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", proc, timeout=300)
        return url, proc

    bridge_url, bridge_proc = bridge("bridge", {})
    keys = work / "api-keys.json"
    key = subprocess.run([sys.executable, "-m", "auth_proxy", "keys", "add", "bench"], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={**env, "API_KEYS_FILE": str(keys)}).stdout.strip()

    def proxy_before(name: str, bridge_url: str) -> tuple[str, subprocess.Popen[bytes]]:
        port = free_port()
        folder = work / name
        folder.mkdir()
        proc = services.start(name, [sys.executable, "-m", "auth_proxy"],
                              {**env, "AUTH_HOST": "127.0.0.1", "AUTH_PORT": str(port), "BRIDGE_URL": bridge_url,
                               "API_KEYS_FILE": str(keys), "USAGE_DB": str(folder / "usage.db"),
                               "USAGE_JSON": str(folder / "usage.json")})
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", proc)
        return url, proc

    proxy_url, proxy = proxy_before("proxy", bridge_url)
    instant_port = free_port()
    services.start("instant-engine", [sys.executable, "-m", "bench.instant_engine", "--port", str(instant_port),
                                       "--words-per-second", "2.5"], env)
    instant_url, instant_proc = bridge("instant-bridge", {
        "ENGINE_ADAPTER": "websocket", "ENGINE_URL": f"ws://127.0.0.1:{instant_port}", "SPEED_CHECK": "false"})
    instant_proxy_url, instant_proxy = proxy_before("instant-proxy", instant_url)
    bridge_ps = psutil.Process(bridge_proc.pid)
    targets = [
        in_process_target(spec, model_dir, settings, clip),
        raw_target(f"ws://127.0.0.1:{raw_port}", clip, raw),
        http_target("bridge", bridge_url, clip_wav, [bridge_ps], {}),
        http_target("proxy + bridge", proxy_url, clip_wav, [psutil.Process(proxy.pid)],
                    {"Authorization": f"Bearer {key}"}),
        http_target("bridge, instant engine", instant_url, clip_wav, [psutil.Process(instant_proc.pid)], {}),
        # The proxy's own cost: the same proxy in front of the stand-in's bridge.
        http_target("proxy + bridge, instant engine", instant_proxy_url, clip_wav,
                    [psutil.Process(instant_proxy.pid)], {"Authorization": f"Bearer {key}"}),
    ]
    return targets, http_target("bridge", bridge_url, long_wav, [bridge_ps], {})


if __name__ == "__main__":
    sys.exit(main())
