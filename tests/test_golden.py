"""Golden test: a fixed tiny model (weights from a seeded generator), temperature 0, exact tokens.

If this fails, generation changed behaviour: find out why before re-pinning the tokens.
"""

import torch

from qgpt_code.config import preset
from qgpt_code.generation import SamplingParams, generate
from qgpt_code.model import Transformer, checkpoint_tensors

PROMPT = [1, 17, 42, 300, 5, 99]
EXPECTED = [51, 180, 139, 17, 400, 417, 287, 46, 131, 172, 507, 73, 226, 98, 62, 206]


def golden_model() -> Transformer:
    model = Transformer(preset("tiny")).eval()
    g = torch.Generator().manual_seed(20231005)
    with torch.no_grad():
        for _, param in sorted(checkpoint_tensors(model).items()):  # Meta names: independent of fusion
            param.copy_(torch.randn(param.shape, generator=g) * 0.3 + (1.0 if param.dim() == 1 else 0.0))
    return model


class NoEosTokenizer:
    """Just enough tokenizer for token-level generation (no text, no EOS)."""

    eos_id = -1

    def decode(self, ids):
        return ""


def test_golden_greedy_tokens():
    events = generate(golden_model(), NoEosTokenizer(), [PROMPT], SamplingParams(max_new_tokens=16, temperature=0))
    tokens = [event.token_id for step in events for _, event in step]
    assert tokens == EXPECTED
