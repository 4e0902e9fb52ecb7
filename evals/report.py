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


def _model_line(model: Mapping[str, Any]) -> str:
    if model.get("backend") == "http":
        return f"`{model.get('model_id')}` served at {model.get('server')}"
    details = ", ".join(str(v) for v in (model.get("format"), model.get("quantization"), model.get("device"),
                                          model.get("dtype")) if v)
    return f"`{model.get('path')}` ({details}), in-process"


def _generation_lines(generation: Mapping[str, Any]) -> list[str]:
    """The generation block: model, prompt mode, sampling settings, this invocation's counts and time."""
    settings, run = generation.get("settings", {}), generation.get("this_run", {})
    lines = [
        "## Generation",
        "",
        f"- model: {_model_line(generation.get('model', {}))}",
        f"- prompts: {settings.get('mode')}; n = {settings.get('n')}, temperature {settings.get('temperature')}, "
        f"top_p {settings.get('top_p')}, max_tokens {settings.get('max_tokens')}, seed {settings.get('seed')}",
    ]
    if run:
        rate = run.get("completion_tokens_per_s")
        lines.append(
            f"- this invocation: {run.get('generated')} samples generated ({run.get('resumed')} already there), "
            f"{run.get('errors')} errors, {run.get('completion_tokens')} tokens in {run.get('wall_time_s', 0):.1f} s"
            + (f" ({rate} tokens/s)" if rate else "")
        )
    limits = generation.get("limits")
    if limits:
        chosen = [f"every {limits['every']}th"] if limits.get("every", 1) > 1 else []
        chosen += [f"the first {limits['limit']}"] if limits.get("limit") else []
        lines.append(f"- tasks: {limits.get('tasks_selected')} of {limits.get('tasks_in_set')}"
                     + (f" ({', then '.join(chosen)})" if chosen else ""))
    return lines + [""]


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
        *(f"- sandbox warning: {warning}" for warning in isolation.get("warnings", [])),
        "- tests: in an interpreter of their own, the sample's function called with plain values"
        + (f" ({len(summary['tests_in_process'])} tasks in the sample's own process, see below)"
           if summary.get("tests_in_process") else ""),
        f"- wall time (scoring): {summary['wall_time_s']:.1f} s",
        "",
    ]
    if summary.get("generation"):
        lines += _generation_lines(summary["generation"])
    lines += ["## pass@k", ""]
    if summary["pass_at_k"]:
        lines += _table(["metric", "value"], [[k, f"{v * 100:.2f}%"] for k, v in summary["pass_at_k"].items()])
    else:
        lines.append("No k fits: every task needs at least k samples.")
    if summary.get("editor"):
        from qgpt_code.evals.editor_metrics import metrics_lines

        lines += ["", *metrics_lines(summary["editor"])[:-1]]
    outcomes = summary["outcomes"]
    lines += ["", "## Outcomes", ""]
    lines += _table(["outcome", "samples"], [[name, count] for name, count in outcomes.items()])

    failing = [(task, rs) for task, rs in by_task.items() if not any(r.outcome == "passed" for r in rs)]
    lines += ["", f"## Failing tasks (no sample passed): {len(failing)}", ""]
    if failing:
        rows = [[task, rs[0].outcome, rs[0].detail] for task, rs in failing[:_FAILING_ROWS]]
        lines += _table(["task", "first outcome", "detail"], rows) + _more(len(rows), len(failing))

    in_process = summary.get("tests_in_process") or []
    if in_process:
        lines += ["", f"## Tests run in the sample's own process: {len(in_process)}", "",
                  "Their tests pass the candidate something that is not a plain value, so they could not be split "
                  "from the sample: a sample of these tasks could fake its pass.", ""]  # fmt: skip
        lines += [f"- {task}" for task in in_process]
    if summary.get("sandbox_failures"):
        broken = [r for r in results if getattr(r, "sandbox_failed", False)]
        lines += ["", f"## The sandbox did not start: {len(broken)} samples (counted as failed)", ""]
        lines += _table(["task", "sample", "detail"], [[r.task_id, r.index, r.detail] for r in broken[:_FAILING_ROWS]])
        lines += _more(min(len(broken), _FAILING_ROWS), len(broken))

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
