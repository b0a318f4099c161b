"""Cutting long audio into engine-sized pieces.

A piece is never longer than the model's ``max_piece_seconds``. Cuts are placed in the quietest
stretch (lowest RMS over 100 ms frames) of the last part of each window, so that words are not
split where the speech pauses; where it never pauses the cut is still made (hard split).
Pieces that are pure digital silence are not sent to the engine.
"""

from __future__ import annotations

import numpy as np

from bridge.ports import SAMPLE_RATE

FRAME = SAMPLE_RATE // 10  # 100 ms
SILENCE_RMS = 1e-4


def plan_pieces(samples: np.ndarray, max_piece_seconds: float) -> list[tuple[int, int]]:
    """Return (start, end) sample ranges covering ``samples`` in order, without gaps."""
    total = len(samples)
    limit = int(max_piece_seconds * SAMPLE_RATE)
    if total <= limit:
        return [(0, total)]
    pieces: list[tuple[int, int]] = []
    start = 0
    while total - start > limit:
        # Look for the pause in the last 40 % of the window.
        lo = start + int(limit * 0.6)
        hi = start + limit
        window = samples[lo:hi]
        n = len(window) // FRAME
        if n == 0:
            cut = hi
        else:
            frames = window[: n * FRAME].reshape(n, FRAME)
            rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
            quietest = int(np.argmin(rms[::-1]))  # ties: the latest frame, the longest piece
            cut = lo + (n - 1 - quietest) * FRAME + FRAME // 2
        pieces.append((start, cut))
        start = cut
    pieces.append((start, total))
    return pieces


def is_silent(piece: np.ndarray) -> bool:
    return len(piece) == 0 or float(np.sqrt(np.mean(piece.astype(np.float64) ** 2))) < SILENCE_RMS
