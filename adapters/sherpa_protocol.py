"""The sherpa-onnx offline WebSocket protocol (see shared ENGINE notes), in one place.

Per utterance: binary frames whose concatenation is ``int32 LE sample rate``, ``int32 LE byte
count`` and the float32 LE mono samples; the reply is one JSON text frame. One utterance in flight
per connection. The text frame ``Done`` ends the connection.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import numpy as np

from bridge.ports import SAMPLE_RATE, EngineResult

# Frames larger than ~32 MB close the connection with 1009; stay far below.
FRAME_BYTES = 1 << 20
DONE = "Done"


def utterance_frames(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Iterator[bytes | memoryview]:
    """The frames of one utterance; after the first, views of the samples (no copy of a long piece)."""
    payload = np.ascontiguousarray(samples, dtype="<f4").data.cast("B")
    header = struct.pack("<ii", sample_rate, len(payload))
    first = FRAME_BYTES - len(header)
    yield header + payload[:first].tobytes()
    for start in range(first, len(payload), FRAME_BYTES):
        yield payload[start:start + FRAME_BYTES]


def parse_reply(raw: str | bytes) -> EngineResult:
    """Parse the engine's JSON reply (it may carry raw control characters: strict=False)."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    data = json.loads(raw, strict=False)
    return EngineResult(
        text=str(data.get("text", "")).strip(),
        tokens=[str(t) for t in data.get("tokens") or []],
        timestamps=[float(t) for t in data.get("timestamps") or []],
        durations=[float(d) for d in data.get("durations") or []],
        logprobs=[float(p) for p in data.get("ys_log_probs") or []],
        language=str(data.get("lang") or ""),
    )
