"""Benchmark: raw engine vs bridge vs proxy, measured side by side in one run on the same audio.

    .venv/bin/python bench/bench_stack.py [--audio FILE] [--rounds 10] [--requests 16]

Starts its own sherpa-onnx server (same flags as the bridge gives its child), bridge and proxy on
loopback, with the Moonshine model from PyPI (or DEFAULT_MODEL/MODELS_DIR from the environment).
Reports ratios, since absolute numbers on a shared machine are noisy. Raw and bridge rounds are
interleaved so that drift in machine load hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapters.managed_websocket import SERVER_BINARY, EngineSupervisor, find_binary, free_port  # noqa: E402
from adapters.sherpa_protocol import parse_reply, utterance_frames  # noqa: E402
from adapters.websocket import ConnectionPool  # noqa: E402
from bridge.models.catalog import Catalog, ModelSpec  # noqa: E402
from bridge.models.model_store import ModelStore  # noqa: E402
from tests.model_standins import STANDINS, diarization_standins, install_standin  # noqa: E402


def read_audio(path: Path) -> np.ndarray:
    out = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-ac", "1", "-ar", "16000",
                          "-f", "f32le", "pipe:1"], capture_output=True, check=True).stdout
    return np.frombuffer(out, dtype="<f4")


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise TimeoutError(url)


def cpu_model() -> str:
    """The CPU as /proc/cpuinfo names it, with the flags that change onnxruntime's kernels."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extras = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8") if f in flags]
    return f"{name} ({', '.join(extras) or 'no AVX2'})"


class Services:
    """Processes the bench started; all stopped at the end."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.Popen[bytes]:
        """Start ``args`` with its output in ``name``.log in the work folder."""
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=(self.work / f"{name}.log").open("wb"),
                                stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def in_process_recognizer(spec: ModelSpec, model_dir: Path, num_threads: int, provider: str = "cpu") -> Any:
    """sherpa-onnx's Python ``OfflineRecognizer`` for a catalog model, from the flags the bridge gives
    its engine: the raw engine without a server or protocol."""
    import sherpa_onnx

    flags = dict(flag.split("=", 1) for flag in spec.engine_model(model_dir).flags)
    common = {"tokens": flags["--tokens"], "num_threads": max(1, num_threads), "provider": provider}
    if "--moonshine-merged-decoder" in flags:
        return sherpa_onnx.OfflineRecognizer.from_moonshine_v2(
            encoder=flags["--moonshine-encoder"], decoder=flags["--moonshine-merged-decoder"], **common)
    if "--joiner" in flags:
        return sherpa_onnx.OfflineRecognizer.from_transducer(
            encoder=flags["--encoder"], decoder=flags["--decoder"], joiner=flags["--joiner"],
            model_type=flags.get("--model-type", ""), **common)
    raise SystemExit(f"no in-process recognizer for {spec.id} in the bench yet")


def recognize(recognizer: Any, samples: np.ndarray, rate: int = 16000) -> str:
    stream = recognizer.create_stream()
    stream.accept_waveform(rate, samples)
    recognizer.decode_stream(stream)
    return str(stream.result.text)


async def raw_one(url: str, samples: np.ndarray) -> float:
    async with websockets.connect(url, max_size=None, compression=None) as ws:
        t = time.perf_counter()
        for frame in utterance_frames(samples):
            await ws.send(frame)
        parse_reply(await ws.recv())
        return time.perf_counter() - t


async def raw_throughput(url: str, samples: np.ndarray, concurrency: int, total: int) -> float:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)

    async def worker() -> None:
        async with websockets.connect(url, max_size=None, compression=None) as ws:
            while not queue.empty():
                queue.get_nowait()
                for frame in utterance_frames(samples):
                    await ws.send(frame)
                parse_reply(await ws.recv())

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total * len(samples) / 16000 / (time.perf_counter() - t)


def http_one(client: httpx.Client, url: str, data: bytes, headers: dict[str, str]) -> float:
    t = time.perf_counter()
    r = client.post(url + "/v1/audio/transcriptions", files={"file": ("a.wav", data)}, headers=headers)
    r.raise_for_status()
    return time.perf_counter() - t


def http_throughput(url: str, data: bytes, seconds: float, concurrency: int, total: int,
                    headers: dict[str, str]) -> float:
    from concurrent.futures import ThreadPoolExecutor

    clients = [httpx.Client(timeout=600) for _ in range(concurrency)]
    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda i: http_one(clients[i % concurrency], url, data, headers), range(total)))
    elapsed = time.perf_counter() - t
    for c in clients:
        c.close()
    return total * seconds / elapsed


def three_paths(urls: dict[str, str], samples: np.ndarray, data: bytes, seconds: float, auth: dict[str, str],
                args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float]]:
    """The raw engine, the bridge and the proxy, each warmed up: (median latency at concurrency 1,
    rounds interleaved; mean throughput in audio seconds per second at ``args.concurrency``)."""
    raw_url, bridge_url, proxy_url = urls["raw"], urls["bridge"], urls["proxy"]
    asyncio.run(raw_one(raw_url, samples))
    client = httpx.Client(timeout=600)
    http_one(client, bridge_url, data, {})
    http_one(client, proxy_url, data, auth)
    lat: dict[str, list[float]] = {"raw": [], "bridge": [], "proxy": []}
    for _ in range(args.rounds):  # interleaved
        lat["raw"].append(asyncio.run(raw_one(raw_url, samples)))
        lat["bridge"].append(http_one(client, bridge_url, data, {}))
        lat["proxy"].append(http_one(client, proxy_url, data, auth))
    thr: dict[str, list[float]] = {"raw": [], "bridge": [], "proxy": []}
    for _ in range(2):
        thr["raw"].append(asyncio.run(raw_throughput(raw_url, samples, args.concurrency, args.requests)))
        thr["bridge"].append(http_throughput(bridge_url, data, seconds, args.concurrency, args.requests, {}))
        thr["proxy"].append(http_throughput(proxy_url, data, seconds, args.concurrency, args.requests, auth))
    return ({k: statistics.median(v) for k, v in lat.items()}, {k: statistics.mean(v) for k, v in thr.items()})


def parse_args() -> argparse.Namespace:
    import moonshine_cpp

    ap = argparse.ArgumentParser()
    ap.add_argument("--audio", type=Path, default=Path(moonshine_cpp.__file__).parent / "test-data" / "beckett.wav")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    return ap.parse_args()


def main() -> int:
    args = parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-"))
    models_dir = Path(os.environ.get("MODELS_DIR", work / "models"))
    model_id = os.environ.get("DEFAULT_MODEL", "moonshine-base-en")
    spec = Catalog.load().get(model_id)
    store = ModelStore(models_dir)
    store.ensure(spec)
    samples = read_audio(args.audio)
    seconds = len(samples) / 16000
    wav = work / "clip.wav"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(args.audio), "-ac", "1", "-ar", "16000",
                    str(wav)], check=True)
    data = wav.read_bytes()

    env = {**os.environ, "MODELS_DIR": str(models_dir), "DEFAULT_MODEL": model_id, "SHERPA_PROVIDER":
           os.environ.get("SHERPA_PROVIDER", "cpu"), "SHERPA_NUM_THREADS": str(args.threads),
           "ENGINE_CONNECTIONS": str(args.concurrency), "SHERPA_MAX_BATCH_SIZE": str(args.concurrency),
           "LOG_LEVEL": "warning", "BRIDGE_METRICS_PORT": "0", "AUTH_METRICS_PORT": "0"}
    # The raw engine, started with exactly the flags the bridge gives its child.
    sup = EngineSupervisor(spec.engine_model(store.path_for(spec.id)), binary=find_binary(SERVER_BINARY, None),
                           provider=env["SHERPA_PROVIDER"], num_threads=args.threads, num_work_threads=3,
                           max_batch_size=args.concurrency, max_utterance_seconds=spec.max_piece_seconds + 5,
                           ready_timeout=120, max_restarts=0, restart_window=1,
                           pool=ConnectionPool("ws://127.0.0.1:0", 1, 60))
    raw_port = free_port()
    raw = subprocess.Popen(sup.command(raw_port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    raw_url = f"ws://127.0.0.1:{raw_port}"

    bport, pport = free_port(), free_port()
    keys = work / "keys.json"
    key = subprocess.run([sys.executable, "-m", "auth_proxy", "keys", "add", "bench"], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={**env, "API_KEYS_FILE": str(keys)}).stdout.strip()
    bridge = subprocess.Popen([sys.executable, "-m", "bridge"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**env, "BRIDGE_HOST": "127.0.0.1",
                                                              "BRIDGE_PORT": str(bport)})
    bridge_url = f"http://127.0.0.1:{bport}"
    ready_s = wait_http(bridge_url + "/health", bridge)
    proxy = subprocess.Popen([sys.executable, "-m", "auth_proxy"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL,
                             env={**env, "AUTH_HOST": "127.0.0.1", "AUTH_PORT": str(pport), "BRIDGE_URL": bridge_url,
                                  "API_KEYS_FILE": str(keys), "USAGE_DB": str(work / "usage.db"),
                                  "USAGE_JSON": str(work / "usage.json")})
    proxy_url = f"http://127.0.0.1:{pport}"
    wait_http(proxy_url + "/health", proxy)
    auth = {"Authorization": f"Bearer {key}"}
    try:
        time.sleep(1)
        idle_bridge_mb = psutil.Process(bridge.pid).memory_info().rss / 2**20
        idle_proxy_mb = psutil.Process(proxy.pid).memory_info().rss / 2**20
        urls = {"raw": raw_url, "bridge": bridge_url, "proxy": proxy_url}
        med, tput = three_paths(urls, samples, data, seconds, auth, args)
    finally:
        for p in (proxy, bridge, raw):
            p.terminate()
            p.wait(30)

    result = {
        "model": model_id, "audio_seconds": round(seconds, 3), "threads": args.threads,
        "concurrency": args.concurrency, "machine_cores": os.cpu_count(),
        "median_latency_s": {k: round(v, 4) for k, v in med.items()},
        "bridge_added_ms_c1": round((med["bridge"] - med["raw"]) * 1000, 1),
        "proxy_added_ms_c1": round((med["proxy"] - med["bridge"]) * 1000, 1),
        "throughput_audio_s_per_s": {k: round(v, 3) for k, v in tput.items()},
        "bridge_over_raw_throughput": round(tput["bridge"] / tput["raw"], 3),
        "proxy_over_bridge_throughput": round(tput["proxy"] / tput["bridge"], 3),
        "idle_bridge_rss_mb_without_engine": round(idle_bridge_mb, 1),
        "idle_proxy_rss_mb": round(idle_proxy_mb, 1),
        "bridge_start_to_ready_s": round(ready_s, 2),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())


class Watch:
    """CPU seconds and peak RSS of some processes and their children while a block runs."""

    def __init__(self, procs: list[psutil.Process], interval: float = 0.05) -> None:
        self.procs = procs
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _tree(self) -> list[psutil.Process]:
        out = []
        for p in self.procs:
            try:
                out += [p, *p.children(recursive=True)]
            except psutil.Error:
                pass
        return out

    def _cpu(self) -> dict[int, float]:
        times = {}
        for p in self._tree():
            try:
                t = p.cpu_times()
                times[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        return times

    def rss(self) -> int:
        """The RSS of the processes and their children now, bytes."""
        rss = 0
        for p in self._tree():
            try:
                rss += p.memory_info().rss
            except psutil.Error:
                pass
        return rss

    def _sample(self) -> None:
        while True:  # a sample at once: a block shorter than one period has a peak too
            self.peak = max(self.peak, self.rss())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Watch:
        self._before = self._cpu()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        after = self._cpu()
        self._stop.set()
        self._thread.join()
        self.cpu_seconds = sum(t - self._before.get(pid, 0.0) for pid, t in after.items())


def standin_models(work: Path) -> dict[str, str]:
    """A model store with the two stand-ins of the diarization models installed (the tests' own,
    ``../shared/models/diarization/``), and the settings that point the bridge at it."""
    store = ModelStore(work / "models")
    segmentation, embedding = specs = diarization_standins()
    for spec in specs:
        install_standin(store, spec, STANDINS)
    catalog = work / "catalog.json"
    catalog.write_text(json.dumps([spec.model_dump() for spec in specs]))
    return {"MODELS_DIR": str(work / "models"), "CATALOG_FILE": str(catalog),
            "DIARIZATION_SEGMENTATION_MODEL": segmentation.id, "DIARIZATION_EMBEDDING_MODEL": embedding.id,
            "DIARIZATION_THRESHOLD": "0.45"}
