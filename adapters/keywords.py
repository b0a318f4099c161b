"""Keywords for any engine adapter: a request's ``keywords[]`` bias the decoding towards them.

sherpa-onnx takes hotwords per stream only in its library (``OfflineRecognizer.create_stream(
hotwords=...)``, transducers with ``modified_beam_search``); its offline WebSocket server has no
per-request options (one ``--hotwords-file`` for everyone). So ``KeywordsEngine`` wraps the
adapter's engine: audio without keywords goes to it as always, audio with keywords is decoded by an
in-process recognizer of the same model files (loaded on the first such request, with the
sherpa-onnx Python package: on the CPU, also on a GPU host). Keywords never edit the text after the
fact: they only raise the score of their tokens while the beam search runs.

Keywords are split into the model's BPE tokens by sherpa-onnx's own encoder, which needs a BPE
vocabulary: it is written from the model's ``tokens.txt`` (a piece's score is minus its id, the
order in which sentencepiece learnt it). Characters that the hotword syntax reads as commands
(``/`` separates phrases, a leading ``:`` is a score) are turned into spaces first.
"""

from __future__ import annotations

import asyncio
import logging
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from adapters.sherpa_protocol import parse_reply
from bridge.ports import SAMPLE_RATE, EngineHealth, EngineModel, EngineResult, ModelEngine

log = logging.getLogger("bridge.engine")

_NOT_WORD = re.compile(r"[^\w' -]+")


def hotwords(keywords: tuple[str, ...]) -> str:
    """The keywords in sherpa-onnx's per-stream syntax: phrases joined by ``/``, nothing in them that
    the syntax would read as a command."""
    phrases = (" ".join(_NOT_WORD.sub(" ", k).split()) for k in keywords)
    return "/".join(p for p in phrases if p)


def write_bpe_vocab(tokens_file: str, out: Path) -> None:
    """sherpa-onnx's BPE vocabulary (``piece<TAB>score`` lines) from a ``tokens.txt`` (``piece id``)."""
    lines = []
    for line in Path(tokens_file).read_text(encoding="utf-8").splitlines():
        piece, _, token_id = line.rpartition(" ")
        if piece:
            lines.append(f"{piece}\t{-int(token_id)}")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def flag_values(flags: tuple[str, ...]) -> dict[str, str]:
    return dict(flag.split("=", 1) for flag in flags if "=" in flag)


class KeywordDecoder:
    """The in-process sherpa-onnx recognizer that takes hotwords per request (one model copy)."""

    def __init__(self, spec: EngineModel, num_threads: int, score: float) -> None:
        flags = flag_values(spec.flags)
        self.recognizer = _load_recognizer(flags, spec.tokens_file, num_threads, score)

    def decode(self, samples: np.ndarray, keywords: tuple[str, ...]) -> EngineResult:
        stream = self.recognizer.create_stream(hotwords=hotwords(keywords))
        stream.accept_waveform(SAMPLE_RATE, samples)
        self.recognizer.decode_stream(stream)
        return parse_reply(str(stream.result))


def _load_recognizer(flags: dict[str, str], tokens_file: str, num_threads: int, score: float) -> Any:
    import sherpa_onnx  # the bridge extra's package; only this path needs it

    with tempfile.TemporaryDirectory(prefix="bpe-vocab-") as folder:
        vocab = Path(folder) / "bpe.vocab"
        write_bpe_vocab(tokens_file, vocab)  # read once, while the recognizer is built
        return sherpa_onnx.OfflineRecognizer.from_transducer(
            encoder=flags["--encoder"], decoder=flags["--decoder"], joiner=flags["--joiner"], tokens=tokens_file,
            model_type=flags.get("--model-type", ""), decoding_method="modified_beam_search",
            modeling_unit="bpe", bpe_vocab=str(vocab), hotwords_score=score, num_threads=num_threads,
            provider="cpu")


class KeywordsEngine(ModelEngine):
    """An adapter's engine, plus the keyword decoder for audio that comes with keywords."""

    def __init__(self, inner: ModelEngine, num_threads: int, score: float) -> None:
        super().__init__(inner.spec)
        self.inner = inner
        self._num_threads, self._score = num_threads, score
        self._decoder: KeywordDecoder | None = None
        self._loading = threading.Lock()

    async def start(self) -> None:
        await self.inner.start()

    async def transcribe(self, samples: np.ndarray, keywords: tuple[str, ...] = ()) -> EngineResult:
        if not keywords or not hotwords(keywords):
            return await self.inner.transcribe(samples)
        return await asyncio.to_thread(self._decode, samples, keywords)

    def _decode(self, samples: np.ndarray, keywords: tuple[str, ...]) -> EngineResult:
        return self._keyword_decoder().decode(samples, keywords)

    def _keyword_decoder(self) -> KeywordDecoder:
        with self._loading:
            if self._decoder is None:
                started = time.monotonic()
                log.info("loading the keyword decoder for %s (in process, CPU, %d thread(s))", self.spec.id,
                         self._num_threads)
                self._decoder = KeywordDecoder(self.spec, self._num_threads, self._score)
                log.info("keyword decoder for %s ready in %.1f s", self.spec.id, time.monotonic() - started)
            return self._decoder

    def health(self) -> EngineHealth:
        return self.inner.health()

    async def close(self) -> None:
        self._decoder = None
        await self.inner.close()
