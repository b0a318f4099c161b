"""The three adapters give the same text on the same audio (real engines, no HTTP)."""

from __future__ import annotations

import asyncio

import pytest

from adapters.websocket import WebSocketEngine
from bridge.config import load_settings
from bridge.decoding.ffmpeg import decode_file
from bridge.models.engine_factory import create_engine
from bridge.models.model_store import ModelStore
from bridge.ports import EngineUnavailable
from tests.conftest import BECKETT_TEXT, MOONSHINE
from tests.helpers import wer


def test_all_adapters_agree(models_dir, beckett):
    settings = load_settings(models_dir=models_dir, sherpa_num_threads=2, engine_connections=2)
    model_dir = ModelStore(models_dir).path_for(MOONSHINE.id)

    async def run() -> dict[str, str]:
        audio = await decode_file(beckett, max_seconds=600, timeout=30)
        texts: dict[str, str] = {}
        managed = create_engine("managed-websocket", MOONSHINE, model_dir, settings)
        await managed.start()
        try:
            texts["managed-websocket"] = (await managed.transcribe(audio[:])).text
            port = managed.supervisor.port  # type: ignore[attr-defined]
            external = create_engine("websocket", MOONSHINE, model_dir,
                                     load_settings(engine_adapter="websocket", engine_url=f"ws://127.0.0.1:{port}"))
            assert isinstance(external, WebSocketEngine)
            await external.start()
            texts["websocket"] = (await external.transcribe(audio[:])).text
            await external.close()
        finally:
            await managed.close()
        cli = create_engine("subprocess", MOONSHINE, model_dir, settings)
        await cli.start()
        texts["subprocess"] = (await cli.transcribe(audio[:])).text
        await cli.close()
        return texts

    texts = asyncio.run(run())
    assert len(set(texts.values())) == 1, texts
    assert wer(BECKETT_TEXT, texts["subprocess"]) <= 0.1


def test_websocket_adapter_reports_an_unreachable_server(models_dir):
    settings = load_settings(engine_adapter="websocket", engine_url="ws://127.0.0.1:9")
    engine = create_engine("websocket", MOONSHINE, models_dir, settings)

    async def run() -> None:
        with pytest.raises(EngineUnavailable):
            await engine.start()
        assert engine.health().ready is False

    asyncio.run(run())
