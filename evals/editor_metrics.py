"""What a user of the editor sees, beside pass@1, for an infilling run (issue 18).

From samples.jsonl (the inserted text, the raw output, its token count and latency) and results.jsonl:
- left block: the suggestion holds a line indented less than the least-indented line of the code it
  replaces (the canonical middle), i.e. code outside the block that code lives in (a second `def main():`,
  a dedent past the loop). Judged against the task's own answer, not against the post-processing's rules;
- leading blank: the suggestion's first line is blank and more follows (accepting it leaves the cursor's
  line empty);
- tokens and seconds per completion (generation, as one editor waits for it: run with `--batch 1`), and
  seconds per accepted completion (all generation time over the samples that passed).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from qgpt_code.evals.data import Problem
from qgpt_code.prompts.blocks import indentation


def inserted_text(record: Mapping[str, Any]) -> str:
    """The text the editor inserts: the sample's completion less the line break that ends the cursor's line."""
    completion = record.get("completion", "")
    return completion[:-1] if completion.endswith("\n") else completion


def left_block(inserted: str, problem: Problem) -> bool:
    """Whether a line of the suggestion (past the cursor's line) is indented less than every line of the
    code it stands for: it has left the block that code belongs to."""
    middle = [line for line in problem.canonical_solution.split("\n") if line.strip()]
    if not middle:
        return False
    cursor_line = problem.prompt[problem.prompt.rfind("\n") + 1 :]
    floor = min([indentation(cursor_line + middle[0]), *(indentation(line) for line in middle[1:])])
    return any(line.strip() and indentation(line) < floor for line in inserted.split("\n")[1:])


def leading_blank(inserted: str) -> bool:
    first, _, rest = inserted.partition("\n")
    return not first.strip() and bool(rest.strip())


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def editor_metrics(samples: list[dict], results: list[dict], tasks: Mapping[str, Problem]) -> dict[str, Any]:
    passed = {(r["task_id"], r["index"]) for r in results if r.get("passed")}
    rows = [s for s in samples if s["task_id"] in tasks]
    total = len(rows)
    if not total:
        return {}
    inserted = [inserted_text(s) for s in rows]
    seconds = [float(s.get("seconds") or 0.0) for s in rows]
    tokens = [int(s.get("completion_tokens") or 0) for s in rows]
    accepted = sum((s["task_id"], s["index"]) in passed for s in rows)
    return {
        "completions": total,
        "accepted": accepted,
        "left_block_rate": sum(left_block(text, tasks[s["task_id"]]) for text, s in zip(inserted, rows)) / total,
        "leading_blank_rate": sum(map(leading_blank, inserted)) / total,
        "empty_rate": sum(not text.strip() for text in inserted) / total,
        "mean_completion_tokens": sum(tokens) / total,
        "mean_seconds": sum(seconds) / total,
        "seconds_per_accepted": sum(seconds) / accepted if accepted else None,
        "finish_reasons": _count(s.get("finish_reason", "") for s in rows),
    }


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def add_editor_metrics(out_dir: str | Path, tasks: Mapping[str, Problem]) -> dict[str, Any]:
    """Add the editor's metrics to a scored run's summary.json and report.md; return them."""
    from qgpt_code.evals.report import render_report

    out_dir = Path(out_dir)
    summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    results = _read_jsonl(out_dir / "results.jsonl")
    samples = _read_jsonl(Path(summary["samples_file"]))
    summary["editor"] = editor_metrics(samples, results, tasks)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    shown = [SimpleNamespace(**{"detail": "", "duration_s": 0.0, **r}) for r in results]
    (out_dir / "report.md").write_text(render_report(summary, shown), encoding="utf-8")
    return summary["editor"]


def metrics_lines(metrics: Mapping[str, Any]) -> list[str]:
    """The report's "What the editor shows" section."""
    if not metrics:
        return []
    per_accepted = metrics.get("seconds_per_accepted")
    return [
        "## What the editor shows", "",
        f"- suggestions that left their block: {metrics['left_block_rate'] * 100:.1f}%",
        f"- suggestions that begin with a blank line: {metrics['leading_blank_rate'] * 100:.1f}%",
        f"- empty suggestions: {metrics['empty_rate'] * 100:.1f}%",
        f"- tokens generated per completion: {metrics['mean_completion_tokens']:.1f}",
        f"- seconds per completion: {metrics['mean_seconds']:.2f}; per accepted (passing) completion: "
        + (f"{per_accepted:.2f}" if per_accepted is not None else "none passed"),
        "- finish reasons: " + ", ".join(f"{k or '?'} {v}" for k, v in metrics["finish_reasons"].items()),
        "",
    ]
