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

from auth_proxy.admission import SessionSlot, admit
from auth_proxy.auth import check_guessing, client_address, note_auth_failure
from auth_proxy.keys import ApiKey
from auth_proxy.quotas import audio_quota_used_up
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
UNREACHABLE = (OSError, InvalidHandshake, asyncio.TimeoutError)  # a bridge that could not open a session


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
    await ProxiedSession(ws, state).run()


class QuotaUsedUp(Exception):
    pass


class Refused(Exception):
    """The session ends with an ``error`` event and the close (1008)."""

    def __init__(self, code: str, message: str, error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.code, self.message, self.type = code, message, error_type

    @classmethod
    def from_api_error(cls, exc: APIError, default_code: str) -> Refused:
        return cls(exc.code or default_code, exc.message, exc.type)


class ProxiedSession:
    """One live session through the proxy: accepted, admitted (the key, a session slot, the key's
    limits: ``auth_proxy.admission``), opened on a bridge, relayed both ways with each completed
    turn metered, and logged once at its end."""

    def __init__(self, ws: WebSocket, state: ProxyState) -> None:
        self.ws, self.state = ws, state
        self.request_id = request_id_from(ws.scope["headers"])
        self.started = time.monotonic()
        self.fields: dict[str, Any] = {"request_id": self.request_id, "method": "WS", "path": "/v1/realtime"}
        self.outcome, self.audio_seconds, self.turns, self.model = "closed", 0.0, 0, ""
        self.key: ApiKey | None = None
        self.upstream: Any = None  # the bridge's session (a websockets client connection)
        self.bridge: Bridge | None = None  # with several bridges: the one holding the session

    async def run(self) -> None:
        """The session from its accept to its log line."""
        token = request_id_var.set(self.request_id)
        offered = self.ws.scope.get("subprotocols") or []
        await self.ws.accept(subprotocol="realtime" if "realtime" in offered else None,
                             headers=[(b"x-request-id", self.request_id.encode())])
        try:
            key = await self._admit()
            slot = SessionSlot(self.state, key)  # taken by the admission
            try:
                await self._open_upstream()
                try:
                    await self._relay(key)
                finally:
                    await self.upstream.close()
            finally:
                slot.release()
        except Refused as refusal:
            self.outcome = refusal.code
            await self._refuse(refusal)
        except (WebSocketDisconnect, ConnectionClosed):
            self.outcome = "closed by client"
        finally:
            self._log()
            request_id_var.reset(token)

    async def _admit(self) -> ApiKey:
        """The key (Bearer, or the browsers' subprotocol), a session slot and the key's limits."""
        address = client_address(self.ws.scope)
        try:
            await check_guessing(self.state, address)
        except APIError as exc:
            raise Refused.from_api_error(exc, "too_many_auth_failures") from None
        token = presented_key(self.ws)
        key = self.state.keys.authenticate(token) if token else None
        if key is None:
            await note_auth_failure(self.state, address)
            self.fields["key_hint"] = key_hint(token) if token else ""
            raise Refused("invalid_api_key", "Incorrect API key provided" if token else
                          "Missing API key: send Authorization: Bearer <key>, or the subprotocol "
                          "openai-insecure-api-key.<key>")
        self.key = key
        self.fields["key"] = key.name
        try:
            await admit(self.state, key, SessionSlot(self.state, key), is_transcription=True)
        except APIError as exc:
            raise Refused.from_api_error(exc, "rate_limit_exceeded") from None
        return key

    async def _open_upstream(self) -> None:
        """The session opened on the bridge (with several: the least busy ready one serving the
        URL's model, if it names one)."""
        pool = self.state.pool
        try:
            if pool is None:
                self.upstream = await self._open_on(self.state.settings.bridge_url)
            else:
                self.bridge, self.upstream = await pool.reach(self.ws.query_params.get("model", ""),
                                                              lambda b: self._open_on(b.url), UNREACHABLE)
        except APIError as exc:
            if (exc.code or "bridge_unavailable") == "bridge_unavailable":
                self.state.metrics.bridge_errors.labels("unreachable").inc()
            raise Refused.from_api_error(exc, "bridge_unavailable") from None
        except UNREACHABLE as exc:
            self.state.metrics.bridge_errors.labels("unreachable").inc()
            log.warning("bridge unreachable for a live session: %r", exc)
            raise Refused("bridge_unavailable", "the transcription service is not reachable; retry shortly",
                          "server_error") from None
        self.model = self._model_of(self.upstream)

    async def _open_on(self, url: str) -> Any:
        headers = {"x-request-id": self.request_id}
        if self.ws.headers.get("openai-beta"):
            headers["openai-beta"] = self.ws.headers["openai-beta"]
        return await connect(bridge_ws_url(url, self.ws.url.query), additional_headers=headers,
                             max_size=MAX_FRAME, compression=None, open_timeout=10)

    @staticmethod
    def _model_of(upstream: Any) -> str:
        return upstream.response.headers.get("x-model-id", "") if upstream.response else ""

    async def _relay(self, key: ApiKey) -> None:
        """Frames both ways until either side ends; how it ended becomes the outcome."""
        tasks = [asyncio.create_task(self._client_to_bridge()), asyncio.create_task(self._bridge_to_client(key))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
        if tasks[1] in done and isinstance(tasks[1].exception(), QuotaUsedUp):
            raise Refused("insufficient_quota", f"daily audio quota used up for key {key.name!r}; it resets "
                          "at 00:00 UTC", "rate_limit_error")
        if tasks[1] in done:  # the bridge ended the session: pass its close on
            self.outcome = f"closed by bridge ({self.upstream.close_code})"
            with contextlib.suppress(Exception):
                await self.ws.close(self.upstream.close_code or 1000)
        else:
            self.outcome = "closed by client"

    async def _client_to_bridge(self) -> None:
        """The client's frames to the bridge; until the first audio, a session.update naming a
        model another bridge serves moves the session there (see the module's docstring)."""
        placing = self.state.pool is not None  # until the first audio the session may move
        replay: list[str] = []
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text, data = message.get("text"), message.get("bytes")
            if placing and text is not None:
                update = session_update(text)
                placing = update is not None
                if update is not None and not await self._place(update, replay):
                    continue  # refused: the client has the error, the bridge never sees the update
                if update is not None:
                    replay.append(text)
            elif data is not None:
                placing = False
            if text is not None or data is not None:
                await self.upstream.send(text if text is not None else data)

    async def _place(self, update: SessionUpdate, replay: list[str]) -> bool:
        """Move the session to a bridge serving the model ``update`` names, if this one does not;
        False when no ready bridge serves it (the client gets the error a bridge would give)."""
        pool = self.state.pool
        assert pool is not None
        if not update.model or self.bridge in pool.serving(update.model):
            return True
        try:
            target = pool.choose(update.model)
        except APIError as exc:  # what a bridge would answer, naming all bridges' models
            await self.ws.send_text(json.dumps({
                "type": "error", "event_id": f"event_{self.request_id}",
                "error": {"type": exc.type, "code": exc.code, "message": exc.message,
                          "param": update.param, "event_id": update.event_id}}))
            return False
        await self._move(target, replay)
        return True

    async def _move(self, target: Bridge, replay: list[str]) -> None:
        """Reopen the session on ``target`` (see the module's docstring); where that fails the
        session stays where it is (and that bridge answers the update)."""
        assert self.state.pool is not None
        try:
            fresh = await self._open_on(target.url)
        except UNREACHABLE as exc:
            self.state.pool.failed(target, exc)
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
        old, self.upstream, self.bridge = self.upstream, fresh, target
        self.model = self._model_of(fresh)
        log.info("live session moved to %s for model %s", target.url, self.model)
        await old.close()  # the reader goes on with the new one

    async def _bridge_to_client(self, key: ApiKey) -> None:
        """The bridge's frames to the client, each completed turn metered as it passes; raises
        ``QuotaUsedUp`` once a turn uses up the key's daily audio."""
        while True:
            reading = self.upstream
            async for frame in reading:
                text = frame if isinstance(frame, str) else frame.decode("utf-8", "replace")
                seconds = turn_seconds(text) if COMPLETED in text else None
                if seconds is not None:
                    self._meter_turn(key, seconds)
                await self.ws.send_text(text)
                if seconds is not None and await audio_quota_used_up(self.state, key):
                    raise QuotaUsedUp()
            if reading is self.upstream:  # the bridge ended the session (not a move)
                return

    def _meter_turn(self, key: ApiKey, seconds: float) -> None:
        self.audio_seconds += seconds
        self.turns += 1
        self.state.writer.record(UsageRecord(
            request_id=self.request_id, key_id=key.id, key_name=key.name, model=self.model,
            route="/v1/realtime", status=200, audio_seconds=seconds,
            latency_ms=(time.monotonic() - self.started) * 1000, created=time.time()))
        self.state.metrics.audio_seconds.labels(key.name).inc(seconds)

    async def _refuse(self, refusal: Refused) -> None:
        with contextlib.suppress(Exception):
            await self.ws.send_text(json.dumps({"type": "error", "event_id": f"event_{self.request_id}", "error": {
                "type": refusal.type, "code": refusal.code, "message": refusal.message, "param": None,
                "event_id": None}}))
            await self.ws.close(1008, refusal.code)

    def _log(self) -> None:
        """The session's access log line and request count."""
        seconds = time.monotonic() - self.started
        key = self.key
        self.state.metrics.requests.labels("/v1/realtime", "101", key.name if key else "-").inc()
        self.fields.update(status=101, outcome=self.outcome, latency_ms=round(seconds * 1000, 1), turns=self.turns,
                           audio_seconds=round(self.audio_seconds, 3))
        if self.model:
            self.fields["model"] = self.model
        who = f" key={key.name}" if key else (f" key_hint={self.fields['key_hint']}"
                                              if self.fields.get("key_hint") else "")
        access_log.info("%s WS /v1/realtime %s %.0f ms%s turns=%d audio=%.2fs", self.request_id, self.outcome,
                        seconds * 1000, who, self.turns, self.audio_seconds, extra={"fields": self.fields})


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
