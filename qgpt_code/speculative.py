"""Speculative decoding where text repeats itself: guesses from the sequence's own tokens (n-gram lookup).

A decode step reads every weight once whatever the number of rows, so on memory-bound hardware a step
that feeds a sequence's last token plus k guessed tokens costs about what a one-token step costs. The
scheduler feeds the guesses as extra rows of the same sequence (its block table, consecutive
positions); the model's choice at each row is drawn exactly as plain decoding would draw it (the same
sampler, the same per-step random number for seeded rows), and guesses are kept while they equal those
choices. The first choice that differs is kept too (it is what plain decoding would have produced
there), so each step yields between 1 and k + 1 tokens, exactly the tokens plain decoding yields.
For a guess that is a single token (a point mass), "sample from the model and compare" is the standard
speculative rejection rule: the guess survives with probability p(guess), and otherwise the token is
drawn from p without the guess, renormalised.

The proposer is prompt-lookup decoding: find the longest recent n-gram (max_ngram down to min_ngram
tokens) that ended earlier in the sequence and guess the tokens that followed it there. An edit that
rewrites a selection the prompt holds, or code that repeats identifiers and lines, is mostly copies.

How many tokens to guess is a trade: each guess holds with some probability (estimated per sequence
from its recent steps) and each row costs something (measured: `RowCost`). The guess length maximises
the expected tokens per unit of step time, which is 0, no guessing, where rows are expensive or
guesses fail.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

MAX_NGRAM = 4  # longest suffix looked up
MIN_NGRAM = 2  # shorter matches guess wrong too often to pay for their rows
MAX_GUESSES = 8  # tokens guessed per step at most
FIRST_ACCEPTANCE = 0.6  # a sequence's acceptance estimate before any guess was checked
ACCEPTANCE_MEMORY = 4  # guesses' worth of weight the past keeps against a new step's outcome
STEPS_KEPT = 16  # recent step times kept per row count
MIN_STEPS = 3  # a row count's steps needed before its median counts
RECOVERY = 0.05  # per step without guesses, the share of the way back to FIRST_ACCEPTANCE


@dataclass
class NgramIndex:
    """For each n-gram of a sequence (n = MIN_NGRAM..MAX_NGRAM), where the token after its latest
    occurrence sits; extended token by token, so a lookup costs MAX_NGRAM dictionary probes."""

    tokens: list[int] = field(default_factory=list)
    followers: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> index of the token after it

    def extend(self, new_tokens: list[int]) -> None:
        tokens = self.tokens
        for token in new_tokens:
            end = len(tokens)  # the n-grams ending just before `token` are followed by it
            for n in range(MIN_NGRAM, MAX_NGRAM + 1):
                if end >= n:
                    self.followers[tuple(tokens[end - n : end])] = end
            tokens.append(token)

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
        tokens = self.tokens
        for n in range(min(MAX_NGRAM, len(tokens)), MIN_NGRAM - 1, -1):
            start = self.followers.get(tuple(tokens[len(tokens) - n :]))
            if start is not None:
                return tokens[start : start + k]
        return []


@dataclass
class RowCost:
    """What one more decode row costs, as a fraction of a one-row step, from the steps' measured times:
    the median of each row count's recent steps (a step slowed by another process on the machine does
    not move it), then seconds = base + per_row * rows fitted through them. Where reading the weights
    dominates (a GPU at small batch, a small model on the CPU) a row is nearly free; where arithmetic
    dominates (a large batch) it is not, and guessing stops."""

    prior: float = 0.25  # until steps of two sizes have been seen enough
    recent: dict[int, deque] = field(default_factory=dict)  # rows -> the last STEPS_KEPT step times

    def observe(self, rows: int, seconds: float) -> None:
        self.recent.setdefault(rows, deque(maxlen=STEPS_KEPT)).append(seconds)

    @property
    def fraction(self) -> float:
        points = [(rows, statistics.median(times), len(times))
                  for rows, times in self.recent.items() if len(times) >= MIN_STEPS]
        if len(points) < 2:
            return self.prior
        n = sum(w for _, _, w in points)
        x = sum(w * r for r, _, w in points) / n
        y = sum(w * t for _, t, w in points) / n
        spread = sum(w * (r - x) ** 2 for r, _, w in points)
        per_row = sum(w * (r - x) * (t - y) for r, t, w in points) / spread
        base = y - per_row * x
        return min(1.0, max(0.02, per_row / max(base + per_row, 1e-9)))


def best_guess_length(acceptance: float, row_cost: float, limit: int) -> int:
    """The number of guesses k (0..limit) that maximises expected tokens per step over the step's
    cost: a step yields 1 + a + a^2 + ... + a^k tokens (guess j holds only if the ones before it did,
    each with probability a) and costs 1 + row_cost * k one-row steps."""
    best, best_rate, expected, term = 0, 1.0, 1.0, 1.0
    for k in range(1, limit + 1):
        term *= acceptance
        expected += term
        rate = expected / (1 + row_cost * k)
        if rate > best_rate:
            best, best_rate = k, rate
    return best


@dataclass
class Speculation:
    """One sequence's speculation state: its index, its guesses' recent acceptance, and its counts."""

    index: NgramIndex = field(default_factory=NgramIndex)
    acceptance: float = FIRST_ACCEPTANCE  # chance that a guess holds, given the one before it did
    proposed: int = 0
    accepted: int = 0

    def propose(self, limit: int, row_cost: float) -> list[int]:
        k = best_guess_length(self.acceptance, row_cost, min(limit, MAX_GUESSES))
        if not k:  # not worth a row now; drift back so that a sequence that starts copying is tried again
            self.acceptance += RECOVERY * (FIRST_ACCEPTANCE - self.acceptance)
            return []
        return self.index.propose(k)

    def record(self, proposed: int, accepted: int) -> None:
        """Fold one step's outcome into the acceptance estimate: `accepted` guesses held, then one
        failed unless all held (a geometric run), weighted against the recent past."""
        self.proposed += proposed
        self.accepted += accepted
        if proposed:
            trials = accepted + (accepted < proposed)
            observed = accepted / trials
            weight = trials / (trials + ACCEPTANCE_MEMORY)
            self.acceptance += weight * (observed - self.acceptance)


def accepted_prefix(guesses: list[int], choices: list[int]) -> int:
    """How many guesses the model's choices confirm: choices[j] is the model's token after the row
    that fed guesses[j - 1] (choices[0] after the sequence's last token); guess j holds while it equals
    choices[j] and every earlier guess held."""
    held = 0
    while held < len(guesses) and guesses[held] == choices[held]:
        held += 1
    return held
