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


SLOW_BRIDGE = textwrap.dedent("""
    import asyncio, sys
    from fastapi import FastAPI, Request
    from common.serving import run_server

    app = FastAPI()

    @app.post("/v1/audio/transcriptions")
    async def slow(request: Request):
        await request.body()
        await asyncio.sleep(60)
        return {"text": "too late"}

    sys.exit(run_server(app, "127.0.0.1", int(sys.argv[1]), graceful_seconds=30, header_timeout=0))
""")

PROXY = textwrap.dedent("""
    import sys
    from auth_proxy.app import create_app
    from auth_proxy.config import load_proxy_settings
    from common.serving import run_server

    sys.exit(run_server(create_app(load_proxy_settings()), "127.0.0.1", int(sys.argv[1]), graceful_seconds=1))
""")


def wait_up(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.1)


def test_a_forwarded_request_cut_off_by_the_proxy_stop_gets_a_503_and_its_usage_outcome(tmp_path):
    """The proxy stops while the bridge still works on a request: once the proxy's grace is up the
    client gets 503 shutting_down (not a 500), and the request's usage record carries an outcome
    (499: not served), not the pending status 0 — the writes of a request cut off by the stop are
    made before the usage store closes. Found by `docker compose stop` in the container tests."""
    import os
    import sqlite3

    from tests.test_proxy import add_key

    bridge_port, proxy_port = free_port(), free_port()
    key = add_key(tmp_path / "api-keys.json", "stopper")
    env = {**os.environ, "BRIDGE_URL": f"http://127.0.0.1:{bridge_port}", "AUTH_METRICS_PORT": "0",
           "API_KEYS_FILE": str(tmp_path / "api-keys.json"), "USAGE_DB": str(tmp_path / "usage.db"), "USAGE_JSON": ""}
    bridge = subprocess.Popen([sys.executable, "-c", SLOW_BRIDGE, str(bridge_port)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxy = subprocess.Popen([sys.executable, "-c", PROXY, str(proxy_port)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_up(f"http://127.0.0.1:{bridge_port}/docs", bridge)
        wait_up(f"http://127.0.0.1:{proxy_port}/favicon.ico", proxy)
        answer: dict = {}
        client = threading.Thread(target=lambda: answer.update(r=httpx.post(
            f"http://127.0.0.1:{proxy_port}/v1/audio/transcriptions", files={"file": ("a.wav", b"\0" * 4096)},
            headers={"Authorization": f"Bearer {key}"}, timeout=30)))
        client.start()
        time.sleep(1.0)  # the request is at the bridge
        proxy.send_signal(signal.SIGTERM)
        client.join(30)
        assert proxy.wait(30) == 0
        assert_openai_error(answer["r"], 503, "shutting_down")
        rows = sqlite3.connect(tmp_path / "usage.db").execute("SELECT status FROM usage").fetchall()
        assert rows == [(499,)], rows
    finally:
        for proc in (proxy, bridge):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_the_proxy_lets_an_idle_connection_to_a_bridge_go_before_the_bridge_closes_it():
    """A request sent on a connection the server is closing fails ("server disconnected") and the
    proxy cannot send a streamed upload again: the caller would get a 503. So the proxy's idle
    connections to a bridge expire well before a service (``run_server``) closes them. Measured on
    the server: how long it keeps an idle keep-alive connection open."""
    import socket

    from auth_proxy.app import bridge_client
    from auth_proxy.config import ProxySettings

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        wait_up(f"http://127.0.0.1:{port}/ok", proc)
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET /ok HTTP/1.1\r\nHost: bridge\r\n\r\n")
            sock.settimeout(30)
            answer = b""
            while not answer.endswith(b'{"ok":true}'):  # the head and the body may come apart
                chunk = sock.recv(4096)
                assert chunk, answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200")
            idle_from = time.monotonic()
            assert sock.recv(4096) == b""  # the server closed the idle connection
            kept = time.monotonic() - idle_from
    finally:
        proc.terminate()
        proc.wait(10)
    client = bridge_client(ProxySettings(), f"http://127.0.0.1:{port}")
    expiry = client._transport._pool._keepalive_expiry  # httpcore's pool: what httpx.Limits set
    assert expiry is not None and expiry <= kept - 2, f"the proxy keeps {expiry} s, the server {kept:.1f} s"
