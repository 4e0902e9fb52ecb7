"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

With n samples of which c pass, pass@k = 1 - C(n-c, k) / C(n, k). The binomials overflow floats for large n,
so the ratio is computed as the product prod_{i=n-c+1}^{n} (1 - k/i), which is exact in real arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

DEFAULT_KS = (1, 10, 100)


def estimate_pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) passes."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def reportable_ks(ks: Iterable[int], samples_per_task: Iterable[int]) -> list[int]:
    """The k for which pass@k is defined for every task: k <= the smallest n."""
    smallest = min(samples_per_task, default=0)
    return sorted({k for k in ks if 1 <= k <= smallest})


def pass_at_k(counts: Mapping[str, tuple[int, int]], ks: Iterable[int]) -> dict[str, float]:
    """{"pass@k": mean over tasks} from {task_id: (n, c)}, for each k every task has enough samples for."""
    usable = reportable_ks(ks, (n for n, _ in counts.values()))
    return {
        f"pass@{k}": sum(estimate_pass_at_k(n, c, k) for n, c in counts.values()) / len(counts) for k in usable
    }
