"""Score samples: run each in the sandbox against its task's tests, then write results, summary and report.

Nothing here imports a model: scoring needs only the samples file and the problems.

    summary = score_file("run/samples.jsonl", out_dir="run")   # results.jsonl, summary.json, report.md
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import qgpt_code
from qgpt_code.evals.data import EvalDataError, Problem, read_problems, write_jsonl
from qgpt_code.evals.detect import detect
from qgpt_code.evals.infill_tasks import infer_task_set, tasks_of
from qgpt_code.evals.isolation import Isolation, bwrap_version
from qgpt_code.evals.passk import DEFAULT_KS, pass_at_k
from qgpt_code.evals.report import render_report
from qgpt_code.evals.samples import Sample, read_samples
from qgpt_code.evals.sandbox import FAILED, PASSED, TIMED_OUT, Execution, Limits, Sandbox, Trial


@dataclass(frozen=True)
class Result:
    task_id: str
    index: int
    outcome: str
    detail: str
    duration_s: float
    tests_isolated: bool = True
    """The tests ran in an interpreter of their own; False: in the sample's (their arguments were not plain)."""
    sandbox_failed: bool = False
    """The sandbox did not start (no sample code ran): a fault of the machine, not of the sample."""

    @property
    def passed(self) -> bool:
        return self.outcome == PASSED

    def record(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "index": self.index,
            "outcome": self.outcome,
            "passed": self.passed,
            "detail": self.detail,
            "duration_s": round(self.duration_s, 4),
            "tests_isolated": self.tests_isolated,
            "sandbox_failed": self.sandbox_failed,
        }


def execute(
    samples: Sequence[Sample],
    tasks: Mapping[str, Problem],
    sandbox: Sandbox,
    workers: int,
    progress: bool = True,
) -> list[Result]:
    """Run every sample against its task's tests in parallel; results in task order, then sample index."""
    unknown = sorted({s.task_id for s in samples} - tasks.keys())
    if unknown:
        raise EvalDataError(f"{len(unknown)} sample task_id(s) are not in the task set, e.g. {unknown[0]!r}")
    results: list[Result] = []
    with ThreadPoolExecutor(max_workers=workers) as pool, _progress_bar(len(samples), progress) as bar:
        futures = {pool.submit(_run_one, sandbox, tasks[s.task_id], s.completion): s for s in samples}
        try:
            for future in as_completed(futures):
                sample, run = futures[future], future.result()
                results.append(Result(sample.task_id, sample.index, run.outcome, run.detail, run.duration_s,
                                      run.tests_isolated, run.sandbox_failed))  # fmt: skip
                bar.update(1)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    order = {task_id: position for position, task_id in enumerate(tasks)}
    return sorted(results, key=lambda r: (order[r.task_id], r.index))


def _run_one(sandbox: Sandbox, task: Problem, completion: str) -> Execution:
    """One sample's execution; whatever goes wrong with it, even in the harness, fails that sample alone."""
    trial = Trial(task.code(completion), task.test, task.entry_point, task.tests_context)
    try:
        return sandbox.run(trial)
    except Exception as error:  # reported as this sample's failure, with its reason
        return Execution(FAILED, f"the harness could not run this sample: {type(error).__name__}: {error}", 0.0)


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm  # imported here: only execution shows progress

    return tqdm(total=total, desc="executing", unit="sample", file=sys.stderr, disable=not enabled, smoothing=0.1)


def summarize(results: Sequence[Result], tasks: Mapping[str, Problem], ks: Iterable[int]) -> dict[str, Any]:
    """pass@k for each k every scored task has enough samples for, and the counts."""
    counts: dict[str, tuple[int, int]] = {}
    for result in results:
        n, c = counts.get(result.task_id, (0, 0))
        counts[result.task_id] = (n + 1, c + result.passed)
    per_task = [n for n, _ in counts.values()]
    return {
        "pass_at_k": pass_at_k(counts, ks),
        "tasks_total": len(tasks),
        "tasks_scored": len(counts),
        "complete": len(counts) == len(tasks),
        "samples": len(results),
        "samples_per_task": {"min": min(per_task, default=0), "max": max(per_task, default=0)},
        "outcomes": {name: sum(r.outcome == name for r in results) for name in (PASSED, FAILED, TIMED_OUT)},
        "tests_in_process": list(dict.fromkeys(r.task_id for r in results if not r.tests_isolated)),
        "sandbox_failures": sum(r.sandbox_failed for r in results),
    }


def versions(isolation: Isolation) -> dict[str, str | None]:
    return {
        "qgpt_code": qgpt_code.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "bwrap": bwrap_version() if isolation.name == "bwrap" else None,
    }


def score_file(
    samples_path: str | Path,
    out_dir: str | Path | None = None,
    *,
    problems_path: str | Path | None = None,
    task_set: str | None = None,
    ks: Iterable[int] = DEFAULT_KS,
    workers: int | None = None,
    limits: Limits = Limits(),
    isolation: str | Isolation = "auto",
    progress: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Score a samples.jsonl; write results.jsonl, summary.json and report.md into out_dir; return the summary.

    `task_set` (humaneval, single-line, multi-line) is inferred from the task_ids when None; `out_dir` defaults
    to the samples file's folder. `extra` entries are added to the summary (the generation side adds the
    model, its settings and timings under "generation").
    """
    samples_path = Path(samples_path)
    out_dir = Path(out_dir) if out_dir is not None else samples_path.parent
    samples = read_samples(samples_path)
    if not samples:
        raise EvalDataError(f"{samples_path}: no samples to score")
    task_set = task_set or infer_task_set(s.task_id for s in samples)
    problems = read_problems(problems_path)
    tasks = tasks_of(problems.problems, task_set)
    workers = workers or os.cpu_count() or 1
    ks = sorted(set(ks))
    isolation = detect(isolation) if isinstance(isolation, str) else isolation

    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    clock = time.monotonic()
    with Sandbox(limits, isolation) as sandbox:
        results = execute(samples, tasks, sandbox, workers, progress)
        sandbox_description = sandbox.describe()
    summary = {
        "task_set": task_set,
        "samples_file": str(samples_path),
        "problems_file": str(problems.path),
        **summarize(results, tasks, ks),
        "settings": {"workers": workers, "ks_requested": ks},
        "isolation": sandbox_description,
        "versions": {**versions(isolation), "problems_sha256": problems.sha256},
        "started_at": started_at,
        "wall_time_s": round(time.monotonic() - clock, 3),
        **(extra or {}),
    }
    write_outputs(out_dir, results, summary)
    return summary


def write_outputs(out_dir: str | Path, results: Sequence[Result], summary: Mapping[str, Any]) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "results.jsonl", (r.record() for r in results))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(render_report(summary, results), encoding="utf-8")
