"""The start-up plan of the KV block pool: the engine starts wherever the weights and a few blocks fit.

The GPU plan is the engine's own formula (`plan_for_card` predicts the free memory the engine measures
at start-up); the cards are what `torch.cuda.get_device_properties().total_memory` reports for them.
"""

from __future__ import annotations

import pytest
import torch

from qgpt_code.cache_plan import CUDA_CONTEXT_BYTES, MIN_BLOCKS, plan_for_card, plan_from_bytes
from qgpt_code.config import preset
from qgpt_code.errors import QGPTError
from qgpt_code.kv_cache import BLOCK_SIZE, KVCache

GiB = 2**30
CARDS = {"24 GB": 23.99 * GiB, "40 GB": 39.39 * GiB, "48 GB": 47.54 * GiB, "80 GB": 79.19 * GiB,
         "H200 141 GB": 139.7 * GiB}
SEQUENCES, LENGTH = 8, 4096


@pytest.mark.parametrize("model", ["llama-2-7b", "llama-2-13b", "llama-2-70b"])
@pytest.mark.parametrize("card", CARDS)
def test_the_engine_starts_wherever_the_weights_fit_with_room_for_eight_sequences_where_memory_allows(model, card):
    args, card_bytes = preset(model), int(CARDS[card])
    weights = args.n_params * 2  # bfloat16
    eight_sequences = SEQUENCES * LENGTH * KVCache.bytes_per_token(args, torch.bfloat16)
    if weights + CUDA_CONTEXT_BYTES >= card_bytes:
        with pytest.raises(QGPTError, match="weights take"):
            plan_for_card(args, torch.bfloat16, card_bytes)
        return
    plan = plan_for_card(args, torch.bfloat16, card_bytes)
    assert plan.blocks >= MIN_BLOCKS  # never a refusal once the weights fit with a few GiB to spare
    if card_bytes >= weights + eight_sequences + 3 * GiB:  # 3 GiB: context, activations, margin, generously
        assert plan.sequences(LENGTH) >= SEQUENCES
    assert plan.nbytes <= card_bytes - weights - CUDA_CONTEXT_BYTES  # never plans more than is there


def test_the_cards_of_the_issue():
    """What the row design refused: 7B on 24/40/48 GB, 13B on 80 GB, 70B on an H200."""
    bf16 = torch.bfloat16
    assert plan_for_card(preset("llama-2-7b"), bf16, int(CARDS["24 GB"])).sequences(LENGTH) >= 4
    assert plan_for_card(preset("llama-2-7b"), bf16, int(CARDS["40 GB"])).sequences(LENGTH) >= 8
    assert plan_for_card(preset("llama-2-13b"), bf16, int(CARDS["80 GB"])).sequences(LENGTH) >= 8
    seventy = plan_for_card(preset("llama-2-70b"), bf16, int(CARDS["H200 141 GB"]))
    assert seventy.max_seq_len == LENGTH and seventy.sequences(LENGTH) >= 4


def test_max_seq_len_is_capped_at_the_pool_and_a_tiny_budget_is_refused_clearly():
    args = preset("tiny")
    per_block = BLOCK_SIZE * KVCache.bytes_per_token(args, torch.float32)
    plan = plan_from_bytes(args, torch.float32, 10 * per_block + per_block // 2, 4096, "cpu")
    assert (plan.blocks, plan.max_seq_len, plan.tokens) == (10, 160, 160)
    assert "160 tokens in 10 blocks of 16" in plan.describe()
    with pytest.raises(QGPTError, match="raise --cache-bytes"):
        plan_from_bytes(args, torch.float32, 3 * per_block, 4096, "cpu")
