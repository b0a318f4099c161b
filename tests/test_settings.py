"""Bad settings stop the start with a message naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize(("service", "name", "value"), [
    ("bridge", "SHERPA_PROVIDER", "tpu"),
    ("bridge", "SHERPA_NUM_THREADS", "many"),
    ("bridge", "SHERPA_MAX_UTTERANCE", "-5"),
    ("bridge", "ENGINE_ADAPTER", "grpc"),
    ("bridge", "BRIDGE_PORT", "99999"),
    ("bridge", "ENGINE_URL", "http://x"),
    ("auth_proxy", "BRIDGE_URLS", "http://a:8000,mvp-bridge:8000"),
    ("auth_proxy", "RATE_LIMIT_STORAGE", "memcached://x:11211"),
    ("auth_proxy", "BRIDGE_POLL_SECONDS", "0"),
])
def test_bad_value_names_the_variable(service, name, value):
    run = subprocess.run([sys.executable, "-m", service], cwd=ROOT, env={**os.environ, name: value},
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert name in run.stderr


@pytest.mark.parametrize(("service", "api", "metrics"), [
    ("bridge", "BRIDGE_PORT", "BRIDGE_METRICS_PORT"),
    ("auth_proxy", "AUTH_PORT", "AUTH_METRICS_PORT"),
])
def test_metrics_on_the_api_port_stops_the_start(service, api, metrics):
    """Else the metrics server takes the port first and answers every path, /health included."""
    run = subprocess.run([sys.executable, "-m", service], cwd=ROOT, env={**os.environ, api: "8999", metrics: "8999"},
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert metrics in run.stderr and f"must differ from {api}" in run.stderr


def test_websocket_adapter_needs_an_url():
    run = subprocess.run([sys.executable, "-m", "bridge"], cwd=ROOT,
                         env={**os.environ, "ENGINE_ADAPTER": "websocket", "ENGINE_URL": ""},
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "ENGINE_URL" in run.stderr


def test_unknown_default_model_stops_the_start(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bridge"], cwd=ROOT,
                         env={**os.environ, "DEFAULT_MODEL": "nope", "MODELS_DIR": str(tmp_path),
                              "BRIDGE_PORT": "8999"}, capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "DEFAULT_MODEL" in run.stderr


def test_engine_tuning_is_resolved_from_provider_and_cores():
    from bridge.config import load_settings, usable_cores

    cpu = load_settings(sherpa_provider="cpu")
    # One thread per model run, a connection per core plus one kept for newcomers, and a work
    # thread in the engine for every connection (or pieces queue inside the engine).
    assert (cpu.sherpa_num_threads, cpu.engine_connections, cpu.sherpa_num_work_threads) == \
        (1, usable_cores() + 1, usable_cores() + 1)
    cuda = load_settings(sherpa_provider="cuda")
    assert (cuda.sherpa_num_threads, cuda.engine_connections, cuda.sherpa_num_work_threads) == (4, 8, 3)
    chosen = load_settings(sherpa_provider="cpu", sherpa_num_threads=3, engine_connections=2)
    assert (chosen.sherpa_num_threads, chosen.engine_connections, chosen.sherpa_num_work_threads) == (3, 2, 2)


def test_batch_size_reaches_only_models_the_engine_batches(tmp_path):
    from adapters.managed_websocket import EngineSupervisor
    from adapters.websocket import ConnectionPool
    from bridge.models.catalog import Catalog

    catalog = Catalog.load()

    def batch_flag(model_id: str) -> str:
        sup = EngineSupervisor(catalog.get(model_id).engine_model(tmp_path), binary="engine", provider="cpu",
                               num_threads=1, num_work_threads=3, max_batch_size=8, max_utterance_seconds=30,
                               ready_timeout=1, max_restarts=0, restart_window=1,
                               pool=ConnectionPool("ws://127.0.0.1:0", 1, 1))
        return next(f for f in sup.command(6006) if f.startswith("--max-batch-size="))

    # sherpa-onnx decodes a Moonshine "batch" one piece after another on one thread: with a batch
    # size above 1 a newcomer's piece could wait inside the engine behind a long request's piece.
    assert batch_flag("moonshine-base-en") == "--max-batch-size=1"
    assert batch_flag("parakeet-tdt-0.6b-v3-int8") == "--max-batch-size=8"


def test_proxy_lists_and_empty_values():
    from auth_proxy.config import load_proxy_settings

    s = load_proxy_settings(bridge_urls="http://a:8000/, http://b:8000", usage_json="", rate_limit_storage="")
    assert s.bridge_urls == ["http://a:8000", "http://b:8000"]
    assert s.usage_json is None and s.rate_limit_storage == "memory://"


def test_a_gpu_host_starts_the_parakeet_engine_with_cuda_flags(tmp_path):
    """What cannot run here, checked by reading: with compose's settings (``SHERPA_PROVIDER=cuda``,
    the default parakeet model) the engine child is started on CUDA with the tuning the settings
    resolve for it (4 threads per model run, batches of 8, 3 work threads) and the transducer's files."""
    from adapters.managed_websocket import EngineSupervisor
    from adapters.websocket import ConnectionPool
    from bridge.config import load_settings
    from bridge.models.catalog import Catalog

    settings = load_settings(sherpa_provider="cuda", default_model="parakeet-tdt-0.6b-v2-int8")
    spec = Catalog.load().get(settings.default_model).engine_model(tmp_path)
    sup = EngineSupervisor(spec, binary="engine", provider=settings.sherpa_provider,
                           num_threads=settings.sherpa_num_threads, num_work_threads=settings.sherpa_num_work_threads,
                           max_batch_size=settings.sherpa_max_batch_size,
                           max_utterance_seconds=settings.sherpa_max_utterance, ready_timeout=1, max_restarts=0,
                           restart_window=1, pool=ConnectionPool("ws://127.0.0.1:0", 1, 1))
    flags = sup.command(6006)
    for wanted in ("--provider=cuda", "--num-threads=4", "--num-work-threads=3", "--max-batch-size=8",
                   "--model-type=nemo_transducer", f"--encoder={tmp_path}/encoder.int8.onnx",
                   f"--decoder={tmp_path}/decoder.int8.onnx", f"--joiner={tmp_path}/joiner.int8.onnx",
                   f"--tokens={tmp_path}/tokens.txt"):
        assert wanted in flags, (wanted, flags)
