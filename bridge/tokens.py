"""The engine's tokens as OpenAI's answers carry them: ids (``verbose_json`` segments' ``tokens``)
from the model's own token table, and ``logprobs`` entries (``include[]=logprobs``).

sherpa-onnx replies with token strings, not ids. Its token table (``tokens.txt``: a token, a space,
its id per line; base64 for Moonshine and Whisper) maps them back; SentencePiece's word mark U+2581
is read as the space the engine puts in its place. A token the table does not hold (the engine
writes single bytes of a split character as ``<0xE2>``) has no id and is left out of ``tokens``.
"""

from __future__ import annotations

import base64
import binascii
import functools
from pathlib import Path
from typing import Any

from bridge.ports import EngineModel

WORD_MARK = "\u2581"


@functools.lru_cache(maxsize=8)
def token_table(path: str, encoded: bool) -> dict[str, int]:
    table: dict[str, int] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return table
    for line in lines:
        token, sep, number = line.rpartition(" ")
        if not sep or not number.isdigit():
            continue
        if encoded:
            try:
                token = base64.b64decode(token, validate=True).decode("utf-8", errors="replace")
            except (binascii.Error, ValueError):
                continue
        table.setdefault(token.replace(WORD_MARK, " "), int(number))
    return table


def token_ids(spec: EngineModel, tokens: list[str]) -> list[int]:
    if not spec.tokens_file or not tokens:
        return []
    table = token_table(spec.tokens_file, spec.tokens_base64)
    return [table[t] for t in tokens if t in table]


def logprob_entries(pairs: list[tuple[str, float]]) -> list[dict[str, Any]]:
    """OpenAI's ``logprobs`` list: ``{token, bytes, logprob}`` per token."""
    return [{"token": token, "bytes": list(token.encode("utf-8")), "logprob": round(logprob, 6)}
            for token, logprob in pairs]
