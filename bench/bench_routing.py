"""Benchmark: what routing over several bridges costs and gives, measured side by side in one run.

    .venv/bin/python -m bench.bench_routing [--rounds 20] [--delay 0.05]

Two bridges, each in front of a stand-in engine (``bench.instant_engine --delay``: seconds of
engine time per second of audio, a GPU's worth of speed that takes no CPU), and three proxies:
``BRIDGE_URL`` (one bridge, the body streamed through), ``BRIDGE_URLS`` with one bridge (the body
spooled and its model read, then routed) and ``BRIDGE_URLS`` with both. A 10 s mp3 is sent through
each at concurrency 1 (latency: the cost of routing) and 8 (throughput: what a second bridge
gives), rounds interleaved so that drift in machine load hits all alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapters.managed_websocket import free_port  # noqa: E402
from bench.bench_stack import Services, wait_http  # noqa: E402
from bridge.models.catalog import BUILTIN_MODELS  # noqa: E402
from bridge.models.model_store import ModelStore  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--delay", type=float, default=0.05, help="stand-in engine seconds per audio second")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    moonshine = next(m for m in BUILTIN_MODELS if m.id == "moonshine-base-en")
    ModelStore(work / "models").prepare(moonshine)
    import moonshine_cpp

    clip = work / "b.mp3"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i",
                    str(Path(moonshine_cpp.__file__).parent / "test-data" / "beckett.wav"), "-b:a", "64k", str(clip)],
                   check=True)
    data = clip.read_bytes()
    env = {**os.environ, "LOG_LEVEL": "warning", "BRIDGE_METRICS_PORT": "0", "AUTH_METRICS_PORT": "0",
           "MODELS_DIR": str(work / "models"), "DEFAULT_MODEL": moonshine.id, "SPEED_CHECK": "false"}
    services = Services(work)
    try:
        bridges = []
        for i in range(2):
            engine_port, port = free_port(), free_port()
            services.start(f"engine-{i}", [sys.executable, "-m", "bench.instant_engine", "--port", str(engine_port),
                                           "--delay", str(args.delay), "--words-per-second", "2.5"], env)
            time.sleep(0.5)
            proc = services.start(f"bridge-{i}", [sys.executable, "-m", "bridge"], {
                **env, "ENGINE_ADAPTER": "websocket", "ENGINE_URL": f"ws://127.0.0.1:{engine_port}",
                "BRIDGE_HOST": "127.0.0.1", "BRIDGE_PORT": str(port)})
            bridges.append(f"http://127.0.0.1:{port}")
            wait_http(bridges[-1] + "/health", proc)
        keys = work / "api-keys.json"
        key = subprocess.run([sys.executable, "-m", "auth_proxy", "keys", "add", "bench"], cwd=ROOT, check=True,
                             capture_output=True, text=True, env={**env, "API_KEYS_FILE": str(keys)}).stdout.strip()
        proxies: dict[str, str] = {}
        for name, extra in {"BRIDGE_URL, one bridge": {},
                            "BRIDGE_URLS, one bridge": {"BRIDGE_URLS": bridges[0]},
                            "BRIDGE_URLS, two bridges": {"BRIDGE_URLS": ",".join(bridges)}}.items():
            port = free_port()
            folder = work / f"proxy-{len(proxies)}"
            folder.mkdir()
            proc = services.start(f"proxy-{len(proxies)}", [sys.executable, "-m", "auth_proxy"], {
                **env, "AUTH_HOST": "127.0.0.1", "AUTH_PORT": str(port), "BRIDGE_URL": bridges[0],
                "API_KEYS_FILE": str(keys), "USAGE_DB": str(folder / "usage.db"), "USAGE_JSON": "", **extra})
            proxies[name] = f"http://127.0.0.1:{port}"
            wait_http(proxies[name] + "/health", proc)
        time.sleep(2.5)  # a poll of every bridge

        def one(url: str, client: httpx.Client) -> float:
            started = time.perf_counter()
            r = client.post(url + "/v1/audio/transcriptions", files={"file": ("b.mp3", data)},
                            data={"model": moonshine.id}, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
            return time.perf_counter() - started

        latency: dict[str, list[float]] = {name: [] for name in proxies}
        throughput: dict[str, list[float]] = {name: [] for name in proxies}
        clients = [httpx.Client(timeout=120) for _ in range(8)]
        with ThreadPoolExecutor(8) as pool:
            for url in proxies.values():  # warm up
                list(pool.map(one, [url] * 8, clients))
            for _ in range(args.rounds):
                for name, url in proxies.items():
                    latency[name].append(one(url, clients[0]))
                    started = time.perf_counter()
                    list(pool.map(one, [url] * 16, clients * 2))
                    throughput[name].append(16 * 10.0 / (time.perf_counter() - started))
        base = "BRIDGE_URL, one bridge"
        p50 = {name: statistics.median(v) * 1000 for name, v in latency.items()}
        tput = {name: statistics.median(v) for name, v in throughput.items()}
        print(f"\n10 s mp3, stand-in engine at {args.delay:g} s per audio second, {args.rounds} rounds interleaved\n")
        print("| proxy | p50 at concurrency 1 | vs BRIDGE_URL | audio s/s at concurrency 8 | vs BRIDGE_URL |")
        print("| --- | --- | --- | --- | --- |")
        for name in proxies:
            print(f"| {name} | {p50[name]:.1f} ms | {p50[name] / p50[base]:.2f} | {tput[name]:.0f} | "
                  f"{tput[name] / tput[base]:.2f} |")
    finally:
        services.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
