"""Where samples are generated: the in-process `Engine`, or any OpenAI-compatible HTTP server.

Both backends have the same small surface: `generate(request) -> Generation` (blocking, safe to call from
many threads at once: that is how requests are batched), `concurrency` (how many calls to keep in flight),
`identity()` (what the summary records about the model), `default_chat()` and `close()`.

The engine backend builds exactly the prompts our server builds for the same request (the same prompts/
functions, the same stop ids, the same /infill budget), so at temperature 0 a run in-process and a run
through `qgpt serve` produce the same samples. torch and the engine are imported only when an
`EngineBackend` is made. The HTTP backend uses only the standard library.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

from qgpt_code.errors import QGPTError
from qgpt_code.evals.prompting import BASE, CHAT, INFILL, Generation, GenerationRequest

INFILL_BUDGET = 2048  # the server's default `infill_budget` (ServerSettings): editor context per prompt
_CHAT_NAME = re.compile(r"chat|instruct|(?:^|[-_.])it(?:$|[-_.])", re.IGNORECASE)


class GenerationError(QGPTError):
    """Generation cannot go on (the engine failed, the server is unreachable or refuses the run)."""


def looks_like_chat_model(name: str) -> bool:
    """Whether a model's name says it was tuned to chat: `...-chat`, `...-Instruct`, `gemma-2b-it`."""
    return bool(_CHAT_NAME.search(name))


def infill_budget(context: int, max_tokens: int) -> int:
    """The editor-context budget of an infilling prompt, as the server's /infill and the language server
    compute it (`prompts.completion_budget`), at most INFILL_BUDGET."""
    from qgpt_code.prompts import completion_budget

    return completion_budget(context, INFILL_BUDGET, max_tokens)


# -- in-process ----------------------------------------------------------------------------------------


class EngineBackend:
    """Samples from a model loaded in this process, batched by a serving `Engine`."""

    def __init__(self, loaded, engine):
        self.loaded, self.engine = loaded, engine
        self.tokenizer = loaded.tokenizer
        self.add_bos = getattr(self.tokenizer, "add_bos", True)  # as the server's PromptBuilder
        self.end_ids = tuple(sorted(getattr(self.tokenizer, "eog_ids", ())))
        # a full batch running and as many waiting; at batch 1 (`--batch 1`, latency as one editor sees it)
        # nothing waits behind the running request, so each sample's `seconds` is its own
        self.concurrency = 1 if engine.max_batch == 1 else 2 * engine.max_batch
        self.runtime_quantization = None  # e.g. "int8": applied after loading (`--quantize`)

    @classmethod
    def from_args(cls, args) -> EngineBackend:
        """Load the model the CLI options name and start an engine of `--batch` sequences."""
        from qgpt_code.cli_common import engine_from_args, load_from_args

        loaded = load_from_args(args)
        args.max_batch, args.max_queue = args.batch, 2 * args.batch
        backend = cls(loaded, engine_from_args(args, loaded))
        backend.runtime_quantization = getattr(args, "quantize", None)
        return backend

    def identity(self) -> dict[str, Any]:
        import torch

        info, model_args = self.loaded.info, self.loaded.model.args
        return {
            "backend": "engine",
            "path": str(info.path),
            "name": info.name,
            "format": info.format,
            "quantization": info.quantization,
            "runtime_quantization": self.runtime_quantization,
            "chat_format": info.chat_format,
            "has_chat_template": bool(info.chat_template),
            "architecture": {key: getattr(model_args, key, None) for key in (
                "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "rope_theta", "max_seq_len")},
            "device": str(self.loaded.device),
            "dtype": str(self.loaded.dtype).removeprefix("torch."),
            "engine": {"max_batch": self.engine.max_batch, "max_seq_len": self.engine.max_seq_len},
            "torch": torch.__version__,
        }

    def default_chat(self) -> bool:
        info = self.loaded.info
        names = f"{info.name} {info.path.name}"
        return bool(info.chat_format == "template" and info.chat_template) or looks_like_chat_model(names)

    def generate(self, request: GenerationRequest) -> Generation:
        from qgpt_code.engine import EngineOverloaded, Request
        from qgpt_code.generation import SamplingParams

        try:
            tokens, stop_ids, postprocess, stop_when = self._prompt(request)
            params = SamplingParams(
                max_new_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
                seed=request.seed, stop=request.stop, stop_ids=stop_ids, stop_when=stop_when,
            )  # fmt: skip
        except QGPTError as exc:  # a dialog the chat format refuses, say
            return Generation("", "error", error=str(exc))
        while True:
            try:
                started = time.monotonic()
                handle = self.engine.submit(Request(tokens, params))
                break
            except EngineOverloaded:  # more callers than the queue holds: wait for room
                time.sleep(0.05)
            except QGPTError as exc:  # the prompt does not fit the context window
                return Generation("", "error", len(tokens), error=str(exc))
        completion = handle.result()
        if completion.finish_reason in ("error", "cancelled"):
            raise GenerationError(f"the engine stopped: {handle.error or completion.finish_reason}")
        return Generation(completion.text, completion.finish_reason, len(tokens), len(completion.tokens),
                          seconds=time.monotonic() - started, postprocess=postprocess)

    def _prompt(self, request: GenerationRequest):
        """(prompt ids, stop ids, post-processing, early stop) built as the server builds them."""
        if request.mode == BASE:
            return self.tokenizer.encode(request.prompt, bos=self.add_bos), self.end_ids, None, None
        if request.mode == CHAT:
            from qgpt_code.prompts import chat_tokens

            return chat_tokens(self.loaded.info, self.tokenizer, request.dialog()), self.end_ids, None, None
        from qgpt_code.prompts import ContextOptions, completion_prompt

        budget = infill_budget(self.engine.max_seq_len, request.max_tokens)
        prompt = completion_prompt(self.tokenizer, request.prefix, request.suffix,
                                   language_id=request.language_id, options=ContextOptions(budget=budget))
        # the language server's generation exactly: its stop ids, its early stop, its trimming
        return (prompt.tokens, tuple(dict.fromkeys(prompt.stop_ids + self.end_ids)), prompt.postprocess,
                prompt.stop_when)

    def close(self) -> None:
        self.engine.close()


# -- over HTTP -----------------------------------------------------------------------------------------


class HTTPBackend:
    """Samples from an OpenAI-compatible server: `/v1/completions` (base), `/v1/chat/completions` (chat),
    and llama.cpp's `/infill` (input_prefix, input_suffix; streamed, so that the raw text comes back and is
    post-processed here exactly as in-process, whatever the server does with it)."""

    RETRY_STATUSES = (429, 503)

    def __init__(self, url: str, *, api_key: str | None = None, model: str | None = None, concurrency: int = 8,
                 timeout: float = 600.0, retries: int = 8):
        self.url = normalize_url(url)
        self.api_key, self.timeout, self.retries = api_key, timeout, retries
        self.concurrency = concurrency
        self.models = self._list_models()
        if model is None:
            if not self.models:
                raise GenerationError(f"{self.url}/v1/models lists no model: name one with --server-model")
            model = self.models[0]["id"]
        self.model = model

    def identity(self) -> dict[str, Any]:
        card = next((m for m in self.models if m.get("id") == self.model), {})
        return {"backend": "http", "server": self.url, "model_id": self.model,
                "owned_by": card.get("owned_by"), "models_listed": [m.get("id") for m in self.models]}

    def default_chat(self) -> bool:
        return looks_like_chat_model(self.model)

    def close(self) -> None:
        pass

    def generate(self, request: GenerationRequest) -> Generation:
        sampling = {"temperature": request.temperature, "top_p": request.top_p, "seed": request.seed}
        if request.mode == INFILL:
            body = {"input_prefix": request.prefix, "input_suffix": request.suffix, "prompt": "",
                    "language": request.language_id, "n_predict": request.max_tokens, "stream": True, **sampling}
            return self._infill(body)
        body = {"model": self.model, "max_tokens": request.max_tokens, **sampling, "n": 1}
        if request.stop:
            body["stop"] = list(request.stop)
        if request.mode == BASE:
            reply = self._post("/v1/completions", {**body, "prompt": request.prompt})
            if isinstance(reply, Generation):
                return reply
            choice = reply["choices"][0]
            text = choice.get("text") or ""
        else:
            reply = self._post("/v1/chat/completions", {**body, "messages": request.dialog()})
            if isinstance(reply, Generation):
                return reply
            choice = reply["choices"][0]
            text = (choice.get("message") or {}).get("content") or ""
        usage = reply.get("usage") or {}
        return Generation(text, choice.get("finish_reason") or "stop", usage.get("prompt_tokens", 0),
                          usage.get("completion_tokens", 0))

    # -- transport ---------------------------------------------------------------------------------

    def _list_models(self) -> list[dict]:
        reply = self._post("/v1/models", None)
        if isinstance(reply, Generation):
            raise GenerationError(f"{self.url}/v1/models: {reply.error}")
        return [m for m in reply.get("data") or [] if isinstance(m, dict) and "id" in m]

    def _infill(self, body: dict) -> Generation:
        started = time.monotonic()
        reply = self._post("/infill", body, stream=True)
        if isinstance(reply, Generation):
            return reply
        text, final = "", {}
        for chunk in reply:
            text += chunk.get("content") or ""
            if chunk.get("stop"):
                final = chunk
        reason = final.get("finish_reason") or {"eos": "stop", "word": "stop", "limit": "length"}.get(
            final.get("stop_type"), "stop")
        return Generation(text, reason, final.get("tokens_evaluated", 0), final.get("tokens_predicted", 0),
                          seconds=time.monotonic() - started)

    def _post(self, path: str, body: dict | None, stream: bool = False):
        """The JSON reply (an iterator of chunks when streaming); a `Generation` with `error` when the
        server refuses this one request (400, 413: say a prompt too long); retries 429 and 503 with backoff;
        GenerationError for anything that stops the run."""
        url = self.url + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if stream else "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        delay = 0.5
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
            try:
                response = urllib.request.urlopen(request, timeout=self.timeout)
            except urllib.error.HTTPError as error:
                message = _error_message(error)
                if error.code in self.RETRY_STATUSES and attempt < self.retries:
                    time.sleep(_retry_after(error, delay))
                    delay = min(delay * 2, 10.0)
                    continue
                if error.code in (400, 413, 422):
                    return Generation("", "error", error=f"HTTP {error.code}: {message}")
                if error.code == 401:
                    raise GenerationError(f"{url}: the server wants an API key (--api-key or $QGPT_API_KEY): {message}")
                raise GenerationError(f"{url}: HTTP {error.code}: {message}") from None
            except (urllib.error.URLError, OSError) as error:
                reason = getattr(error, "reason", error)
                raise GenerationError(f"cannot reach {url}: {reason}") from None
            if stream:
                return _sse_chunks(response)
            with response:
                try:
                    return json.loads(response.read())
                except json.JSONDecodeError as error:
                    raise GenerationError(f"{url}: the reply is not JSON ({error.msg})") from None
        raise AssertionError("unreachable")


def normalize_url(url: str) -> str:
    """`http://host:8000`, `http://host:8000/` and `http://host:8000/v1` all name the same server."""
    url = url.strip().rstrip("/")
    if not re.match(r"^https?://", url):
        url = "http://" + url
    return url.removesuffix("/v1")


def _sse_chunks(response) -> Iterator[dict]:
    """The JSON objects of a server-sent event stream (`data: {...}` lines; `[DONE]` ends it)."""
    with response:
        for raw in response:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            payload = line[len("data:"):].strip()
            if payload == "[DONE]":
                return
            try:
                chunk = json.loads(payload)
            except json.JSONDecodeError:
                raise GenerationError(f"a streamed chunk is not JSON: {payload[:80]!r}") from None
            if "error" in chunk and "content" not in chunk:
                raise GenerationError(f"the server failed mid-stream: {chunk['error']}")
            yield chunk


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read() or b"{}")
    except (json.JSONDecodeError, OSError):
        return error.reason or ""
    detail = body.get("error") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        return str(detail.get("message", ""))
    return str(detail or body)


def _retry_after(error: urllib.error.HTTPError, default: float) -> float:
    try:
        return max(float(error.headers.get("Retry-After", default)), 0.05)
    except (TypeError, ValueError):
        return default

