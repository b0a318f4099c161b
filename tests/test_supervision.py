"""The engine child is supervised: restarted after a crash, given up on after a crash loop, stopped
with the bridge (no orphan)."""

from __future__ import annotations

import logging
import os
import signal
import time

import httpx
import psutil
import pytest

from tests.conftest import BECKETT_TEXT, BridgeProcess, bridge_env
from tests.helpers import assert_openai_error, transcribe, wer


def wait_for(predicate, timeout: float = 30, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise TimeoutError("condition not met")


def test_kill_9_of_the_engine_is_survived(bridge, beckett):
    before = bridge.health()
    os.kill(before["engine_pid"], signal.SIGKILL)
    # The very next request succeeds (it waits for the restart, at most one internal retry).
    r = transcribe(bridge.url, beckett)
    assert r.status_code == 200, r.text
    assert wer(BECKETT_TEXT, r.json()["text"]) <= 0.1
    after = wait_for(lambda: (h := bridge.health())["status"] == "ready" and h)
    assert after["engine_restarts"] == before["engine_restarts"] + 1
    assert after["engine_pid"] != before["engine_pid"]
    assert not psutil.pid_exists(before["engine_pid"])  # reaped: no zombie left behind


@pytest.fixture
def private_bridge(models_dir, catalog_file, tmp_path):
    procs: list[BridgeProcess] = []

    def start(**env: str) -> BridgeProcess:
        proc = BridgeProcess(bridge_env(models_dir, catalog_file, **env), tmp_path / f"bridge{len(procs)}.log")
        procs.append(proc)
        proc.wait_ready()
        return proc

    yield start
    for proc in procs:
        proc.stop(signal.SIGKILL)


def test_crash_loop_gives_up_and_reports_not_ready(private_bridge, beckett):
    b = private_bridge(ENGINE_MAX_RESTARTS="1", ENGINE_RESTART_WINDOW="120")
    pid1 = b.health()["engine_pid"]
    os.kill(pid1, signal.SIGKILL)
    pid2 = wait_for(lambda: (h := b.health())["status"] == "ready" and h["engine_pid"] != pid1 and h["engine_pid"])
    os.kill(pid2, signal.SIGKILL)
    health = wait_for(lambda: (r := httpx.get(b.url + "/health")).status_code == 503 and "gave up" in
                      r.json()["detail"] and r)
    assert health.json()["status"] == "not_ready" and health.headers["retry-after"]
    r = transcribe(b.url, beckett)
    assert_openai_error(r, 503, "engine_unavailable")
    assert int(r.headers["retry-after"]) > 0
    assert "giving up" in b.log()


def test_sigterm_stops_the_engine_child_and_exits_cleanly(private_bridge):
    b = private_bridge()
    engine_pid = b.health()["engine_pid"]
    engine = psutil.Process(engine_pid)
    assert engine.ppid() == b.proc.pid
    assert b.stop(signal.SIGTERM) == 0
    assert not psutil.pid_exists(engine_pid) or engine.status() == psutil.STATUS_ZOMBIE
    log = b.log()
    assert "engine pid" in log and "stopped" in log
    for noise in ("[fatal]", "Broken pipe", "[disconnect]", "Number of active connections"):
        assert noise not in log, noise  # a clean stop is quiet (ENGINE_LOG_LEVEL=debug shows it)


def test_engine_output_levels():
    from adapters.managed_websocket import engine_line_level

    fatal = "[2026-11-25 14:29:40] [fatal] handle_write_frame error: websocketpp.transport:2"
    assert engine_line_level(fatal, ready=True, closing=False) == logging.DEBUG
    assert engine_line_level("Listening on: 6006", ready=False, closing=False) == logging.INFO
    assert engine_line_level("Number of active connections: 2", ready=True, closing=False) == logging.DEBUG
    assert engine_line_level("Failed to load model encoder.onnx", ready=False, closing=False) == logging.WARNING
    assert engine_line_level("CUDA error: out of memory", ready=True, closing=False) == logging.WARNING
    assert engine_line_level("anything at all", ready=True, closing=True) == logging.DEBUG


def test_engine_dies_with_a_killed_bridge(private_bridge):
    b = private_bridge()
    engine_pid = b.health()["engine_pid"]
    b.proc.kill()
    b.proc.wait()
    wait_for(lambda: not psutil.pid_exists(engine_pid) or psutil.Process(engine_pid).status() == psutil.STATUS_ZOMBIE,
             timeout=10)
