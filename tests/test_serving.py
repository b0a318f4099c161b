"""How both services stop (common/serving.py): a request still running when the graceful shutdown's
time is up gets a 503 in OpenAI's error shape with Retry-After, not uvicorn's plain-text 500, and
the process exits 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time

import httpx

from tests.conftest import ROOT, free_port
from tests.helpers import assert_openai_error

SERVER = textwrap.dedent("""
    import asyncio, sys
    from fastapi import FastAPI
    from common.serving import run_server

    app = FastAPI()

    @app.get("/slow")
    async def slow():
        await asyncio.sleep(60)
        return {"done": True}

    @app.get("/ok")
    async def ok():
        return {"ok": True}

    sys.exit(run_server(app, "127.0.0.1", int(sys.argv[1]), graceful_seconds=1, header_timeout=0))
""")


def test_a_request_cut_off_by_the_shutdown_gets_a_503_it_can_retry():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/ok", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        answer: dict = {}
        client = threading.Thread(target=lambda: answer.update(r=httpx.get(url + "/slow", timeout=30)))
        client.start()
        time.sleep(0.5)  # the request is in the app
        proc.send_signal(signal.SIGTERM)
        client.join(30)
        err = assert_openai_error(answer["r"], 503, "shutting_down")
        assert answer["r"].headers["retry-after"] and answer["r"].headers["x-should-retry"] == "true", err
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
