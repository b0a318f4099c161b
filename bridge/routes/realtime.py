"""GET /v1/realtime?intent=transcription: live dictation over a WebSocket (``bridge.realtime``).

The proxy authenticates and meters; the bridge owns the session: its VAD, its buffer and the
engine. Limits: ``REALTIME_MAX_SESSIONS`` open at once, ``REALTIME_MAX_SESSION_SECONDS`` each,
``REALTIME_IDLE_SECONDS`` without an event from the client. A session ended by a limit gets an
``error`` event first, then the close (1008; 1013 when the bridge is full).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from fastapi import APIRouter
from starlette.websockets import WebSocket, WebSocketDisconnect

from bridge.realtime import RealtimeError, RealtimeSession
from bridge.state import BridgeState
from common.access import request_id_from
from common.logs import request_id_var

router = APIRouter()
access_log = logging.getLogger("bridge.access")


@router.websocket("/v1/realtime")
async def realtime(ws: WebSocket) -> None:
    state: BridgeState = ws.app.state.bridge
    settings = state.settings
    request_id = request_id_from(ws.scope["headers"])
    token = request_id_var.set(request_id)
    offered = ws.scope.get("subprotocols") or []
    model = state.engines.model.id if state.engines.model else ""
    await ws.accept(subprotocol="realtime" if "realtime" in offered else None,
                    headers=[(b"x-request-id", request_id.encode()), (b"x-model-id", model.encode())])
    started = time.monotonic()
    beta = ws.headers.get("openai-beta", "").startswith("realtime")
    lock = asyncio.Lock()

    async def emit(event: dict[str, Any]) -> None:
        async with lock:
            await ws.send_text(json.dumps(event, ensure_ascii=False))

    if state.realtime_sessions >= settings.realtime_max_sessions:
        await emit({"type": "error", "error": {"type": "server_error", "code": "too_many_sessions",
                    "message": "too many live sessions open; retry shortly", "param": None, "event_id": None}})
        await ws.close(1013)
        request_id_var.reset(token)
        return
    state.realtime_sessions += 1
    session = RealtimeSession(state, emit, beta=beta)
    outcome = "closed by client"
    try:
        await session.start()
        deadline = started + settings.realtime_max_session_seconds
        while True:
            timeout = min(settings.realtime_idle_seconds, deadline - time.monotonic())
            if timeout <= 0:
                raise TimeoutError("session")
            try:
                message = await asyncio.wait_for(ws.receive(), timeout)
            except asyncio.TimeoutError:
                raise TimeoutError("session" if time.monotonic() >= deadline else "idle") from None
            if message["type"] == "websocket.disconnect":
                break
            raw = message.get("text") if message.get("text") is not None else message.get("bytes")
            try:
                event = json.loads(raw or "")
            except (ValueError, TypeError):
                await session.error(RealtimeError("invalid_json", "an event must be a JSON object"))
                continue
            await session.handle(event)
        await session.finish(wait=False)  # the client is gone: nothing left to send to
    except TimeoutError as exc:
        which = str(exc)
        outcome = f"{which} limit"
        limit = (f"{settings.realtime_max_session_seconds:g} s (REALTIME_MAX_SESSION_SECONDS)" if which == "session"
                 else f"{settings.realtime_idle_seconds:g} s without an event (REALTIME_IDLE_SECONDS)")
        await session.finish(wait=True)  # turns already committed still get their text
        await session.error(RealtimeError(f"{which}_expired", f"the session ended: {limit}"))
        await ws.close(1008)
    except WebSocketDisconnect:
        await session.finish(wait=False)
    finally:
        if not session.worker.done():
            await session.finish(wait=False)
        state.realtime_sessions -= 1
        seconds = time.monotonic() - started
        access_log.info("%s WS /v1/realtime %s %.0f ms turns=%d audio=%.2fs", request_id, outcome, seconds * 1000,
                        session.completed, session.audio_seconds,
                        extra={"fields": {"request_id": request_id, "method": "WS", "path": "/v1/realtime",
                                          "status": 101, "outcome": outcome, "latency_ms": round(seconds * 1000, 1),
                                          "turns": session.completed, "audio_seconds": round(session.audio_seconds, 3),
                                          "model": state.engines.model.id if state.engines.model else ""}})
        request_id_var.reset(token)
