"""Generation: token-level `generate` for a batch of prompts, text-level helpers on top.

Meta's `text_completion` / `chat_completion` are the reference for defaults (temperature 0.6,
top_p 0.9, stop at EOS). The batch is prefilled in one forward pass with right padding (padding
writes only cache positions that real tokens overwrite before anyone attends to them), then decoded
one step at a time with every row at its own position; rows finish independently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from qgpt_code.checkpoints.assemble import LoadedModel
from qgpt_code.detokenize import IncrementalDecoder, StopStringFilter
from qgpt_code.errors import EmptyPromptError, PromptTooLongError, QGPTError
from qgpt_code.kv_cache import KVCache
from qgpt_code.model import Transformer
from qgpt_code.sampling import sample, token_logprobs
from qgpt_code.tokenizer import Tokenizer

KV_BUCKET = 256  # attend over the cache in steps of this many positions, not all of it every step


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.6  # 0: greedy
    top_p: float = 0.9
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None  # None: torch's global generator
    stop: tuple[str, ...] = ()  # generation ends before any of these strings; they are not emitted
    stop_ids: tuple[int, ...] = ()  # ids that end generation besides EOS (e.g. Code Llama's EOT)
    logprobs: bool = False
    truncate_prompt: bool = False  # keep a too-long prompt's last tokens instead of failing

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise QGPTError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise QGPTError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise QGPTError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class TokenEvent:
    """One step of one row: the token chosen, the text it completes, and whether the row ended."""

    row: int
    token_id: int
    text: str
    logprob: float | None = None
    finish_reason: str | None = None  # "stop" (EOS, stop id or stop string) or "length"


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[float] | None = field(default=None)


def fit_prompt(tokens: Sequence[int], context: int, truncate: bool) -> list[int]:
    """The prompt if it leaves room for one new token; its last tokens if `truncate`; else an error."""
    if not tokens:
        raise EmptyPromptError("prompt is empty: give at least one token to continue from")
    if len(tokens) < context:
        return list(tokens)
    if truncate:
        return list(tokens[len(tokens) - context + 1 :])
    raise PromptTooLongError(len(tokens), context - 1)


class _Row:
    """Per-row decoding state: text assembly, stop conditions and outputs."""

    def __init__(self, tokenizer: Tokenizer, prompt: list[int], params: SamplingParams, budget: int):
        self.decoder = IncrementalDecoder(tokenizer, prompt)
        self.stops = StopStringFilter(params.stop)
        self.stop_ids = {tokenizer.eos_id, *params.stop_ids} - {-1}
        self.budget = budget  # new tokens this row may still produce
        self.done = False

    def accept(self, row: int, token: int, logprob: float | None) -> TokenEvent:
        self.budget -= 1
        if token in self.stop_ids:
            self.done = True
            tail = self.stops.push(self.decoder.flush())
            return TokenEvent(row, token, tail + self.stops.flush(), logprob, "stop")
        text = self.stops.push(self.decoder.push(token))
        if self.stops.stopped:
            self.done = True
            return TokenEvent(row, token, text, logprob, "stop")
        if self.budget <= 0:
            self.done = True
            tail = self.stops.push(self.decoder.flush())
            return TokenEvent(row, token, text + tail + self.stops.flush(), logprob, "length")
        return TokenEvent(row, token, text, logprob)


def _bucket(length: int, limit: int) -> int:
    return min(limit, -(-length // KV_BUCKET) * KV_BUCKET)


@torch.inference_mode()
def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    max_seq_len: int | None = None,
) -> Iterator[list[TokenEvent]]:
    """Yield, per decoding step, the events of the rows still running (finished rows drop out).

    `max_seq_len` bounds prompt + completion (default: the model's trained context).
    """
    context = min(max_seq_len or model.args.max_seq_len, model.args.max_seq_len)
    prompts = [fit_prompt(p, context, params.truncate_prompt) for p in prompts]
    lengths = [len(p) for p in prompts]
    device = model.tok_embeddings.weight.device
    budgets = [min(params.max_new_tokens, context - n) for n in lengths]
    cache_len = max(n + b for n, b in zip(lengths, budgets))
    cache = KVCache(model.args, len(prompts), cache_len, device, model.tok_embeddings.weight.dtype)
    rows = [_Row(tokenizer, p, params, b) for p, b in zip(prompts, budgets)]
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)

    # Prefill: right-padded batch, logits only at each row's last prompt token.
    width = max(lengths)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    positions = torch.arange(width, device=device).expand(len(prompts), width).clamp(max=cache_len - 1)
    last = torch.tensor([n - 1 for n in lengths], device=device)
    logits = model(tokens, positions, cache, kv_len=_bucket(width, cache_len), last_index=last)[:, -1]

    while True:
        next_tokens = sample(logits, params.temperature, params.top_p, params.top_k, generator)  # (B,)
        logprobs = token_logprobs(logits, next_tokens).tolist() if params.logprobs else None
        chosen = next_tokens.tolist()
        events = []
        for i, row in enumerate(rows):
            if not row.done:
                events.append(row.accept(i, chosen[i], logprobs[i] if logprobs else None))
                lengths[i] += 1
        yield events
        if all(row.done for row in rows):
            return
        # Decode: each row feeds its new token at its own position (finished rows idle in place).
        positions = torch.tensor([[min(n - 1, cache_len - 1)] for n in lengths], device=device)
        logits = model(next_tokens[:, None], positions, cache, kv_len=_bucket(max(lengths), cache_len))[:, -1]


def generate_batch(loaded: LoadedModel, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
    """Complete several token prompts together."""
    results = [Completion("", [], "length", len(p), [] if params.logprobs else None) for p in prompts]
    for events in generate(loaded.model, loaded.tokenizer, prompts, params):
        for event in events:
            result = results[event.row]
            result.text += event.text
            result.tokens.append(event.token_id)
            if result.logprobs is not None:
                result.logprobs.append(event.logprob)
            if event.finish_reason:
                result.finish_reason = event.finish_reason
    return results


def generate_text(loaded: LoadedModel, prompt_tokens: Sequence[int], params: SamplingParams) -> Completion:
    """Complete one token prompt."""
    return generate_batch(loaded, [prompt_tokens], params)[0]


def stream_text(loaded: LoadedModel, prompt_tokens: Sequence[int], params: SamplingParams) -> Iterator[str]:
    """The completion of one prompt as text pieces, each ending on a whole character."""
    for events in generate(loaded.model, loaded.tokenizer, [prompt_tokens], params):
        for event in events:
            if event.text:
                yield event.text
