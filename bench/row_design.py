"""The row design's engine beside this checkout's, in the same benchmark run.

Before the paged KV cache, each running sequence owned a row of `max_seq_len` positions (commit
1ef7cb4 is the last one with rows). The benchmarks that compare the two check that commit out in a
temporary `git worktree` and run its `qgpt_code` in a subprocess, its checkout first on PYTHONPATH
(ahead of the editable install of this checkout, which Python's import system consults after
PYTHONPATH). Used by bench/prefix_cpu.py and bench/http_load.py; not a script of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REV = "1ef7cb4"


@contextmanager
def checkout(rev: str) -> Iterator[Path]:
    """A detached worktree of `rev` in a temporary directory, removed on exit."""
    with tempfile.TemporaryDirectory(prefix="qgpt-rows-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(tree), rev], check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)


def environment(tree: Path) -> dict[str, str]:
    """os.environ with `tree` first on PYTHONPATH."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}


def check_imports_from(tree: Path, module_file: str) -> None:
    """Fail unless `module_file` (a qgpt_code.__file__) lies in the worktree."""
    if not Path(module_file).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"the row design's process imported {module_file}, not the worktree's qgpt_code")


def imported_file(tree: Path) -> str:
    """qgpt_code.__file__ as a process started with `environment(tree)` in `tree` sees it (checked)."""
    found = subprocess.run([sys.executable, "-c", "import qgpt_code; print(qgpt_code.__file__)"], cwd=tree,
                           env=environment(tree), check=True, capture_output=True, text=True).stdout.strip()
    check_imports_from(tree, found)
    return found
