"""GET /v1/models (OpenAI list shape plus what is loaded) and POST /v1/models/switch."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import JSONResponse

from bridge.api_types import SwitchRequest
from bridge.models.catalog import ModelSpec, UnknownModelError
from bridge.models.engine_manager import ModelNotDownloaded
from bridge.state import BridgeState, get_state
from common.errors import APIError

router = APIRouter()


def model_card(spec: ModelSpec, state: BridgeState) -> dict[str, object]:
    loaded = state.engines.model
    return {
        "id": spec.id,
        "object": "model",
        "created": spec.created,
        "owned_by": "mvp-stt",
        "loaded": loaded is not None and loaded.id == spec.id,
        "downloaded": state.store.is_ready(spec),
        "languages": spec.languages,
        "word_timestamps": spec.token_timestamps,
        "precision": spec.precision,
        "size_mb": spec.size_mb,
        "description": spec.description,
    }


@router.get("/v1/models")
async def list_models(state: BridgeState = Depends(get_state)) -> JSONResponse:
    loaded = state.engines.model
    return JSONResponse({
        "object": "list",
        "data": [model_card(spec, state) for spec in state.catalog.transcription_models()],
        "loaded": loaded.id if loaded else None,
        "aliases": state.settings.model_aliases,
    })


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, state: BridgeState = Depends(get_state)) -> JSONResponse:
    try:
        spec = state.catalog.get(model_id)
        if spec.kind != "asr":
            raise UnknownModelError(model_id)
        return JSONResponse(model_card(spec, state))
    except UnknownModelError:
        raise APIError(404, f"model {model_id!r} is not in the catalog", param="model",
                       code="model_not_found") from None


@router.post("/v1/models/switch")
async def switch_model(request: Request, state: BridgeState = Depends(get_state)) -> JSONResponse:
    try:
        body = SwitchRequest.model_validate(await request.json())
    except ValueError:
        raise APIError(400, 'body must be JSON: {"model_id": "<catalog id>"}', param="model_id",
                       code="invalid_value") from None
    if body.model_id not in state.catalog:
        raise APIError(404, f"model {body.model_id!r} is not in the catalog; see GET /v1/models",
                       param="model_id", code="model_not_found")
    if state.catalog.get(body.model_id).kind != "asr":
        raise APIError(400, f"{body.model_id} is a speaker diarization model, not a transcription model: it is "
                       "used with model=gpt-4o-transcribe-diarize, never loaded by a switch", param="model_id",
                       code="invalid_value")
    try:
        result = await state.engines.switch(body.model_id)
    except ModelNotDownloaded as exc:
        raise APIError(409, str(exc), param="model_id", code="model_not_downloaded",
                       should_retry=False) from None
    except Exception as exc:  # noqa: BLE001 - a failed switch leaves the old model serving
        loaded = state.engines.model
        raise APIError(
            500, f"switching to {body.model_id} failed: {exc}; still serving {loaded.id if loaded else None}",
            code="switch_failed", should_retry=False,
        ) from None
    return JSONResponse({
        "model": result.model,
        "previous": result.previous,
        "switched": result.switched,
        "switch_seconds": round(result.seconds, 3),
    })
