"""Response bodies, whole and streamed: OpenAI's completion and chat shapes, llama.cpp's /infill shape.

Each route has a format object, made per request, with the same four methods:
  whole(job)                 the JSON body of a non-streaming response
  opening(job)               chunks sent before the first token (chat's role delta, completions' echo)
  chunks(job, choice, event) the chunks for one token event (none when it carries nothing to send)
  closing(job)               chunks after the last token (the usage chunk, when asked for)
`streaming.sse_events` drives them; `done_marker` says whether the stream ends with `data: [DONE]`.

A choice's stream ends as OpenAI's and llama.cpp's do: its last text arrives in an ordinary chunk, then
one more chunk carries no text (an empty delta; `""`) and the `finish_reason` (llama.cpp: `"stop": true`
and the totals). Clients that read text only from chunks without a finish reason see all of it.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Sequence

from qgpt_code.engine import RequestHandle
from qgpt_code.generation import TokenEvent
from qgpt_code.prompts import decode_without_leading_space
from qgpt_code.server.jobs import Choice, Job
from qgpt_code.server.protocol import ChatCompletionRequest, CompletionRequest
from qgpt_code.tokenizer import Tokenizer


class TokenTexts:
    """The text of single token ids, as logprobs report them (SentencePiece's leading space kept)."""

    def __init__(self, tokenizer: Tokenizer):
        self.of = lru_cache(maxsize=65536)(lambda token_id: decode_without_leading_space(tokenizer, [token_id]))


class CompletionFormat:
    done_marker = True

    def __init__(self, model_id: str, texts: TokenTexts, body: CompletionRequest):
        self.model_id, self.texts, self.body = model_id, texts, body
        self.offsets: dict[int, int] = {}  # choice index -> text offset of its next token (streaming logprobs)

    def whole(self, job: Job) -> dict:
        choices = []
        for choice in job.choices:
            echo = choice.prompt.text if self.body.echo else ""
            logprobs = None
            if self.body.logprobs is not None:
                prompt_ids = choice.prompt.tokens if self.body.echo else ()
                logprobs = self._logprobs(choice.tokens, 0, prompt_ids)
            choices.append({"index": choice.index, "text": echo + choice.text, "logprobs": logprobs,
                            "finish_reason": choice.finish_reason})
        return self._envelope(job, choices, usage=job.usage())

    def opening(self, job: Job) -> list[dict]:
        if not self.body.echo:
            return []
        return [self._envelope(job, [{"index": c.index, "text": c.prompt.text, "logprobs": None,
                                      "finish_reason": None}]) for c in job.choices]

    def chunks(self, job: Job, choice: Choice, event: TokenEvent) -> list[dict]:
        logprobs = None
        if self.body.logprobs is not None and event.token_id is not None:
            start = self.offsets.get(choice.index, len(choice.prompt.text) if self.body.echo else 0)
            logprobs = self._logprobs([event], start)
            self.offsets[choice.index] = start + len(logprobs["tokens"][0])
        out = []
        if event.text or logprobs:
            out.append(self._choice_chunk(job, choice, event.text, logprobs, None))
        if event.finish_reason:
            out.append(self._choice_chunk(job, choice, "", None, event.finish_reason))
        return out

    def _choice_chunk(self, job: Job, choice: Choice, text: str, logprobs: dict | None, finish: str | None) -> dict:
        return self._envelope(job, [{"index": choice.index, "text": text, "logprobs": logprobs,
                                     "finish_reason": finish}])

    def closing(self, job: Job) -> list[dict]:
        return [self._envelope(job, [], usage=job.usage())] if self.body.include_usage() else []

    def _logprobs(self, events: Sequence[TokenEvent], offset: int, prompt_ids: Sequence[int] = ()) -> dict:
        """OpenAI's legacy completions logprobs. Echoed prompt tokens get null logprobs: the engine
        does not score prompts."""
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        steps = [(i, None, None) for i in prompt_ids] + [(e.token_id, e.logprob, e.top_logprobs) for e in events]
        for token_id, logprob, top in steps:
            text = self.texts.of(token_id)
            tokens.append(text)
            token_logprobs.append(logprob)
            top_logprobs.append(None if top is None else self._by_text(top))
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}

    def _by_text(self, top: list[tuple[int, float]]) -> dict[str, float]:
        """Alternatives keyed by text; where ids share a text (byte pieces all read "\ufffd"), the likeliest."""
        alternatives: dict[str, float] = {}
        for token_id, logprob in top:  # most likely first
            alternatives.setdefault(self.texts.of(token_id), logprob)
        return alternatives

    def _envelope(self, job: Job, choices: list[dict], usage: dict | None = None) -> dict:
        body = {"id": job.id, "object": "text_completion", "created": job.created, "model": self.model_id,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body


class ChatFormat:
    done_marker = True

    def __init__(self, model_id: str, texts: TokenTexts, body: ChatCompletionRequest):
        self.model_id, self.texts, self.body = model_id, texts, body

    def whole(self, job: Job) -> dict:
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self._logprobs(c.tokens), "finish_reason": c.finish_reason} for c in job.choices]
        return self._envelope(job, "chat.completion", choices, usage=job.usage())

    def opening(self, job: Job) -> list[dict]:
        return [self._envelope(job, "chat.completion.chunk", [{
            "index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None,
        }]) for c in job.choices]

    def chunks(self, job: Job, choice: Choice, event: TokenEvent) -> list[dict]:
        logprobs = self._logprobs([event]) if event.token_id is not None else None
        out = []
        if event.text or logprobs:
            delta = {"content": event.text} if event.text else {}
            out.append(self._choice_chunk(job, choice, delta, logprobs, None))
        if event.finish_reason:
            out.append(self._choice_chunk(job, choice, {}, None, event.finish_reason))
        return out

    def _choice_chunk(self, job: Job, choice: Choice, delta: dict, logprobs: dict | None, finish: str | None) -> dict:
        return self._envelope(job, "chat.completion.chunk", [{
            "index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
        }])

    def closing(self, job: Job) -> list[dict]:
        if not self.body.include_usage():
            return []
        return [self._envelope(job, "chat.completion.chunk", [], usage=job.usage())]

    def _logprobs(self, events: Sequence[TokenEvent]) -> dict | None:
        if self.body.wanted_logprobs() is None:
            return None
        return {"content": [{**self._entry(e.token_id, e.logprob),
                             "top_logprobs": [self._entry(i, lp) for i, lp in e.top_logprobs or ()]}
                            for e in events]}

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.texts.of(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _envelope(self, job: Job, kind: str, choices: list[dict], usage: dict | None = None) -> dict:
        body = {"id": job.id, "object": kind, "created": job.created, "model": self.model_id, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body


class InfillFormat:
    """llama.cpp's `/infill` (and `/completion`) shape; its streams end with a `"stop": true` chunk, no [DONE].
    `response_fields` (llama.cpp's) keeps only the named fields of the final answer, `a/b` paths as flat keys."""

    done_marker = False
    STOP_TYPES = {"stop": "eos", "length": "limit", "time_limit": "limit"}

    def __init__(self, model_id: str, response_fields: Sequence[str] | None = None):
        self.model_id = model_id
        self.response_fields = response_fields

    def whole(self, job: Job) -> dict:
        choice = job.choices[0]
        # out of tokens or of time: the text may end mid-line, which the editor's trimming drops
        truncated = choice.finish_reason in ("length", "time_limit")
        content = choice.prompt.postprocess(choice.text, truncated) if choice.prompt.postprocess else choice.text
        return self._fields({"content": content, **self._summary(job)})

    def opening(self, job: Job) -> list[dict]:
        return []

    def chunks(self, job: Job, choice: Choice, event: TokenEvent) -> list[dict]:
        out = [{"content": event.text, "stop": False}] if event.text else []
        if event.finish_reason:
            out.append(self._fields({"content": "", **self._summary(job)}))
        return out

    def closing(self, job: Job) -> list[dict]:
        return []

    def _summary(self, job: Job) -> dict:
        choice = job.choices[0]
        handle = choice.handle
        return {"stop": True, "model": self.model_id, "stop_type": self.STOP_TYPES.get(choice.finish_reason, "none"),
                "finish_reason": choice.finish_reason, "tokens_predicted": handle.completion_tokens,
                "tokens_evaluated": handle.prompt_tokens, "tokens_cached": handle.cached_tokens, "truncated": False,
                "has_new_line": "\n" in choice.text, "timings": timings(handle)}

    def _fields(self, body: dict) -> dict:
        return pick_fields(body, self.response_fields) if self.response_fields else body


def timings(handle: RequestHandle) -> dict:
    """llama.cpp's `timings`: the prompt tokens computed (the rest came from the prefix cache) and the
    time from the engine taking the request to the first token; the tokens generated and the time from
    the first token to the last; speculation's guessed tokens and those confirmed (llama.cpp's draft_n)."""
    end = handle.finished_at or time.monotonic()
    first = handle.first_token_at or end
    start = handle.started_at or handle.submitted_at
    prompt_n, predicted_n = handle.prompt_tokens - handle.cached_tokens, handle.completion_tokens
    prompt_ms, predicted_ms = (first - start) * 1000, (end - first) * 1000
    return {"cache_n": handle.cached_tokens,
            "prompt_n": prompt_n, "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
            "prompt_per_second": 1000 * prompt_n / prompt_ms if prompt_ms else 0.0,
            "predicted_n": predicted_n, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
            "predicted_per_second": 1000 * predicted_n / predicted_ms if predicted_ms else 0.0,
            "draft_n": handle.tokens_proposed, "draft_n_accepted": handle.tokens_accepted}


def pick_fields(body: dict, paths: Sequence[str]) -> dict:
    """Each path (`content`, `timings/prompt_n`) that leads to a value, as a flat key (llama.cpp's
    `json_get_nested_values`); a path that leads nowhere is left out."""
    picked = {}
    for path in paths:
        value = body
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            picked[path] = value
    return picked
