"""Switching the loaded model while requests run: none fails, none is answered by the wrong model."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import BECKETT_TEXT, BROKEN_ID, COPY_ID
from tests.helpers import assert_openai_error, transcribe, wer

ORIGINAL = "moonshine-base-en"


def switch(url: str, model_id: str) -> httpx.Response:
    return httpx.post(url + "/v1/models/switch", json={"model_id": model_id}, timeout=120)


def test_switch_while_requests_run(bridge, beckett):
    try:
        with ThreadPoolExecutor(12) as pool:
            # Requests that name the original model explicitly, in flight when the switch starts.
            before = [pool.submit(transcribe, bridge.url, beckett, model=ORIGINAL) for _ in range(4)]
            # Requests that name no model / an alias: answered by whichever model they were admitted to.
            anyone = [pool.submit(transcribe, bridge.url, beckett, model="whisper-1") for _ in range(4)]
            r = switch(bridge.url, COPY_ID)
            assert r.status_code == 200, r.text
            assert r.json()["model"] == COPY_ID and r.json()["previous"] == ORIGINAL
            assert r.json()["switch_seconds"] > 0
            after = [pool.submit(transcribe, bridge.url, beckett, model=COPY_ID) for _ in range(4)]
            for f in before + anyone + after:
                resp = f.result()
                assert resp.status_code == 200, resp.text
                assert wer(BECKETT_TEXT, resp.json()["text"]) <= 0.1
            assert {f.result().headers["x-model-id"] for f in before} == {ORIGINAL}
            assert {f.result().headers["x-model-id"] for f in after} == {COPY_ID}
            assert {f.result().headers["x-model-id"] for f in anyone} <= {ORIGINAL, COPY_ID}
        health = bridge.health()
        assert health["model"] == COPY_ID and health["status"] == "ready"
        models = httpx.get(bridge.url + "/v1/models").json()
        assert models["loaded"] == COPY_ID
        # The old model is no longer served under its own name.
        assert_openai_error(transcribe(bridge.url, beckett, model=ORIGINAL), 400, "model_not_loaded")
    finally:
        assert switch(bridge.url, ORIGINAL).status_code == 200
    assert bridge.health()["model"] == ORIGINAL


def test_switch_to_the_loaded_model_is_a_no_op(bridge):
    r = switch(bridge.url, ORIGINAL)
    assert r.status_code == 200 and r.json()["switched"] is False


def test_unknown_model_is_404(bridge):
    assert_openai_error(switch(bridge.url, "gpt-17"), 404, "model_not_found")
    assert_openai_error(switch(bridge.url, "../../etc"), 404, "model_not_found")
    assert_openai_error(httpx.post(bridge.url + "/v1/models/switch", content=b"nope"), 400)


def test_a_failed_switch_leaves_the_old_model_serving(bridge, beckett):
    pid = bridge.health()["engine_pid"]
    r = switch(bridge.url, BROKEN_ID)
    err = assert_openai_error(r, 500, "switch_failed")
    assert ORIGINAL in err["message"]
    assert r.headers["x-should-retry"] == "false"
    health = bridge.health()
    assert health["model"] == ORIGINAL and health["status"] == "ready" and health["engine_pid"] == pid
    ok = transcribe(bridge.url, beckett)
    assert ok.status_code == 200 and ok.headers["x-model-id"] == ORIGINAL


def test_a_model_that_is_not_downloaded_says_how_to_get_it(bridge):
    r = switch(bridge.url, "parakeet-tdt-0.6b-v3-int8")
    err = assert_openai_error(r, 409, "model_not_downloaded")
    assert "python -m bridge models download parakeet-tdt-0.6b-v3-int8" in err["message"]
    assert r.headers["x-should-retry"] == "false"
