"""The one loop that runs the model for generation: admission, chunked prefill, batched decode.

Single-threaded and synchronous: `step()` does one round of work and returns the events it produced.
`generation.generate` drives it directly; `engine.Engine` drives it from its own thread and feeds it
requests from other threads. Each round:

1. sequences past their deadline or cancelled are finished (their computed prefix stays cached);
2. waiting sequences are admitted while there are fewer than `max_batch` running and the prefix
   store can give them a row (which may already hold part of their prompt);
3. every running sequence still reading its prompt advances by one chunk of at most `prefill_chunk`
   tokens (so a long new prompt never stalls the others for its whole prefill), and one whose prompt
   is done samples its first token;
4. all sequences with a sampled token not yet fed decode together in one forward pass, each row at
   its own position, and sample their next token.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence as Seq

import torch

from qgpt_code.decode_step import EagerDecode, kv_bucket
from qgpt_code.generation import SamplingParams, TextState, TokenEvent, fit_prompt
from qgpt_code.kv_cache import PrefixStore
from qgpt_code.model import Transformer
from qgpt_code.sampling import sample, token_logprobs
from qgpt_code.tokenizer import Tokenizer

_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request's state inside the scheduler."""

    prompt: list[int]
    params: SamplingParams
    text: TextState
    generator: torch.Generator | None
    deadline: float | None = None  # time.monotonic() by which it must finish
    id: int = field(default_factory=lambda: next(_ids))
    row: int | None = None
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix store
    computed: int = 0  # tokens of prompt + generated whose keys/values are in the row
    generated: list[int] = field(default_factory=list)
    abort_reason: str | None = None  # set from outside; acted on at the next step
    finish_reason: str | None = None

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt)


class Scheduler:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        store: PrefixStore,
        max_batch: int,
        prefill_chunk: int = 512,
        decode: Callable[[list[int], list[int], list[int], int], torch.Tensor] | None = None,
    ):
        self.model = model
        self.decode = decode or EagerDecode(model, store.cache)  # (tokens, positions, rows, kv_len) -> (B, V)
        self.tokenizer = tokenizer
        self.store = store
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.device = model.tok_embeddings.weight.device
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.tokens_computed = 0  # tokens run through the model (prefill and decode)

    @property
    def context(self) -> int:
        """Tokens one sequence may hold: prompt plus completion."""
        return self.store.cache.max_seq_len

    def add(self, prompt: Seq[int], params: SamplingParams, deadline: float | None = None) -> Sequence:
        """Queue a prompt; raises PromptTooLongError / EmptyPromptError at once if it cannot run."""
        prompt = fit_prompt(prompt, min(self.context, self.model.args.max_seq_len), params.truncate_prompt)
        budget = min(params.max_new_tokens, self.context - len(prompt))
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        seq = Sequence(prompt, params, TextState(self.tokenizer, prompt, params, budget), generator, deadline)
        self.waiting.append(seq)
        return seq

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, TokenEvent]]:
        events: list[tuple[Sequence, TokenEvent]] = []
        self._finish_aborted(events)
        self._admit()
        decoding = [s for s in self.running if not s.prefilling]
        for seq in [s for s in self.running if s.prefilling]:
            logits = self._prefill_chunk(seq)
            if logits is not None:
                self._choose(seq, logits, events)
        if decoding:
            logits = self._decode(decoding)
            for seq, row_logits in zip(decoding, logits):
                self._choose(seq, row_logits[None], events)
        return events

    # -- phases ----------------------------------------------------------------------------------
    def _finish_aborted(self, events: list[tuple[Sequence, TokenEvent]]) -> None:
        now = time.monotonic()
        for seq in [*self.waiting, *self.running]:
            if seq.abort_reason is None and seq.deadline is not None and now > seq.deadline:
                seq.abort_reason = "timeout"
            if seq.abort_reason is not None:
                events.append((seq, TokenEvent(None, "", finish_reason=seq.abort_reason)))
                self._retire(seq, seq.abort_reason)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            got = self.store.acquire(self.waiting[0].prompt)
            if got is None:
                return  # every row is busy; try again after someone finishes
            seq = self.waiting.popleft()
            seq.row, seq.cached_tokens = got
            seq.computed = seq.cached_tokens
            self.running.append(seq)

    def _prefill_chunk(self, seq: Sequence) -> torch.Tensor | None:
        """Feed the next chunk of the prompt; the last-token logits (1, V) once the prompt is done."""
        start = seq.computed
        chunk = seq.prompt[start : start + self.prefill_chunk]
        tokens = torch.tensor([chunk], device=self.device)
        positions = torch.arange(start, start + len(chunk), device=self.device)[None]
        logits = self.model(tokens, positions, self.store.cache, rows=[seq.row], kv_len=start + len(chunk),
                            last_index=torch.tensor([len(chunk) - 1], device=self.device), causal_from=start)
        self._computed(seq, chunk)
        return None if seq.prefilling else logits[:, -1]

    def _decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for each sequence, (B, V) logits."""
        kv_len = kv_bucket(max(s.computed for s in seqs) + 1, self.context)
        logits = self.decode([s.generated[-1] for s in seqs], [s.computed for s in seqs], [s.row for s in seqs], kv_len)
        for seq in seqs:
            self._computed(seq, seq.generated[-1:])
        return logits

    def _computed(self, seq: Sequence, tokens: list[int]) -> None:
        self.store.extend(seq.row, tokens)
        seq.computed += len(tokens)
        self.tokens_computed += len(tokens)

    def _choose(self, seq: Sequence, logits: torch.Tensor, events: list[tuple[Sequence, TokenEvent]]) -> None:
        """Sample the next token from (1, V) logits and turn it into an event."""
        p = seq.params
        token = sample(logits, p.temperature, p.top_p, p.top_k, seq.generator)  # (1,)
        logprob = top = None
        if p.logprobs:
            logprob = token_logprobs(logits, token).item()
            if p.top_logprobs:
                values, ids = torch.log_softmax(logits[0], -1).topk(p.top_logprobs)
                top = list(zip(ids.tolist(), values.tolist()))
        token_id = token.item()
        seq.generated.append(token_id)
        event = seq.text.accept(token_id, logprob)
        event.top_logprobs = top
        events.append((seq, event))
        if event.finish_reason:
            self._retire(seq, event.finish_reason)

    def retire_all(self, reason: str) -> None:
        """End every sequence at once (after a failed step); rows go back to the store."""
        for seq in [*self.running, *self.waiting]:
            self._retire(seq, reason)

    def _retire(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
            self.store.release(seq.row)
        elif seq in self.waiting:
            self.waiting.remove(seq)
