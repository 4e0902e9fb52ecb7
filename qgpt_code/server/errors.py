"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the right status.

Bad input is always a 4xx naming the field at fault; a 5xx means a fault of the server itself.
"""

from __future__ import annotations

import sys

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from qgpt_code.engine import EngineClosed, EngineFailed, EngineOverloaded
from qgpt_code.errors import EmptyPromptError, PromptTooLongError, QGPTError

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         503: "overloaded_error"}


class APIError(Exception):
    """An HTTP error response, raised anywhere in a route."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, details: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.details = details or {}  # extra fields of the error object (llama.cpp's n_prompt_tokens, n_ctx)

    def body(self) -> dict:
        body = error_body(self.status, self.message, self.param, self.code)
        body["error"].update(self.details)
        return body

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def from_qgpt_error(exc: QGPTError, prompt_field: str | None = None) -> APIError:
    """The status a user-facing engine or prompt error deserves. `prompt_field` names the request
    field the prompt came from (prompt, messages, input_prefix), for errors about the prompt."""
    if isinstance(exc, EngineOverloaded):
        return APIError(429, str(exc), code="overloaded", headers={"Retry-After": "1"})
    if isinstance(exc, EngineFailed):
        return APIError(503, str(exc), code="engine_failed")
    if isinstance(exc, EngineClosed):
        return APIError(503, str(exc), code="shutting_down")
    if isinstance(exc, PromptTooLongError):  # 400, as OpenAI and llama.cpp answer it (their SDKs rely on it)
        context = exc.limit + 1
        message = (f"the prompt ({exc.n_prompt} tokens) exceeds the available context size ({context} tokens, "
                   "which must also hold at least one new token): shorten the prompt")
        return APIError(400, message, param=prompt_field, code="context_length_exceeded",
                        details={"n_prompt_tokens": exc.n_prompt, "n_ctx": context})
    if isinstance(exc, EmptyPromptError):
        return APIError(400, str(exc), param=prompt_field)
    return APIError(400, str(exc))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()

    @app.exception_handler(QGPTError)
    async def user_error(request: Request, exc: QGPTError) -> JSONResponse:
        return from_qgpt_error(exc).response()

    @app.exception_handler(Exception)
    async def server_fault(request: Request, exc: Exception) -> JSONResponse:
        print(f"qgpt serve: internal error on {request.url.path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return APIError(500, f"internal server error: {type(exc).__name__}").response()


def validation_error(exc: RequestValidationError) -> APIError:
    """400 for the invalid field, named as a dotted path (`messages.0.role`). For a union (a prompt
    may be text or token ids) the deepest error is the telling one: `prompt.0`, not "not a string"."""
    errors = exc.errors()
    first = max(errors, key=lambda e: len(e.get("loc", ())))  # max keeps the first of equals
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON: {detail}".rstrip(": "))
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    # pydantic appends the union member tried (`str`, `list[...]`) to the path; it is not a field
    fields = [part for part in location if not ("[" in part or part in _TYPE_NAMES)]
    param = ".".join(fields) or None
    message = first.get("msg", "invalid value")
    return APIError(400, f"{param}: {message}" if param else f"invalid request body: {message}", param=param)


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "function-after", "union"}
