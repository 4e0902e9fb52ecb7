"""Choosing a device and a dtype from what the user asked for and what the machine has."""

from __future__ import annotations

import torch

from qgpt_code.errors import QGPTError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(name: str | torch.device | None) -> torch.device:
    """`None` means CUDA when present, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QGPTError(f"device {name!r} was asked for but CUDA is not available on this machine")
    return device


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None` means bfloat16 on CUDA and float32 on the CPU (bf16 matmuls are slow on most CPUs)."""
    if isinstance(name, torch.dtype):
        return name
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise QGPTError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None
