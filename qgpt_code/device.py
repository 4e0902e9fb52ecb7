"""Choosing a device and a dtype from what the user asked for and what the machine has.

The names are checked without torch (`check_device_name`, `DTYPE_NAMES`), so the CLI can refuse a typo
before paying for the import; torch is imported when a name is resolved.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from qgpt_code.errors import QGPTError

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
               "bfloat16": "bfloat16", "bf16": "bfloat16"}
_DEVICE = re.compile(r"(cpu|cuda(:\d+)?)\Z")  # the devices the model and its kernels run on


def check_device_name(name: str, what: str = "device") -> None:
    """A QGPTError unless `name` is cpu, cuda or cuda:N (torch knows more kinds -- meta, mps, xpu --
    that this engine does not run on). `what` names it in the message (the CLI says `--device`)."""
    if not _DEVICE.match(name):
        raise QGPTError(f"{what} {name!r} is not one QGPT runs on: use cpu, cuda or cuda:N")


def resolve_device(name: "str | torch.device | None") -> "torch.device":
    """`None` means CUDA when present, else the CPU."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device_name(str(name))
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise QGPTError(f"device {str(name)!r} was asked for but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise QGPTError(f"device {str(name)!r} was asked for but this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def resolve_dtype(name: "str | torch.dtype | None", device: "torch.device") -> "torch.dtype":
    """`None` means bfloat16 on CUDA and float32 on the CPU (bf16 matmuls are slow on most CPUs)."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return getattr(torch, DTYPE_NAMES[name])
    except KeyError:
        raise QGPTError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}") from None
