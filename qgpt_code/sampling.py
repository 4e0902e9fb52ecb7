"""Choosing the next token of every row of a batch at once, on the logits' device.

The reference is Meta's `llama/generation.py`: temperature 0 means argmax; otherwise softmax of
logits / temperature, then nucleus (top-p) sampling with `sample_top_p`'s exact cut (a token is kept
while the probability mass *before* it is <= p). Top-k, when set, keeps the k likeliest tokens first
(as in HF, top-p then measures mass within those k). Each row has its own settings, so greedy and
sampled rows share one batch; the whole batch is one sort, one cumulative sum and one host transfer
(`Choices.fetch`), where a loop over rows costs a sort and a host sync or two per row.

Randomness is one uniform draw per row and step, turned into a token by inverse transform sampling
over the kept tokens in sorted order. A seeded request draws from a counter-based generator
(`seeded_uniform(seed, step)`: a hash of the seed and the token's index), so it samples the same
tokens alone, in any batch, after a preemption, on any device; an unseeded one draws from torch's
global generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy: the distribution is a point mass anyway
UNIFORM_BITS = 24  # draws are multiples of 2**-24: exact in float32 and always < 1
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class RowSettings:
    """How one row chooses its token."""

    temperature: float  # < MIN_TEMPERATURE: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no cut
    uniform: float = 0.0  # the row's draw in [0, 1) (ignored when greedy)
    top_logprobs: int = 0  # alternatives to report (with logprobs)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seeded_uniform(seed: int, step: int) -> float:
    """The draw in [0, 1) of a request seeded with `seed` for its `step`-th generated token."""
    return (_splitmix64(_splitmix64(seed & _MASK64) ^ step) >> (64 - UNIFORM_BITS)) / (1 << UNIFORM_BITS)


def unseeded_uniforms(n: int) -> list[float]:
    """n draws from torch's global (CPU) generator, on the same grid as `seeded_uniform`."""
    return (torch.randint(0, 1 << UNIFORM_BITS, (n,)).double() / (1 << UNIFORM_BITS)).tolist()


@dataclass
class Choices:
    """A batch's choices, still on the device: (B, 3 + 2n) float64 rows of token id, its logprob
    (NaN when not asked), 1.0 where the row's logits held NaN or +inf or were all -inf (its token is
    meaningless), then n alternative ids and n logprobs, likeliest first."""

    packed: torch.Tensor
    n_top: int

    def fetch(self) -> list[tuple[int, float, bool, list[tuple[int, float]]]]:
        """(token, logprob, bad, [(id, logprob)] * n) per row: the step's one device-to-host transfer."""
        rows = []
        for row in self.packed.tolist():
            top = list(zip(map(int, row[3 : 3 + self.n_top]), row[3 + self.n_top :]))
            rows.append((int(row[0]), row[1], row[2] != 0.0, top))
        return rows


def choose(logits: torch.Tensor, settings: list[RowSettings], vocab_size: int | None = None,
           logprobs: bool = False) -> Choices:
    """(B, V) float logits and one RowSettings per row -> the batch's Choices.

    Ids >= `vocab_size` (a vocabulary padded beyond its tokenizer) are never chosen: the choice is
    over the first `vocab_size` columns; `logprobs` reports each chosen token's log-probability under
    the raw (untempered) logits of those columns.
    """
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits[:, :vocab_size]  # a view: the ids a tokenizer has are the first ones
    logits = logits.float()
    B, V = logits.shape
    top, tokens = logits.max(dim=-1)  # (B,) each: the greedy choice, in one pass over the logits
    bad = ~top.isfinite()  # (B,): the max propagates NaN, +inf is the max, -inf means nothing to choose
    sampled = [s.temperature >= MIN_TEMPERATURE for s in settings]
    if any(sampled):
        # (B, 5): temperature, top_p, top_k, draw, sampled-or-greedy per row, in one host-to-device copy
        table = torch.tensor([[s.temperature if on else 1.0, s.top_p, s.top_k if 0 < s.top_k < V else V, s.uniform, on]
                              for s, on in zip(settings, sampled)], dtype=torch.float64)
        table = table.to(logits.device, non_blocking=True)
        drawn = _sample(logits, table[:, 0:1].float(), table[:, 1:2].float(), table[:, 2:3], table[:, 3:4].float())
        tokens = torch.where(table[:, 4] != 0, drawn, tokens)
    n_top = max((s.top_logprobs for s in settings), default=0) if logprobs else 0
    columns = [tokens.double()[:, None], torch.full((B, 1), float("nan"), dtype=torch.float64, device=logits.device),
               bad.double()[:, None]]
    if logprobs:
        log_probs = torch.log_softmax(logits, dim=-1)  # (B, V)
        columns[1] = log_probs.gather(-1, tokens[:, None]).double()
        if n_top:
            values, ids = log_probs.topk(min(n_top, V), dim=-1)  # (B, n)
            columns += [ids.double(), values.double()]
    return Choices(torch.cat(columns, dim=-1), n_top)


def _sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
            uniform: torch.Tensor) -> torch.Tensor:
    """(B, V) logits and (B, 1) settings -> (B,) tokens by inverse transform over the kept tokens."""
    probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True, stable=True)
    ranks = torch.arange(probs.shape[-1], device=probs.device)[None]  # (1, V)
    kept = probs_sort.masked_fill(ranks >= top_k, 0.0)  # top-k: the k likeliest
    mass = kept.cumsum(dim=-1)
    kept = kept.masked_fill(mass - kept > top_p * mass[:, -1:], 0.0)  # Meta's cut, within the top-k mass
    cdf = kept.cumsum(dim=-1)  # (B, V): nondecreasing, flat past the last kept token
    choice = (cdf <= uniform * cdf[:, -1:]).sum(dim=-1, keepdim=True).clamp(max=probs.shape[-1] - 1)
    return probs_idx.gather(-1, choice).squeeze(-1)
