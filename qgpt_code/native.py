"""The fused CPU decode kernels (cpu_kernels.c), compiled on first use and loaded with ctypes.

The library is built for this machine's CPU (`-march=native`) with the system C compiler and kept
in a cache directory named by the source, the compiler command and the CPU's features, so a changed
source or another CPU gets its own build. Without a compiler the decode step stays in plain
PyTorch (one line on stderr says so): slower, same results.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-march=native", "-std=gnu11", "-shared", "-fPIC"]
BUILD_TIMEOUT_S = 120

_pointer, _int64, _float = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
SIGNATURES = {
    "add_rms_norm": [_pointer, _pointer, _pointer, _pointer, _int64, _int64, _float],
    "swiglu": [_pointer, _pointer, _int64, _int64],
    # qkv, keys, values, rope, tables, table_width, positions, out, scratch, then the sizes
    "decode_attention": [_pointer] * 5 + [_int64] + [_pointer] * 3 + [_int64] * 6,
    "int8_matmul": [_pointer] * 4 + [_int64] * 3,
    # block-quantized weights (quant_blocks.py): fmt, blocks, x, y, then batch, in, out, ldy, isa, method
    "quant_matmul": [_int64] + [_pointer] * 3 + [_int64] * 6,
    "quant_dequantize": [_int64, _pointer, _pointer, _int64, _int64],
    "quant_quantize": [_int64, _pointer, _pointer, _int64, _int64],
    "quant_activations": [_pointer, _int64] + [_pointer] * 4,
    "quant_best_isa": [],
    "quant_block_bytes": [_int64],
    "quant_set_threads": [_int64],
}
RETURNS_INT = {"quant_matmul", "quant_best_isa", "quant_block_bytes"}  # the others return nothing


class NativeBuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    """$QGPT_CACHE_DIR, else $XDG_CACHE_HOME/qgpt-code, else ~/.cache/qgpt-code."""
    if os.environ.get("QGPT_CACHE_DIR"):
        return Path(os.environ["QGPT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qgpt-code"


def _cpu_features() -> str:
    """What -march=native depends on: the architecture and, on Linux, the CPU's flags."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return f"{platform.machine()} {flags}"


def _openmp_flag(compiler: str) -> str:
    """GCC's -fopenmp links libgomp, the runtime PyTorch's Linux wheels load: one thread pool for both.
    Clang's would bring a second runtime (libomp) whose threads compete with PyTorch's, so with
    Clang the kernels use SIMD only and run on the calling thread."""
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        version = ""
    return "-fopenmp-simd" if "clang" in version.lower() else "-fopenmp"


def build(compiler: str | None = None) -> Path:
    """Compile the kernels (once per source, compiler and CPU) and return the library's path."""
    compiler = compiler or os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise NativeBuildError(f"no C compiler '{compiler}' on PATH")
    flags = [*FLAGS, _openmp_flag(compiler)]
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join([compiler, *flags]).encode(), _cpu_features().encode()]))
    target = cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent first uses each see a whole library or none.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        try:
            result = subprocess.run([compiler, *flags, "-o", str(built), str(SOURCE), "-lm"],
                                    capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise NativeBuildError(f"{compiler} took over {BUILD_TIMEOUT_S} s") from None
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
            first_error = next((line for line in lines if "error" in line), lines[-1])
            raise NativeBuildError(f"{compiler} failed: {first_error.strip()}")
        os.replace(built, target)
    return target


@functools.cache
def cpu_kernels() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (with one line on stderr) when it cannot be built."""
    import torch  # noqa: F401  loaded first, so the library binds to PyTorch's libgomp (one thread pool)

    try:
        library = ctypes.CDLL(str(build()))
    except (NativeBuildError, OSError) as error:
        print(f"qgpt: CPU decode kernels unavailable ({error}); decoding with plain PyTorch",
              file=sys.stderr)
        return None
    return bind(library)


def bind(library: ctypes.CDLL) -> ctypes.CDLL:
    """Give the library's functions their argument and result types (ctypes would guess ints)."""
    for name, argtypes in SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, _int64 if name in RETURNS_INT else None
    return library
