"""The speed check before ready: the real-time factor and provider in /health, and the slow-CUDA
warning for an engine that reports CUDA and answers slowly (a stand-in: no GPU here)."""

from __future__ import annotations

import pytest

from tests.conftest import BridgeProcess, bridge_env, start_instant_engine


def test_health_shows_the_measured_speed_on_cpu(bridge):
    check = bridge.health()["speed_check"]
    assert check["model"] == "moonshine-base-en" and check["provider"] == "cpu"
    assert 2 < check["audio_seconds"] < 3
    assert 0 < check["real_time_factor"] < 2 and check["seconds"] > 0
    assert "birch canoe" in check["text"].lower()  # the model really heard the utterance
    assert check["warning"] is None
    assert "speed check: model moonshine-base-en on cpu" in bridge.log()


@pytest.fixture
def stand_in_engine():
    """Start ``bench.instant_engine`` with a given delay per second of audio."""
    procs = []

    def start(delay: float) -> str:
        proc, url = start_instant_engine("--delay", str(delay))
        procs.append(proc)
        return url

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("delay, slow", [(0.5, True), (0.0, False)])
def test_slow_cuda_is_called_out(models_dir, catalog_file, tmp_path, stand_in_engine, delay, slow):
    url = stand_in_engine(delay)
    bridge = BridgeProcess(bridge_env(models_dir, catalog_file, ENGINE_ADAPTER="websocket", ENGINE_URL=url,
                                      SHERPA_PROVIDER="cuda", SPEED_WARN_RTF="0.2"), tmp_path / "bridge.log")
    try:
        bridge.wait_ready()
        check = bridge.health()["speed_check"]
        assert check["provider"] == "cuda"
        if slow:
            assert check["real_time_factor"] >= 0.5
            assert "SPEED_WARN_RTF=0.2" in check["warning"] and "fp32" in check["warning"]
            assert "MatMulInteger" in bridge.log()
        else:
            assert check["real_time_factor"] < 0.2 and check["warning"] is None
            assert "MatMulInteger" not in bridge.log()
    finally:
        bridge.stop()
