"""Scoring end to end: canonical solutions, empty completions, infilling tasks, the CLI and its files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qgpt_code.evals.cli import main
from qgpt_code.evals.data import EvalDataError, load_problems, write_jsonl
from qgpt_code.evals.infill_tasks import MULTI_LINE, SINGLE_LINE, load_tasks
from qgpt_code.evals.sandbox import Limits
from qgpt_code.evals.score import Result, score_file, summarize

# Generous: two cores shared with the rest of the test suite; interpreter start-up counts against it.
LIMITS = Limits(timeout_s=30)
WORKERS = 4


def write_samples(path, rows):
    write_jsonl(path, ({"task_id": task_id, "completion": completion} for task_id, completion in rows))
    return path


def read_results(out_dir) -> list[Result]:
    lines = (out_dir / "results.jsonl").read_text().splitlines()
    return [Result(**{k: v for k, v in json.loads(line).items() if k != "passed"}) for line in lines]


@pytest.mark.slow
def test_canonical_solutions_pass_and_empty_completions_fail(tmp_path):
    problems = load_problems()
    rows = [(task_id, p.canonical_solution) for task_id, p in problems.items()]
    rows += [(task_id, "") for task_id in problems]  # sample 1 of every task: the empty completion
    samples = write_samples(tmp_path / "samples.jsonl", rows)

    summary = score_file(samples, ks=[1, 2, 10], limits=LIMITS, workers=WORKERS, progress=False)

    results = read_results(tmp_path)
    assert [(r.task_id, r.index) for r in results] == [(t, i) for t in problems for i in (0, 1)]
    canonical = [r for r in results if r.index == 0]
    empty = [r for r in results if r.index == 1]
    failures = [(r.task_id, r.outcome, r.detail) for r in canonical if not r.passed]
    assert failures == []
    assert summarize(canonical, problems, [1])["pass_at_k"] == {"pass@1": 1.0}
    assert summarize(empty, problems, [1])["pass_at_k"] == {"pass@1": 0.0}
    assert all(r.outcome == "failed" and r.detail for r in empty)
    # both together: one of two samples passes on every task
    assert summary["pass_at_k"] == {"pass@1": 0.5, "pass@2": 1.0}
    assert summary["outcomes"] == {"passed": 164, "failed": 164, "timed out": 0}
    assert summary["tests_in_process"] == [] and all(r.tests_isolated for r in results)  # every problem splits
    assert summary["sandbox_failures"] == 0
    assert summary["complete"] and summary["tasks_total"] == summary["tasks_scored"] == 164
    assert summary["samples_per_task"] == {"min": 2, "max": 2}
    assert len(summary["versions"]["problems_sha256"]) == 64
    report = (tmp_path / "report.md").read_text()
    assert "| pass@1 | 50.00% |" in report and "| pass@2 | 100.00% |" in report
    assert "## Failing tasks (no sample passed): 0" in report
    per_task = report.split("## Per-task outcomes")[1].splitlines()
    assert sum(line.startswith("| HumanEval/") for line in per_task) == 164


@pytest.mark.slow
def test_canonical_single_line_infills_all_pass(tmp_path):
    tasks = load_tasks(SINGLE_LINE)
    samples = write_samples(tmp_path / "samples.jsonl", ((t, task.canonical_solution) for t, task in tasks.items()))
    summary = score_file(samples, limits=LIMITS, workers=WORKERS, progress=False)
    assert summary["task_set"] == SINGLE_LINE  # inferred from the task ids
    assert summary["tasks_scored"] == summary["tasks_total"] == 1033
    assert summary["pass_at_k"] == {"pass@1": 1.0}, [r for r in read_results(tmp_path) if not r.passed][:5]


@pytest.mark.slow
def test_canonical_multi_line_infills_pass_on_a_deterministic_subset(tmp_path):
    tasks = load_tasks(MULTI_LINE)
    chosen = list(tasks.items())[::37]  # 158 of 5,815; all of them rebuild the canonical program (test_evals_data)
    samples = write_samples(tmp_path / "samples.jsonl", ((t, task.canonical_solution) for t, task in chosen))
    summary = score_file(samples, limits=LIMITS, workers=WORKERS, progress=False)
    assert summary["task_set"] == MULTI_LINE and summary["tasks_scored"] == len(chosen) == 158
    assert not summary["complete"] and summary["tasks_total"] == 5815
    assert summary["pass_at_k"] == {"pass@1": 1.0}, [r for r in read_results(tmp_path) if not r.passed][:5]
    # a wrong infill fails
    task_id, task = chosen[0]
    wrong = write_samples(tmp_path / "wrong.jsonl", [(task_id, "")])  # the empty infill
    assert score_file(wrong, tmp_path / "wrong", limits=LIMITS, progress=False)["pass_at_k"] == {"pass@1": 0.0}


def test_cli_scores_with_a_problems_file(tmp_path):
    problems = list(load_problems().values())[:3]
    write_jsonl(tmp_path / "three.jsonl.gz", (p.__dict__ for p in problems))
    rows = [(p.task_id, completion) for p in problems for completion in (p.canonical_solution, "    return None\n")]
    samples = write_samples(tmp_path / "samples.jsonl", rows)
    out = subprocess.run(
        [sys.executable, "-m", "qgpt_code.evals.cli", "score", str(samples),
         "--problems", str(tmp_path / "three.jsonl.gz"), "--out", str(tmp_path / "out"),
         "--workers", "2", "--timeout", "30", "--k", "1,2,5", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "humaneval: pass@1 = 50.00%  pass@2 = 100.00%" in out.stdout
    assert "3 of 3 tasks, 6 samples: 3 passed, 3 failed, 0 timed out" in out.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["pass_at_k"] == {"pass@1": 0.5, "pass@2": 1.0}  # no pass@5: only 2 samples per task
    assert summary["settings"] == {"workers": 2, "ks_requested": [1, 2, 5]}
    assert summary["isolation"]["limits"]["timeout_s"] == 30.0
    record = json.loads((tmp_path / "out" / "results.jsonl").read_text().splitlines()[1])
    assert record == {**record, "task_id": "HumanEval/0", "index": 1, "outcome": "failed", "passed": False}
    assert record["detail"] == "AssertionError" and record["duration_s"] > 0


def test_cli_partial_runs_and_errors(tmp_path, capsys):
    samples = write_samples(tmp_path / "samples.jsonl", [("HumanEval/2", "    return number % 1.0\n")])
    assert main(["score", str(samples), "--no-progress", "--timeout", "30"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["tasks_scored"], summary["tasks_total"], summary["complete"]) == (1, 164, False)
    assert "INCOMPLETE" in (tmp_path / "report.md").read_text()
    assert "1 of 164 tasks" in capsys.readouterr().out

    assert main(["score", str(tmp_path / "absent.jsonl")]) == 1
    assert "no such samples file" in capsys.readouterr().err
    unknown = write_samples(tmp_path / "unknown.jsonl", [("HumanEval/999", "")])
    assert main(["score", str(unknown)]) == 1
    assert "not in the task set" in capsys.readouterr().err
    assert main(["score", str(samples), "--k", "0"]) == 2
    assert main(["score", str(samples), "--bogus"]) == 2
    for command in ("humaneval", "infill"):
        assert main([command, "--model", str(tmp_path / "m.gguf"), "--n", "10", "--out", str(tmp_path / "o")]) == 1
        assert "m.gguf: no such file or directory" in capsys.readouterr().err


def test_scoring_refuses_samples_for_unknown_tasks(tmp_path):
    samples = write_samples(tmp_path / "samples.jsonl", [("HumanEval/0", ""), ("Other/1", "")])
    with pytest.raises(EvalDataError, match="1 sample task_id"):
        score_file(samples, progress=False)


def test_scoring_does_not_import_torch():
    code = "import sys, qgpt_code.evals.score, qgpt_code.evals.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
