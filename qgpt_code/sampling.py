"""Choosing the next token from logits: pure functions over (B, V) tensors.

The reference is Meta's `llama/generation.py`: temperature 0 means argmax; otherwise softmax of
logits / temperature, then nucleus (top-p) sampling with `sample_top_p`'s exact cut (a token is kept
while the probability mass *before* it is <= p). Top-k, when set, is applied first, as in HF.
"""

from __future__ import annotations

import torch

MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy: the distribution is a point mass anyway


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B,) the most likely token of each row."""
    return logits.argmax(dim=-1)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits outside each row's k largest set to -inf; k <= 0 or >= V leaves them unchanged."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Meta's nucleus sampling: (B, V) probabilities -> (B,) sampled tokens."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p  # mass before this token already exceeds p
    probs_sort = probs_sort.masked_fill(mask, 0.0)
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(probs_sort, num_samples=1, generator=generator)  # (B, 1)
    return torch.gather(probs_idx, -1, choice).squeeze(-1)


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, V) float logits -> (B,) next tokens under the given sampling settings."""
    if temperature < MIN_TEMPERATURE:  # dividing by a vanishing temperature overflows to inf, then NaN
        return greedy(logits)
    probs = torch.softmax(top_k_filter(logits.float(), top_k) / temperature, dim=-1)
    return sample_top_p(probs, top_p, generator)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, V), (B,) -> (B,) log-probability of each chosen token under the raw (untempered) logits."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
