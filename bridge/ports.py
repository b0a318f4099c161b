"""The port between the bridge and a speech engine: all that an adapter sees of the bridge.

The bridge knows only ``ModelEngine``; ``adapters/`` knows how sherpa-onnx is reached and imports
nothing of the bridge but this module (``tests/test_layout.py``). What an engine needs to know
about a model is an ``EngineModel``, which the bridge builds from its catalog. A new way of running
an engine is a new adapter module plus a branch in ``bridge.models.engine_factory``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class EngineModel:
    """What an engine needs to know about the model it runs."""

    id: str
    flags: tuple[str, ...]  # the engine's flags that load it, file paths resolved ("--tokens=/m/x/tokens.txt")
    max_piece_seconds: float  # longest audio the bridge sends in one go
    token_timestamps: bool  # the engine reports token times
    batches: bool  # the engine decodes waiting pieces in one batched run (else: batch size 1)
    languages: tuple[str, ...] = ("en",)
    token_logprobs: bool = False  # the engine reports each token's log-probability
    tokens_file: str = ""  # the model's token table (token -> id), for token ids in answers
    tokens_base64: bool = False  # its tokens are written in base64 (Moonshine, Whisper)
    # The model's decoding can be biased towards keywords (sherpa-onnx hotwords: transducers only).
    keywords: bool = False


@dataclass
class EngineResult:
    """What the engine says about one piece of audio (times relative to the piece's start)."""

    text: str
    tokens: list[str] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)  # token start times, seconds
    durations: list[float] = field(default_factory=list)  # token durations (TDT), seconds
    logprobs: list[float] = field(default_factory=list)  # each token's log-probability (transducers)
    language: str = ""
    flags: list[str] = field(default_factory=list)  # checks this text still fails (bridge.guard)


@dataclass
class EngineHealth:
    ready: bool
    provider: str  # provider really in use ("cpu" when a CUDA request fell back)
    pid: int | None = None
    restarts: int = 0
    detail: str = ""


class EngineUnavailable(RuntimeError):
    """The engine cannot take work now (starting, restarting, crashed, given up).

    The bridge answers 503 with Retry-After.
    """

    def __init__(self, message: str, retry_after: float = 2.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineRejected(RuntimeError):
    """The engine refused this piece of audio (a retry with the same audio cannot help)."""


class ModelEngine(ABC):
    """One loaded model behind one engine.

    Lifecycle: ``start()`` loads the model and returns once a real round trip succeeded;
    ``transcribe()`` may be called concurrently; ``close()`` frees everything (child processes
    included) and is safe to call twice.
    """

    def __init__(self, spec: EngineModel) -> None:
        self.spec = spec

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def transcribe(self, samples: np.ndarray, keywords: tuple[str, ...] = ()) -> EngineResult:
        """Transcribe mono float32 samples at 16 kHz; with ``keywords`` (only where ``spec.keywords``),
        decoding is biased towards those words and phrases."""

    @abstractmethod
    def health(self) -> EngineHealth: ...

    @abstractmethod
    async def close(self) -> None: ...
