"""Benchmark: what a VAD scan costs, for each candidate, side by side on the same real speech.

    .venv/bin/python -m bench.bench_vad [--seconds 300]

The audio is LibriSpeech joined as in ``bench/bench_real_speech.py`` (utterances with 0.3-1.0 s
pauses). CPU seconds of one thread, and audio seconds scanned per CPU second, for:

- the bridge's scan before: Silero through sherpa-onnx's ``VoiceActivityDetector`` (16 kHz, 32 ms
  windows, one window per call);
- the bridge's scan now (``bridge.vad.SpeechDetector``, onnxruntime with sherpa-onnx's segment
  logic ported, ``bridge.silero``): one pass, and 16 regions of the file in one model run, with
  Silero at 16 kHz (sherpa-onnx's segments to the sample) and at 8 kHz (``VAD_SAMPLE_RATE``, the
  default);
- Silero through onnxruntime directly, at 16 and 8 kHz (sherpa-onnx 1.13 runs Silero at 16 kHz
  only: any other ``sample_rate`` exits the process), one stream, then regions of the file as one
  batch (16 regions side by side in one model run per window);
- TEN-VAD (its own library, 16 ms hops), if the ``ten-vad`` wheel is importable;
- an energy gate: the share of the audio in quiet runs a gate could skip, an upper bound of its gain.

ten-vad is not a dependency of the bridge: install it to get its row (``pip install ten-vad``;
it needs libc++1). A row whose package is missing says so.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from bench.bench_real_speech import join, utterances
from bridge.silero import halve
from bridge.vad import find_vad_model

RATE = 16000


def sherpa_scan(x: np.ndarray) -> float:
    import sherpa_onnx

    cfg = sherpa_onnx.VadModelConfig()
    cfg.silero_vad.model = str(find_vad_model(None))
    cfg.sample_rate = RATE
    cfg.num_threads = 1
    vad = sherpa_onnx.VoiceActivityDetector(cfg, buffer_size_in_seconds=60)
    window = cfg.silero_vad.window_size
    started = time.process_time()
    for o in range(0, len(x) - window + 1, window):
        vad.accept_waveform(x[o:o + window])
        while not vad.empty():
            vad.pop()
    return time.process_time() - started


def bridge_scan(x: np.ndarray, regions: int, rate: int = 16000, *, rounds: bool = True
                ) -> tuple[float, list[tuple[int, int]]]:
    """The bridge's own detector: CPU seconds and the segments, one pass or ``regions`` side by side,
    Silero at ``rate``; each round of windows in one run of the rebuilt graph (``bridge.silero_graph``),
    or with ``rounds=False`` the exported model, one run per window."""
    import threading

    from bridge.decoding.stream import AudioStream
    from bridge.vad import SpeechDetector

    model = find_vad_model(None)
    assert model is not None, "no Silero VAD model (pip install --no-deps silero-vad)"
    detector = SpeechDetector(model, rate=rate)
    if not rounds:
        detector.silero.rounds = None
    started = time.process_time()
    found = list(detector.iter_segments_parallel(AudioStream.from_samples(x), workers=regions,
                                                 stop=threading.Event()))
    return time.process_time() - started, found


def onnx_scan(x: np.ndarray, rate: int, batch: int) -> tuple[float, np.ndarray]:
    """Silero v5 through onnxruntime: CPU seconds, and the speech probability of each window."""
    from bridge.silero import SileroModel

    model = find_vad_model(None)
    assert model is not None, "no Silero VAD model (pip install --no-deps silero-vad)"
    session = SileroModel(model).session  # the bridge's session, one thread
    window, context_size = (512, 64) if rate == 16000 else (256, 32)
    length = (len(x) // batch) // window * window
    regions = x[:length * batch].reshape(batch, length)
    state = np.zeros((2, batch, 128), np.float32)
    context = np.zeros((batch, context_size), np.float32)
    sr = np.array(rate, np.int64)
    probs = []
    started = time.process_time()
    for o in range(0, length, window):
        frame = np.concatenate([context, regions[:, o:o + window]], axis=1)
        out, state = session.run(None, {"input": frame, "state": state, "sr": sr})
        context = frame[:, -context_size:]
        probs.append(out[:, 0])
    return time.process_time() - started, np.array(probs).T.reshape(-1)


def ten_vad_scan(x: np.ndarray) -> float:
    from ten_vad import TenVad

    vad = TenVad(256, 0.5)
    pcm = (np.clip(x, -1, 1) * 32767).astype(np.int16)
    started = time.process_time()
    for o in range(0, len(pcm) - 256 + 1, 256):
        vad.process(pcm[o:o + 256])
    return time.process_time() - started


def gate_share(x: np.ndarray, floor_db: float = -50.0, min_run: float = 0.5) -> float:
    """The share of 32 ms windows in runs of at least ``min_run`` s below ``floor_db`` dBFS (less the
    half run a gate would keep feeding for context)."""
    n = len(x) // 512
    level = 10 * np.log10(np.mean(x[:n * 512].reshape(n, 512).astype(np.float64) ** 2, axis=1) + 1e-12)
    k = int(min_run * RATE / 512)
    skip, run = 0, 0
    for quiet in [*(level < floor_db), False]:
        if quiet:
            run += 1
            continue
        if run >= k:
            skip += run - k // 2
        run = 0
    return skip / n


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_vad", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300)
    args = ap.parse_args()
    x, _, _ = join(utterances(), args.seconds)
    audio = len(x) / RATE
    x8 = halve(x)  # 2:1 as the bridge does it
    base = sherpa_scan(x)
    rows = [("Silero, sherpa-onnx VoiceActivityDetector (the bridge before)", base, "")]
    for rate in (16000, 8000):
        one, one_found = bridge_scan(x, 1, rate)
        many, many_found = bridge_scan(x, 16, rate)
        kind = "16 kHz, sherpa-onnx's segments" if rate == 16000 else "8 kHz (the default)"
        exported, exported_found = bridge_scan(x, 16, rate, rounds=False)
        rows += [(f"the bridge (bridge.vad), {kind}: one pass", one, f"{len(one_found)} segments"),
                 (f"the bridge (bridge.vad), {kind}: 16 regions, the exported model run per window", exported,
                  f"{len(exported_found)} segments"),
                 (f"the bridge (bridge.vad), {kind}: 16 regions, a round of windows per run", many,
                  f"{len(many_found)} segments, {'the same' if many_found == exported_found else 'not the same'}")]
    t16, p16 = onnx_scan(x, 16000, 1)
    t8, p8 = onnx_scan(x8, 8000, 1)
    n = min(len(p16), len(p8))
    agree = float(np.mean((p16[:n] > 0.5) == (p8[:n] > 0.5)))
    rows += [("Silero, onnxruntime, 16 kHz, one stream", t16, ""),
             ("Silero, onnxruntime, 8 kHz, one stream", t8, f"same speech/no-speech call as 16 kHz on "
                                                          f"{agree:.1%} of 32 ms windows"),
             ("Silero, onnxruntime, 16 kHz, 16 regions in one batch", onnx_scan(x, 16000, 16)[0], ""),
             ("Silero, onnxruntime, 8 kHz, 16 regions in one batch", onnx_scan(x8, 8000, 16)[0], "")]
    try:
        rows.append(("TEN-VAD 1.0.6.9, its own library, 16 ms hops", ten_vad_scan(x), "licence: see bench/README.md"))
    except (ImportError, OSError) as exc:
        rows.append(("TEN-VAD", float("nan"), f"not available here ({exc.__class__.__name__})"))
    share = gate_share(x)
    print(f"{audio:.0f} s of joined LibriSpeech, one thread each, one run\n")
    print("| scan | CPU s | audio s per CPU s | vs today | note |")
    print("| --- | --- | --- | --- | --- |")
    for name, cpu, note in rows:
        if cpu != cpu:  # nan: not measured
            print(f"| {name} | - | - | - | {note} |")
        else:
            print(f"| {name} | {cpu:.2f} | {audio / cpu:.0f} | {base / cpu:.2f}x | {note} |")
    print(f"| energy gate in front of Silero (below -50 dBFS for 0.5 s or more) | | | at most "
          f"{1 / (1 - share):.2f}x | {share:.1%} of the audio is in such quiet runs |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
