"""Pieces the model fails on (nothing for a piece of speech, or a loop) are caught and transcribed
again in halves (``bridge.guard``): the checks on crafted replies, the cut at the quietest point,
order and times, and the whole path through a real bridge in front of a stand-in engine that fails
on long pieces the way Moonshine does on noisy speech (no model fails that way on demand here)."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from bridge.cutting import quietest_point
from bridge.guard import GuardLimits, PieceGuard
from bridge.ports import EngineResult
from bridge.transcript import compression_ratio
from bridge.vad import SpeechDetector, find_vad_model
from tests.conftest import BridgeProcess, bridge_env, start_instant_engine
from tests.helpers import transcribe
from tests.speech import HARVARD, festival_wav, have_festival, read_wav16, write_wav16

pytestmark = pytest.mark.skipif(not have_festival(), reason="festival/sox not installed")

RATE = 16000


def speech(*sentences: int, gap: float = 0.6) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Festival sentences with pauses between them; returns the samples and each sentence's span."""
    parts, spans, pos = [], [], 0
    for i in sentences:
        clip = read_wav16(festival_wav(HARVARD[i]))
        loud = np.flatnonzero(np.abs(clip) > 2e-3)
        clip = clip[loud[0]:loud[-1] + 1]  # the sentence without Festival's own leading and trailing quiet
        spans.append((pos, pos + len(clip)))
        parts += [clip, np.zeros(int(gap * RATE), dtype=np.float32)]
        pos += len(clip) + int(gap * RATE)
    return np.concatenate(parts), spans


@pytest.fixture(scope="module")
def guard() -> PieceGuard:
    model = find_vad_model(None)
    return PieceGuard(GuardLimits(), SpeechDetector(model) if model else None)


def judge(guard: PieceGuard, text: str, samples: np.ndarray) -> list[str]:
    return asyncio.run(guard.judge(EngineResult(text=text), samples)).reasons


def test_each_check_fires_on_a_broken_reply_and_not_on_a_good_one(guard):
    samples, _ = speech(0, 1, 2, 3)  # about 12 s of speech
    said = " ".join(HARVARD[:4])
    assert judge(guard, said, samples) == []
    assert judge(guard, "", samples) == ["empty"]
    assert judge(guard, "The birch.", samples) == ["empty"]  # near-empty: 2 words for 12 s of speech
    loop = " ".join(["the birch canoe slid"] * 40)
    assert set(judge(guard, loop, samples)) == {"too_long", "repetitive"}
    rng = np.random.default_rng(1)
    babble = " ".join("".join(rng.choice(list("aeioubcdfgklmnprst"), 5)) for _ in range(100))  # too many words
    assert judge(guard, babble, samples) == ["too_long"]
    assert compression_ratio(loop) > 2.4 > compression_ratio(said)
    # Silence answered with nothing is right, not a failure.
    assert judge(guard, "", np.zeros(12 * RATE, dtype=np.float32)) == []


def test_a_failed_piece_is_retried_in_halves_cut_at_the_quietest_point(guard):
    samples, spans = speech(0, 1, 2, 3, 4, gap=0.8)
    cut = quietest_point(samples, 3 * RATE)
    assert any(end <= cut <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False)), \
        "the cut is in a pause between sentences"
    calls: list[int] = []

    async def submit(piece: np.ndarray) -> EngineResult:
        calls.append(len(piece))
        if len(piece) > 9 * RATE:  # the stand-in model fails on long pieces
            return EngineResult(text="")
        seconds = len(piece) / RATE
        return EngineResult(text=f"part of {seconds:.2f} s", tokens=["a", "b"], timestamps=[0.1, seconds - 0.2])

    before = guard.retried
    result = asyncio.run(guard.run(submit, samples))
    assert guard.retried > before and not result.flags
    parts = result.text.split("part of ")[1:]
    lengths = [float(p.split(" s")[0]) for p in parts]
    assert sum(lengths) == pytest.approx(len(samples) / RATE, abs=0.01)  # every sample, once, in order
    assert len(calls) >= 3 and max(calls[1:]) <= 9 * RATE
    # Token times of a right half are moved by where it starts.
    starts = result.timestamps[::2]
    assert starts == sorted(starts) and starts[-1] > len(samples) / RATE / 2


def test_a_piece_that_still_fails_is_kept_and_flagged(guard):
    samples, _ = speech(0, 1, 2)

    async def submit(piece: np.ndarray) -> EngineResult:
        return EngineResult(text="")

    result = asyncio.run(guard.run(submit, samples))
    assert result.text == "" and result.flags == ["empty"]


@pytest.mark.parametrize("fail_over", [8.0, 1.0])
def test_the_bridge_retries_failed_pieces_and_shows_what_still_fails(models_dir, catalog_file, tmp_path, fail_over):
    # A stand-in engine answering nothing for utterances over ``fail_over`` seconds.
    engine, url = start_instant_engine("--fail-over", str(fail_over), "--fail-mode", "empty")
    bridge = BridgeProcess(bridge_env(models_dir, catalog_file, ENGINE_ADAPTER="websocket", ENGINE_URL=url,
                                      SPEED_CHECK="false", PIECE_TARGET_SECONDS="20"), tmp_path / "bridge.log")
    try:
        bridge.wait_ready()
        samples, _ = speech(0, 1, 2, 3, 4, 5, gap=0.8)  # ~18 s: one piece, which the engine fails on
        path = write_wav16(tmp_path / "speech.wav", samples)
        body = transcribe(bridge.url, path, response_format="verbose_json").json()
        health = bridge.health()["guard"]
        assert health["retried"] >= 1 and health["failed_checks"]["empty"] >= 1
        metrics = httpx.get(bridge.metrics_url).text
        assert f"stt_bridge_pieces_retried_total {float(health['retried'])}" in metrics
        if fail_over == 8.0:  # the halves (of halves) the engine can take: their text, in order
            seconds = [float(p.split(" seconds")[0]) for p in body["text"].split("piece of ")[1:]]
            assert len(seconds) >= 3 and all(s <= 8 for s in seconds)
            assert sum(seconds) == pytest.approx(len(samples) / RATE, abs=0.6)  # nothing lost
            assert health["improved"] >= 1 and health["unreliable"] == 0
            assert not any(seg.get("flags") for seg in body["segments"])
        else:  # it fails down to the smallest halves: kept, flagged, never dropped
            assert body["text"] == "" and health["unreliable"] >= 1
            flagged = [seg for seg in body["segments"] if seg.get("flags")]
            assert flagged and all(seg["flags"] == ["empty"] for seg in flagged)
            assert flagged[0]["start"] < 1 and flagged[-1]["end"] > len(samples) / RATE - 2
            assert transcribe(bridge.url, path, response_format="srt").text.strip() == ""  # no empty cues
    finally:
        bridge.stop()
        engine.terminate()
        engine.wait(10)
