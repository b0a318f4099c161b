"""POST /v1/audio/transcriptions (and /v1/audio/translations): the route reads the form, starts
the request's ``Job`` (``bridge.job``: checks, decode, cut, engine) and answers it whole or as a
stream.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.background import BackgroundTask
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from bridge.api_types import MAX_KEYWORDS, MAX_LANGUAGES
from bridge.job import Job
from bridge.state import BridgeState, get_state
from bridge.upload import storage_error
from common.access import access_record
from common.errors import APIError

router = APIRouter()


@router.post("/v1/audio/transcriptions")
async def create_transcription(request: Request, state: BridgeState = Depends(get_state)) -> Response:
    return await answer(request, state, "transcribe")


@router.post("/v1/audio/translations")
async def create_translation(request: Request, state: BridgeState = Depends(get_state)) -> Response:
    return await answer(request, state, "translate")


async def answer(request: Request, state: BridgeState, task: str) -> Response:
    """The route: read the form, start the job (checks, then decode, cut and engine overlapped), and
    answer it whole or as a stream. The job's ``aclose`` releases what it holds, on every path."""
    if state.in_flight >= state.settings.max_concurrent_requests:
        raise APIError(503, "the server is busy; retry shortly", code="overloaded", type="server_error",
                       retry_after=2)
    state.in_flight += 1
    try:
        job = Job(state, task, access_record(request))
        form = await read_form(request)
        try:
            await job.start(form)
        except BaseException:
            await job.aclose()
            raise
        finally:
            await form.close()
        if job.params.stream:
            return StreamingResponse(job.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                              "x-model-id": job.engine.spec.id, **job.warning_header()},
                                     background=BackgroundTask(job.aclose))
        async with job:
            return await job.whole_answer()
    finally:
        state.in_flight -= 1


async def read_form(request: Request) -> FormData:
    try:
        # Fields are small, except known speakers' references: data URLs of up to 10 s of audio each. The
        # body as a whole stays under MAX_UPLOAD_BYTES.
        return await request.form(max_files=1, max_fields=32 + MAX_KEYWORDS + MAX_LANGUAGES,
                                  max_part_size=4 * 1024 * 1024)
    except OSError as exc:  # the upload is spooled to TMPDIR as it arrives
        raise storage_error(exc) from None
    except MultiPartException as exc:
        raise APIError(400, f"malformed multipart body: {exc.message}", code="invalid_multipart") from None
