"""The proxy's routes: its own pages and answers (the toolbar, ``/health``, ``/v1/usage``, the
OpenAPI description, with several bridges the model list and switch), live sessions
(``/v1/realtime``: ``auth_proxy.realtime``), and everything else under ``/v1/`` forwarded to a
bridge (``forward_request``: the key, the route's rules, admission, then a ``ForwardedRequest``).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.websockets import WebSocket

from auth_proxy.admission import RequestSlot, admit
from auth_proxy.auth import authenticate
from auth_proxy.bridges import Bridge
from auth_proxy.forwarded_request import ForwardedRequest
from auth_proxy.keys import ApiKey
from auth_proxy.realtime import realtime_session
from auth_proxy.state import ProxyState
from auth_proxy.usage_store import UsageRecord
from common.access import access_record
from common.errors import APIError
from common.openapi import error as openapi_error
from common.openapi import proxy_schema

FORWARDED_PREFIXES = ("/v1/audio/", "/v1/models")
STATIC = Path(__file__).resolve().parent / "static"
# The toolbar page: static files, no key needed to load them; every call it makes sends the key
# typed in. It may talk to this origin only.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:; "
                "style-src 'self' 'unsafe-inline'; media-src 'self' blob:; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def add_routes(app: FastAPI) -> None:
    """Every route of the proxy, the forwarded ones last."""
    app.add_api_route("/openapi.json", openapi, include_in_schema=False)
    app.add_api_route("/", toolbar, include_in_schema=False)
    app.add_api_route("/favicon.ico", favicon, include_in_schema=False)
    app.add_api_route("/health", health, include_in_schema=False)
    app.add_api_route("/v1/usage", usage)
    app.add_api_websocket_route("/v1/realtime", realtime)
    # A plain Starlette route: nothing for FastAPI's parameter handling to do on the hot path.
    app.add_route("/v1/{path:path}", forward_request, methods=["GET", "POST"], include_in_schema=False)


async def openapi(request: Request) -> Response:
    """The audio API's contract (common.openapi) behind a key, and the proxy's own routes."""
    app = request.app
    if app.openapi_schema is None:
        own = get_openapi(title=app.title, version=app.version, routes=app.routes)["paths"]
        usage = own["/v1/usage"]["get"]
        usage.update(security=[{"bearer": []}], responses={
            "200": {"description": "usage totals and records", "content": {"application/json": {"schema": {
                "type": "object", "required": ["object", "totals", "records"]}}}},
            **{str(s): openapi_error(s) for s in (400, 401, 403, 429, 503)}})
        app.openapi_schema = proxy_schema(app.title, app.version, {"/v1/usage": {"get": usage}})
    return JSONResponse(app.openapi_schema)


async def toolbar() -> Response:
    return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)


async def favicon() -> Response:
    return Response(status_code=204)


async def health(request: Request) -> Response:
    """Ready when the bridge is (with several bridges: when one is), with what it says of itself."""
    state: ProxyState = request.app.state.proxy
    if state.pool is not None:
        ready = bool(state.pool.ready())
        body = {"status": "ready" if ready else "not_ready", "models": state.pool.loaded_models(),
                "bridges": [b.describe() for b in state.pool.bridges.values() if not b.gone]}
        return JSONResponse(body, status_code=200 if ready else 503, headers={} if ready else {"Retry-After": "5"})
    try:
        r = await state.client.get("/health", timeout=5.0)
        bridge = r.json()
        ready = r.status_code == 200
    except (httpx.HTTPError, ValueError) as exc:
        bridge, ready = {"error": f"bridge unreachable: {exc.__class__.__name__}"}, False
    body = {"status": "ready" if ready else "not_ready", "bridge": bridge}
    return JSONResponse(body, status_code=200 if ready else 503,
                        headers={} if ready else {"Retry-After": "5"})


async def usage(request: Request, since: float | None = None, until: float | None = None,
                key: str | None = None, limit: int = 100) -> Response:
    """The caller's usage (an admin key's: every key's, or the one named)."""
    state: ProxyState = request.app.state.proxy
    caller = await authenticate(state, request)
    key_id: str | None = caller.id
    if caller.admin:
        key_id = None
        if key is not None:
            matches = [k for k in state.keys._keys if k.name == key or k.id == key]
            key_id = matches[0].id if matches else key
    elif key is not None and key not in (caller.name, caller.id):
        raise APIError(403, "only admin keys can read other keys' usage", code="forbidden", should_retry=False)
    limit = max(1, min(limit, 1000))
    totals = await state.writer.run(state.usage.totals, key_id, since, until)
    records = await state.writer.run(state.usage.records, key_id, since, until, limit)
    return JSONResponse({"object": "usage", "since": since, "until": until, "totals": totals,
                         "records": records})


async def realtime(ws: WebSocket) -> None:
    await realtime_session(ws, ws.app.state.proxy)


async def forward_request(request: Request) -> Response:
    """A request under ``/v1/`` to a bridge: the caller's key, the route's own rules, admission (a
    slot in flight, the key's limits; a refusal for a limit is metered too), then the
    ``ForwardedRequest`` that carries it to a bridge and its answer back."""
    state: ProxyState = request.app.state.proxy
    started = time.monotonic()
    key = await authenticate(state, request)
    path = checked_path(request, key)
    slot = RequestSlot(state, key)
    try:
        limit_headers = await admit(state, key, slot, is_transcription=path.startswith("/v1/audio/"))
    except APIError as exc:
        if exc.status == 429:
            meter_refusal(state, request, key, exc.status, started)
        raise
    forwarded = await ForwardedRequest.start(state, request, key, slot, started)
    upstream = await forwarded.send(pool_answer if state.pool is not None else None)
    if not isinstance(upstream, httpx.Response):
        return upstream
    return await forwarded.answer(upstream, limit_headers)


def checked_path(request: Request, key: ApiKey) -> str:
    """The path, if the proxy forwards it for this key: the audio API and the models, never a path
    that climbs or holds empty segments; a model switch for admin keys only."""
    path = request.url.path
    segments = path.split("/")
    if not path.startswith(FORWARDED_PREFIXES) or ".." in segments or "." in segments or "" in segments[1:]:
        raise APIError(404, f"no route {path}", code="not_found", should_retry=False)
    if path == "/v1/models/switch" and not key.admin:
        raise APIError(403, "switching the model changes it for every key: use an admin key "
                       "(python -m auth_proxy keys add NAME --admin)", code="forbidden", should_retry=False)
    return path


def meter_refusal(state: ProxyState, request: Request, key: ApiKey, status: int, started: float) -> None:
    """A request refused for a limit is metered too (its status, no audio)."""
    state.writer.record(UsageRecord(request_id=access_record(request).request_id, key_id=key.id, key_name=key.name,
                                    model="", route=request.url.path, status=status, audio_seconds=0.0,
                                    latency_ms=(time.monotonic() - started) * 1000, created=time.time()))


async def pool_answer(forwarded: ForwardedRequest) -> Response | None:
    """The answers the proxy gives itself with several bridges (None: forward the request):

    - ``GET /v1/models``: the union of the bridges' catalogs, each model with ``loaded_on``;
    - ``GET /v1/models/{id}``: one entry of it;
    - ``POST /v1/models/switch``: ``?bridges=one`` (the default) loads the model on one bridge
      if no ready bridge has it (one whose model another bridge also serves, least busy first),
      and changes nothing if one has; ``?bridges=all`` switches every ready bridge.
    """
    pool, request, path = forwarded.state.pool, forwarded.request, forwarded.path
    assert pool is not None
    if request.method == "GET" and path == "/v1/models":
        return JSONResponse(pool.models())
    if request.method == "GET" and path.startswith("/v1/models/"):
        model_id = path.removeprefix("/v1/models/")
        for card in pool.models()["data"]:
            if card["id"] == model_id:
                return JSONResponse(card)
        raise APIError(404, f"model {model_id!r} is not in the catalog", param="model", code="model_not_found",
                       should_retry=False)
    if request.method != "POST" or path != "/v1/models/switch":
        return None
    scope = request.query_params.get("bridges", "one")
    if scope not in ("one", "all"):
        raise APIError(400, "bridges must be 'one' or 'all'", param="bridges", code="invalid_value")
    try:
        with open(forwarded.spooled or "/dev/null", "rb") as fh:
            model_id = json.loads(fh.read(65536))["model_id"]
        assert isinstance(model_id, str) and 0 < len(model_id) <= 128
    except (ValueError, KeyError, TypeError, AssertionError):
        raise APIError(400, 'body must be JSON: {"model_id": "<catalog id>"}', param="model_id",
                       code="invalid_value") from None
    if not any(card["id"] == model_id for card in pool.models()["data"]):
        raise APIError(404, f"model {model_id!r} is not in the catalog; see GET /v1/models", param="model_id",
                       code="model_not_found", should_retry=False)
    serving = [b for b in pool.ready() if b.model == model_id]
    if scope == "one" and serving:
        return JSONResponse({"model": model_id, "previous": model_id, "switched": False, "switch_seconds": 0.0,
                             "bridges": [b.url for b in serving]})
    targets = [pool.pick_for_switch(model_id)] if scope == "one" else pool.ready()
    if not targets:
        raise pool.none_for(model_id)

    async def switch(bridge: Bridge) -> tuple[Bridge, int, dict[str, Any]]:
        bridge.in_flight += 1
        try:
            r = await bridge.client.post("/v1/models/switch", json={"model_id": model_id},
                                         headers={"x-request-id": forwarded.record.request_id})
            return bridge, r.status_code, r.json()
        except (httpx.HTTPError, ValueError) as exc:
            return bridge, 502, {"error": {"message": f"bridge unreachable: {exc.__class__.__name__}",
                                           "type": "server_error", "param": None, "code": "bridge_unavailable"}}
        finally:
            bridge.in_flight -= 1
            await pool.poll(bridge)

    results = await asyncio.gather(*(switch(b) for b in targets))
    failed = [(b, status, body) for b, status, body in results if status >= 300]
    if scope == "one" and failed:  # the bridge's own answer, in the OpenAI shape
        _, status, body = failed[0]
        return JSONResponse(body, status_code=status)
    per_bridge = [{"bridge": b.url, "status": status, **body} for b, status, body in results]
    if failed:
        where = ", ".join(f"{b.url} ({status})" for b, status, _ in failed)
        return JSONResponse({"error": {"message": f"switching to {model_id} failed on {where}", "type": "server_error",
                                       "param": "model_id", "code": "switch_failed"}, "results": per_bridge},
                            status_code=max(status for _, status, _ in failed))
    first = results[0][2]
    return JSONResponse({"model": model_id, "previous": first.get("previous"),
                         "switched": any(body.get("switched") for _, _, body in results),
                         "switch_seconds": max(float(body.get("switch_seconds", 0)) for _, _, body in results),
                         "bridges": [b.url for b in targets], "results": per_bridge})
