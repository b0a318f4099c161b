"""Test plumbing for the container tests: a private Docker engine (Debian's dockerd, started as root
on its own data root and socket), Compose v2, and stand-ins for the base images that Docker Hub
would give (it cannot be reached here). The Dockerfiles and compose files are used exactly as a
user runs them; nothing here changes them.

Set ``DOCKER_TESTS_DIR`` to keep the engine's images between runs (default: ``.cache/docker`` in the
repository, so a second local run reuses the stand-ins and the layer cache)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STANDINS = Path(__file__).resolve().parent / "standins"
DEBIAN_STANDIN = "mvp-standin/debian:bookworm"
# The bases the Dockerfiles name, and the stand-in Dockerfile that plays each one here.
BASES = {
    "python:3.11-slim": "python-3.11-slim.Dockerfile",
    "nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04": "cuda-runtime.Dockerfile",
}
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class DockerUnavailable(Exception):
    """Why the container tests cannot run on this machine (printed as the skip reason)."""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


class DockerEngine:
    """dockerd on a private socket, started here and stopped (by its pid) at the end."""

    def __init__(self) -> None:
        self.base = Path(os.environ.get("DOCKER_TESTS_DIR", ROOT / ".cache" / "docker"))
        self.run_dir = Path("/tmp/mvp-stt-dockerd")  # short: unix socket paths are limited to 107 bytes
        self.socket = self.run_dir / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}"}
        self.proc: subprocess.Popen | None = None

    def start(self) -> DockerEngine:
        if os.geteuid() != 0:
            raise DockerUnavailable("dockerd needs root; run the tests as root to build and run the containers")
        for tool, package in (("dockerd", "docker.io"), ("docker", "docker.io"), ("mmdebstrap", "mmdebstrap")):
            if shutil.which(tool) is None:
                raise DockerUnavailable(f"{tool} is not installed (Debian package {package}; scripts/test.sh "
                                        "installs it)")
        if _run(["docker", "compose", "version"], env=self.env).returncode != 0:
            raise DockerUnavailable("Docker Compose v2 is not installed (scripts/test.sh installs Debian 13's)")
        if self._answers():
            return self  # one started by an earlier run that did not stop it: use it, leave it running
        self.base.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        log = (self.base / "dockerd.log").open("ab")
        self.proc = subprocess.Popen(
            ["dockerd", "--data-root", str(self.base / "data"), "--exec-root", str(self.run_dir / "exec"),
             "-H", f"unix://{self.socket}", "--pidfile", str(self.run_dir / "docker.pid"),
             "--storage-driver", "overlay2"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.base / "dockerd.log").read_text(errors="replace")[-1500:]
                self.stop()
                raise DockerUnavailable(f"dockerd did not start (no overlay2, or no cgroups?):\n{tail}")
            time.sleep(0.3)
        return self

    def _answers(self) -> bool:
        return self.socket.exists() and _run(["docker", "info"], env=self.env, timeout=20).returncode == 0

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def docker(self, *args: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        run = _run(["docker", *args], env={**self.env, **kw.pop("env", {})}, timeout=timeout, **kw)
        if check and run.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed ({run.returncode}):\n{run.stdout[-3000:]}\n"
                                 f"{run.stderr[-3000:]}")
        return run

    def has_image(self, name: str) -> bool:
        return self.docker("image", "inspect", name, check=False).returncode == 0

    def ensure_standins(self) -> None:
        """Stand-ins for the Docker Hub bases, tagged with the names the Dockerfiles use. A base that
        is already in this engine and is not one of ours (a real image) is left alone."""
        if not self.has_image(DEBIAN_STANDIN):
            tar = self.base / "bookworm.tar"
            build = _run(["mmdebstrap", "--variant=minbase", "--include=ca-certificates", "bookworm", str(tar)],
                         timeout=600)
            if build.returncode != 0:
                raise AssertionError(f"mmdebstrap failed:\n{build.stderr[-3000:]}")
            with tar.open("rb") as fh:
                self.docker("import", "-", DEBIAN_STANDIN, stdin=fh)
            tar.unlink()
        context = self.base / "standin-context"
        context.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(CA_BUNDLE, context / "ca.crt")
        for name, dockerfile in BASES.items():
            if self.has_image(name):
                labels = json.loads(self.docker("image", "inspect", "--format", "{{json .Config.Labels}}",
                                                name).stdout) or {}
                if labels.get("org.mvp-stt.standin") != name:
                    continue  # a real base image: use it
            self.docker("build", "-q", "-t", name, "-f", str(STANDINS / dockerfile), str(context))


def clean_clone(dest: Path) -> Path:
    """What a fresh clone of this working tree holds: the files git tracks or would track (no .venv,
    caches, models or data), copied to ``dest``."""
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, check=True)
    dest.mkdir(parents=True, exist_ok=True)
    for name in filter(None, listed.stdout.split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


class Compose:
    """``docker compose -f ... <args>`` run in a folder, as the README writes it."""

    def __init__(self, engine: DockerEngine, folder: Path, files: list[str], env: dict[str, str]) -> None:
        self.engine, self.folder, self.files, self.env = engine, folder, files, env

    def __call__(self, *args: str, check: bool = True, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
        flags = [x for f in self.files for x in ("-f", f)]
        return self.engine.docker("compose", *flags, *args, check=check, timeout=timeout, cwd=self.folder,
                                  env={**self.env, **kw.pop("env", {})}, **kw)

    def container(self, service: str) -> str:
        return self("ps", "-a", "-q", service).stdout.strip()

    def inspect(self, service: str) -> dict:
        return json.loads(self.engine.docker("inspect", self.container(service)).stdout)[0]

    def health(self, service: str) -> str:
        state = self.inspect(service)["State"]
        return state.get("Health", {}).get("Status") or state["Status"]

    def logs(self, service: str) -> str:
        return self("logs", "--no-color", "--no-log-prefix", service).stdout

    def wait_healthy(self, *services: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = {s: self.health(s) for s in services}
            if all(v == "healthy" for v in states.values()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not healthy in {timeout} s: {states}\n" +
                                     "\n".join(f"--- {s}\n{self.logs(s)[-3000:]}" for s in services))
            time.sleep(1)
