"""Benchmark: what the proxy itself adds to a request, in milliseconds, and where they go.

    .venv/bin/python -m bench.bench_proxy [--requests 40] [--profile out.prof]

A bridge in front of the stand-in engine that answers at once (``bench.instant_engine``), and the
proxy in front of that bridge: a 10 s mp3 goes to the bridge directly and through the proxy in
pairs, one after the other at concurrency 1, and the median of the pairs' differences is the
proxy's cost (key check, limits, the usage rows, metrics, the access line, forwarding). With
``--profile`` the proxy runs under the standard library's profiler and its profile is written
there when the bench stops it (read it with ``python -m pstats``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from adapters.managed_websocket import free_port
from bench.bench_stack import Services, wait_http
from bridge.catalog import BUILTIN_MODELS
from bridge.model_store import ModelStore

ROOT = Path(__file__).resolve().parent.parent


def start(services: Services, work: Path, env: dict[str, str], profile: Path | None = None) -> tuple[str, str, str]:
    """(bridge URL, proxy URL, key): the instant engine, a bridge before it, the proxy before that."""
    engine_port, bridge_port, proxy_port = free_port(), free_port(), free_port()
    services.start("instant-engine", [sys.executable, "-m", "bench.instant_engine", "--port", str(engine_port),
                                       "--words-per-second", "2.5"], env)
    time.sleep(0.5)
    bridge = f"http://127.0.0.1:{bridge_port}"
    proc = services.start("bridge", [sys.executable, "-m", "bridge"], {
        **env, "ENGINE_ADAPTER": "websocket", "ENGINE_URL": f"ws://127.0.0.1:{engine_port}",
        "BRIDGE_HOST": "127.0.0.1", "BRIDGE_PORT": str(bridge_port)})
    wait_http(bridge + "/health", proc)
    keys = work / "api-keys.json"
    key = subprocess.run([sys.executable, "-m", "auth_proxy", "keys", "add", "bench"], cwd=ROOT, check=True,
                         capture_output=True, text=True, env={**env, "API_KEYS_FILE": str(keys)}).stdout.strip()
    runner = [sys.executable, "-m", "cProfile", "-o", str(profile)] if profile else [sys.executable]
    proxy = f"http://127.0.0.1:{proxy_port}"
    proc = services.start("proxy", [*runner, "-m", "auth_proxy"], {
        **env, "AUTH_HOST": "127.0.0.1", "AUTH_PORT": str(proxy_port), "BRIDGE_URL": bridge,
        "API_KEYS_FILE": str(keys), "USAGE_DB": str(work / "usage.db"), "USAGE_JSON": str(work / "usage.json")})
    wait_http(proxy + "/health", proc)
    return bridge, proxy, key


def paired_cost(bridge: str, proxy: str, key: str, data: bytes, requests: int) -> dict[str, float]:
    """Medians (ms) of the bridge alone, through the proxy, and of the pairs' differences."""
    direct, through, diffs = [], [], []
    with httpx.Client(timeout=60) as client:
        def one(url: str) -> float:
            started = time.perf_counter()
            r = client.post(url + "/v1/audio/transcriptions", files={"file": ("clip.mp3", data, "audio/mpeg")},
                            headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
            return (time.perf_counter() - started) * 1000

        for _ in range(5):  # warm-up: connections, first imports, the decoder workers
            one(bridge), one(proxy)
        for i in range(requests):
            # The order alternates so that neither side always goes first.
            a, b = (one(bridge), one(proxy)) if i % 2 == 0 else tuple(reversed((one(proxy), one(bridge))))
            direct.append(a)
            through.append(b)
            diffs.append(b - a)
    return {"bridge_ms": statistics.median(direct), "proxy_ms": statistics.median(through),
            "proxy_cost_ms": statistics.median(diffs)}


def clip_mp3(work: Path) -> bytes:
    """10 s of the speed-check utterance, repeated, as mp3."""
    from bench.__main__ import make_audio, wav_bytes

    wav = work / "clip.wav"
    wav.write_bytes(wav_bytes(make_audio(10.0)))
    out = work / "clip.mp3"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(wav), "-b:a", "64k", str(out)],
                   check=True)
    return out.read_bytes()


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_proxy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--profile", type=Path, help="write the proxy's cProfile here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    moonshine = next(m for m in BUILTIN_MODELS if m.id == "moonshine-base-en")
    ModelStore(work / "models").prepare(moonshine)  # the catalog's model, for the bridge to name
    env = {**os.environ, "LOG_LEVEL": "warning", "BRIDGE_METRICS_PORT": "0", "AUTH_METRICS_PORT": "0",
           "MODELS_DIR": str(work / "models"), "DEFAULT_MODEL": moonshine.id, "SPEED_CHECK": "false"}
    services = Services(work)
    try:
        bridge, proxy, key = start(services, work, env, args.profile)
        result = paired_cost(bridge, proxy, key, clip_mp3(work), args.requests)
    finally:
        services.stop()
    print(f"10 s mp3, instant engine, {args.requests} pairs at concurrency 1: bridge {result['bridge_ms']:.1f} ms, "
          f"proxy + bridge {result['proxy_ms']:.1f} ms; the proxy's own cost (median of the pairs) "
          f"{result['proxy_cost_ms']:+.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
