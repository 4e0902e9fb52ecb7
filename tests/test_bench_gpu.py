"""bench/gpu.py, the prepared GPU run, walked through on the CPU (`--smoke`: tiny model, float32).

The numbers mean nothing on a CPU; what is checked is that every step runs and prints its row with
positive numbers, and that the targets come out as PASS/FAIL lines, so that the one run on a lent GPU
is not wasted on a bug in the script.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu.py"
NUMBER = r"([0-9]+(?:\.[0-9]+)?)"

# (what the row is, a pattern for it whose groups are numbers that must be positive)
ROWS = {
    "copy bandwidth": rf"^copy bandwidth\s+{NUMBER} GB/s",
    "decode floor": rf"^decode floor fp32\s+{NUMBER} ms/token\s+{NUMBER} tok/s",
    "matvec ceiling": rf"^matvec ceiling\s+{NUMBER} tok/s\s+{NUMBER} ms/chain",
    "decode, serving settings": rf"^decode fp32 \(no graphs on the CPU\)\s+{NUMBER} tok/s\s+{NUMBER} ms/token; "
                                rf"{NUMBER} of floor; {NUMBER} of matvec ceiling",
    "decode, eager": rf"^decode fp32 \(eager\)\s+{NUMBER} tok/s\s+{NUMBER} ms/token",
    "int8 floor": rf"^decode floor int8\s+{NUMBER} ms/token",
    "int8 decode": rf"^decode int8 \(.*?\)\s+{NUMBER} tok/s\s+{NUMBER} ms/token; {NUMBER}x our fp32",
    "int8 logits": rf"^int8 vs fp32 logits\s+distance\s+max\|diff\| {NUMBER} .*cosine >= {NUMBER}",
    "transformers": rf"^transformers static cache\s+{NUMBER} tok/s\s+{NUMBER} ms/token",
    "ours / transformers": rf"^ours / transformers\s+{NUMBER}x",
    "cold prefill": rf"^prefill 128 tokens \(cold TTFT\)\s+{NUMBER} ms",
    "warm TTFT": rf"^TTFT 96 cached \+ 32 new\s+{NUMBER} ms\s+ratio warm/cold {NUMBER}; (96) tokens from cache",
}


@pytest.fixture(scope="module")
def smoke_run() -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--smoke"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_smoke_run_exits_cleanly_without_error_rows(smoke_run):
    assert smoke_run.returncode == 0, smoke_run.stderr[-3000:]
    assert "ERROR" not in smoke_run.stdout, smoke_run.stdout + smoke_run.stderr[-3000:]
    first = smoke_run.stdout.splitlines()[0]
    assert first.startswith("card cpu; torch ") and "transformers " in first


@pytest.mark.parametrize("row", sorted(ROWS))
def test_smoke_run_prints_the_row_with_positive_numbers(smoke_run, row):
    match = re.search(ROWS[row], smoke_run.stdout, re.MULTILINE)
    assert match, f"no {row} row in:\n{smoke_run.stdout}"
    assert all(float(value) > 0 for value in match.groups()), match.group(0)


def test_smoke_run_int8_logits_stay_close_to_float(smoke_run):
    match = re.search(ROWS["int8 logits"], smoke_run.stdout, re.MULTILINE)
    assert match and float(match.group(2)) > 0.99, smoke_run.stdout


def test_smoke_run_ends_with_one_pass_or_fail_line_per_target(smoke_run):
    lines = smoke_run.stdout.splitlines()
    targets = lines[lines.index("targets:") + 1 :]
    assert len(targets) == 5, targets
    for line in targets:
        assert re.match(rf"^(PASS|FAIL)  .+: {NUMBER} \(target (>=|<=) {NUMBER}\)(; .+ {NUMBER} ms.*)?$", line), line
    # each beside the numbers it compares: the decode targets name the floor's time per token
    assert re.search(rf"of the floor: .*; ours {NUMBER} ms, floor {NUMBER} ms$", "\n".join(targets), re.MULTILINE)


def test_smoke_run_int8_compiles_nothing_after_start_up(smoke_run):
    match = re.search(r"^decode int8 .*kernel (\w+); .* (\d+) compilations after start-up$", smoke_run.stdout,
                      re.MULTILINE)
    assert match and match.group(2) == "0", smoke_run.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_the_full_run_refuses_in_one_line():
    result = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "CUDA" in result.stderr
