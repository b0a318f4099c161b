"""Bad settings stop the start with a message naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize(("name", "value"), [
    ("SHERPA_PROVIDER", "tpu"),
    ("SHERPA_NUM_THREADS", "many"),
    ("SHERPA_MAX_UTTERANCE", "-5"),
    ("ENGINE_ADAPTER", "grpc"),
    ("BRIDGE_PORT", "99999"),
    ("ENGINE_URL", "http://x"),
])
def test_bad_value_names_the_variable(name, value):
    run = subprocess.run([sys.executable, "-m", "bridge"], cwd=ROOT, env={**os.environ, name: value},
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert name in run.stderr


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
