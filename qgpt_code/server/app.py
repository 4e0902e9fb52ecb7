"""`create_app(engine, settings)`: the FastAPI app over a running Engine.

A generating route does four things: check the body (protocol.py bounds it, `_check` refuses what
the server cannot do), build the prompt(s) (prompting.py) on a worker thread, convert to engine requests
(convert.engine_requests) and submit them as one Job, then answer whole or as a stream
(responses.py shapes, streaming.py transport). The engine never sees HTTP; nothing here touches tensors.

Prompt building runs off the event loop: tokenizing a 1,000,000-character prompt takes a tenth of a
second to seconds, and on the loop it would stall every other request, `/health` included.
"""

from __future__ import annotations

import asyncio
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.middleware.cors import CORSMiddleware

from qgpt_code import __version__
from qgpt_code.engine import Engine
from qgpt_code.server.convert import engine_requests
from qgpt_code.server.errors import APIError, install_error_handlers
from qgpt_code.server.jobs import Job
from qgpt_code.server.metrics import Metrics
from qgpt_code.server.middleware import LimitBody, RequireApiKey
from qgpt_code.server.prompting import Prompt, PromptBuilder
from qgpt_code.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    InfillRequest,
    SamplingFields,
)
from qgpt_code.server.responses import ChatFormat, CompletionFormat, InfillFormat, TokenTexts
from qgpt_code.server.settings import ServerSettings
from qgpt_code.server.streaming import EventStream, NoResponse, run_unless_disconnected, sse_events

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)}
GENERATED = {**ERRORS, 200: {"description": "the whole response, or server-sent events with `stream: true`",
                             "content": {"text/event-stream": {}}}}
# Prompts built at once: half the CPUs, so tokenizing huge prompts leaves the event loop and the engine a
# core; more wait (each holds its text and tokens meanwhile). Everyday prompts take milliseconds.
PROMPT_THREADS = max(1, (os.cpu_count() or 2) // 2)


def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    prompt_threads = ThreadPoolExecutor(PROMPT_THREADS, thread_name_prefix="qgpt-prompt")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            prompt_threads.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="QGPT Code", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible completions over a self-hosted Llama-2-family model.")
    app.state.engine, app.state.settings = engine, settings
    metrics = app.state.metrics = Metrics(engine)
    prompts = PromptBuilder(engine.loaded, engine.max_seq_len, settings.infill_budget)
    texts = TokenTexts(engine.tokenizer)
    install_error_handlers(app)
    # added innermost first: CORS answers preflights before the key is asked for and adds its headers to
    # every answer, 401s included; metrics see every response, 401s and 413s included
    app.add_middleware(LimitBody, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(RequireApiKey, api_key=settings.api_key)
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins),
                           allow_methods=["GET", "POST"], allow_headers=["*"], max_age=600)
    app.add_middleware(metrics.middleware)

    async def off_the_loop(build, *args):
        """`build(*args)` on a prompt thread: tokenizing must not stall the event loop."""
        return await asyncio.get_running_loop().run_in_executor(prompt_threads, functools.partial(build, *args))

    def model_card() -> dict:
        return {"id": settings.model_id, "object": "model", "created": 0, "owned_by": "qgpt"}

    def check(body: SamplingFields, n_prompts: int = 1) -> None:
        model = getattr(body, "model", None)
        if model is not None and model != settings.model_id:
            raise APIError(404, f"model {model!r} is not served here; this server has {settings.model_id!r}",
                           param="model", code="model_not_found")
        unsupported = body.unsupported()
        if unsupported:
            field, message = next(iter(unsupported.items()))
            raise APIError(400, f"{field}: {message}", param=field)
        if n_prompts * body.choices_per_prompt() > settings.max_choices:
            raise APIError(400, f"n: {n_prompts} prompt(s) x n={body.choices_per_prompt()} asks for more than "
                           f"{settings.max_choices} completions", param="n")

    async def respond(request: Request, body: SamplingFields, prompt_list: list[Prompt], fmt,
                      prompt_field: str, id_prefix: str) -> Response:
        work = [(p, engine_requests(body, p, settings)) for p in prompt_list]
        job = Job(engine, work, metrics, prompt_field, id_prefix)
        if body.stream:
            return EventStream(sse_events(job, fmt), job)
        if not await run_unless_disconnected(job, request):
            return NoResponse()
        return JSONResponse(fmt.whole(job))

    @app.post("/v1/completions", responses=GENERATED, summary="Complete a prompt (OpenAI completions)")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check(body, len(body.prompts()))
        prompt_list = await off_the_loop(prompts.completion, body)
        return await respond(request, body, prompt_list, CompletionFormat(settings.model_id, texts, body),
                             "prompt", "cmpl")

    @app.post("/v1/chat/completions", responses=GENERATED, summary="Answer a dialog (OpenAI chat completions)")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check(body)
        prompt = await off_the_loop(prompts.chat, body)
        return await respond(request, body, [prompt], ChatFormat(settings.model_id, texts, body),
                             "messages", "chatcmpl")

    @app.post("/infill", responses=GENERATED, summary="Fill in at the cursor (llama.cpp's /infill)")
    async def infill(body: InfillRequest, request: Request) -> Response:
        check(body)
        prompt = await off_the_loop(prompts.infill_request, body,
                                    body.max_new_tokens(settings.sampling.max_new_tokens))
        return await respond(request, body, [prompt], InfillFormat(settings.model_id, body.response_fields),
                             "input_prefix", "infill")

    @app.get("/v1/models", summary="The served model")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}", responses=ERRORS, summary="One model")
    async def get_model(model: str) -> dict:
        if model != settings.model_id:
            raise APIError(404, f"model {model!r} is not served here", param="model", code="model_not_found")
        return model_card()

    @app.get("/health", summary="Liveness and load (no API key needed); 503 once the engine has stopped")
    async def health() -> Response:
        stats = engine.stats()
        body = {"status": "ok", "model": settings.model_id, "queued": stats.queued, "running": stats.running,
                "max_batch": engine.max_batch, "max_queue": engine.max_queue}
        if engine.failure is not None:
            return JSONResponse({**body, "status": "error", "error": engine.failure}, status_code=503)
        return JSONResponse(body)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=Metrics.content_type)

    def openapi() -> dict:
        """FastAPI's schema, less the 422 it documents: invalid bodies are 400s here, as at OpenAI."""
        if app.openapi_schema is None:
            for operations in FastAPI.openapi(app)["paths"].values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
        return app.openapi_schema

    app.openapi = openapi
    return app
