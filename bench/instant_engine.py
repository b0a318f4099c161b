"""A stand-in engine that answers at once: a WebSocket server speaking the sherpa-onnx offline
protocol (``adapters.sherpa_protocol``), for measuring what the bridge itself costs around an
engine as fast as a GPU. It reads each utterance in full and replies with a short fixed text.

    .venv/bin/python -m bench.instant_engine --port 6006

The bridge reaches it with ``ENGINE_ADAPTER=websocket ENGINE_URL=ws://127.0.0.1:6006``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

REPLY = json.dumps({"text": "instant", "tokens": [" instant"], "timestamps": [0.0], "lang": ""})


DELAY = 0.0  # seconds per second of audio (--delay): a slow engine for tests
FAIL_OVER = 0.0  # --fail-over: utterances longer than this get a broken answer (tests of bridge.guard)
FAIL_MODE = "empty"  # or "loop": the two ways a model fails on noisy speech
TRANSDUCER = False  # --transducer: answer as parakeet does, with token times and log-probabilities


def transducer_reply(seconds: float) -> str:
    """"piece of N seconds" in SentencePiece tokens, each with a start time, a duration and a
    log-probability (falling along the piece: -0.1, -0.2, ...), as sherpa-onnx's transducers reply."""
    words = f"piece of {seconds:.2f} seconds".split()
    step = seconds / len(words)
    return json.dumps({
        "lang": "", "text": " ".join(words), "tokens": [f"\u2581{w}" for w in words],
        "timestamps": [round(i * step, 2) for i in range(len(words))], "durations": [round(step, 2)] * len(words),
        "ys_log_probs": [round(-0.1 * (i + 1), 6) for i in range(len(words))],
    })


def reply(seconds: float) -> str:
    """The fixed answer, or with --fail-over a broken one for long utterances, and otherwise a text
    that says how long the utterance was (so a test can tell which piece said what)."""
    if TRANSDUCER:
        return transducer_reply(seconds)
    if not FAIL_OVER:
        return REPLY
    if seconds > FAIL_OVER:
        text = "" if FAIL_MODE == "empty" else " ".join(["again and again"] * int(seconds * 3))
    else:
        text = f"piece of {seconds:.2f} seconds"
    return json.dumps({"text": text, "tokens": [], "timestamps": [], "lang": ""})


async def handle(conn: ServerConnection) -> None:
    buffer = b""
    try:
        async for message in conn:
            if isinstance(message, str):  # "Done"
                return
            buffer += message
            while len(buffer) >= 8:
                rate, size = struct.unpack("<ii", buffer[:8])
                if len(buffer) < 8 + size:
                    break
                buffer = buffer[8 + size:]
                if DELAY:
                    await asyncio.sleep(DELAY * size / 4 / rate)
                await conn.send(reply(size / 4 / rate))
    except ConnectionClosed:
        pass


async def serve_forever(host: str, port: int, ready: asyncio.Event | None = None) -> None:
    async with serve(handle, host, port, max_size=None, compression=None, ping_interval=None):
        if ready is not None:
            ready.set()
        await asyncio.Future()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=6006)
    ap.add_argument("--delay", type=float, default=0.0,
                    help="answer after this many seconds per second of audio (a slow engine)")
    ap.add_argument("--fail-over", type=float, default=0.0,
                    help="answer utterances longer than this many seconds wrongly (see --fail-mode)")
    ap.add_argument("--fail-mode", choices=["empty", "loop"], default="empty")
    ap.add_argument("--transducer", action="store_true",
                    help="answer 'piece of N seconds' with token times and log-probabilities (as parakeet)")
    args = ap.parse_args()
    global DELAY, FAIL_OVER, FAIL_MODE, TRANSDUCER
    DELAY, FAIL_OVER, FAIL_MODE, TRANSDUCER = args.delay, args.fail_over, args.fail_mode, args.transducer
    asyncio.run(serve_forever(args.host, args.port))


if __name__ == "__main__":
    main()
