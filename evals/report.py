"""report.md: the pass@k table, outcome counts, failing and slowest tasks, and every task's outcomes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

_FAILING_ROWS = 50
_SLOWEST_ROWS = 10


class ResultLike(Protocol):
    task_id: str
    index: int
    outcome: str
    detail: str
    duration_s: float


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ") or " "


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(str(value)) for value in row) + " |" for row in rows]
    return lines


def _more(shown: int, total: int) -> list[str]:
    return [f"\n... and {total - shown} more (see results.jsonl)"] if total > shown else []


def render_report(summary: Mapping[str, Any], results: Sequence[ResultLike]) -> str:
    """The markdown report of a scored run; `results` are in task order."""
    by_task: dict[str, list[ResultLike]] = {}
    for result in results:
        by_task.setdefault(result.task_id, []).append(result)
    isolation = summary["isolation"]
    fewest, most = summary["samples_per_task"]["min"], summary["samples_per_task"]["max"]
    lines = [
        f"# Evaluation: {summary['task_set']}",
        "",
        f"- samples: `{summary['samples_file']}` ({summary['samples']} samples, "
        f"{fewest if fewest == most else f'{fewest}-{most}'} per task)",
        f"- tasks scored: {summary['tasks_scored']} of {summary['tasks_total']}"
        + ("" if summary["complete"] else " (INCOMPLETE: pass@k covers the scored tasks only)"),
        f"- problems: `{summary['problems_file']}`",
        f"- sandbox: {isolation['mode']}, process limit: {isolation['process_limit']}, "
        f"timeout {isolation['limits']['timeout_s']} s, {summary['settings']['workers']} workers",
        f"- wall time: {summary['wall_time_s']:.1f} s",
        "",
        "## pass@k",
        "",
    ]
    if summary["pass_at_k"]:
        lines += _table(["metric", "value"], [[k, f"{v * 100:.2f}%"] for k, v in summary["pass_at_k"].items()])
    else:
        lines.append("No k fits: every task needs at least k samples.")
    outcomes = summary["outcomes"]
    lines += ["", "## Outcomes", ""]
    lines += _table(["outcome", "samples"], [[name, count] for name, count in outcomes.items()])

    failing = [(task, rs) for task, rs in by_task.items() if not any(r.outcome == "passed" for r in rs)]
    lines += ["", f"## Failing tasks (no sample passed): {len(failing)}", ""]
    if failing:
        rows = [[task, rs[0].outcome, rs[0].detail] for task, rs in failing[:_FAILING_ROWS]]
        lines += _table(["task", "first outcome", "detail"], rows) + _more(len(rows), len(failing))

    slowest = sorted(results, key=lambda r: r.duration_s, reverse=True)[:_SLOWEST_ROWS]
    lines += ["", "## Slowest samples", ""]
    lines += _table(
        ["task", "sample", "seconds", "outcome"],
        [[r.task_id, r.index, f"{r.duration_s:.2f}", r.outcome] for r in slowest],
    )

    lines += ["", "## Per-task outcomes", ""]
    rows = []
    for task, rs in by_task.items():
        counts = {name: sum(r.outcome == name for r in rs) for name in outcomes}
        first_failure = next((f"{r.outcome}: {r.detail}" for r in rs if r.outcome != "passed"), "")
        rows.append([task, len(rs), *counts.values(), first_failure])
    lines += _table(["task", "n", *outcomes, "first failure"], rows)
    return "\n".join(lines) + "\n"
