"""Live dictation through the proxy: ``/v1/realtime`` WebSocket sessions, authenticated, limited and
metered here, forwarded to the bridge, which owns the session (VAD, buffer, engine).

Keys come from ``Authorization: Bearer`` or, from browsers (which cannot set headers), from the
subprotocol ``openai-insecure-api-key.<key>``; the answer selects ``realtime`` when offered, as
browsers require. A refused session is accepted, told why in an ``error`` event (the same codes as
the HTTP API: ``invalid_api_key``, ``rate_limit_exceeded``, ``insufficient_quota``,
``too_many_sessions``) and closed with 1008, so that a browser can show the reason. Each completed
turn's audio seconds are recorded for the key as the turn completes: a dropped connection loses no
completed turn's usage. Frames pass through as they are; the only state kept is the session count.

With several bridges (``BRIDGE_URLS``) a session opens on the least busy ready bridge serving the
URL's ``model`` (older clients), or any. Its model is usually named later, in a ``session.update``;
until the first audio, a session.update naming a model that bridge does not serve moves the session
to one that does (the least busy): the proxy opens a session there, replays the client's earlier
session.update events, drops the answers the client already had (session.created and one per
replayed update), forwards the new update and closes the first session. The client sees one
session throughout, except that later events carry the new bridge's session id. A model no ready
bridge serves is answered with an ``error`` event in the bridge's own form (model_not_loaded naming
the loaded models, model_unavailable, model_not_found), and the session stays where it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from auth_proxy.auth import check_guessing, client_address, note_auth_failure
from auth_proxy.metering import usage_unavailable
from auth_proxy.quotas import check_limits, start_of_utc_day
from auth_proxy.state import ProxyState
from auth_proxy.usage_store import UsageRecord
from common.access import key_hint, request_id_from
from common.errors import APIError
from common.logs import request_id_var

if TYPE_CHECKING:
    from auth_proxy.bridges import Bridge

log = logging.getLogger("auth_proxy.realtime")
access_log = logging.getLogger("auth_proxy.access")

KEY_PROTOCOL = "openai-insecure-api-key."
COMPLETED = "conversation.item.input_audio_transcription.completed"
MAX_FRAME = 16 * 1024 * 1024  # OpenAI allows appends of up to 15 MiB


UPDATES = ("session.update", "transcription_session.update")


class SessionUpdate(NamedTuple):
    model: str  # the transcription model it names, "" for none
    event_id: Any
    param: str  # where the model is named, for an error about it


def session_update(text: str) -> SessionUpdate | None:
    """A client frame read as a session.update (GA or beta); None for any other frame."""
    if not any(kind in text for kind in UPDATES):
        return None
    try:
        event = json.loads(text)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("type") not in UPDATES:
        return None

    def part(parent: dict[str, Any], name: str) -> dict[str, Any]:
        value = parent.get(name)
        return value if isinstance(value, dict) else {}

    session = part(event, "session")
    if event["type"] == "transcription_session.update":
        transcription, param = part(session, "input_audio_transcription"), "session.input_audio_transcription.model"
    else:
        transcription = part(part(part(session, "audio"), "input"), "transcription")
        param = "session.audio.input.transcription.model"
    model = transcription.get("model")
    return SessionUpdate(model if isinstance(model, str) else "", event.get("event_id"), param)


def presented_key(ws: WebSocket) -> str | None:
    auth = ws.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    for protocol in ws.scope.get("subprotocols") or []:
        if protocol.startswith(KEY_PROTOCOL) and len(protocol) > len(KEY_PROTOCOL):
            return str(protocol[len(KEY_PROTOCOL):])
    return None


def bridge_ws_url(bridge_url: str, query: str) -> str:
    base = "ws" + bridge_url[4:] if bridge_url.startswith("http") else bridge_url
    return f"{base}/v1/realtime" + (f"?{query}" if query else "")


async def realtime_session(ws: WebSocket, state: ProxyState) -> None:
    settings = state.settings
    request_id = request_id_from(ws.scope["headers"])
    token_var = request_id_var.set(request_id)
    started = time.monotonic()
    offered = ws.scope.get("subprotocols") or []
    await ws.accept(subprotocol="realtime" if "realtime" in offered else None,
                    headers=[(b"x-request-id", request_id.encode())])
    fields: dict[str, Any] = {"request_id": request_id, "method": "WS", "path": "/v1/realtime"}
    outcome, audio_seconds, turns, model = "closed", 0.0, 0, ""
    key = None

    async def refuse(code: str, message: str, error_type: str = "invalid_request_error") -> None:
        with contextlib.suppress(Exception):
            await ws.send_text(json.dumps({"type": "error", "event_id": f"event_{request_id}", "error": {
                "type": error_type, "code": code, "message": message, "param": None, "event_id": None}}))
            await ws.close(1008, code)

    try:
        address = client_address(ws.scope)
        try:
            await check_guessing(state, address)
        except APIError as exc:
            outcome = exc.code or "too_many_auth_failures"
            await refuse(outcome, exc.message, exc.type)
            return
        token = presented_key(ws)
        key = state.keys.authenticate(token) if token else None
        if key is None:
            await note_auth_failure(state, address)
            fields["key_hint"] = key_hint(token) if token else ""
            outcome = "invalid_api_key"
            await refuse("invalid_api_key", "Incorrect API key provided" if token else
                         "Missing API key: send Authorization: Bearer <key>, or the subprotocol "
                         "openai-insecure-api-key.<key>")
            return
        fields["key"] = key.name
        try:
            try:
                await check_limits(state, key, is_transcription=True)
            except APIError:
                raise
            except Exception:  # the quota could not be read: the store is down
                raise usage_unavailable() from None
        except APIError as exc:
            outcome = exc.code or "limit"
            state.metrics.refused.labels(key.name, "audio_quota" if exc.code == "insufficient_quota" else "rpm").inc()
            await refuse(exc.code or "rate_limit_exceeded", exc.message, exc.type)
            return
        open_now = state.realtime_sessions.get(key.id, 0)
        if open_now >= settings.realtime_sessions_per_key:
            outcome = "too_many_sessions"
            state.metrics.refused.labels(key.name, "sessions").inc()
            await refuse("too_many_sessions", f"key {key.name!r} has {open_now} live sessions open, the most allowed "
                         f"(REALTIME_SESSIONS_PER_KEY={settings.realtime_sessions_per_key})", "rate_limit_error")
            return
        state.realtime_sessions[key.id] = open_now + 1
        try:
            headers = {"x-request-id": request_id}
            if ws.headers.get("openai-beta"):
                headers["openai-beta"] = ws.headers["openai-beta"]
            pool = state.pool

            async def open_on(url: str) -> Any:
                return await connect(bridge_ws_url(url, ws.url.query), additional_headers=headers,
                                     max_size=MAX_FRAME, compression=None, open_timeout=10)

            bridge: Bridge | None = None
            try:
                if pool is None:
                    upstream = await open_on(settings.bridge_url)
                else:  # several bridges: the least busy ready one serving the URL's model, if it names one
                    bridge, upstream = await pool.reach(ws.query_params.get("model", ""), lambda b: open_on(b.url),
                                                        (OSError, InvalidHandshake, asyncio.TimeoutError))
            except APIError as exc:
                outcome = exc.code or "bridge_unavailable"
                if outcome == "bridge_unavailable":
                    state.metrics.bridge_errors.labels("unreachable").inc()
                await refuse(outcome, exc.message, exc.type)
                return
            except (OSError, InvalidHandshake, asyncio.TimeoutError) as exc:
                outcome = "bridge_unavailable"
                state.metrics.bridge_errors.labels("unreachable").inc()
                log.warning("bridge unreachable for a live session: %r", exc)
                await refuse("bridge_unavailable", "the transcription service is not reachable; retry shortly",
                             "server_error")
                return
            model = upstream.response.headers.get("x-model-id", "") if upstream.response else ""
            try:

                async def move(target: Bridge, replay: list[str]) -> None:
                    """Reopen the session on ``target`` (see the module's docstring); where that fails
                    the session stays where it is (and that bridge answers the update)."""
                    nonlocal upstream, bridge, model
                    assert pool is not None
                    try:
                        fresh = await open_on(target.url)
                    except (OSError, InvalidHandshake, asyncio.TimeoutError) as exc:
                        pool.failed(target, exc)
                        return
                    try:
                        await asyncio.wait_for(fresh.recv(), 10)  # its session.created: the client has one
                        for frame in replay:
                            await fresh.send(frame)
                            await asyncio.wait_for(fresh.recv(), 10)  # the answer the client already had
                    except (ConnectionClosed, asyncio.TimeoutError) as exc:
                        log.warning("could not move a live session to %s: %r", target.url, exc)
                        await fresh.close()
                        return
                    old, upstream, bridge = upstream, fresh, target
                    model = fresh.response.headers.get("x-model-id", "") if fresh.response else ""
                    log.info("live session moved to %s for model %s", target.url, model)
                    await old.close()  # the reader goes on with the new one

                async def client_to_bridge() -> None:
                    placing = pool is not None  # until the first audio the session may move
                    replay: list[str] = []
                    while True:
                        message = await ws.receive()
                        if message["type"] == "websocket.disconnect":
                            return
                        text = message.get("text")
                        if placing and pool is not None and text is not None:
                            update = session_update(text)
                            placing = update is not None
                            if update and update.model and bridge not in pool.serving(update.model):
                                try:
                                    target = pool.choose(update.model)
                                except APIError as exc:  # what a bridge would answer, naming all bridges' models
                                    await ws.send_text(json.dumps({
                                        "type": "error", "event_id": f"event_{request_id}",
                                        "error": {"type": exc.type, "code": exc.code, "message": exc.message,
                                                  "param": update.param, "event_id": update.event_id}}))
                                    continue
                                await move(target, replay)
                            if update:
                                replay.append(text)
                        elif message.get("bytes") is not None:
                            placing = False
                        if text is not None:
                            await upstream.send(text)
                        elif message.get("bytes") is not None:
                            await upstream.send(message["bytes"])

                async def bridge_to_client() -> None:
                    nonlocal audio_seconds, turns
                    while True:
                        reading = upstream
                        async for frame in reading:
                            text = frame if isinstance(frame, str) else frame.decode("utf-8", "replace")
                            if COMPLETED in text:
                                seconds = turn_seconds(text)
                                if seconds is not None:
                                    audio_seconds += seconds
                                    turns += 1
                                    state.writer.record(UsageRecord(
                                        request_id=request_id, key_id=key.id, key_name=key.name, model=model,
                                        route="/v1/realtime", status=200, audio_seconds=seconds,
                                        latency_ms=(time.monotonic() - started) * 1000, created=time.time()))
                                    state.metrics.audio_seconds.labels(key.name).inc(seconds)
                                    await ws.send_text(text)
                                    if await over_quota(state, key):
                                        raise QuotaUsedUp()
                                    continue
                            await ws.send_text(text)
                        if reading is upstream:  # the bridge ended the session (not a move)
                            return

                tasks = [asyncio.create_task(client_to_bridge()), asyncio.create_task(bridge_to_client())]
                try:
                    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in tasks:
                        task.cancel()
                    for task in tasks:
                        with contextlib.suppress(BaseException):
                            await task
                if tasks[1] in done and isinstance(tasks[1].exception(), QuotaUsedUp):
                    outcome = "insufficient_quota"
                    await refuse("insufficient_quota", f"daily audio quota used up for key {key.name!r}; it resets "
                                 "at 00:00 UTC", "rate_limit_error")
                elif tasks[1] in done:  # the bridge ended the session: pass its close on
                    outcome = f"closed by bridge ({upstream.close_code})"
                    with contextlib.suppress(Exception):
                        await ws.close(upstream.close_code or 1000)
                else:
                    outcome = "closed by client"
            finally:
                await upstream.close()
        finally:
            state.realtime_sessions[key.id] -= 1
            if not state.realtime_sessions[key.id]:
                del state.realtime_sessions[key.id]
    except (WebSocketDisconnect, ConnectionClosed):
        outcome = "closed by client"
    finally:
        seconds = time.monotonic() - started
        state.metrics.requests.labels("/v1/realtime", "101", key.name if key else "-").inc()
        fields.update(status=101, outcome=outcome, latency_ms=round(seconds * 1000, 1), turns=turns,
                      audio_seconds=round(audio_seconds, 3))
        if model:
            fields["model"] = model
        who = f" key={key.name}" if key else (f" key_hint={fields['key_hint']}" if fields.get("key_hint") else "")
        access_log.info("%s WS /v1/realtime %s %.0f ms%s turns=%d audio=%.2fs", request_id, outcome,
                        seconds * 1000, who, turns, audio_seconds, extra={"fields": fields})
        request_id_var.reset(token_var)


class QuotaUsedUp(Exception):
    pass


async def over_quota(state: ProxyState, key: Any) -> bool:
    quota = key.audio_seconds_per_day if key.audio_seconds_per_day is not None \
        else state.settings.default_audio_seconds_per_day
    if not quota:
        return False
    now = time.time()
    # On the store's thread, after the turn just recorded.
    return bool(await state.writer.run(state.usage.audio_seconds_since, key.id, start_of_utc_day(now)) >= quota)


def turn_seconds(text: str) -> float | None:
    try:
        event = json.loads(text)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("type") != COMPLETED:
        return None
    try:
        return float(event["usage"]["seconds"])
    except (KeyError, TypeError, ValueError):
        return None
