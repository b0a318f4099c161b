"""`docker compose up`, for real: both images built by a real Docker engine from a clean copy of this
tree, and the no-GPU stack run with the README's own commands. Hugging Face, GitHub and Docker Hub
cannot be reached here: the bases are stand-ins (tests/docker_stack.py) and the model takes the
README's offline path (its folder copied into the mvp-models volume with `docker compose cp`).
The GPU image is built as far as this machine allows, which is up to the engine's download.

The tests run in file order on one stack: each leaves it running and healthy for the next. They take
Hugging Face to be unreachable, as it is where CI runs (the first start's message is part of the test)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import psutil
import pytest
import srt
import webvtt

from tests.conftest import MOONSHINE, free_port
from tests.docker_stack import Compose, DockerEngine, DockerUnavailable, clean_clone
from tests.helpers import assert_openai_error, live_turns, pcm24, wer
from tests.speech import LIBRISPEECH, librispeech_samples, write_wav16
from tests.speech import librispeech_text as reference

CPU = ["docker-compose.yml", "docker-compose.cpu.yml"]  # the README's no-GPU command
CLEAN = "1089-134686-0000"  # test-clean: what Moonshine hears well enough to check the text
ENGINE_BINARY = "sherpa-onnx-offline-websocket-server"


@pytest.fixture(scope="module")
def engine():
    try:
        docker = DockerEngine().start()
    except DockerUnavailable as exc:
        pytest.skip(f"container tests not run: {exc}")
    docker.ensure_standins()
    yield docker
    if not os.environ.get("KEEP_STACK"):
        docker.stop()


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    return clean_clone(tmp_path_factory.mktemp("clone") / "mvp-stt")


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


class Stack(Compose):
    def __init__(self, engine: DockerEngine, folder: Path) -> None:
        self.port = 20300 if port_is_free(20300) else free_port()
        # Only what a user may set; DEFAULT_MODEL is added once the offline model is in the volume.
        super().__init__(engine, folder, CPU, {"AUTH_PORT": str(self.port)})
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = ""

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture(scope="module")
def stack(engine, clone, tmp_path_factory):
    s = Stack(engine, clone)
    s("down", "-v", "--remove-orphans", check=False)  # what an interrupted earlier run left
    yield s
    logs = tmp_path_factory.mktemp("stack-logs")
    for service in ("mvp-bridge", "mvp-auth"):
        (logs / f"{service}.log").write_text(s("logs", "--no-color", service, check=False).stdout)
    if not os.environ.get("KEEP_STACK"):  # KEEP_STACK=1: leave it running to look at after a failure
        s("down", "-v", check=False)


# --- configuration, as Compose itself resolves it -----------------------------------------------

def resolved(engine: DockerEngine, clone: Path, *files: str) -> dict:
    """`docker compose config` with none of the compose files' variables set."""
    names = set()
    for f in files:
        names |= set(re.findall(r"\$\{(\w+)", (clone / f).read_text()))
    env = {k: v for k, v in os.environ.items() if k not in names}
    run = subprocess.run(["docker", "compose", *[x for f in files for x in ("-f", f)], "config", "--format", "json"],
                         cwd=clone, env={**env, "DOCKER_HOST": engine.env["DOCKER_HOST"]}, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


# Empty means "none" for these, and the services read it so (the stack below starts with them empty).
MAY_BE_EMPTY = {"PRELOAD_MODELS", "CORS_ORIGINS"}


@pytest.mark.parametrize("files", [["docker-compose.yml"], CPU, ["docker-compose.yml", "docker-compose.gpus.yml"]],
                         ids=["gpu", "cpu", "two-gpus"])
def test_compose_resolves_no_empty_override(engine, clone, files):
    """No `${VAR:-}` can turn into an empty build argument (an empty SHERPA_ONNX_SHA256 replaced the
    Dockerfile's pinned checksum and failed the build) or an empty setting a service would misread."""
    config = resolved(engine, clone, *files)
    for name, service in config["services"].items():
        args = (service.get("build") or {}).get("args") or {}
        assert not [k for k, v in args.items() if v in ("", None)], (name, args)
        assert "SHERPA_ONNX_SHA256" not in args  # the Dockerfile's pinned checksum is the one used
        empty = {k for k, v in (service.get("environment") or {}).items() if v in ("", None)}
        assert empty <= MAY_BE_EMPTY, (name, empty)
    bridges = {n: s for n, s in config["services"].items() if n.startswith("mvp-bridge")}
    for s in bridges.values():
        assert not s.get("ports")  # the bridge is never published
        devices = (s.get("deploy") or {}).get("resources", {}).get("reservations", {}).get("devices")
        assert (devices is None) == (files == CPU), s.get("deploy")
        assert s["build"]["dockerfile"] == ("Dockerfile.bridge-cpu" if files == CPU else "Dockerfile.bridge")
    assert len(bridges) == (2 if "docker-compose.gpus.yml" in files else 1)
    assert [p["target"] for p in config["services"]["mvp-auth"]["ports"]] == [20300]


def test_the_gpu_image_builds_up_to_the_engine_download(engine, clone):
    """`docker compose build` of the GPU bridge on a stand-in CUDA base: every step before the
    engine's download from GitHub runs (packages, Python); the download itself cannot run here."""
    gpu = Compose(engine, clone, ["docker-compose.yml"], {})
    run = gpu("--progress", "plain", "build", "mvp-bridge", check=False, timeout=1200)
    out = run.stdout + run.stderr
    if run.returncode == 0:  # GitHub reachable (not where CI runs): the tarball came and was verified
        print("GPU image: built, the engine's tarball downloaded and checked against the pinned sha256")
        return
    assert "Could not resolve host: github.com" in out, out[-3000:]
    failed = re.findall(r"> \[mvp-bridge +(\d+)/(\d+)\] RUN (.*)", out)
    assert failed, out[-3000:]
    step, total, command = failed[0]
    assert "sherpa-onnx-v1.13.3-cuda" in command and "curl" in command, command
    # The checksum the build really checks against is the Dockerfile's pin, not an empty override.
    assert 'echo "ebf265973f241e1c203ae3262d2e642b4cf11d97763968f2bcb33416405521e8  /tmp/sherpa.tar.bz2"' in command
    # Every step before it (the system packages the image installs) completed.
    assert int(step) > 1 and re.search(r"\[mvp-bridge +\d+/\d+\] RUN apt-get update", out)
    print(f"GPU image: build stopped at step {step}/{total} (the engine tarball's download from GitHub, "
          "unreachable here); every earlier step ran")


# --- the no-GPU stack, with the README's commands ------------------------------------------------

def wait_for(predicate, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def test_first_start_without_a_model_says_what_to_do_and_the_proxy_runs(stack):
    """`up -d --build` from a clean clone, with no network for the model: the bridge's log carries
    the entrypoint's message, and the proxy is running (not left "Created"), answering 503."""
    started = time.monotonic()
    stack("up", "-d", "--build", timeout=1800)
    print(f"up -d --build: {time.monotonic() - started:.0f} s")
    wait_for(lambda: "could not fetch model parakeet-tdt-0.6b-v2-int8" in stack.logs("mvp-bridge"), 180,
             "the entrypoint's message for the default model")
    log = stack.logs("mvp-bridge")
    assert "HF_ENDPOINT" in log and "docker compose cp ./models/parakeet-tdt-0.6b-v2-int8 mvp-bridge:/models/" in log
    assert stack.inspect("mvp-auth")["State"]["Running"]
    r = wait_for(lambda: _get(stack.url + "/health"), 60, "the proxy on the published port")
    assert r.status_code == 503 and r.headers.get("retry-after"), r.text
    # The image of the proxy holds none of the bridge's dependencies (engine, decoder, downloader).
    probe = "import importlib.util as u; print([m for m in ('sherpa_onnx', 'av', 'numpy', 'huggingface_hub') " \
            "if u.find_spec(m)])"
    assert stack.engine.docker("run", "--rm", "mvp-stt/auth:latest", "python", "-c", probe).stdout.strip() == "[]"
    sizes = {img: int(stack.engine.docker("image", "inspect", "--format", "{{.Size}}", img).stdout) // 2**20
             for img in ("mvp-stt/auth:latest", "mvp-stt/bridge-cpu:latest", "python:3.11-slim")}
    print(f"image sizes (MiB; the python base is a stand-in): {sizes}")


def _get(url: str, **kw) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=10, **kw)
    except httpx.HTTPError:
        return None


def test_a_model_copied_into_the_volume_starts_the_stack(stack, tmp_path):
    """The README's offline path: the model prepared where it can be (here from the PyPI package)
    and copied into the volume; the bridge restarts by itself and both services become healthy."""
    stack.env["DEFAULT_MODEL"] = MOONSHINE.id
    stack("up", "-d")  # the README's "another model by default"
    wait_for(lambda: f"could not fetch model {MOONSHINE.id}" in stack.logs("mvp-bridge"), 120,
             "the message for the missing Moonshine model")
    models = tmp_path / "models"
    run = subprocess.run([sys.executable, "-m", "bridge", "models", "prepare", MOONSHINE.id],
                         env={**os.environ, "MODELS_DIR": str(models)}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    stack("cp", str(models / MOONSHINE.id), "mvp-bridge:/models/")
    stack.wait_healthy("mvp-bridge", "mvp-auth", timeout=240)
    health = httpx.get(stack.url + "/health", timeout=10).json()
    assert health["status"] == "ready" and health["bridge"]["model"] == MOONSHINE.id, health


def test_only_the_proxy_is_published_and_everything_runs_as_10001(stack):
    bridge, auth = stack.inspect("mvp-bridge"), stack.inspect("mvp-auth")
    assert not any(bridge["NetworkSettings"]["Ports"].values()), bridge["NetworkSettings"]["Ports"]
    published = {k: v for k, v in auth["NetworkSettings"]["Ports"].items() if v}
    assert list(published) == ["20300/tcp"] and {b["HostPort"] for b in published["20300/tcp"]} == {str(stack.port)}
    for service in ("mvp-bridge", "mvp-auth"):
        top = stack.engine.docker("top", stack.container(service), "-eo", "pid,uid,args").stdout.splitlines()[1:]
        procs = [line.split(None, 2)[1:] for line in top]
        assert procs and all(uid == "10001" for uid, _ in procs), (service, top)
        if service == "mvp-bridge":
            assert any(ENGINE_BINARY in args for _, args in procs), top
            # The engine's WebSocket port, whatever it is, is bound inside the container only.
            engine_port = re.search(rf"{ENGINE_BINARY} --port=(\d+)", "\n".join(a for _, a in procs)).group(1)
            assert engine_port not in json.dumps(bridge["NetworkSettings"]["Ports"])


def test_keys_added_with_the_readme_command_work_at_once(stack):
    os.chown(stack.folder / "api-keys.json", 10001, -1)  # the README's `sudo chown 10001 api-keys.json`
    assert httpx.get(stack.url + "/v1/models", headers={"Authorization": "Bearer sk-nope"}).status_code == 401
    run = stack("exec", "-T", "mvp-auth", "python", "-m", "auth_proxy", "keys", "add", "alice")
    stack.key = run.stdout.strip()
    assert stack.key.startswith("sk-") and "shown only this once" in run.stderr
    on_host = json.loads((stack.folder / "api-keys.json").read_text())  # the bind-mounted file, edited in place
    assert [k["name"] for k in on_host["keys"]][-1] == "alice" and stack.key not in json.dumps(on_host)
    r = wait_for(lambda: (_get(stack.url + "/v1/models", headers=stack.auth()) or httpx.Response(0)).status_code
                 == 200, 5, "the new key to be accepted")
    assert r


FORMATS = ["json", "text", "srt", "vtt", "verbose_json"]


def check_format(fmt: str, body: str, ref: str) -> str:
    """The text of an answer in ``fmt``, after checking its shape."""
    if fmt == "json":
        return json.loads(body)["text"]
    if fmt == "verbose_json":
        data = json.loads(body)
        assert data["segments"] and data["duration"] == pytest.approx(10.4, abs=0.2)
        return data["text"]
    if fmt == "srt":
        cues = list(srt.parse(body))
        assert cues and cues[-1].end.total_seconds() <= 10.6
        return " ".join(c.content for c in cues)
    if fmt == "vtt":
        import io

        cues = list(webvtt.from_buffer(io.StringIO(body)))
        assert cues
        return " ".join(c.text for c in cues)
    return body


def test_transcription_from_the_host_with_curl_and_the_openai_sdk(stack, tmp_path):
    audio = LIBRISPEECH / f"{CLEAN}.flac"
    ref = reference(CLEAN)
    texts = {}
    for fmt in FORMATS:
        run = subprocess.run(["curl", "-sS", "--fail-with-body", f"{stack.url}/v1/audio/transcriptions",
                              "-H", f"Authorization: Bearer {stack.key}", "-F", f"file=@{audio}",
                              "-F", f"response_format={fmt}"], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        texts[f"curl {fmt}"] = check_format(fmt, run.stdout, ref)
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.key, max_retries=0, timeout=300)
    for fmt in FORMATS:
        with audio.open("rb") as fh:
            answer = client.audio.transcriptions.create(model="whisper-1", file=fh, response_format=fmt)
        body = answer if isinstance(answer, str) else answer.model_dump_json()
        texts[f"sdk {fmt}"] = check_format(fmt, body, ref)
    with audio.open("rb") as fh:
        events = list(client.audio.transcriptions.create(model="whisper-1", file=fh, stream=True))
    assert events[-1].type == "transcript.text.done" and any(e.type == "transcript.text.delta" for e in events)
    texts["sdk stream"] = events[-1].text
    for how, text in texts.items():
        assert wer(ref, text) <= 0.15, (how, text)
    assert texts["curl json"] == texts["sdk json"] == texts["curl text"].strip() == texts["sdk stream"]


def test_a_live_session_through_the_published_port(stack):
    completed = live_turns(stack.url, stack.key, pcm24(LIBRISPEECH / f"{CLEAN}.flac", silence_after=2))
    assert completed and wer(reference(CLEAN), " ".join(completed)) <= 0.2, completed


def usage_total(stack: Stack) -> tuple[int, float]:
    totals = httpx.get(stack.url + "/v1/usage", headers=stack.auth(), timeout=10).json()["totals"]
    return sum(t["requests"] for t in totals), sum(t["audio_seconds"] for t in totals)


def models_in_volume(stack: Stack) -> str:
    """Each complete model in the volume (the folders with the store's marker), with the inode and
    mtime of its files: a second copy or a fetch again would change them."""
    return stack("exec", "-T", "mvp-bridge", "sh", "-c",
                 "cd /models && for m in */.complete.json; do stat -c '%n %i %Y' \"$(dirname $m)\"/*; done").stdout


@pytest.mark.parametrize("how", ["restart", "down-up"])
def test_usage_keys_and_the_model_survive(stack, how):
    before, models = usage_total(stack), models_in_volume(stack)
    assert models.count(MOONSHINE.id + "/") == 3, models
    assert before[0] >= 11 and before[1] > 100, before  # the uploads above
    if how == "restart":
        stack("restart")
    else:
        stack("down")
        stack("up", "-d")
    stack.wait_healthy("mvp-bridge", "mvp-auth", timeout=240)
    assert usage_total(stack) == before
    assert models_in_volume(stack) == models  # the one copy, not fetched or copied again
    # The last start found the model where it was (the entrypoint's later lines are about the
    # optional diarization models, which cannot be fetched here).
    last_start = stack.logs("mvp-bridge").rsplit(f"entrypoint: model {MOONSHINE.id} ", 1)[-1]
    assert last_start.startswith("is present"), last_start[:300]


def long_recording(tmp_path: Path, seconds: float = 90) -> Path:
    """LibriSpeech utterances joined until ``seconds`` of speech."""
    parts: list[np.ndarray] = []
    for flac in sorted(LIBRISPEECH.glob("*.flac")):
        parts.append(librispeech_samples(flac.stem))
        if sum(map(len, parts)) >= seconds * 16000:
            break
    return write_wav16(tmp_path / "long.wav", np.concatenate(parts))


def engines_of_10001() -> list[int]:
    """Engine processes of the containers' user still alive anywhere on this host (the suite's own
    engines run as this user, not 10001)."""
    return [p.pid for p in psutil.process_iter(["name", "uids"])
            if p.info["name"] and ENGINE_BINARY.startswith(p.info["name"]) and p.info["uids"]
            and p.info["uids"].real == 10001]


def test_stop_during_a_transcription_is_clean(stack, tmp_path):
    audio = long_recording(tmp_path)
    result: dict = {}

    def upload() -> None:
        try:
            with audio.open("rb") as fh:
                result["r"] = httpx.post(stack.url + "/v1/audio/transcriptions", headers=stack.auth(),
                                         files={"file": ("long.wav", fh)}, timeout=120)
        except httpx.HTTPError as exc:
            result["exc"] = exc

    assert engines_of_10001()
    thread = threading.Thread(target=upload)
    thread.start()
    wait_for(lambda: "POST /v1/audio/transcriptions" in stack.logs("mvp-auth")[-20000:] or
             "pieces" in stack.logs("mvp-bridge")[-5000:], 30, "the upload to reach the stack", every=0.2)
    time.sleep(1.0)
    started = time.monotonic()
    stack("stop")
    took = time.monotonic() - started
    thread.join(150)
    for service in ("mvp-auth", "mvp-bridge"):  # each stopped within its stop_grace_period, not killed (137)
        state = stack.inspect(service)["State"]
        assert state["ExitCode"] == 0 and not state["OOMKilled"], (service, state)
    assert not engines_of_10001()
    assert re.search(r"engine pid \d+ stopped", stack.logs("mvp-bridge").rsplit("entrypoint:", 1)[-1])
    if "r" in result:  # finished, or a clean error in OpenAI's shape (503 shutting_down: the SDKs retry it)
        r = result["r"]
        if r.status_code != 200:
            assert_openai_error(r, 503)
            assert r.headers.get("retry-after"), r.headers
        else:
            assert r.json()["text"]
    else:
        pytest.fail(f"the upload got no answer: {result['exc']!r}")
    print(f"docker compose stop during a 90 s upload: {took:.1f} s; the upload got {result['r'].status_code}")
    stack("up", "-d")
    stack.wait_healthy("mvp-bridge", "mvp-auth", timeout=240)


def test_a_killed_or_crashed_bridge_the_proxy_says_retry_and_it_comes_back(stack):
    """`docker kill`: Docker counts it as a manual stop, so the restart policy leaves the bridge down
    (checked here, Docker 20.10) until `docker compose up -d`; meanwhile the proxy answers 503 with
    Retry-After. A crash (the bridge's main process killed from outside, as the OOM killer does) is
    restarted by the policy. Either way the same request then gets 200."""
    audio = LIBRISPEECH / f"{CLEAN}.flac"

    def post() -> httpx.Response:
        with audio.open("rb") as fh:
            return httpx.post(stack.url + "/v1/audio/transcriptions", headers=stack.auth(),
                              files={"file": (audio.name, fh)}, timeout=120)

    def answers() -> httpx.Response | None:
        r = post()
        return r if r.status_code == 200 else None

    stack("up", "-d")  # running and healthy, whatever the test before left
    stack.wait_healthy("mvp-bridge", "mvp-auth", timeout=240)
    stack.engine.docker("kill", stack.container("mvp-bridge"))
    r = post()
    assert r.status_code == 503 and r.headers.get("retry-after") and r.json()["error"], r.text
    time.sleep(3)
    assert stack.inspect("mvp-bridge")["State"]["Status"] == "exited"
    stack("up", "-d")
    ok = wait_for(answers, 180, "the bridge started again by up -d", every=2)
    assert wer(reference(CLEAN), ok.json()["text"]) <= 0.15

    restarts = stack.inspect("mvp-bridge")["RestartCount"]
    os.kill(stack.inspect("mvp-bridge")["State"]["Pid"], 9)  # a crash: not a stop Docker was asked for
    r = post()
    assert r.status_code == 503 and r.headers.get("retry-after") and r.json()["error"], r.text
    ok = wait_for(answers, 180, "the restart policy to bring the bridge back", every=2)
    assert wer(reference(CLEAN), ok.json()["text"]) <= 0.15
    assert stack.inspect("mvp-bridge")["RestartCount"] == restarts + 1
