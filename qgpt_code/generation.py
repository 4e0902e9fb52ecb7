"""Generation's vocabulary and its simplest entry points.

`SamplingParams` (Meta's `text_completion` / `chat_completion` defaults: temperature 0.6, top_p 0.9,
stop at EOS), the `TokenEvent`s a generation produces, the per-sequence `TextState` that turns tokens
into text and decides when to stop, and `generate` / `generate_text` / `stream_text`, which run
prompts to completion through the same `Scheduler` the serving engine uses, without threads or a
shared prefix cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from qgpt_code.checkpoints.assemble import LoadedModel
from qgpt_code.detokenize import IncrementalDecoder, StopStringFilter
from qgpt_code.errors import EmptyPromptError, PromptTooLongError, QGPTError
from qgpt_code.kv_cache import BlockPool, blocks_for
from qgpt_code.model import Transformer
from qgpt_code.tokenizer import Tokenizer


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256  # 0: only compute (and cache) the prompt's keys/values, generate nothing
    temperature: float = 0.6  # 0: greedy
    top_p: float = 0.9
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None  # None: torch's global generator
    stop: tuple[str, ...] = ()  # generation ends before any of these strings; they are not emitted
    stop_ids: tuple[int, ...] = ()  # ids that end generation besides EOS (e.g. Code Llama's EOT)
    logprobs: bool = False
    top_logprobs: int = 0  # with logprobs: also the n likeliest alternatives at each step
    ignore_eos: bool = False  # keep going past EOS (benchmarks that need a fixed token count)
    truncate_prompt: bool = False  # keep a too-long prompt's last tokens instead of failing
    # Called with the whole text generated so far whenever a line's indentation becomes known: after a
    # token whose text holds a line break, and after the one that puts the first non-blank character on
    # a new line. True ends the generation (finish_reason "stop"); the text so far is emitted. Editors
    # use it to stop once the block at the cursor is closed (prompts' `CompletionPrompt.stop_when`).
    stop_when: Callable[[str], bool] | None = field(default=None, compare=False)
    max_generation_seconds: float | None = None  # from the first token; past it: finish_reason "time_limit"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise QGPTError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}")
        if self.max_generation_seconds is not None and self.max_generation_seconds <= 0:
            raise QGPTError(f"max_generation_seconds must be positive, got {self.max_generation_seconds}")
        if self.temperature < 0:
            raise QGPTError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise QGPTError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class TokenEvent:
    """One step of one sequence: the token chosen, the text it completes, and whether it ended."""

    token_id: int | None  # None on an event that only ends the sequence (cancelled, timeout, error)
    text: str
    logprob: float | None = None
    # "stop" (EOS, stop id or string, stop_when), "length", "time_limit" (max_generation_seconds),
    # "cancelled", "timeout" (the request's deadline), "error"
    finish_reason: str | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[float] | None = field(default=None)

    def add(self, event: TokenEvent) -> None:
        self.text += event.text
        if event.token_id is not None:
            self.tokens.append(event.token_id)
            if self.logprobs is not None:
                self.logprobs.append(event.logprob)
        if event.finish_reason:
            self.finish_reason = event.finish_reason


def fit_prompt(tokens: Sequence[int], context: int, truncate: bool) -> list[int]:
    """The prompt if it leaves room for one new token; its last tokens if `truncate`; else an error."""
    if not tokens:
        raise EmptyPromptError("prompt is empty: give at least one token to continue from")
    if len(tokens) < context:
        return list(tokens)
    if truncate:
        return list(tokens[len(tokens) - context + 1 :])
    raise PromptTooLongError(len(tokens), context - 1)


class TextState:
    """Per-sequence text assembly and stop conditions: EOS or a stop id, a stop string, `stop_when`,
    the budget, the time limit."""

    def __init__(self, tokenizer: Tokenizer, prompt: list[int], params: SamplingParams, budget: int):
        self.decoder = IncrementalDecoder(tokenizer, prompt)
        self.stops = StopStringFilter(params.stop)
        # A tokenizer may know several end-of-generation ids (GGUF `eog_ids`: SmolLM2 ends chats with
        # <|im_end|> but plain completions with <|endoftext|>); EOS alone otherwise.
        end_ids = set(getattr(tokenizer, "eog_ids", ())) | {tokenizer.eos_id}
        self.stop_ids = (end_ids - {-1} if not params.ignore_eos else set()) | set(params.stop_ids)
        self.budget = budget  # new tokens this sequence may still produce
        self.stop_when = params.stop_when
        self.time_limit = params.max_generation_seconds
        self.first_token_at: float | None = None  # time.monotonic() of the first generated token
        self.emitted = ""  # the text handed out so far (what `stop_when` sees)

    def accept(self, token: int, logprob: float | None) -> TokenEvent:
        self.budget -= 1
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if token in self.stop_ids:
            return self._event(token, self.finish(), logprob, "stop")
        text = self.stops.push(self.decoder.push(token))
        if self.stops.stopped:
            return self._event(token, text, logprob, "stop")
        if self._answer_complete(text):
            return self._event(token, text + self.finish(), logprob, "stop")
        if self.budget <= 0:
            return self._event(token, text + self.finish(), logprob, "length")
        if self.time_limit is not None and time.monotonic() - self.first_token_at > self.time_limit:
            return self._event(token, text + self.finish(), logprob, "time_limit")
        return self._event(token, text, logprob, None)

    def _event(self, token: int, text: str, logprob: float | None, finish_reason: str | None) -> TokenEvent:
        self.emitted += text
        return TokenEvent(token, text, logprob, finish_reason)

    def _answer_complete(self, text: str) -> bool:
        """`stop_when` asked at the moments a line's indentation becomes known: `text` holds a line
        break, or puts the first non-blank character on the line after one."""
        if self.stop_when is None or not text:
            return False
        after = self.emitted + text
        line_start = after.rfind("\n") + 1
        settled = "\n" in text or (
            line_start > 0 and not after[line_start : len(self.emitted)].strip() and bool(after[line_start:].strip())
        )
        return settled and self.stop_when(after)

    def finish(self) -> str:
        """The text still held back (part of a character, a possible stop string) when the sequence
        ends without a token of its own."""
        return self.stops.push(self.decoder.flush()) + self.stops.flush()


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    max_seq_len: int | None = None,
    eager: bool = False,
    speculate: bool = False,
) -> Iterator[list[tuple[int, TokenEvent]]]:
    """Run prompts together to completion; yield, per step, (prompt index, event) pairs.

    `max_seq_len` bounds prompt + completion (default: the model's trained context). Decode steps
    take `make_decode`'s fastest path (on a GPU, CUDA graphs), built with a cache on the first call
    and kept on the model: later calls that fit reuse them (sizes are rounded up to powers of two so
    that growing prompts rebuild them rarely). `eager` runs them as plain PyTorch instead.
    `speculate` verifies n-gram guesses as extra decode rows (qgpt_code/speculative.py).
    """
    from qgpt_code.decode_step import acquire_runtime  # these build on this module's types
    from qgpt_code.scheduler import Scheduler
    from qgpt_code.speculative import MAX_GUESSES

    context = min(max_seq_len or model.args.max_seq_len, model.args.max_seq_len)
    prompts = [fit_prompt(p, context, params.truncate_prompt) for p in prompts]
    lengths = [len(p) + min(params.max_new_tokens, context - len(p)) for p in prompts]
    # Blocks for every sequence's whole length: nothing is ever preempted or evicted.
    blocks = sum(blocks_for(n) for n in lengths)
    rows = len(prompts) * (1 + MAX_GUESSES) if speculate else len(prompts)  # decode rows, guesses included
    runtime = acquire_runtime(model, _power_of_two(blocks), _power_of_two(rows),
                              min(_power_of_two(max(lengths)), model.args.max_seq_len), eager)
    try:
        scheduler = Scheduler(model, tokenizer, BlockPool(runtime.cache), max_batch=rows, max_seq_len=context,
                              prefill_budget=max(lengths), decode=runtime.decode, speculate=speculate)
        index = {scheduler.add(p, params).id: i for i, p in enumerate(prompts)}
        while scheduler.has_work():
            yield [(index[seq.id], event) for seq, event in scheduler.step()]
    finally:
        runtime.release()


def _power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def generate_batch(loaded: LoadedModel, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
    """Complete several token prompts together."""
    results = [Completion("", [], "length", len(p), [] if params.logprobs else None) for p in prompts]
    for events in generate(loaded.model, loaded.tokenizer, prompts, params):
        for i, event in events:
            results[i].add(event)
    return results


def generate_text(loaded: LoadedModel, prompt_tokens: Sequence[int], params: SamplingParams) -> Completion:
    """Complete one token prompt."""
    return generate_batch(loaded, [prompt_tokens], params)[0]


def stream_text(
    loaded: LoadedModel, prompt_tokens: Sequence[int], params: SamplingParams, eager: bool = False,
    speculate: bool = False,
) -> Iterator[str]:
    """The completion of one prompt as text pieces, each ending on a whole character."""
    for events in generate(loaded.model, loaded.tokenizer, [prompt_tokens], params, eager=eager, speculate=speculate):
        for _, event in events:
            if event.text:
                yield event.text
