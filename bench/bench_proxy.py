"""Benchmark: what the proxy itself adds to a request, in milliseconds, and where they go.

    .venv/bin/python -m bench.bench_proxy [--requests 40] [--profile out.prof] [--baseline DIR]

A bridge in front of the stand-in engine that answers at once (``bench.instant_engine``), and the
proxy in front of that bridge: a 10 s mp3 goes to the bridge directly and through the proxy in
pairs, one after the other at concurrency 1, and the median of the pairs' differences is the
proxy's cost (key check, limits, the usage rows, metrics, the access line, forwarding). With
``--profile`` the proxy runs under the standard library's profiler and its profile is written
there when the bench stops it (read it with ``python -m pstats``).

``--baseline DIR`` also starts the proxy of another checkout (``git worktree add DIR <commit>``)
in front of the same bridge, with the same keys, and measures both side by side: each round sends
the clip to the bridge and through each proxy, in an order that turns every round.
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
from bridge.models.catalog import BUILTIN_MODELS
from bridge.models.model_store import ModelStore

ROOT = Path(__file__).resolve().parent.parent


def start_proxy(services: Services, name: str, work: Path, env: dict[str, str], bridge: str, keys: Path,
                runner: list[str], cwd: Path = ROOT) -> str:
    """A proxy of the checkout at ``cwd`` in front of ``bridge``; its URL."""
    port = free_port()
    proxy = f"http://127.0.0.1:{port}"
    (work / name).mkdir(exist_ok=True)
    proc = services.start(name, [*runner, "-m", "auth_proxy"], {
        **env, "AUTH_HOST": "127.0.0.1", "AUTH_PORT": str(port), "BRIDGE_URL": bridge, "API_KEYS_FILE": str(keys),
        "USAGE_DB": str(work / name / "usage.db"), "USAGE_JSON": str(work / name / "usage.json")}, cwd=cwd)
    wait_http(proxy + "/health", proc)
    return proxy


def start(services: Services, work: Path, env: dict[str, str], profile: Path | None = None) -> tuple[str, str, str]:
    """(bridge URL, proxy URL, key): the instant engine, a bridge before it, the proxy before that."""
    engine_port, bridge_port = free_port(), free_port()
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
    return bridge, start_proxy(services, "proxy", work, env, bridge, keys, runner), key


def paired_cost(bridge: str, proxy: str, key: str, data: bytes, requests: int) -> dict[str, float]:
    """Medians (ms) of the bridge alone, through the proxy, and of the pairs' differences."""
    result = side_by_side(bridge, {"proxy": proxy}, key, data, requests)["proxy"]
    return {"bridge_ms": result["bridge_ms"], "proxy_ms": result["through_ms"], "proxy_cost_ms": result["cost_ms"]}


def side_by_side(bridge: str, proxies: dict[str, str], key: str, data: bytes, rounds: int
                 ) -> dict[str, dict[str, float]]:
    """For each proxy: medians (ms) of the bridge alone, through it, and of each round's difference.
    A round sends the clip to the bridge and through every proxy, starting one place further on
    each round, so that no side always goes first."""
    urls = [bridge, *proxies.values()]
    times: list[list[float]] = [[] for _ in urls]
    with httpx.Client(timeout=60) as client:
        def one(url: str) -> float:
            started = time.perf_counter()
            r = client.post(url + "/v1/audio/transcriptions", files={"file": ("clip.mp3", data, "audio/mpeg")},
                            headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
            return (time.perf_counter() - started) * 1000

        for _ in range(5):  # warm-up: connections, first imports, the decoder workers
            for url in urls:
                one(url)
        for i in range(rounds):
            order = [(i + k) % len(urls) for k in range(len(urls))]
            for k in order:
                times[k].append(one(urls[k]))
    return {name: {"bridge_ms": statistics.median(times[0]), "through_ms": statistics.median(times[k]),
                   "cost_ms": statistics.median(b - a for a, b in zip(times[0], times[k], strict=True))}
            for k, name in enumerate(proxies, start=1)}


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
    ap.add_argument("--baseline", type=Path, help="a checkout (git worktree) whose proxy is measured side by side")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    moonshine = next(m for m in BUILTIN_MODELS if m.id == "moonshine-base-en")
    ModelStore(work / "models").prepare(moonshine)  # the catalog's model, for the bridge to name
    env = {**os.environ, "LOG_LEVEL": "warning", "BRIDGE_METRICS_PORT": "0", "AUTH_METRICS_PORT": "0",
           "MODELS_DIR": str(work / "models"), "DEFAULT_MODEL": moonshine.id, "SPEED_CHECK": "false"}
    services = Services(work)
    try:
        bridge, proxy, key = start(services, work, env, args.profile)
        proxies = {"proxy": proxy}
        if args.baseline is not None:
            proxies["baseline"] = start_proxy(services, "baseline", work, env, bridge, work / "api-keys.json",
                                              [sys.executable], cwd=args.baseline.resolve())
        results = side_by_side(bridge, proxies, key, clip_mp3(work), args.requests)
    finally:
        services.stop()
    for name, result in results.items():
        print(f"10 s mp3, instant engine, {args.requests} rounds at concurrency 1: "
              f"bridge {result['bridge_ms']:.1f} ms, {name} + bridge {result['through_ms']:.1f} ms; "
              f"{name}'s own cost (median of the rounds) {result['cost_ms']:+.1f} ms")
    if args.baseline is not None:
        print(f"this proxy's cost / the baseline's: {results['proxy']['cost_ms'] / results['baseline']['cost_ms']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
