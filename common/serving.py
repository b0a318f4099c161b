"""Running an ASGI app under uvicorn the way both services want it."""

from __future__ import annotations

import signal
from typing import Any

import uvicorn


def run_server(app: Any, host: str, port: int, *, graceful_seconds: int = 30) -> int:
    """Serve until SIGTERM/SIGINT, shut down gracefully, and return an exit code.

    uvicorn re-raises the signal it caught once it has shut down, which makes a clean stop look
    like death by SIGTERM (exit 143) to Docker and supervisors. Handlers that do nothing are
    installed first, so the re-raised signal lands there and a clean stop exits 0.
    """
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=graceful_seconds, lifespan="on")
    server = uvicorn.Server(config)
    server.run()
    # uvicorn returns normally when the lifespan start failed; say so through the exit code.
    return 0 if server.started else 1
