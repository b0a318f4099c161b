"""A stand-in engine that answers at once: a WebSocket server speaking the sherpa-onnx offline
protocol (``adapters.sherpa_protocol``), for measuring what the bridge itself costs around an
engine as fast as a GPU. It reads each utterance in full and replies with a short fixed text, or
(``--words-per-second``) with as many made-up words as a model would say for that much speech.

A bench of the bridge's own cost wants ``--words-per-second 2.5``: the fixed one-word reply is what
a model that failed says, so the piece guard (``bridge.guard``) checks each piece of 2 s or more
with the VAD and transcribes it again in halves, which is not the bridge's cost for real answers.

    .venv/bin/python -m bench.instant_engine --port 6006

The bridge reaches it with ``ENGINE_ADAPTER=websocket ENGINE_URL=ws://127.0.0.1:6006``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import struct

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

REPLY = json.dumps({"text": "instant", "tokens": [" instant"], "timestamps": [0.0], "lang": ""})


DELAY = 0.0  # seconds per second of audio (--delay): a slow engine for tests
FAIL_OVER = 0.0  # --fail-over: utterances longer than this get a broken answer (tests of bridge.guard)
FAIL_MODE = "empty"  # or "loop": the two ways a model fails on noisy speech
TRANSDUCER = False  # --transducer: answer as parakeet does, with token times and log-probabilities
WORDS_PER_SECOND = 0.0  # --words-per-second: a reply as long as a model's for that much speech
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "do", "gu", "be", "fi", "ho", "ju"]


def made_up_words(seconds: float) -> str:
    """``WORDS_PER_SECOND`` words of one to three syllables: as long as real text and no more
    compressible (the guard's repetition check passes up to 60 s). The k-th word is the same in every
    reply, so a longer piece of the same audio repeats a shorter one's words and adds to them, as a
    model does when it hears more of a turn (live text's passes agree on them)."""
    n = max(1, round(seconds * WORDS_PER_SECOND))
    return " ".join(_made_up_word(k) for k in range(n))


def _made_up_word(k: int) -> str:
    rng = random.Random(k)
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))


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
    if WORDS_PER_SECOND and not FAIL_OVER:
        return json.dumps({"text": made_up_words(seconds), "tokens": [], "timestamps": [], "lang": ""})
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
    ap.add_argument("--words-per-second", type=float, default=0.0,
                    help="answer with this many made-up words per second of audio (2.5: as a model would)")
    args = ap.parse_args()
    global DELAY, FAIL_OVER, FAIL_MODE, TRANSDUCER, WORDS_PER_SECOND
    DELAY, FAIL_OVER, FAIL_MODE, TRANSDUCER = args.delay, args.fail_over, args.fail_mode, args.transducer
    WORDS_PER_SECOND = args.words_per_second
    asyncio.run(serve_forever(args.host, args.port))


if __name__ == "__main__":
    main()
