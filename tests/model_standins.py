"""The test stand-ins of models that cannot be downloaded here, as catalog entries and installed
in a model store: the two diarization models (``../shared/models/diarization/``) and the tiny-tdt
transducer (``../shared/models/tiny-tdt/``). Plain code (no pytest): the benches use them too."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from bridge.models.catalog import BUILTIN_MODELS, ModelFile, ModelSpec
from bridge.models.model_store import ModelStore

SHARED_MODELS = Path(__file__).resolve().parent.parent.parent / "shared" / "models"
STANDINS = SHARED_MODELS / "diarization"
TINY_TDT = SHARED_MODELS / "tiny-tdt"


def standin_spec(model_id: str, kind: Literal["segmentation", "embedding"], name: str) -> ModelSpec:
    data = (STANDINS / name).read_bytes()
    return ModelSpec(id=model_id, kind=kind, description=f"test stand-in: {name}", languages=[],
                     source="huggingface", repo_id=f"test/{model_id}", revision="main",
                     files=[ModelFile(name=name, size=len(data), sha256=hashlib.sha256(data).hexdigest())])


def diarization_standins() -> list[ModelSpec]:
    """Catalog entries of the two diarization stand-ins: segmentation, then embedding."""
    return [standin_spec("test-segmentation", "segmentation", "pyannote-segmentation-3.0-sherpa.onnx"),
            standin_spec("test-embedding", "embedding", "resemblyzer-ge2e-fbank80-sherpa.onnx")]


PARAKEET_V2 = next(m for m in BUILTIN_MODELS if m.id == "parakeet-tdt-0.6b-v2-int8")
PARAKEET_V3 = next(m for m in BUILTIN_MODELS if m.id == "parakeet-tdt-0.6b-v3-int8")


def tiny_tdt_spec(model_id: str, production: ModelSpec = PARAKEET_V2) -> ModelSpec:
    """A production parakeet entry (its flags, file names, piece length, word times, keywords) whose
    files are the tiny-tdt stand-in's: the real engine runs it on the CPU (random weights)."""
    files = []
    for f in production.files:
        data = (TINY_TDT / f.name).read_bytes()
        files.append(ModelFile(name=f.name, size=len(data), sha256=hashlib.sha256(data).hexdigest()))
    return production.model_copy(update={"id": model_id, "description": f"test: tiny-tdt as {production.id}",
                                         "repo_id": f"test/{model_id}", "files": files, "size_mb": 0})


def install_standin(store: ModelStore, spec: ModelSpec, source: Path = TINY_TDT) -> None:
    """Put a stand-in's files from ``source`` into ``store`` and mark them verified."""
    folder = store.path_for(spec.id)
    folder.mkdir(parents=True, exist_ok=True)
    for f in spec.files:
        (folder / f.name).write_bytes((source / f.name).read_bytes())
    store._verify_and_mark(spec, folder)
