"""The CPU engine through the whole bridge: Moonshine as the bridge installs it now (the package's
files rewritten as ONNX, ``bridge/models/ort_convert.py``) against the package's ``.ort`` files as they were
served before, side by side in one run, with the bridge's default settings.

For each: LibriSpeech clips from ``../shared/data`` uploaded one at a time (c=1) and four at a time
(c=4): audio seconds per second and WER; then a 10-minute recording (LibriSpeech utterances joined)
uploaded alone.

    .venv/bin/python -m bench.bench_cpu_engine [--clips 24]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from adapters.managed_websocket import free_port
from bench.bench_stack import Services, cpu_model, wait_http
from bridge.config import load_settings
from bridge.models.catalog import Catalog, ModelFile
from bridge.models.model_store import ModelStore
from tests.helpers import wer
from tests.speech import LIBRISPEECH, librispeech_samples, librispeech_text, write_wav16

RATE = 16000
ORT_ID = "moonshine-base-en-ort"


def ort_variant(catalog: Catalog, work: Path) -> Path:
    """A catalog file with Moonshine served from the package's .ort files, as before the rewrite."""
    spec = catalog.get("moonshine-base-en")
    ort = spec.model_copy(update={
        "id": ORT_ID, "description": "moonshine-base-en from the package's .ort files (bench only)",
        "files": [ModelFile(name="encoder_model.ort"), ModelFile(name="decoder_model_merged.ort"),
                  ModelFile(name="tokens.txt")],
        "file_flags": {**spec.file_flags, "--moonshine-encoder": "encoder_model.ort",
                       "--moonshine-merged-decoder": "decoder_model_merged.ort"}})
    path = work / "catalog.json"
    path.write_text("[" + ort.model_dump_json() + "]")
    return path


def upload(client: httpx.Client, url: str, path: Path) -> str:
    r = client.post(url + "/v1/audio/transcriptions", data={"model": "gpt-transcribe"},
                    files={"file": (path.name, path.read_bytes())})
    r.raise_for_status()
    return str(r.json()["text"])


def measure(url: str, clips: list[tuple[Path, str, float]], long_file: tuple[Path, float]) -> list[str]:
    cells = []
    with httpx.Client(timeout=1800) as client:
        upload(client, url, clips[0][0])  # warm-up
        for concurrency in (1, 4):
            started = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                texts = list(pool.map(lambda c: upload(client, url, c[0]), clips))
            seconds = time.perf_counter() - started
            audio = sum(c[2] for c in clips)
            cells.append(f"{audio / seconds:.1f} audio s/s, WER {wer([c[1] for c in clips], texts) * 100:.2f} %")
        started = time.perf_counter()
        upload(client, url, long_file[0])
        cells.append(f"{long_file[1] / (time.perf_counter() - started):.1f} audio s/s")
    return cells


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_cpu_engine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=24)
    args = ap.parse_args()
    settings = load_settings()
    work = Path(tempfile.mkdtemp(prefix="bench-cpu-engine-"))
    catalog_file = ort_variant(Catalog.load(settings.catalog_file), work)
    catalog = Catalog.load(catalog_file)
    store = ModelStore(settings.models_dir)
    for model in ("moonshine-base-en", ORT_ID):
        store.ensure(catalog.get(model))
    uids = sorted(p.stem for p in LIBRISPEECH.glob("*.flac"))
    chosen = uids[:: max(1, len(uids) // args.clips)][: args.clips]
    clips = []
    for uid in chosen:
        samples = librispeech_samples(uid)
        clips.append((write_wav16(work / f"{uid}.wav", samples), librispeech_text(uid), len(samples) / RATE))
    joined, total = [], 0
    for uid in uids:
        samples = librispeech_samples(uid)
        joined += [samples, np.zeros(RATE // 2, dtype=np.float32)]
        total += len(samples) + RATE // 2
        if total >= 600 * RATE:
            break
    long_samples = np.concatenate(joined)[: 600 * RATE]
    long_file = (write_wav16(work / "ten-minutes.wav", long_samples), len(long_samples) / RATE)
    audio = sum(c[2] for c in clips)
    print(f"{len(clips)} LibriSpeech clips ({audio:.0f} s) and a 10-minute recording, bridge defaults, "
          f"CPU: {cpu_model()}, {os.cpu_count()} cores\n")
    print("| Moonshine files | clips, c=1 | clips, c=4 | 10 minutes, alone |")
    print("| --- | --- | --- | --- |")
    env = {**os.environ, "LOG_LEVEL": "warning", "BRIDGE_METRICS_PORT": "0", "MODELS_DIR": str(settings.models_dir),
           "CATALOG_FILE": str(catalog_file)}
    for label, model in (("as installed now (ONNX, weights folded)", "moonshine-base-en"),
                         ("the package's .ort files", ORT_ID)):
        services = Services(work)
        port = free_port()
        try:
            proc = services.start(model, [sys.executable, "-m", "bridge"],
                                  {**env, "DEFAULT_MODEL": model, "BRIDGE_HOST": "127.0.0.1", "BRIDGE_PORT": str(port)})
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/health", proc, timeout=300)
            print(f"| {label} | " + " | ".join(measure(url, clips, long_file)) + " |", flush=True)
        finally:
            services.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
