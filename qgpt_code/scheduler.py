"""The one loop that runs the model for generation: admission, chunked prefill, batched decode.

Single-threaded and synchronous: `step()` does one round of work and returns the events it produced.
`generation.generate` drives it directly; `engine.Engine` drives it from its own thread and feeds it
requests from other threads. Memory is the `BlockPool`'s blocks, taken one at a time as sequences
grow. Each round:

1. sequences past their deadline or cancelled are finished (their computed blocks stay cached);
2. waiting sequences are admitted while fewer than `max_batch` run and the pool has the blocks their
   prompt still needs; each starts with the longest cached prefix of its prompt;
3. every sequence with a sampled token not yet fed decodes it, together in one forward pass, each
   at its own position (a sequence that needs a new block and finds none preempts the newest
   running sequence: its blocks go back to the pool, cached, and it waits to be recomputed);
4. sequences still reading their prompt advance by chunks that share one budget of `prefill_budget`
   tokens per round (chunked prefill), oldest first, so a burst of new prompts never stalls the
   running streams for long; one whose prompt is done samples its first token. A sequence whose
   prompt another running sequence is already computing waits for that one's blocks instead of
   computing them again (eight editors sending the same file compute it once).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence as Seq

import torch

from qgpt_code.decode_step import EagerDecode
from qgpt_code.errors import QGPTError
from qgpt_code.generation import SamplingParams, TextState, TokenEvent, fit_prompt
from qgpt_code.kv_cache import BlockPool, BlockTable, blocks_for, common_prefix_length
from qgpt_code.model import Transformer
from qgpt_code.sampling import RowSettings, choose, seeded_uniform, unseeded_uniforms
from qgpt_code.speculative import RowCost, Speculation, accepted_prefix
from qgpt_code.tokenizer import Tokenizer

_ids = itertools.count()
EXPLORE_EVERY = 64  # decode steps between guesses made at the prior row cost


@dataclass(eq=False)
class Sequence:
    """One request's state inside the scheduler."""

    prompt: list[int]
    params: SamplingParams
    text: TextState
    deadline: float | None = None  # time.monotonic() by which it must finish
    id: int = field(default_factory=lambda: next(_ids))
    table: BlockTable = field(default_factory=BlockTable)  # its blocks; len(table): tokens with keys/values
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    generated: list[int] = field(default_factory=list)
    leader: "Sequence | None" = None  # a running sequence computing this one's next blocks
    shared: int = 0  # tokens of this sequence the leader computes
    preempted: bool = False  # it was preempted once: what it then recomputes or finds cached is not reuse
    abort_reason: str | None = None  # set from outside; acted on at the next step
    finish_reason: str | None = None
    error: str | None = None  # why it ended with finish_reason "error"
    speculation: Speculation | None = None  # its guesses' state, once the scheduler speculates for it

    @property
    def computed(self) -> int:
        return len(self.table)

    @property
    def target(self) -> int:
        """Tokens that need keys/values before the next decode step: the prompt, or after a
        preemption everything but the last sampled token (which the decode step feeds)."""
        return len(self.prompt) + max(0, len(self.generated) - 1)

    @property
    def reusable(self) -> int:
        """Tokens that may come from the cache: all but the prompt's last one, whose logits are needed,
        or after a preemption all of `target`."""
        return self.target if self.generated else len(self.prompt) - 1

    @property
    def prefilling(self) -> bool:
        return self.computed < self.target

    def tokens(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + generated."""
        prompt = self.prompt
        return prompt[start:stop] + self.generated[max(0, start - len(prompt)) : max(0, stop - len(prompt))]


class Scheduler:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        pool: BlockPool,
        max_batch: int,
        max_seq_len: int,
        prefill_budget: int = 512,
        decode: Callable[[list[int], list[int], list[list[int]]], torch.Tensor] | None = None,
        speculate: bool = False,
    ):
        self.model = model
        self.decode = decode or EagerDecode(model, pool.cache)  # (tokens, positions, tables) -> (B, V)
        self.tokenizer = tokenizer
        # A vocabulary padded beyond the tokenizer (embedding rows it has no pieces for) is cut at sampling.
        self.vocab_size = min(getattr(tokenizer, "vocab_size", model.args.vocab_size), model.args.vocab_size)
        self.pool = pool
        self.max_batch = max_batch
        self.context = min(max_seq_len, model.args.max_seq_len)  # tokens one sequence may hold
        self.prefill_budget = prefill_budget
        self.device = model.tok_embeddings.weight.device
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is the newest
        self.tokens_computed = 0  # tokens run through the model (prefill and decode)
        self.prompt_tokens = 0  # prompt tokens of admitted requests (the hit rate's denominator)
        self.tokens_reused = 0  # of those, served from the prefix cache
        self.prefix_hits = 0  # admitted requests that reused a cached prefix
        self.preemptions = 0
        # Speculation feeds guessed tokens as extra decode rows, up to max_batch rows in all: where the
        # batch alone fills the step, nothing is guessed (compute, not weight reads, would bind).
        self.speculate = speculate
        self.row_cost = RowCost()  # what an extra decode row costs here, measured as steps run
        self.decode_steps = 0
        self.tokens_proposed = 0  # guessed tokens fed to the model
        self.tokens_accepted = 0  # of those, confirmed by the model's own choice

    def add(self, prompt: Seq[int], params: SamplingParams, deadline: float | None = None) -> Sequence:
        """Queue a prompt; raises PromptTooLongError / EmptyPromptError at once if it cannot run."""
        prompt = fit_prompt(prompt, self.context, params.truncate_prompt)
        budget = min(params.max_new_tokens, self.context - len(prompt))
        if params.seed is not None and not -(2**63) <= params.seed < 2**64:
            raise QGPTError(f"seed {params.seed} is out of range: seeds are 64-bit integers")
        seq = Sequence(prompt, params, TextState(self.tokenizer, prompt, params, budget), deadline)
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
        if decoding:
            self._decode(decoding, events)
        self._prefill(events)
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
            seq = self.waiting[0]
            if self.running and not self._fits(seq):
                return  # wait until running sequences finish and give blocks back
            seq.leader, seq.shared = self._leader_for(seq)
            reused = self.pool.attach_prefix(seq.table, seq.tokens(0, seq.reusable), seq.reusable,
                                             partial=seq.leader is None)
            self.waiting.popleft()
            self.running.append(seq)
            if not seq.preempted:
                self._count_reuse(seq, reused, first=True)

    def _fits(self, seq: Sequence) -> bool:
        """Whether the pool has the blocks the rest of `seq`'s prompt needs beyond its cached prefix,
        and one more for each running sequence's next token."""
        found, _, _ = self.pool.lookup(seq.tokens(0, seq.reusable), seq.reusable)
        taken = sum(1 for b in found if self.pool.blocks[b].refs == 0)  # cached blocks it would stop being evictable
        needed = blocks_for(seq.target, self.pool.block_size) - len(found) + len(self.running)
        return self.pool.available() - taken >= needed

    def _leader_for(self, seq: Sequence) -> tuple[Sequence | None, int]:
        """The running sequence that will compute the most of `seq`'s reusable prefix beyond what it
        has computed already, and how many tokens of `seq` that is."""
        best, best_shared = None, 0
        reusable = seq.tokens(0, seq.reusable)
        for other in self.running:
            if not other.prefilling:
                continue
            shared = common_prefix_length(other.tokens(0, other.target), reusable)
            if shared > max(best_shared, other.computed):
                best, best_shared = other, shared
        return best, best_shared

    def _count_reuse(self, seq: Sequence, reused: int, first: bool = False) -> None:
        if first:
            self.prompt_tokens += len(seq.prompt)
            if reused:
                self.prefix_hits += 1
        elif reused and not seq.cached_tokens:
            self.prefix_hits += 1
        seq.cached_tokens += reused
        self.tokens_reused += reused

    def _prefill(self, events: list[tuple[Sequence, TokenEvent]]) -> None:
        budget = self.prefill_budget
        done: list[tuple[Sequence, torch.Tensor]] = []  # prompts read, sampled together at the end
        for seq in [s for s in self.running if s.prefilling]:
            if seq not in self.running:
                continue  # preempted by an earlier sequence's chunk
            leader, seq.leader = seq.leader, None
            if leader is not None and leader not in self.running:
                leader = None  # it finished or was preempted: its blocks are cached, or gone
            if leader is not None and leader.computed < seq.shared:
                seq.leader = leader
                continue  # its leader is still computing these tokens
            # Blocks cached since it was admitted (by its leader, or by anyone) are taken, not recomputed,
            # and so is the leader's last block, not yet full (copied: the leader keeps writing to it).
            reused = self.pool.attach_prefix(seq.table, seq.tokens(0, seq.reusable), seq.reusable,
                                             partial=leader is None)
            if leader is not None:
                reused += self.pool.copy_from(seq.table, leader.table, seq.shared)
            if not seq.preempted:
                self._count_reuse(seq, reused)
            if budget <= 0 or not seq.prefilling:
                continue
            n = min(budget, seq.target - seq.computed)
            if not self._reserve(seq, n, events):
                continue
            budget -= n
            logits = self._prefill_chunk(seq, n)
            if logits is not None:
                done.append((seq, logits))
        done = [(s, row) for s, row in done if s in self.running]  # one preempted since samples when recomputed
        if done:
            self._choose([s for s, _ in done], torch.cat([row for _, row in done]), events)

    def _prefill_chunk(self, seq: Sequence, n: int) -> torch.Tensor | None:
        """Feed the next n tokens; the last-token logits (1, V) once a prompt read for the first time is done."""
        start = seq.computed
        chunk = seq.tokens(start, start + n)
        tokens = torch.tensor([chunk], device=self.device)
        positions = torch.arange(start, start + n, device=self.device)[None]
        tables = torch.tensor([seq.table.blocks], device=self.device)
        logits = self.model(tokens, positions, self.pool.cache, tables=tables, kv_len=start + n,
                            last_index=torch.tensor([n - 1], device=self.device), causal_from=start)
        self._computed(seq, chunk)
        if seq.prefilling or seq.generated:
            return None  # more prompt to read, or a recomputed sequence whose next token is known
        return logits[:, -1]

    def _decode(self, seqs: list[Sequence], events: list[tuple[Sequence, TokenEvent]]) -> None:
        """One token for each sequence (those that get a block for it), more where guesses hold."""
        for seq in seqs:
            if seq in self.running:
                self._reserve(seq, 1, events)
        seqs = [s for s in seqs if s in self.running]
        if not seqs:
            return
        guesses = self._guesses(seqs)
        tokens, positions, tables = [], [], []
        for seq, guessed in zip(seqs, guesses):  # a sequence's rows: its last token, then its guesses
            fed = [seq.generated[-1], *guessed]
            tokens += fed
            positions += range(seq.computed, seq.computed + len(fed))
            tables += [seq.table.blocks] * len(fed)
        started = time.perf_counter()
        logits = self.decode(tokens, positions, tables)  # (rows, V)
        if any(guesses):
            self._verify(seqs, guesses, logits, events)
        else:
            for seq in seqs:
                self._computed(seq, seq.generated[-1:])
            self._choose(seqs, logits, events)
        if self.speculate:  # the draws fetched the ids to the host: the step's work is done
            self.row_cost.observe(len(tokens), time.perf_counter() - started)

    def _guesses(self, seqs: list[Sequence]) -> list[list[int]]:
        """Each sequence's guessed next tokens, within the rows the step has spare, the sequence's
        budget, the context and the blocks the pool can give (a guess never preempts anyone)."""
        spare = self.max_batch - len(seqs) if self.speculate else 0
        self.decode_steps += 1
        # Now and then guess at the prior cost: an estimate made while the machine was busy, or before a
        # change of batch, would otherwise keep guessing off for good (only guesses measure rows).
        row_cost = self.row_cost.prior if self.decode_steps % EXPLORE_EVERY == 0 else self.row_cost.fraction
        guesses = []
        for seq in seqs:
            limit = min(spare, seq.text.budget - 1, self.context - seq.computed - 1)
            if limit <= 0:
                guesses.append([])
                continue
            if seq.speculation is None:
                seq.speculation = Speculation()
            index = seq.speculation.index  # indexes the tokens it has not seen yet (not all, every step)
            index.extend(seq.tokens(len(index.tokens), len(seq.prompt) + len(seq.generated)))
            guessed = seq.speculation.propose(limit, row_cost)
            if guessed and not self.pool.reserve(seq.table, 1 + len(guessed)):
                room = len(seq.table.blocks) * self.pool.block_size - seq.computed - 1
                guessed = guessed[:room]
            spare -= len(guessed)
            guesses.append(guessed)
        return guesses

    def _verify(self, seqs: list[Sequence], guesses: list[list[int]], logits: torch.Tensor,
                events: list[tuple[Sequence, TokenEvent]]) -> None:
        """Draw the model's token at every row, as plain decoding would at that step, keep each
        sequence's guesses while they equal those draws, and emit the draws up to the first that
        differs. Keys and values of guesses past it are dropped (their positions are written again)."""
        row_seqs, steps = [], []
        for seq, guessed in zip(seqs, guesses):
            row_seqs += [seq] * (1 + len(guessed))
            steps += range(len(seq.generated), len(seq.generated) + 1 + len(guessed))
        choices = self._draws(row_seqs, logits, steps)
        row = 0
        for seq, guessed in zip(seqs, guesses):
            drawn, row = choices[row : row + 1 + len(guessed)], row + 1 + len(guessed)
            held = accepted_prefix(guessed, [c[0] if isinstance(c, tuple) else None for c in drawn])
            self._computed(seq, [seq.generated[-1], *guessed[:held]])
            if guessed:
                self.pool.trim(seq.table)
                seq.speculation.record(len(guessed), held)
                self.tokens_proposed += len(guessed)
                self.tokens_accepted += held
            for choice in drawn[: held + 1]:
                self._take(seq, choice, events)
                if seq not in self.running:
                    break

    def _reserve(self, seq: Sequence, n: int, events: list[tuple[Sequence, TokenEvent]]) -> bool:
        """Blocks for n more tokens of `seq`, preempting the newest running sequences while the pool
        is out; False when `seq` itself had to go."""
        while not self.pool.reserve(seq.table, n):
            victim = self.running[-1]
            if victim is seq and len(self.running) == 1:
                # Alone and still out of blocks: the pool cannot hold this sequence any longer.
                events.append((seq, TokenEvent(None, seq.text.finish(), finish_reason="length")))
                self._retire(seq, "length")
                return False
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks (they stay cached: its recomputation may find them) and
        put it first in line; its output so far is kept."""
        self.running.remove(seq)
        self.pool.release(seq.table)
        seq.leader, seq.preempted = None, True
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _computed(self, seq: Sequence, tokens: list[int]) -> None:
        self.pool.commit(seq.table, tokens)
        self.tokens_computed += len(tokens)

    def _choose(self, seqs: list[Sequence], logits: torch.Tensor, events: list[tuple[Sequence, TokenEvent]]) -> None:
        """The next token of each sequence from its row of (B, V) logits, all rows sampled together,
        and the events they make. Whatever goes wrong with one row (logits holding NaN, a token the
        tokenizer cannot decode, a failing stop check) ends that sequence alone."""
        rows = [i for i, seq in enumerate(seqs) if seq.text.budget > 0]
        for seq in seqs:
            if seq.text.budget <= 0:  # max_new_tokens 0: the prompt is computed and cached, nothing is generated
                events.append((seq, TokenEvent(None, "", finish_reason="length")))
                self._retire(seq, "length")
        if not rows:
            return
        seqs = [seqs[i] for i in rows]
        logits = logits[rows] if len(rows) < len(logits) else logits
        for seq, choice in zip(seqs, self._draws(seqs, logits, [len(s.generated) for s in seqs])):
            self._take(seq, choice, events)

    def _draws(self, seqs: list[Sequence], logits: torch.Tensor, steps: list[int]) -> list:
        """The draw of each row of (rows, V) logits for `seqs[row]` at its generation step `steps[row]`
        (seeded rows draw that step's random number): all at once, or, when that fails, row by row,
        so that only a row that fails alone gets its exception in place of a draw."""
        try:
            return self._draw(seqs, logits, steps)
        except Exception:
            choices = []
            for seq, row, step in zip(seqs, logits, steps):
                try:
                    choices += self._draw([seq], row[None], [step])
                except Exception as exc:
                    choices.append(exc)
            return choices

    def _take(self, seq: Sequence, choice, events: list[tuple[Sequence, TokenEvent]]) -> None:
        """One draw into its sequence; whatever goes wrong (an exception drawn in its place, logits
        holding NaN, a token the tokenizer cannot decode, a failing stop check) ends that sequence alone."""
        try:
            if isinstance(choice, Exception):
                raise choice
            self._sample(seq, choice, events)
        except Exception as exc:
            seq.error = f"{type(exc).__name__}: {exc}"
            events.append((seq, TokenEvent(None, "", finish_reason="error")))
            self._retire(seq, "error")

    def _draw(self, seqs: list[Sequence], logits: torch.Tensor, steps: list[int]) -> list:
        """(token, logprob, bad, top alternatives) per row: one batched choice, one host transfer."""
        draws = iter(unseeded_uniforms(sum(s.params.seed is None for s in seqs)))
        settings = [RowSettings(s.params.temperature, s.params.top_p, s.params.top_k,
                                seeded_uniform(s.params.seed, step) if s.params.seed is not None else next(draws),
                                s.params.top_logprobs if s.params.logprobs else 0) for s, step in zip(seqs, steps)]
        logprobs = any(s.params.logprobs for s in seqs)
        return choose(logits, settings, self.vocab_size, logprobs).fetch()

    def _sample(self, seq: Sequence, choice: tuple[int, float, bool, list[tuple[int, float]]],
                events: list[tuple[Sequence, TokenEvent]]) -> None:
        """Take one drawn (token, logprob, bad, alternatives) into the sequence and its event."""
        token_id, logprob, bad, top = choice
        if bad:
            raise ValueError("the model's logits hold NaN or infinity: no token can be chosen")
        p = seq.params
        seq.generated.append(token_id)
        event = seq.text.accept(token_id, logprob if p.logprobs else None)
        event.top_logprobs = top[: p.top_logprobs] if p.logprobs and p.top_logprobs else None
        events.append((seq, event))
        if event.finish_reason:
            self._retire(seq, event.finish_reason)

    def retire_all(self, reason: str) -> None:
        """End every sequence at once (after a failed step); their blocks go back to the pool."""
        for seq in [*self.running, *self.waiting]:
            self._retire(seq, reason)

    def _retire(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
            self.pool.release(seq.table)
        elif seq in self.waiting:
            self.waiting.remove(seq)
