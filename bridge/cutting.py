"""Cutting long audio into engine-sized pieces.

A piece is never longer than the model's ``max_piece_seconds``. With voice activity (``bridge.vad``)
the pieces are the speech segments, padded a little, and neighbours merged while they fit; the
silence between them is not sent to the engine. A segment longer than a piece (speech that never
pauses) and audio cut without VAD are split in the quietest stretch (lowest RMS over 100 ms frames)
of the last part of each window, so that words are not split where the speech pauses; where it
never pauses the cut is still made (hard split). Pure digital silence is not sent to the engine.
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


PAD = SAMPLE_RATE // 5  # 200 ms kept around each speech segment


def plan_speech_pieces(total: int, speech: list[tuple[int, int]], max_piece_seconds: float,
                       target_seconds: float | None = None) -> list[tuple[int, int]]:
    """Pieces from speech segments: padded, long ones split, neighbours merged up to the target
    length (default: the model's safe length). Ranges are in order and do not overlap."""
    limit = int(max_piece_seconds * SAMPLE_RATE)
    target = min(limit, int((target_seconds or max_piece_seconds) * SAMPLE_RATE))
    padded: list[tuple[int, int]] = []
    for start, end in speech:
        start, end = max(0, start - PAD), min(total, end + PAD)
        if padded and start <= padded[-1][1]:  # pauses shorter than the padding: one segment
            padded[-1] = (padded[-1][0], max(end, padded[-1][1]))
        elif end > start:
            padded.append((start, end))
    pieces: list[tuple[int, int]] = []
    for start, end in padded:
        if pieces and end - pieces[-1][0] <= target:
            pieces[-1] = (pieces[-1][0], end)  # merge: the silence in between rides along
        else:
            pieces.append((start, end))
    return pieces


def split_long(samples: np.ndarray, pieces: list[tuple[int, int]], max_piece_seconds: float) -> list[tuple[int, int]]:
    """Hard-split any piece longer than the model's safe length (speech that never pauses)."""
    out: list[tuple[int, int]] = []
    for start, end in pieces:
        for a, b in plan_pieces(samples[start:end], max_piece_seconds):
            out.append((start + a, start + b))
    return out
