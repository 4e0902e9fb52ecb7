"""Request bodies on the wire: OpenAI's completions and chat schemas, llama.cpp's `/infill`.

Every field is bounded (text lengths, list lengths, numeric ranges) so a hostile body is refused
before it costs anything; NaN and infinity are refused too, and types are strict (JSON's own). Unknown fields are ignored, as other
OpenAI-compatible servers do, but the OpenAI features this server does not implement (penalties,
logit bias, tools) are refused by name instead of being silently dropped: see `check_supported`.

The methods at the bottom of each model (`max_new_tokens`, `wanted_logprobs`...) hide the naming
differences between the APIs from `convert.engine_requests`, the one place a body becomes engine types.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_TEXT_CHARS = 1_000_000  # the request body limit (2 MiB by default) is usually the tighter bound
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256
MAX_PROMPTS = 64  # prompts in one /v1/completions batch
MAX_N = 16  # choices per prompt
MAX_TOKENS = 1 << 20  # beyond any context window; the engine caps a request at its context
MAX_LOGPROBS = 20
MAX_MESSAGES = 1024
MAX_EXTRA_FILES = 64
MAX_INDENT = 1 << 16
MAX_PREDICT_MS = 24 * 3600 * 1000
UNTIL_CONTEXT_FULL = MAX_TOKENS  # llama.cpp's n_predict = -1: generate until the context is full


def _encodable(text: str) -> str:
    # JSON can carry lone surrogates ("\ud800"); no tokenizer can encode them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text contains an unpaired UTF-16 surrogate") from None
    return text


Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS), AfterValidator(_encodable)]
StopText = Annotated[str, Field(max_length=MAX_STOP_CHARS), AfterValidator(_encodable)]
Stop = Union[StopText, Annotated[list[StopText], Field(max_length=MAX_STOP_STRINGS)], None]
TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(min_length=1, max_length=MAX_TEXT_CHARS)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]  # what torch.Generator.manual_seed takes


class Body(BaseModel):
    # strict: `"logprobs": false` must not pass as 0, nor `"stream": "yes"` as true
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class SamplingFields(Body):
    """Sampling fields every generating route shares (OpenAI names; llama.cpp uses the same ones)."""

    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy; default: the server's")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=MAX_TOKENS, description="extension: keep the k likeliest tokens; 0 off")
    seed: Seed | None = None
    stop: Stop = Field(None, description="up to 16 strings; generation ends before any of them")
    stream: bool = False

    def stop_strings(self) -> tuple[str, ...] | None:
        """The stop strings asked for; None when the request leaves them to the server's default."""
        if self.stop is None:
            return None
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    # Overridden where the API names these differently.
    def max_new_tokens(self, default: int) -> int:
        """The completion's token budget; `default` (the server's) when the request leaves it out."""
        return default

    def wanted_logprobs(self) -> int | None:
        """None: no logprobs; k: each token's logprob and the k likeliest alternatives."""
        return None

    def choices_per_prompt(self) -> int:
        return 1

    def keep_going_past_eos(self) -> bool:
        return False

    def generation_time_limit(self) -> float | None:
        """Seconds generation may run from its first token (llama.cpp's t_max_predict_ms); None: no limit."""
        return None

    def unsupported(self) -> dict[str, Any]:
        """Fields set to something this server cannot do, by name."""
        return {}


class StreamOptions(Body):
    include_usage: bool = False


class OpenAIFields(SamplingFields):
    """What the OpenAI completions and chat APIs share beyond sampling."""

    model: str | None = Field(None, max_length=256, description="the served model's id; may be left out")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    n: int = Field(1, ge=1, le=MAX_N)
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="extension: keep generating past end-of-sequence (benchmarks)")
    user: str | None = Field(None, max_length=256)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="not supported: must be 0 if given")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="not supported: must be 0 if given")
    logit_bias: dict[str, float] | None = Field(None, max_length=300, description="not supported: must be empty")

    def max_new_tokens(self, default: int) -> int:
        return self.max_tokens or default

    def choices_per_prompt(self) -> int:
        return self.n

    def keep_going_past_eos(self) -> bool:
        return self.ignore_eos

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> dict[str, Any]:
        found = super().unsupported()
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                found[name] = "penalties are not supported; leave it out or send 0"
        if self.logit_bias:
            found["logit_bias"] = "logit_bias is not supported"
        return found


class CompletionRequest(OpenAIFields):
    """`POST /v1/completions`."""

    prompt: Union[
        Text,
        Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)],
        TokenIds,
        Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)],
    ]
    suffix: Text | None = Field(None, description="text after the insertion point: fill in the middle")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="not supported beyond n")

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: one text or one list of ids is a batch of one."""
        single = isinstance(self.prompt, str) or isinstance(self.prompt[0], int)
        return [self.prompt] if single else list(self.prompt)

    def wanted_logprobs(self) -> int | None:
        return self.logprobs

    def unsupported(self) -> dict[str, Any]:
        found = super().unsupported()
        if self.best_of is not None and self.best_of != self.n:
            found["best_of"] = "best_of is not supported; use n"
        return found


class TextPart(Body):
    type: Literal["text"]
    text: Text


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[Text, Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)], None] = None
    name: str | None = Field(None, max_length=256)

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content


class ChatCompletionRequest(OpenAIFields):
    """`POST /v1/chat/completions`."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict] | None = Field(None, max_length=128, description="not supported")
    response_format: dict | None = Field(None, description="only {'type': 'text'} is supported")

    def max_new_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> dict[str, Any]:
        found = super().unsupported()
        if self.top_logprobs and not self.logprobs:
            found["top_logprobs"] = "top_logprobs needs logprobs: true"
        if self.tools:
            found["tools"] = "tool calling is not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            found["response_format"] = "only the text response format is supported"
        return found


class ExtraFile(Body):
    """One file of editor context: `text` is required, `filename` optional (both strings), as in llama.cpp."""

    filename: str = Field("", max_length=4096)
    text: Text
    language: str = Field("", max_length=64, description="extension: its language id when not the document's")


class InfillRequest(SamplingFields):
    """`POST /infill` in llama.cpp's shape, as llama.vim and llama.vscode send it: `input_prefix` and
    `input_suffix` are required (they may be empty); the text before the cursor is `input_prefix + prompt`
    (the plugins send the cursor's line up to the cursor as `prompt`). `n_predict: 0` only computes and
    caches the prompt (the plugins' warm-up after their ring buffer of chunks changes). Fields of
    llama.cpp's that change nothing here (`cache_prompt`: prompts are always cached; `samplers`,
    `id_slot`, `t_max_prompt_ms`, `timings_per_token`, each extra chunk's `time`) are accepted and ignored."""

    input_prefix: Text
    input_suffix: Text
    input_extra: Annotated[list[ExtraFile], Field(max_length=MAX_EXTRA_FILES)] = []
    prompt: Text = ""
    n_predict: int | None = Field(None, ge=-1, le=MAX_TOKENS, description="-1: until the context is full; 0: only cache the prompt")
    n_indent: int | None = Field(None, ge=0, le=MAX_INDENT, description="stop at a new line indented by fewer whitespace characters")
    t_max_predict_ms: int | None = Field(None, ge=0, le=MAX_PREDICT_MS, description="stop this long after the first token; 0: no limit")
    response_fields: Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=64)] | None = Field(
        None, description="only these fields of the answer, paths like timings/prompt_n as flat keys")
    ignore_eos: bool = Field(False, description="generate n_predict tokens: no stop at end-of-generation tokens "
                             "or where the editor's answer is complete (benchmarks)")
    path: Annotated[str, Field(max_length=4096)] = Field("", description="extension: the document's path, for the prompt's file header")
    language: Annotated[str, Field(max_length=64)] = Field("", description="extension: the editor's language id")

    def max_new_tokens(self, default: int) -> int:
        if self.n_predict is None:
            return default
        return UNTIL_CONTEXT_FULL if self.n_predict == -1 else self.n_predict

    def generation_time_limit(self) -> float | None:
        return self.t_max_predict_ms / 1000 if self.t_max_predict_ms else None

    def keep_going_past_eos(self) -> bool:
        return self.ignore_eos


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    n_prompt_tokens: int | None = Field(None, description="context_length_exceeded: the prompt's tokens (llama.cpp's field)")
    n_ctx: int | None = Field(None, description="context_length_exceeded: the context window (llama.cpp's field)")


class ErrorResponse(BaseModel):
    """OpenAI's error shape, for every error status."""

    error: ErrorDetail
