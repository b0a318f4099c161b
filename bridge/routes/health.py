"""GET /health: liveness and readiness in one answer (200 ready, 503 not)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends
from starlette.responses import JSONResponse

from bridge.state import BridgeState, get_state

router = APIRouter()


@router.get("/health")
async def health(state: BridgeState = Depends(get_state)) -> JSONResponse:
    h = state.engines.health()
    model = state.engines.model
    body = {
        "status": "ready" if h.ready else "not_ready",
        "model": model.id if model else None,
        "adapter": state.settings.engine_adapter,
        "provider_requested": state.settings.sherpa_provider,
        "provider": h.provider,
        "engine_pid": h.pid,
        "engine_restarts": h.restarts,
        "engine_connections": state.settings.engine_connections,
        "engine_threads": state.settings.sherpa_num_threads,
        "detail": h.detail,
        "switching_to": state.engines.switching_to,
        "uptime_s": round(time.monotonic() - state.started_at, 3),
        "requests_in_flight": state.in_flight,
        "realtime_sessions": state.realtime_sessions,
        "pieces_waiting": state.scheduler.waiting,
        "pieces_running": state.scheduler.busy,
        "speed_check": state.engines.speed.as_dict() if state.engines.speed else None,
        "guard": state.guard.as_dict() if state.guard else None,
        "decoder": state.settings.audio_decoder,
        "decoder_workers": len(state.decoders.pids) if state.decoders else 0,
        "decoder_workers_replaced": state.decoders.replaced if state.decoders else 0,
    }
    headers = {} if h.ready else {"Retry-After": "5"}
    return JSONResponse(body, status_code=200 if h.ready else 503, headers=headers)
