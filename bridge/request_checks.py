"""What a request may ask of the loaded model, checked before any audio is decoded: the model it
names (the loaded one or an alias: never a silent answer from another model), a translation, the
language and the languages it may be in, keywords and log-probabilities. Uploads and live
sessions check alike; a refusal is an ``APIError`` naming the field.
"""

from __future__ import annotations

from bridge.ports import EngineModel
from bridge.state import BridgeState
from common.errors import APIError


def check_model(requested: str, loaded: EngineModel, state: BridgeState) -> None:
    """The model a client names must be the loaded one (or an alias of it): never a silent answer
    from another model."""
    settings = state.settings
    if not requested or requested == loaded.id or requested in (*settings.model_aliases, *settings.diarize_aliases):
        return
    switch_hint = f"load it first with POST /v1/models/switch {{\"model_id\": \"{requested}\"}}"
    if requested in state.catalog and not state.store.is_ready(state.catalog.get(requested)):
        # Switching to it would answer 409 (not downloaded): say the step that comes first.
        switch_hint = (f"download it first (python -m bridge models download {requested}; in Docker: docker compose "
                       f"exec mvp-bridge python -m bridge models download {requested}), then {switch_hint}")
    if requested in state.catalog:
        raise APIError(400, f"model {requested!r} is not loaded; the loaded model is {loaded.id!r}. "
                       f"Use {loaded.id!r} (or one of its aliases), or {switch_hint}.",
                       param="model", code="model_not_loaded")
    raise APIError(404, f"model {requested!r} does not exist; the loaded model is {loaded.id!r} "
                   "(see GET /v1/models)", param="model", code="model_not_found")


def check_translates(requested: str, loaded: EngineModel, state: BridgeState) -> None:
    """A translation needs a model that translates (the catalog says which): never a transcription
    in the source language returned as if it were English."""
    model_id = requested if requested in state.catalog else loaded.id
    if model_id in state.catalog and state.catalog.get(model_id).translates:
        return
    able = [m.id for m in state.catalog.transcription_models() if m.translates]
    raise APIError(400, f"model {model_id} cannot translate speech into English; "
                   + (f"models that can: {', '.join(able)}" if able else
                      "no model in this server's catalog translates. Transcribe in the spoken language "
                      "with POST /v1/audio/transcriptions instead"),
                   param="model", code="model_cannot_translate")


def check_logprobs(wanted: bool, spec: EngineModel, state: BridgeState) -> None:
    """``include[]=logprobs`` needs a model whose engine scores its tokens: never an empty list."""
    if wanted and not spec.token_logprobs:
        able = [m.id for m in state.catalog.transcription_models() if m.token_logprobs]
        raise APIError(400, f"model {spec.id} gives no token log-probabilities, so include[]=logprobs cannot be "
                       f"answered; models that give them: {', '.join(able) or 'none in this catalog'}",
                       param="include[]", code="unsupported_include")


def check_languages(languages: list[str], spec: EngineModel, state: BridgeState) -> None:
    """``languages[]`` are the languages the audio may be in: the loaded model must speak at least one
    of them, else the answer would be in a language nobody asked for."""
    if not languages or set(languages) & set(spec.languages):
        return
    able = [m.id for m in state.catalog.transcription_models() if set(languages) & set(m.languages)]
    raise APIError(400, f"model {spec.id} speaks none of languages[] ({', '.join(languages)}); it speaks: "
                   f"{', '.join(spec.languages)}. "
                   + (f"Models in this catalog that speak {', '.join(languages)}: {', '.join(able)} (load one with "
                      "POST /v1/models/switch)" if able else "No model in this catalog speaks them"),
                   param="languages[]", code="unsupported_language")


def keywords_for(keywords: list[str], spec: EngineModel, warnings: list[str]) -> tuple[str, ...]:
    """The keywords the engine will apply: all of them where the model can use keywords; none
    otherwise, with a warning (they are hints, as OpenAI calls them: never an error)."""
    if keywords and not spec.keywords:
        warnings.append(f"keywords were not applied: model {spec.id} cannot bias its decoding towards keywords "
                        "(transducer models such as parakeet can)")
        return ()
    return tuple(keywords)


def check_language(language: str | None, spec: EngineModel) -> str:
    if language is None:
        return spec.languages[0] if len(spec.languages) == 1 else ""
    if language not in spec.languages:
        raise APIError(400, f"model {spec.id} does not support language {language!r}; "
                       f"it supports: {', '.join(spec.languages)}", param="language",
                       code="unsupported_language")
    return language
