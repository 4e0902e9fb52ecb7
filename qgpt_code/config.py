"""Model architecture (`ModelArgs`) and its named presets.

`ModelArgs` says what a checkpoint *is* (layer count, widths, rope base); it comes from a Meta
`params.json`, an HF `config.json`, GGUF metadata or a named preset. How a model *runs* is kept
apart on purpose: device and dtype are arguments of `load_model`, and the KV-cache length, batch size
and cache budget are arguments of `Engine` (flags --max-seq-len, --max-batch, --cache-bytes).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qgpt_code.errors import CheckpointError


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU hidden width exactly as Meta's `FeedForward.__init__` computes it."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class ModelArgs:
    """The architecture of a Llama-2-family transformer."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (no grouped-query attention)
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None  # explicit SwiGLU width (HF/GGUF state it); None: Meta's formula
    head_dim: int | None = None  # None: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0  # linear position interpolation: positions divided by this (HF rope_scaling)
    max_seq_len: int = 4096  # the context the model was trained for
    tie_embeddings: bool = False  # output projection shares tok_embeddings' weight

    def __post_init__(self) -> None:
        # Frozen dataclass: derived fields are filled in through object.__setattr__.
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.hidden_dim is None:
            object.__setattr__(
                self, "hidden_dim", ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not self.rope_scaling_factor > 0:
            raise ValueError(f"rope_scaling_factor={self.rope_scaling_factor} must be positive")

    def replace(self, **changes: Any) -> "ModelArgs":
        """A copy with some fields changed (derived fields are recomputed unless given)."""
        base = dataclasses.asdict(self)
        base.update(changes)
        return ModelArgs(**base)

    @property
    def n_params(self) -> int:
        """Parameter count of the weights this architecture has."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        embeddings = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + embeddings + self.dim

    @classmethod
    def from_meta_params(cls, params: dict[str, Any], **overrides: Any) -> "ModelArgs":
        """From the dict in a Meta `params.json` (unknown keys ignored; vocab_size -1 means "ask the tokenizer")."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in params.items() if k in known}
        if kwargs.get("vocab_size", 0) <= 0:
            kwargs.pop("vocab_size", None)
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> "ModelArgs":
        """From the dict in a Hugging Face `config.json` of a `LlamaForCausalLM`."""
        n_heads = config["num_attention_heads"]
        return cls(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            vocab_size=config["vocab_size"],
            hidden_dim=config["intermediate_size"],
            head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            rope_scaling_factor=hf_rope_scaling(config),
            max_seq_len=config.get("max_position_embeddings", 4096),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


def hf_rope_scaling(config: dict[str, Any]) -> float:
    """The linear position-interpolation factor of an HF config (`rope_scaling`, or transformers 5's
    `rope_parameters`): 1.0 for none or "default"; a CheckpointError naming any other type, which this
    engine does not implement (dynamic NTK, YaRN, Llama 3's and the rest change more than positions)."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return 1.0
    if kind != "linear":
        raise CheckpointError(f"rope_scaling type {kind!r} is not supported: QGPT applies only 'linear' "
                              "(position interpolation)")
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or factor <= 0:
        raise CheckpointError(f"rope_scaling type 'linear' needs a positive factor, got {factor!r}")
    return float(factor)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or a CheckpointError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


# Named presets: the published params.json of each model.
PRESETS: dict[str, ModelArgs] = {
    "llama-2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32),
    "llama-2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40),
    "llama-2-70b": ModelArgs(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096
    ),
    "codellama-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32016, rope_theta=1e6, max_seq_len=16384),
    "codellama-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32016, rope_theta=1e6, max_seq_len=16384),
    # Code Llama 34B was released without infilling, so its vocabulary has no <PRE>/<SUF>/<MID>/<EOT>: 32000.
    "codellama-34b": ModelArgs(
        dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.0,
        vocab_size=32000, rope_theta=1e6, max_seq_len=16384,
    ),
    # Tiny shapes for tests and CPU benchmarks (random weights).
    "tiny": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=256),
    "tiny-100m": ModelArgs(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=32000, max_seq_len=2048),
}


def preset(name: str) -> ModelArgs:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
