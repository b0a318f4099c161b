from __future__ import annotations

import re
from pathlib import Path

import httpx
import jiwer


def normalize(text: str) -> str:
    text = text.lower().replace("'", "")
    text = re.sub(r"[^a-z0-9 ]+", " ", text)
    return " ".join(text.split())


def wer(reference: str | list[str], hypothesis: str | list[str]) -> float:
    refs = [reference] if isinstance(reference, str) else reference
    hyps = [hypothesis] if isinstance(hypothesis, str) else hypothesis
    return float(jiwer.wer([normalize(r) for r in refs], [normalize(h) for h in hyps]))


def transcribe(url: str, path: Path, timeout: float = 120, headers: dict[str, str] | None = None,
               **fields: str) -> httpx.Response:
    with path.open("rb") as fh:
        return httpx.post(url + "/v1/audio/transcriptions", files={"file": (path.name, fh)},
                          data=fields, timeout=timeout, headers=headers)


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]
