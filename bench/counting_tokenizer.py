"""The tokenizer the benchmarks hand the engine: they measure tokens, never text.

Imported as `from counting_tokenizer import CountingTokenizer` by scripts run as `python bench/NAME.py`
(their own folder is first on the import path).
"""


class CountingTokenizer:
    """Stands in for a tokenizer over `vocab_size` ids: no EOS (-1 is no id), no decoding work."""

    bos_id, eos_id, pad_id = 1, -1, -1

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def decode(self, ids) -> str:
        return ""
