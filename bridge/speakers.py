"""Speakers in an upload (``model`` a diarize alias, ``diarized_json``): the request's checks, the
bridge's ``Diarizer`` (made once its two models are in the store), known speakers' references
decoded, the search run as one job of the fair scheduler, and the pieces cut at speaker changes
for models without token times.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import AsyncGenerator
from pathlib import Path

import numpy as np

from bridge.api_types import (
    TranscriptionParams,
)
from bridge.cutting import turn_pieces
from bridge.decoding.stream import AudioDecodeError, AudioStorageFull, AudioStream, AudioTimeout, AudioTooLong
from bridge.diarization import MAX_KNOWN_SPEAKERS, REFERENCE_SECONDS, Diarizer, Turn
from bridge.ports import SAMPLE_RATE
from bridge.state import BridgeState
from bridge.upload import decode_into, storage_error
from common.errors import APIError


def check_diarize(params: TranscriptionParams, state: BridgeState) -> Diarizer | None:
    """The diarizer when the request asks for speakers (``model`` a diarize alias), after
    refusing what OpenAI refuses with that model; None otherwise."""
    diarize = params.model in state.settings.diarize_aliases
    if not diarize:
        if params.response_format == "diarized_json" or params.known_speaker_names or params.known_speaker_references:
            param = "response_format" if params.response_format == "diarized_json" else "known_speaker_names[]"
            raise APIError(400, f"speakers need model={state.settings.diarize_aliases[0]}", param=param,
                           code="invalid_value")
        return None
    for wrong, param in ((bool(params.prompt), "prompt"), (params.logprobs, "include[]"),
                         (bool(params.timestamp_granularities), "timestamp_granularities[]")):
        if wrong:
            raise APIError(400, f"{param} is not supported with {params.model}", param=param, code="invalid_value")
    names, refs = params.known_speaker_names, params.known_speaker_references
    if len(names) != len(refs):
        raise APIError(400, f"known_speaker_names[] ({len(names)}) and known_speaker_references[] ({len(refs)}) "
                       "must have as many entries", param="known_speaker_references[]", code="invalid_value")
    if len(names) > MAX_KNOWN_SPEAKERS or len(set(names)) != len(names) or any(not n.strip() for n in names):
        raise APIError(400, f"known_speaker_names[]: up to {MAX_KNOWN_SPEAKERS} different, non-empty names",
                       param="known_speaker_names[]", code="invalid_value")
    return diarizer_for(state)


def diarizer_for(state: BridgeState) -> Diarizer:
    """The bridge's diarizer, once its two models are in the store."""
    if state.diarizer is not None:
        return state.diarizer
    settings = state.settings
    ids = (settings.diarization_segmentation_model, settings.diarization_embedding_model)
    missing = [i for i in ids if i not in state.catalog or not state.store.is_ready(state.catalog.get(i))]
    if missing:
        commands = "; ".join(f"python -m bridge models download {i}" for i in missing)
        raise APIError(409, f"speaker diarization needs its models, which are not downloaded: {', '.join(missing)}. "
                       f"Download them ({commands}; in Docker: docker compose exec mvp-bridge ...)",
                       param="model", code="diarization_not_available", should_retry=False)
    segmentation, embedding = (state.catalog.get(i) for i in ids)
    state.diarizer = Diarizer(state.store.path_for(segmentation.id) / segmentation.files[0].name,
                              state.store.path_for(embedding.id) / embedding.files[0].name,
                              threshold=settings.diarization_threshold, num_threads=settings.sherpa_num_threads,
                              min_similarity=settings.known_speaker_min_similarity,
                              window_seconds=settings.diarization_window_seconds)
    return state.diarizer


async def decode_references(params: TranscriptionParams, state: BridgeState, folder: Path) -> dict[str, np.ndarray]:
    """Each known speaker's reference audio (a data URL) decoded to 16 kHz, 2 to 10 s long."""
    out: dict[str, np.ndarray] = {}
    for i, (name, url) in enumerate(zip(params.known_speaker_names, params.known_speaker_references, strict=True)):
        param = f"known_speaker_references[{i}]"
        header, comma, data = url.partition(",")
        if not (url.startswith("data:") and comma and header.endswith(";base64")):
            raise APIError(400, f"{param} must be a data URL (data:audio/wav;base64,...)", param=param,
                           code="invalid_value")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{param} is not valid base64", param=param, code="invalid_value") from None
        path = folder / f"reference-{i}"
        path.write_bytes(raw)
        stream = AudioStream(REFERENCE_SECONDS[1] + 5)
        try:
            await decode_into(state, path, stream)
            await stream.wait_done()
            out[name] = stream[:]
        except AudioStorageFull as exc:
            raise storage_error(exc) from None
        except (AudioDecodeError, AudioTimeout, AudioTooLong) as exc:
            raise APIError(400, f"{param} cannot be decoded as audio: {exc}", param=param,
                           code="invalid_value") from None
        finally:
            stream.close()
        low, high = REFERENCE_SECONDS
        if not low <= len(out[name]) / SAMPLE_RATE <= high:
            raise APIError(400, f"{param} is {len(out[name]) / SAMPLE_RATE:.1f} s long; a reference must be {low:g} "
                           f"to {high:g} s of the speaker", param=param, code="invalid_value")
    return out


async def find_speakers(state: BridgeState, diarizer: Diarizer, audio: AudioStream,
                        references: dict[str, np.ndarray]) -> list[Turn]:
    """Who spoke when, once the audio is decoded: one job in the fair scheduler, run in a thread."""
    await audio.wait_done()

    def run() -> list[Turn]:
        turns = diarizer.turns(audio)
        named = {name: diarizer.embed(ref) for name, ref in references.items()}
        return diarizer.name_speakers(audio, turns, named)

    return await state.scheduler.submit_call(state.scheduler.new_request(), lambda: asyncio.to_thread(run))


async def speaker_plan(turns: asyncio.Task[list[Turn]], audio: AudioStream,
                       max_piece_seconds: float) -> AsyncGenerator[tuple[int, int], None]:
    """The pieces of a model without token times: cut at the speaker changes."""
    found = await turns
    for a, b, _speaker in turn_pieces(found, audio.available, max_piece_seconds, audio):
        yield a, b
