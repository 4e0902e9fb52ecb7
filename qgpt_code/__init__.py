"""QGPT Code: a Llama-2-family engine for code assistance.

The public entry points are imported lazily so that `import qgpt_code` (and `qgpt --help`) stays
instant: torch loads only when a model or tokenizer is asked for.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load_model", "load_tokenizer", "__version__"]


def __getattr__(name: str):
    if name == "load_model":
        from qgpt_code.checkpoints import load_model

        return load_model
    if name == "load_tokenizer":
        from qgpt_code.tokenizer import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module 'qgpt_code' has no attribute {name!r}")
