"""One front for every checkpoint format: `load_model(path)` recognises what `path` is."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from qgpt_code.checkpoints import hf, meta
from qgpt_code.checkpoints.assemble import LoadedModel, ModelInfo, Progress, build_model, check_tokenizer_fits
from qgpt_code.device import resolve_device, resolve_dtype
from qgpt_code.errors import CheckpointError
from qgpt_code.fresh_thread import run_in_fresh_thread
from qgpt_code.tokenizer import Tokenizer, find_tokenizer_file, load_tokenizer

if TYPE_CHECKING:  # torch is imported by load_model: reading a header (`qgpt models`) needs none
    import torch

__all__ = ["LoadedModel", "ModelInfo", "load_model", "detect_format"]


def detect_format(path: Path) -> str:
    """"meta", "hf" or "gguf"; a CheckpointError saying what was expected otherwise."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if meta.is_meta_dir(path):
        return "meta"
    if hf.is_hf_dir(path):
        return "hf"
    raise CheckpointError(
        f"{path}: not a model checkpoint (expected a .gguf file, or a directory with params.json + "
        "consolidated.*.pth, or with config.json + *.safetensors)"
    )


def stderr_progress(label: str) -> Progress:
    """Progress on stderr (stdout carries only results): a live counter on a terminal, otherwise
    one line per quarter so logs stay readable."""
    interactive = sys.stderr.isatty()

    def report(done: int, total: int) -> None:
        if interactive:
            print(f"\r{label}: {done}/{total} tensors", end="\n" if done == total else "", file=sys.stderr, flush=True)
        elif done == total or done * 4 // total != (done - 1) * 4 // total:
            print(f"{label}: {done}/{total} tensors", file=sys.stderr, flush=True)

    return report


def load_model(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    tokenizer: str | Path | Tokenizer | None = None,
    progress: Progress | None = None,
    keep_quantized: bool | None = None,
) -> LoadedModel:
    """Load a Meta directory, an HF directory or a GGUF file onto `device` (default: CUDA when present).

    A GGUF file's quantized matrices stay quantized on the CPU in float32 (see quant_blocks.py);
    `keep_quantized=False` dequantizes them as on other devices.

    `tokenizer` overrides the one found beside the weights (a path or a Tokenizer). The work runs on
    a thread of its own that exits when it is done (see qgpt_code/fresh_thread.py: an engine thread
    serving the model afterwards then keeps its full CPU speed).
    """
    import torch

    device = resolve_device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" is the caller's current device, not the worker's
        device = torch.device("cuda", torch.cuda.current_device())
    return run_in_fresh_thread(_load_model, path, device, dtype, tokenizer, progress, keep_quantized)


def _load_model(path, device: torch.device, dtype, tokenizer, progress, keep_quantized=None) -> LoadedModel:
    path = Path(path).expanduser()
    fmt = detect_format(path)
    dtype = resolve_dtype(dtype, device)
    if fmt == "gguf":
        from qgpt_code.checkpoints import gguf

        return gguf.load(path, device, dtype, tokenizer, progress, keep_quantized)
    module = meta if fmt == "meta" else hf
    args = module.read_args(path)
    tok = _tokenizer_for(path, tokenizer)
    check_tokenizer_fits(tok, args, getattr(tok, "source", str(path)))
    tensors = meta.iter_tensors(path) if fmt == "meta" else hf.iter_tensors(path, args)
    model = build_model(args, tensors, device, dtype, progress)
    info = ModelInfo(path=path, format=fmt, args=args, name=path.name)
    return LoadedModel(model=model, tokenizer=tok, info=info)


def _tokenizer_for(path: Path, given: str | Path | Tokenizer | None) -> Tokenizer:
    if given is not None and not isinstance(given, (str, Path)):
        return given
    if given is not None:
        return load_tokenizer(given)
    found = find_tokenizer_file(path)
    if found is None:
        raise CheckpointError(f"{path}: no tokenizer.model beside the weights (pass one with --tokenizer)")
    return load_tokenizer(found)
