"""The client connection: server-sent events, and cancelling generations whose client went away."""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from qgpt_code.server.jobs import Job

DONE = b"data: [DONE]\n\n"


def sse(body: dict) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def sse_events(job: Job, fmt) -> AsyncIterator[bytes]:
    """The job as SSE chunks in `fmt`'s shape (see responses.py). An engine failure mid-stream is sent
    as an OpenAI error object, since the status line has gone out already, and ends the stream."""
    for body in fmt.opening(job):
        yield sse(body)
    failed = False
    async for choice, event in job.events():
        failure = job.failure(choice) if event.finish_reason else None
        if failure is not None:
            job.cancel()
            yield sse(failure.body())
            failed = True
            break
        for body in fmt.chunks(job, choice, event):
            yield sse(body)
    if not failed:
        for body in fmt.closing(job):
            yield sse(body)
    if fmt.done_marker:
        yield DONE


class EventStream(StreamingResponse):
    """An SSE response that cancels its job however it ends: finished, failed, or the client gone.

    uvicorn speaks ASGI 2.3, where Starlette watches for `http.disconnect` while streaming and cancels
    the stream at once; `finally` then frees the batch slots instead of generating for nobody."""

    def __init__(self, events: AsyncIterator[bytes], job: Job):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


async def run_unless_disconnected(job: Job, request: Request) -> bool:
    """`job.run()` for a non-streaming response, cancelled if the client disconnects meanwhile;
    whether the client is still there to be answered."""
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        job.cancel()

    watcher = asyncio.create_task(watch())
    try:
        await job.run()
    finally:
        watcher.cancel()
    return not gone


class NoResponse(Response):
    """What a route returns for a client that has gone: nothing is sent, and the request is counted
    with the status `no_response` (its generations as `cancelled`), not as an error of the server."""

    def __init__(self) -> None:
        super().__init__(status_code=499)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return None
