"""Where Moonshine's time goes: one decoder step, the package's ``.ort`` files against the same
files rewritten as ONNX (``bridge.models.ort_convert``), in onnxruntime alone, with its profiler's top
operators for one cached step. Small enough to hand upstream (moonshine-cpp, sherpa-onnx,
onnxruntime): it needs only the moonshine-cpp wheel, onnxruntime, onnx and numpy.

    .venv/bin/python -m bench.moonshine_steps [--threads 1] [--seconds 10]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_stack import cpu_model
from bridge.models.ort_convert import convert

STEPS = 20


def session(path: Path, threads: int, profile: Path | None = None) -> Any:
    """An onnxruntime session; with ``profile``, its profiler writes into that folder."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile / f"profile-{path.stem}")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def decode(encoder: Any, decoder: Any, audio: np.ndarray, steps: int) -> tuple[float, list[float]]:
    """Encoder time and each greedy decoder step's time, fed as sherpa-onnx feeds the merged decoder
    (all caches empty at first; after it, only the self-attention caches move on)."""
    started = time.perf_counter()
    hidden = encoder.run(None, {"input_values": audio[None, :]})[0]
    encoder_seconds = time.perf_counter() - started
    caches = [i.name for i in decoder.get_inputs() if i.name.startswith("past_key_values.")]
    feeds: dict[str, Any] = {"input_ids": np.array([[1]], dtype=np.int64), "encoder_hidden_states": hidden,
                             "use_cache_branch": np.array([False])}
    feeds.update({name: np.zeros((1, 8, 0, 52), np.float32) for name in caches})
    names = [o.name for o in decoder.get_outputs()]
    times = []
    for step in range(steps):
        started = time.perf_counter()
        out = dict(zip(names, decoder.run(None, feeds), strict=True))
        times.append(time.perf_counter() - started)
        feeds["input_ids"] = np.array([[int(out["logits"][0, -1].argmax())]], dtype=np.int64)
        feeds["use_cache_branch"] = np.array([True])
        for name in caches:
            if step == 0 or ".decoder." in name:
                feeds[name] = out[name.replace("past_key_values", "present")]
    return encoder_seconds, times


def top_operators(decoder: Any, count: int = 6) -> list[str]:
    """The operators of the last run in the profile, by time."""
    events = json.loads(Path(decoder.end_profiling()).read_text())
    last = [e for e in events if e.get("name") == "model_run"][-1]["ts"]
    total: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last:
            total[e["args"].get("op_name", "?")] += e["dur"]
    return [f"{op} {us / 1000:.1f} ms" for op, us in total.most_common(count)]


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.moonshine_steps", description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    import moonshine_cpp

    package = Path(moonshine_cpp.__file__).parent / "models" / "base-en"
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(int(args.seconds * 16000)) * 0.05).astype(np.float32)
    print(f"Moonshine base, {args.seconds:g} s of audio, {args.threads} thread(s), CPU: {cpu_model()}\n")
    print("| files | encoder | first step | later steps (median) | top operators of a cached step |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in (".ort", ".onnx"):
            encoder_path = package / "encoder_model.ort"
            decoder_path = package / "decoder_model_merged.ort"
            if kind == ".onnx":
                encoder_path, decoder_path = Path(tmp) / "encoder.onnx", Path(tmp) / "decoder.onnx"
                convert(package / "encoder_model.ort", encoder_path)
                convert(package / "decoder_model_merged.ort", decoder_path)
            decoder = session(decoder_path, args.threads, profile=Path(tmp))
            encoder_seconds, steps = decode(session(encoder_path, args.threads), decoder, audio, STEPS)
            print(f"| {kind} | {encoder_seconds * 1000:.0f} ms | {steps[0] * 1000:.0f} ms | "
                  f"{np.median(steps[1:]) * 1000:.1f} ms | {', '.join(top_operators(decoder))} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
