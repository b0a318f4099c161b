"""Shared fixtures: one real bridge (real sherpa-onnx server, real Moonshine model, real ffmpeg)
per test session, reached over loopback HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.models.catalog import BUILTIN_MODELS
from bridge.models.model_store import ModelStore
from tests.model_standins import (
    PARAKEET_V3,
    STANDINS,
    diarization_standins,
    install_standin,
    tiny_tdt_spec,
)

ROOT = Path(__file__).resolve().parent.parent
MOONSHINE = next(m for m in BUILTIN_MODELS if m.id == "moonshine-base-en")
COPY_ID = "moonshine-base-en-copy"  # a second catalog id on the same files, for switch tests
BROKEN_ID = "moonshine-broken"  # complete on disk by its marker, but the engine cannot load it


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run long load, soak and fuzz tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


_GIVEN: set[int] = set()


def free_port() -> int:
    """A loopback port free now and not handed out before in this test session: the kernel may offer
    the same free port twice in a row (a bridge once got its metrics port as its API port)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def catalog_file(session_dir: Path) -> Path:
    copy = MOONSHINE.model_copy(update={"id": COPY_ID, "description": "test copy of moonshine-base-en"})
    path = session_dir / "test-catalog.json"
    broken = MOONSHINE.model_copy(update={"id": BROKEN_ID, "description": "test: corrupt encoder"})
    path.write_text(json.dumps([copy.model_dump(), broken.model_dump()]))
    return path


@pytest.fixture(scope="session")
def models_dir(session_dir: Path) -> Path:
    path = session_dir / "models"
    store = ModelStore(path)
    store.prepare(MOONSHINE)
    store.prepare(MOONSHINE.model_copy(update={"id": COPY_ID}))
    broken = MOONSHINE.model_copy(update={"id": BROKEN_ID})
    folder = store.prepare(broken)
    (folder / "encoder_model.onnx").write_bytes(b"not an onnx model")
    store._verify_and_mark(broken, folder)  # sizes recorded as they are now: looks complete
    return path


class BridgeProcess:
    """``python -m bridge`` as a user starts it, on a free loopback port."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.log_path = log_path
        self.tmpdir: Path | None = None
        full_env = {**os.environ, "BRIDGE_HOST": "127.0.0.1", "BRIDGE_PORT": str(self.port),
                    "BRIDGE_METRICS_PORT": str(self.metrics_port), **env}
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "bridge"], cwd=ROOT, env=full_env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bridge exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"bridge not ready in {timeout} s:\n{self.log()[-3000:]}")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def start_instant_engine(*args: str) -> tuple[subprocess.Popen, str]:
    """``bench.instant_engine`` (a stand-in engine, see its flags) on a free port, once it answers;
    returns the process and its ws:// URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.instant_engine", "--port", str(port), *args], cwd=ROOT)
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            return proc, f"ws://127.0.0.1:{port}"
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)


def bridge_env(models_dir: Path, catalog_file: Path, **extra: str) -> dict[str, str]:
    env = {
        "MODELS_DIR": str(models_dir),
        "CATALOG_FILE": str(catalog_file),
        "DEFAULT_MODEL": MOONSHINE.id,
        "SHERPA_PROVIDER": "cpu",
        "SHERPA_NUM_THREADS": "2",
        "ENGINE_CONNECTIONS": "4",
        "LOG_LEVEL": "info",
    }
    env.update(extra)
    return env


def session_bridge(models_dir: Path, catalog_file: Path, session_dir: Path, name: str,
                   **env: str) -> Iterator[BridgeProcess]:
    """A bridge kept for the whole session; its TMPDIR is its own (tests check nothing is left)."""
    tmp = session_dir / f"{name}-tmp"
    tmp.mkdir(exist_ok=True)
    proc = BridgeProcess(bridge_env(models_dir, catalog_file, TMPDIR=str(tmp), **env), session_dir / f"{name}.log")
    proc.tmpdir = tmp
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def bridge(models_dir: Path, catalog_file: Path, session_dir: Path) -> Iterator[BridgeProcess]:
    yield from session_bridge(models_dir, catalog_file, session_dir, "bridge")


@pytest.fixture(scope="session")
def ffmpeg_bridge(models_dir: Path, catalog_file: Path, session_dir: Path) -> Iterator[BridgeProcess]:
    """A second bridge decoding with one ffmpeg process per request (``AUDIO_DECODER=ffmpeg``)."""
    yield from session_bridge(models_dir, catalog_file, session_dir, "ffmpeg-bridge", AUDIO_DECODER="ffmpeg",
                              ENGINE_CONNECTIONS="2", SHERPA_NUM_THREADS="1")


@pytest.fixture(params=["pyav", "ffmpeg"])
def decoder_bridge(request: pytest.FixtureRequest) -> BridgeProcess:
    """The session bridge with each decoder: PyAV workers (the default) and the ffmpeg command."""
    name = "bridge" if request.param == "pyav" else "ffmpeg_bridge"
    proc: BridgeProcess = request.getfixturevalue(name)
    assert proc.health()["decoder"] == request.param
    return proc


@pytest.fixture(scope="session")
def beckett() -> Path:
    import moonshine_cpp

    return Path(moonshine_cpp.__file__).parent / "test-data" / "beckett.wav"


BECKETT_TEXT = "Ever tried ever failed, no matter try again fail again fail better."


@pytest.fixture(scope="session")
def five_minutes(session_dir: Path) -> tuple[Path, list[tuple[str, float, float]]]:
    """Five minutes of Festival sentences with pauses, and where each sentence is."""
    from tests.test_long_audio import PAUSES, build

    return build(300, lambda i: PAUSES[i % len(PAUSES)], session_dir / "five-minutes.wav")


@pytest.fixture(scope="session")
def five_minutes_answer(bridge: BridgeProcess, five_minutes) -> dict:
    """The session bridge's verbose_json answer for ``five_minutes``, transcribed once for the tests
    that compare with it, with the bridge's piece-guard counts before and after."""
    guard_before = bridge.health()["guard"]
    r = httpx.post(bridge.url + "/v1/audio/transcriptions", files={"file": five_minutes[0].open("rb")},
                   data={"response_format": "verbose_json"}, timeout=600)
    assert r.status_code == 200, r.text
    return {"body": r.json(), "guard_before": guard_before, "guard_after": bridge.health()["guard"]}


def bridge_behind_proxy(env: dict[str, str], work: Path, key_name: str) -> Iterator[Any]:
    """A bridge started with ``env`` and a proxy in front of it with one key (``proxy.key``;
    ``proxy.bridge`` is the bridge), both stopped when the caller is done."""
    from tests.test_proxy import ProxyProcess, add_key

    bridge = BridgeProcess(env, work / "bridge.log")
    proxy = None
    try:
        bridge.wait_ready()
        proxy = ProxyProcess(bridge.url, work / "proxy")
        proxy.key = add_key(proxy.keys_file, key_name)
        proxy.bridge = bridge
        yield proxy
    finally:
        if proxy is not None:
            proxy.stop()
        bridge.stop()


# --- speaker diarization with the test stand-ins of its models ---------------------------------

@pytest.fixture(scope="session")
def diarizing(tmp_path_factory):
    """A bridge (Moonshine) whose diarization models were downloaded from a Hugging Face stand-in
    with ``python -m bridge models download``, and the proxy in front of it (tests/test_diarization.py,
    tests/test_toolbar.py)."""
    from tests.hf_mirror import MirrorServer

    work = tmp_path_factory.mktemp("diarization")
    specs = diarization_standins()
    for spec in specs:
        repo = work / "mirror" / "test" / spec.id
        repo.mkdir(parents=True)
        (repo / spec.files[0].name).write_bytes((STANDINS / spec.files[0].name).read_bytes())
    catalog = work / "catalog.json"
    catalog.write_text(json.dumps([s.model_dump() for s in specs]))
    models = work / "models"
    ModelStore(models).prepare(MOONSHINE)
    mirror = MirrorServer(work / "mirror").start()
    env = bridge_env(models, catalog, DIARIZATION_SEGMENTATION_MODEL=specs[0].id,
                     DIARIZATION_EMBEDDING_MODEL=specs[1].id, DIARIZATION_THRESHOLD="0.45", SPEED_CHECK="false")
    try:
        for spec in specs:
            subprocess.run([sys.executable, "-m", "bridge", "models", "download", spec.id], cwd=ROOT, check=True,
                           env={**os.environ, **env, "HF_ENDPOINT": mirror.url}, capture_output=True)
    finally:
        mirror.shutdown()
    yield from bridge_behind_proxy(env, work, "meetings")


# --- the parakeet path through the real engine, with the tiny-tdt stand-in ------------------------

TDT_V2, TDT_V3 = "tiny-tdt-v2", "tiny-tdt-v3"


@pytest.fixture(scope="session")
def tdt_proxy(tmp_path_factory):
    """A bridge serving the parakeet v2 entry's flags with tiny-tdt's files, through the real managed
    engine (sherpa-onnx-offline-websocket-server, CPU); its catalog also has the v3 entry (25
    languages) on the same files, downloaded, for switching; the speed check runs before ready; the
    diarization stand-ins are installed (speakers by word times). The proxy in front of it."""
    work = tmp_path_factory.mktemp("tiny-tdt")
    specs = [tiny_tdt_spec(TDT_V2), tiny_tdt_spec(TDT_V3, PARAKEET_V3)]
    speakers = diarization_standins()
    store = ModelStore(work / "models")
    for spec in specs:
        install_standin(store, spec)
    for spec in speakers:
        install_standin(store, spec, STANDINS)
    catalog = work / "catalog.json"
    catalog.write_text(json.dumps([s.model_dump() for s in [*specs, *speakers]]))
    env = bridge_env(work / "models", catalog, DEFAULT_MODEL=TDT_V2, SHERPA_NUM_THREADS="1",
                     ENGINE_CONNECTIONS="2", DIARIZATION_SEGMENTATION_MODEL=speakers[0].id,
                     DIARIZATION_EMBEDDING_MODEL=speakers[1].id, DIARIZATION_THRESHOLD="0.45")
    for proxy in bridge_behind_proxy(env, work, "tdt"):
        proxy.bridge.models_dir = work / "models"  # a test links Moonshine in, to switch to it
        proxy.bridge.catalog_file = catalog
        yield proxy
