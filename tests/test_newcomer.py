"""The README's path for a newcomer, run as written: the local stack, then the key commands from
another terminal, against the same key file; the repository is left as it was."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid

import httpx
import pytest

from tests.conftest import ROOT, free_port


def readme_commands(word: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Keys\n"):text.index("## Configuration")]
    return [line.split("#")[0].strip() for line in section.splitlines() if f"auth_proxy keys {word}" in line]


def git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def local_stack():
    bridge_port, auth_port = free_port(), free_port()
    env = {**os.environ, "BRIDGE_PORT": str(bridge_port), "AUTH_PORT": str(auth_port),
           "BRIDGE_METRICS_PORT": str(free_port()), "AUTH_METRICS_PORT": str(free_port())}
    for name in ("API_KEYS_FILE", "USAGE_DB", "USAGE_JSON", "MODELS_DIR", "DEFAULT_MODEL"):
        env.pop(name, None)  # the defaults, as a newcomer has them
    proc = subprocess.Popen(["bash", "scripts/run-local.sh"], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{auth_port}"
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as the README says
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_readme_key_commands_work_against_the_local_stack(local_stack):
    before = git_status()
    name = f"newcomer-{uuid.uuid4().hex[:8]}"
    [add] = readme_commands("add")
    assert add.startswith(".venv/bin/python -m auth_proxy keys add alice")
    env = {k: v for k, v in os.environ.items() if k != "API_KEYS_FILE"}
    run = subprocess.run(["bash", "-c", re.sub(r"\balice\b", name, add)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    key = run.stdout.strip()
    assert key.startswith("sk-")
    headers = {"Authorization": f"Bearer {key}"}
    deadline = time.monotonic() + 10  # the proxy notices the changed file within a second or so
    while (r := httpx.get(local_stack + "/v1/models", headers=headers, timeout=10)).status_code != 200:
        assert r.status_code == 401 and time.monotonic() < deadline, r.text
        time.sleep(0.3)
    [listed] = readme_commands("list")
    assert name in subprocess.run(["bash", "-c", listed], cwd=ROOT, env=env, capture_output=True, text=True).stdout
    [revoke] = readme_commands("revoke")
    subprocess.run(["bash", "-c", re.sub(r"\balice\b", name, revoke)], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=60)
    deadline = time.monotonic() + 10
    while httpx.get(local_stack + "/v1/models", headers=headers, timeout=10).status_code != 401:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert git_status() == before  # the tracked example api-keys.json and everything else untouched


def readme_live_snippet() -> str:
    """The README's live dictation example (the Python block that opens a realtime connection)."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    [snippet] = [b for b in blocks if "client.realtime.connect" in b and "meeting.m4a" in b]
    return snippet


def test_readme_live_example_runs_as_written(local_stack, tmp_path):
    """The live dictation example, run as written (only the port is this stack's): a recording
    read from a file goes through a live session, and the words come out as deltas and in full."""
    from tests.helpers import wer
    from tests.speech import ffmpeg_convert, librispeech_samples, librispeech_text, write_wav16

    utterance = "1089-134686-0000"
    ffmpeg_convert(write_wav16(tmp_path / "speech.wav", librispeech_samples(utterance)), tmp_path / "meeting.m4a")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "local-key.txt").write_text((ROOT / "data" / "local-key.txt").read_text())
    snippet = readme_live_snippet().replace("http://127.0.0.1:20300", local_stack)
    run = subprocess.run([str(ROOT / ".venv/bin/python"), "-c", snippet], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    streamed, completed = run.stdout.rstrip("\n").rsplit("\n", 1)
    assert wer(librispeech_text(utterance), completed) <= 0.2, run.stdout
    assert wer(completed, streamed) <= 0.1, run.stdout  # the deltas, printed as they came, join to the turn
