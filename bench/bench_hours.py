"""Benchmark: hours of audio in one request. Recordings of 10 minutes, 1 hour and 3 hours (48 kHz
stereo mp3 of real read speech, LibriSpeech with pauses, looped) go one at a time through a bridge in
front of the stand-in engine that answers at once (``bench/instant_engine.py``), so only the bridge's
own cost shows: the time per request and the peak RSS of the bridge and its children (decoder
workers) over the bridge's idle RSS, in several response formats, side by side in one run. Each
request gets a freshly started bridge, so that one request's freed memory is not the next one's.

    .venv/bin/python -m bench.bench_hours [--minutes 10 60 180] [--formats json verbose_json srt]
    .venv/bin/python -m bench.bench_hours --minutes 10 --compare /tmp/before [--rounds 8]

``--compare DIR`` times this checkout's bridge against another's (a worktree of another commit),
side by side in front of the same engine, requests interleaved, and prints the medians.

``python -m bench`` runs it too (its "Hours of audio" lines). The mp3 files are made once with
ffmpeg (libmp3lame) and kept in ``bench/.cache/``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from adapters.managed_websocket import free_port
from bench.bench_stack import Services, Watch, cpu_model, standin_models, wait_http
from tests.speech import librispeech_loop

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"
RATE = 16000


def recording(minutes: float) -> Path:
    """A ``minutes`` long 48 kHz stereo mp3 (64 kbit/s) of the speech loop, made once."""
    out = CACHE / f"speech-{minutes:g}min.mp3"
    if not out.exists():
        loop = librispeech_loop(CACHE / "speech-loop.wav", 300)
        subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-stream_loop", "-1", "-i", str(loop),
                        "-t", str(minutes * 60), "-ac", "2", "-ar", "48000", "-c:a", "libmp3lame", "-b:a", "64k",
                        str(out) + ".part.mp3"], check=True)
        os.replace(str(out) + ".part.mp3", out)
    return out


def post(url: str, path: Path, fmt: str) -> httpx.Response:
    """``path`` in response format ``fmt``; ``diarized_json`` asks for speakers."""
    model = "gpt-4o-transcribe-diarize" if fmt == "diarized_json" else "whisper-1"
    with path.open("rb") as fh:
        r = httpx.post(url + "/v1/audio/transcriptions", files={"file": (path.name, fh, "audio/mpeg")},
                       data={"model": model, "response_format": fmt}, timeout=7200)
    r.raise_for_status()
    return r


def start_bridge(services: Services, env: dict[str, str], name: str, tree: Path = ROOT
                 ) -> tuple[str, subprocess.Popen[bytes]]:
    """A bridge of the checkout ``tree`` on a free port: its URL and process, once it answers."""
    port = free_port()
    proc = services.start(name, [sys.executable, "-m", "bridge"],
                          {**env, "BRIDGE_HOST": "127.0.0.1", "BRIDGE_PORT": str(port)}, cwd=tree)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc, timeout=120)
    return url, proc


def one_request(services: Services, env: dict[str, str], name: str, path: Path, fmt: str) -> tuple[float, float]:
    """A fresh bridge, warmed with a request in the same format (models loaded, buffers made), then
    one upload: (seconds, peak MB over the bridge's RSS before it)."""
    url, proc = start_bridge(services, env, name)
    try:
        # Warm-up: a minute, or with speakers one window (10 min) and then two (20 min): the diarization
        # models load at the first request for speakers, and their runtimes' memory grows once, to
        # the largest window met and (at the first recording of several windows) to a speaker's 30 s
        # matched across windows.
        for minutes in ((10, 20) if fmt == "diarized_json" else (1,)):
            post(url, recording(minutes), fmt)
        watch = Watch([psutil.Process(proc.pid)], interval=0.02)
        time.sleep(1.0)
        idle = watch.rss()
        with watch:
            started = time.perf_counter()
            post(url, path, fmt)
            elapsed = time.perf_counter() - started
        return elapsed, (watch.peak - idle) / 2**20
    finally:
        proc.terminate()
        proc.wait(60)


def start_engine(services: Services, work: Path, minutes: list[float], formats: list[str]) -> dict[str, str]:
    """The instant engine; the bridges' environment, pointed at it."""
    engine_port = free_port()
    env = {**os.environ, "LOG_LEVEL": "warning", "BRIDGE_METRICS_PORT": "0", "SPEED_CHECK": "false",
           "ENGINE_ADAPTER": "websocket", "ENGINE_URL": f"ws://127.0.0.1:{engine_port}",
           "SHERPA_MAX_UTTERANCE": str(int(max(minutes) * 60 + 60)), "MAX_UPLOAD_BYTES": str(2**30),
           "TMPDIR": str(work), **(standin_models(work) if "diarized_json" in formats else {})}
    engine = services.start("hours-engine", [sys.executable, "-m", "bench.instant_engine", "--port",
                                              str(engine_port), "--words-per-second", "2.5"], env)
    time.sleep(1.0)
    if engine.poll() is not None:
        raise RuntimeError("the instant engine did not start")
    return env


def run(services: Services, work: Path, minutes: list[float], formats: list[str]) -> list[str]:
    """The "Hours of audio" lines: one row per recording length, a time and a peak per format."""
    env = start_engine(services, work, minutes, formats)
    files = {m: recording(m) for m in minutes}
    header = " | ".join(f"{f}: s, audio s/s, peak MB" for f in formats)
    lines = ["Hours of audio (one request at a time, bridge with the instant engine, 48 kHz stereo mp3 at "
             "64 kbit/s of LibriSpeech speech, peak RSS of the bridge and its decoder workers over idle):", "",
             f"| recording | {header} |", "|---" * (1 + len(formats)) + "|"]
    for m in minutes:
        cells = []
        for fmt in formats:
            seconds, peak = one_request(services, env, f"hours-{m:g}-{fmt}", files[m], fmt)
            cells.append(f"{seconds:.1f} s, {m * 60 / seconds:.0f}, +{peak:.0f} MB")
            print(f"  {m:g} min {fmt}: {cells[-1]}", file=sys.stderr)
        lines.append(f"| {m:g} min | " + " | ".join(cells) + " |")
    return lines


def compare(services: Services, work: Path, other: Path, minutes: list[float], formats: list[str],
            rounds: int) -> list[str]:
    """Time only, side by side: this checkout's bridge and ``other``'s (a worktree of another
    commit) in front of the same engine, both warmed, the requests interleaved (each round in the
    other order than the last); medians and their ratio."""
    env = start_engine(services, work, minutes, formats)
    urls, procs = {}, {}
    for name, tree in (("this", ROOT), ("other", other)):
        urls[name], proc = start_bridge(services, env, f"compare-{name}", tree)
        procs[name] = psutil.Process(proc.pid)
        post(urls[name], recording(1), formats[0])
    times: dict[tuple[str, float, str], list[float]] = {}
    cpu: dict[tuple[str, float, str], list[float]] = {}
    for k in range(rounds):
        for m in minutes:
            for fmt in formats:
                for name in (("this", "other") if k % 2 == 0 else ("other", "this")):
                    used, started = cpu_seconds(procs[name]), time.perf_counter()
                    post(urls[name], recording(m), fmt)
                    times.setdefault((name, m, fmt), []).append(time.perf_counter() - started)
                    cpu.setdefault((name, m, fmt), []).append(cpu_seconds(procs[name]) - used)
    lines = [f"Side by side with {other} ({rounds} interleaved rounds, medians; CPU: the bridge and its decoder "
             "workers):", "", "| recording | format | audio s/s, this | other | ratio | CPU s, this | other | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for m in minutes:
        for fmt in formats:
            this, theirs = (statistics.median(times[(n, m, fmt)]) for n in ("this", "other"))
            cpu_this, cpu_theirs = (statistics.median(cpu[(n, m, fmt)]) for n in ("this", "other"))
            lines.append(f"| {m:g} min | {fmt} | {m * 60 / this:.0f} | {m * 60 / theirs:.0f} | {theirs / this:.2f}x "
                         f"| {cpu_this:.2f} | {cpu_theirs:.2f} | {cpu_theirs / cpu_this:.2f}x |")
    return lines


def cpu_seconds(proc: psutil.Process) -> float:
    """CPU time of a process and its children (the decoder workers) so far."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, nargs="+", default=[10, 60, 180])
    ap.add_argument("--formats", nargs="+", default=["json", "verbose_json", "srt"],
                    help="response formats; diarized_json asks for speakers (the test stand-ins of the diarization "
                         "models, ../shared/models/diarization/)")
    ap.add_argument("--compare", type=Path, help="another checkout (a git worktree): time only, its bridge and this "
                                                  "one side by side, interleaved")
    ap.add_argument("--rounds", type=int, default=8, help="rounds of --compare")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-hours-"))
    services = Services(work)
    try:
        if args.compare:
            lines = compare(services, work, args.compare.resolve(), args.minutes, args.formats, args.rounds)
        else:
            lines = run(services, work, args.minutes, args.formats)
    finally:
        services.stop()
    print(f"CPU: {cpu_model()}, {psutil.cpu_count()} cores\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
