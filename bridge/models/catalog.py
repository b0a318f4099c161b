"""The model catalog: the one place that says which models exist, where they come from, which
files they need and how the engine is told to load them.

Extra entries (a custom export, or a test catalog) come from the JSON list in ``CATALOG_FILE``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, TypeAdapter, field_validator

from bridge.ports import EngineModel

MODEL_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class ModelFile(BaseModel):
    name: str
    size: int | None = None  # bytes; checked after download when known
    sha256: str | None = None  # checked after download when known
    # pypi: made at install from this file of the package (bridge.models.ort_convert: .ort -> .onnx)
    converted_from: str | None = None

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if "/" in value or "\\" in value or value in ("", ".", "..") or value.startswith("."):
            raise ValueError("model file names are plain names inside the model's folder")
        return value


class ModelSpec(BaseModel):
    id: str
    description: str
    # "asr": a transcription model the engine loads; "segmentation" and "embedding": the two models
    # of speaker diarization (bridge.diarization), run by the bridge itself, never switched to.
    kind: Literal["asr", "segmentation", "embedding"] = "asr"
    languages: list[str]
    source: Literal["huggingface", "pypi"]
    repo_id: str | None = None  # huggingface: "owner/name"
    revision: str = "main"  # huggingface: pinned commit where known
    pypi_package: str | None = None  # pypi: the package that ships the files
    pypi_subdir: str | None = None  # pypi: folder inside the installed package
    files: list[ModelFile]
    # engine flag -> file name in the model's folder, e.g. {"--encoder": "encoder.int8.onnx"}
    file_flags: dict[str, str] = Field(default_factory=dict)
    extra_flags: dict[str, str] = Field(default_factory=dict)
    # Longest piece of audio the bridge sends to the engine in one go.
    max_piece_seconds: float = 30.0
    # Whether the engine returns token timestamps (words and refined segments are built from them).
    token_timestamps: bool = False
    # Whether the engine decodes several waiting pieces in one batched model run. sherpa-onnx
    # batches transducers (parakeet); for Moonshine it runs a "batch" one piece after another on
    # one thread, so the bridge sets --max-batch-size=1 and the pieces run side by side instead.
    engine_batches: bool = False
    # Whether the engine reports each token's log-probability (sherpa-onnx's ``ys_log_probs``: its
    # transducer decoders fill it, greedy and beam search; Moonshine, Whisper and CTC models do not).
    token_logprobs: bool = False
    # Whether decoding can be biased towards a request's ``keywords[]`` (sherpa-onnx's hotwords: its
    # transducer decoders with modified_beam_search; bridge.keywords).
    keywords: bool = False
    # Whether the model translates speech into English (``/v1/audio/translations``).
    translates: bool = False
    precision: str = "int8"
    size_mb: int = 0
    created: int = 1735689600  # for the OpenAI list shape: when this catalog entry was added

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        if not MODEL_ID_RE.match(value):
            raise ValueError(f"model id {value!r} must match {MODEL_ID_RE.pattern}")
        return value

    def engine_flags(self, model_dir: Path) -> list[str]:
        flags = [f"{flag}={model_dir / name}" for flag, name in self.file_flags.items()]
        flags += [f"{flag}={value}" for flag, value in self.extra_flags.items()]
        return flags

    def engine_model(self, model_dir: Path) -> EngineModel:
        """What the engine is told about this model (the port's view of a catalog entry)."""
        tokens = self.file_flags.get("--tokens")
        return EngineModel(id=self.id, flags=tuple(self.engine_flags(model_dir)),
                           max_piece_seconds=self.max_piece_seconds, token_timestamps=self.token_timestamps,
                           batches=self.engine_batches, languages=tuple(self.languages),
                           token_logprobs=self.token_logprobs, keywords=self.keywords,
                           tokens_file=str(model_dir / tokens) if tokens else "",
                           # sherpa-onnx reads these models' token tables as base64 (its symbol table)
                           tokens_base64=any(f.startswith(("--moonshine", "--whisper")) for f in self.file_flags))


def _parakeet(version: str, languages: list[str], revision: str, files: list[ModelFile],
              precision: str = "int8") -> ModelSpec:
    """A sherpa-onnx export of parakeet TDT 0.6B: int8 (small; on CUDA its encoder's uint8 matmuls
    run on the CPU) or fp32 (for CUDA hosts; the encoder's weights in an external file that must
    lie beside it as ``encoder.weights``)."""
    suffix = ".int8" if precision == "int8" else ""
    return ModelSpec(
        id=f"parakeet-tdt-0.6b-{version}-{precision}",
        description=f"NVIDIA Parakeet TDT 0.6B {version} ({precision} sherpa-onnx export)",
        languages=languages,
        source="huggingface",
        repo_id=f"csukuangfj/sherpa-onnx-nemo-parakeet-tdt-0.6b-{version}" + ("-int8" if precision == "int8" else ""),
        revision=revision,
        files=files,
        file_flags={
            "--encoder": f"encoder{suffix}.onnx",
            "--decoder": f"decoder{suffix}.onnx",
            "--joiner": f"joiner{suffix}.onnx",
            "--tokens": "tokens.txt",
        },
        extra_flags={"--model-type": "nemo_transducer", "--decoding-method": "greedy_search"},
        # The exported encoder fails on single passes of roughly 400 s; stay well under that.
        max_piece_seconds=120.0,
        token_timestamps=True,
        engine_batches=True,
        token_logprobs=True,
        keywords=True,
        precision=precision,
        size_mb=sum(f.size or 0 for f in files) // 10**6,
    )


_V3_LANGUAGES = (
    "bg,cs,da,de,el,en,es,et,fi,fr,hr,hu,it,lt,lv,mt,nl,pl,pt,ro,ru,sk,sl,sv,uk".split(",")
)

BUILTIN_MODELS: list[ModelSpec] = [
    # v2 at revision 1ab9323 of csukuangfj/sherpa-onnx-nemo-parakeet-tdt-0.6b-v2-int8: sizes and
    # sha256 of each file as the hub lists them (tokens.txt is a plain git file there, not LFS, so the
    # hub shows a git blob id for it; the sha256 below is of its bytes).
    _parakeet(
        "v2",
        ["en"],
        "1ab9323565ddb038682214b292f588070a538ce2",
        [
            ModelFile(
                name="encoder.int8.onnx",
                size=652_184_296,
                sha256="a32b12d17bbbc309d0686fbbcc2987b5e9b8333a7da83fa6b089f0a2acd651ab",
            ),
            ModelFile(
                name="decoder.int8.onnx",
                size=7_257_753,
                sha256="b6bb64963457237b900e496ee9994b59294526439fbcc1fecf705b31a15c6b4e",
            ),
            ModelFile(
                name="joiner.int8.onnx",
                size=1_739_080,
                sha256="7946164367946e7f9f29a122407c3252b680dbae9a51343eb2488d057c3c43d2",
            ),
            ModelFile(
                name="tokens.txt",
                size=9_384,
                sha256="ec182b70dd42113aff6c5372c75cac58c952443eb22322f57bbd7f53977d497d",
            ),
        ],
    ),
    _parakeet(
        "v3",
        _V3_LANGUAGES,
        "2bda32ec70b097a55adaa07d9a7173915b43cc78",
        [
            ModelFile(
                name="encoder.int8.onnx",
                size=652_184_281,
                sha256="acfc2b4456377e15d04f0243af540b7fe7c992f8d898d751cf134c3a55fd2247",
            ),
            ModelFile(
                name="decoder.int8.onnx",
                size=11_845_275,
                sha256="179e50c43d1a9de79c8a24149a2f9bac6eb5981823f2a2ed88d655b24248db4e",
            ),
            ModelFile(
                name="joiner.int8.onnx",
                size=6_355_277,
                sha256="3164c13fc2821009440d20fcb5fdc78bff28b4db2f8d0f0b329101719c0948b3",
            ),
            ModelFile(
                name="tokens.txt",
                size=93_939,
                sha256="d58544679ea4bc6ac563d1f545eb7d474bd6cfa467f0a6e2c1dc1c7d37e3c35d",
            ),
        ],
    ),
    # fp32 exports, for CUDA hosts: pinned as public projects that download them at a fixed revision
    # do (the v2 decoder and joiner from one source only; not downloaded from here: no network).
    _parakeet(
        "v2",
        ["en"],
        "86891485dd8ad7cb28cb1aade45c3e23d0197c30",
        [
            ModelFile(name="encoder.onnx", size=41_766_257,
                      sha256="7ce8d2b3f45fcd3b553d3b7a188436db7748c271081cc004f28bf76f3df01893"),
            ModelFile(name="encoder.weights", size=2_435_420_160,
                      sha256="90cd4bb6c9b60496d49be9bec3a844f4e9bf22c62a45ea93f391cc00f9a47cfe"),
            ModelFile(name="decoder.onnx", size=28_883_663,
                      sha256="0140d12782ccf550a9709f03a52c2782b3c54d045f47ce14af39c713ab42de7f"),
            ModelFile(name="joiner.onnx", size=6_907_576,
                      sha256="a9e57e488cd1016cbefd51f60712896af6590e3f61ff466a540e085bbd6af59e"),
            ModelFile(name="tokens.txt", size=9_384,
                      sha256="ec182b70dd42113aff6c5372c75cac58c952443eb22322f57bbd7f53977d497d"),
        ],
        precision="fp32",
    ),
    _parakeet(
        "v3",
        _V3_LANGUAGES,
        "1a468a35cbba69418f126de829e75261dea4a4e4",
        [
            ModelFile(name="encoder.onnx", size=41_766_257,
                      sha256="3eed7ce424bf8339ad09233533c687e2dbd07e74ccf5027b5e7344019ea373b0"),
            ModelFile(name="encoder.weights", size=2_435_420_160,
                      sha256="3af3f51af5f2d01dbbf5af47d42c7962a2c205f11004254bb4f2b979862f39a8"),
            ModelFile(name="decoder.onnx", size=47_233_743,
                      sha256="d593cdb0e571f5a457ec2219af9968cbf6b0e8198e8f7839b40a8754593bf68c"),
            ModelFile(name="joiner.onnx", size=25_286_330,
                      sha256="b9b0bcf88ac571902e69a6536223ed2d94885e981b85045410f1403d53121a63"),
            ModelFile(name="tokens.txt", size=93_939,
                      sha256="d58544679ea4bc6ac563d1f545eb7d474bd6cfa467f0a6e2c1dc1c7d37e3c35d"),
        ],
        precision="fp32",
    ),
    ModelSpec(
        id="moonshine-base-en",
        description="Moonshine base, English (from the moonshine-cpp PyPI package; runs on CPU)",
        languages=["en"],
        source="pypi",
        pypi_package="moonshine_cpp",
        pypi_subdir="models/base-en",
        # The package's .ort files rewritten as ONNX at install, so that onnxruntime folds their
        # int8 weights into float32 once instead of on every decoder step: 5x faster on CPU, the
        # same text (bridge/models/ort_convert.py, bench/README.md "Where Moonshine's time went").
        files=[
            ModelFile(name="encoder_model.onnx", converted_from="encoder_model.ort"),
            ModelFile(name="decoder_model_merged.onnx", converted_from="decoder_model_merged.ort"),
            ModelFile(name="tokens.txt"),
        ],
        file_flags={
            "--moonshine-encoder": "encoder_model.onnx",
            "--moonshine-merged-decoder": "decoder_model_merged.onnx",
            "--tokens": "tokens.txt",
        },
        max_piece_seconds=30.0,
        token_timestamps=False,
        precision="fp32",
        size_mb=356,
    ),
]


def _diarization_model(model_id: str, kind: Literal["segmentation", "embedding"], description: str,
                       repo_id: str, revision: str, file: ModelFile) -> ModelSpec:
    return ModelSpec(id=model_id, kind=kind, description=description, languages=[], source="huggingface",
                     repo_id=repo_id, revision=revision, files=[file], precision="fp32",
                     size_mb=(file.size or 0) // 10**6)


# Speaker diarization's production models, pinned as several public projects that download them
# pin them (not downloaded from here: no network; check them when a network allows).
DIARIZATION_MODELS: list[ModelSpec] = [
    _diarization_model(
        "pyannote-segmentation-3.0", "segmentation",
        "pyannote segmentation 3.0 (speaker turns; MIT), sherpa-onnx export",
        "csukuangfj/sherpa-onnx-pyannote-segmentation-3-0", "9403a6902bb58e3d5ae8c7e77c3422de279db2e0",
        ModelFile(name="model.onnx", size=5_992_913,
                  sha256="220ad67ca923bef2fa91f2390c786097bf305bceb5e261d4af67b38e938e1079")),
    _diarization_model(
        "3dspeaker-campplus-en-voxceleb", "embedding",
        "3D-Speaker CAM++ speaker embeddings, English VoxCeleb (Apache-2.0)",
        "csukuangfj/speaker-embedding-models", "0743f301363dec56491a490f6d6cbc9d67f9a3bf",
        ModelFile(name="3dspeaker_speech_campplus_sv_en_voxceleb_16k.onnx", size=29_596_978,
                  sha256="357a834f702b80161e5b981182c038e18553c1f2ca752ed6cec2052365d4129b")),
]
BUILTIN_MODELS += DIARIZATION_MODELS


class UnknownModelError(KeyError):
    pass


class Catalog:
    def __init__(self, models: list[ModelSpec]) -> None:
        self._models: dict[str, ModelSpec] = {}
        for spec in models:
            self._models[spec.id] = spec

    @classmethod
    def load(cls, extra_file: Path | None = None) -> Catalog:
        models = list(BUILTIN_MODELS)
        if extra_file is not None:
            raw = json.loads(Path(extra_file).read_text())
            models += TypeAdapter(list[ModelSpec]).validate_python(raw)
        return cls(models)

    def get(self, model_id: str) -> ModelSpec:
        try:
            return self._models[model_id]
        except KeyError:
            raise UnknownModelError(model_id) from None

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._models

    def all(self) -> list[ModelSpec]:
        return list(self._models.values())

    def transcription_models(self) -> list[ModelSpec]:
        """The models the engine can load (what /v1/models lists and a switch may name)."""
        return [m for m in self._models.values() if m.kind == "asr"]
