"""The speed check before ready: each engine, once loaded, transcribes a short fixed utterance that
ships with the project (``data/speed-check.wav``, 2.6 s of Festival speech). The first run warms the
engine up (on CUDA the first runs are slow), so that the first user request is not the slow one; the
second is timed. The real-time factor (seconds of work per second of audio) and the provider really
in use go to the log and to ``/health``.

On CUDA a real-time factor above ``SPEED_WARN_RTF`` is called out: the usual cause is an int8
export, whose encoder is quantized with uint8 weights while onnxruntime's CUDA ``MatMulInteger``
takes int8 x int8 only, so those nodes fall back to the CPU with copies at every boundary
(k2-fsa/sherpa-onnx#2282, microsoft/onnxruntime#7745).
"""

from __future__ import annotations

import logging
import time
import wave
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np

from bridge.ports import SAMPLE_RATE, ModelEngine

log = logging.getLogger("bridge.speed")

PROBE = Path(__file__).resolve().parents[1] / "data" / "speed-check.wav"
PROBE_TEXT = "The birch canoe slid on the smooth planks."
SLOW_ON_CUDA = (
    "slower than expected on CUDA. int8 exports quantize the encoder with uint8 weights, which "
    "onnxruntime's CUDA MatMulInteger does not take (int8 x int8 only): those nodes run on the CPU "
    "with a copy at every boundary. Use an fp32 export on a GPU (README: models for GPU hosts)"
)


@dataclass
class SpeedCheck:
    model: str
    provider: str
    audio_seconds: float
    seconds: float
    real_time_factor: float
    text: str
    warning: str | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@cache
def probe_samples() -> np.ndarray:
    with wave.open(str(PROBE)) as w:
        if w.getframerate() != SAMPLE_RATE or w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise RuntimeError(f"{PROBE} must be 16 kHz mono 16-bit")
        data = w.readframes(w.getnframes())
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


async def run_speed_check(engine: ModelEngine, warn_rtf: float) -> SpeedCheck:
    samples = probe_samples()
    await engine.transcribe(samples)  # warm-up
    started = time.perf_counter()
    result = await engine.transcribe(samples)
    elapsed = time.perf_counter() - started
    audio = len(samples) / SAMPLE_RATE
    provider = engine.health().provider
    check = SpeedCheck(model=engine.spec.id, provider=provider, audio_seconds=round(audio, 3),
                       seconds=round(elapsed, 4), real_time_factor=round(elapsed / audio, 4), text=result.text)
    if provider == "cuda" and check.real_time_factor > warn_rtf:
        check.warning = (f"real-time factor {check.real_time_factor:.3f} is above SPEED_WARN_RTF={warn_rtf}: "
                         f"{SLOW_ON_CUDA}")
        log.warning("speed check: model %s on %s: %s", check.model, provider, check.warning)
    else:
        log.info("speed check: model %s on %s: %.2f s of speech in %.3f s (real-time factor %.3f): %r",
                 check.model, provider, audio, elapsed, check.real_time_factor, result.text)
    return check
