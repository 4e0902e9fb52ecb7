"""Infilling tasks derived from the canonical solutions, following HumanEval-infilling.

The construction is the one of the InCoder paper (Fried et al. 2022) that the FIM paper (Bavarian et al.
2022, "Efficient Training of Language Models to Fill in the Middle") evaluates on, and that OpenAI's
human-eval-infilling files hold:

- single-line: each non-blank line of a canonical solution is masked in turn. Task id
  `SingleLineInfilling/HumanEval/N/L{i}`, where i is the line's index in the solution (blank lines count).
- multi-line: each contiguous span of lines from non-blank line i to non-blank line j (i <= j, so the
  one-line spans are included, and blank lines inside a span are part of the middle) is masked. Task id
  `MultiLineInfilling/HumanEval/N/L{i}_L{j}`.
- function-body (ours, issue 18's editor case): the whole body of the problem's function is masked, the
  cursor sits after the auto-indent of the body's first line (what an editor shows after Enter below a
  docstring), and the file goes on after the function: two blank lines and another top-level function
  (`FOLLOWING_CODE`), so a completion that runs on past the body is seen doing so. Task id
  `FunctionBodyInfilling/HumanEval/N`; the task's `prompt` ends with that indentation and its
  `canonical_solution` starts after it.

On HumanEval's 164 problems this gives 1,033 single-line and 5,815 multi-line tasks, the counts the FIM paper
reports. Each task is a `Problem` in human-eval-infilling's format: `prompt` = problem prompt + the solution's
lines before the span, `canonical_solution` = the masked lines, `suffix` = the lines after, and the problem's
own unit tests, so prompt + canonical_solution + suffix is always the original canonical program.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from itertools import combinations_with_replacement
from pathlib import Path

from qgpt_code.evals.data import EvalDataError, Problem, read_problems

HUMANEVAL = "humaneval"
SINGLE_LINE = "single-line"
MULTI_LINE = "multi-line"
FUNCTION_BODY = "function-body"
TASK_SETS = (HUMANEVAL, SINGLE_LINE, MULTI_LINE, FUNCTION_BODY)
INFILL_KINDS = (FUNCTION_BODY, MULTI_LINE, SINGLE_LINE)
_ID_PREFIX = {SINGLE_LINE: "SingleLineInfilling", MULTI_LINE: "MultiLineInfilling",
              FUNCTION_BODY: "FunctionBodyInfilling"}
# What follows the function in a function-body task's file: the Neovim case of issue 18. It defines a name
# and runs nothing, so the tests see only the candidate.
FOLLOWING_CODE = "\n\ndef main():\n    pass\n"


def _spans(problem: Problem, task_set: str) -> Iterator[tuple[int, int]]:
    lines = problem.canonical_solution.splitlines(keepends=True)
    non_blank = [i for i, line in enumerate(lines) if line.strip()]
    if task_set == SINGLE_LINE:
        return ((i, i) for i in non_blank)
    return combinations_with_replacement(non_blank, 2)


def _function_body_task(problem: Problem) -> Problem:
    body = problem.canonical_solution
    indent = body[: len(body) - len(body.lstrip(" \t"))]
    return Problem(
        task_id=f"{_ID_PREFIX[FUNCTION_BODY]}/{problem.task_id}",
        prompt=problem.prompt + indent,
        canonical_solution=body[len(indent):],
        suffix=FOLLOWING_CODE,
        test=problem.test,
        entry_point=problem.entry_point,
        context=problem.tests_context,
    )


def _infill_task(problem: Problem, task_set: str, first: int, last: int) -> Problem:
    lines = problem.canonical_solution.splitlines(keepends=True)
    label = f"L{first}" if task_set == SINGLE_LINE else f"L{first}_L{last}"
    return Problem(
        task_id=f"{_ID_PREFIX[task_set]}/{problem.task_id}/{label}",
        prompt=problem.prompt + "".join(lines[:first]),
        canonical_solution="".join(lines[first : last + 1]),
        suffix="".join(lines[last + 1 :]),
        test=problem.test,
        entry_point=problem.entry_point,
        context=problem.tests_context,  # the prompt holds solution lines now: the tests get the problem's own
    )


def infill_tasks(problems: Iterable[Problem], task_set: str) -> dict[str, Problem]:
    """The single-line, multi-line or function-body infilling tasks of `problems`, by task_id, in a fixed order."""
    if task_set not in _ID_PREFIX:
        raise ValueError(f"unknown infilling task set {task_set!r}; expected one of {sorted(_ID_PREFIX)}")
    if task_set == FUNCTION_BODY:
        return {task.task_id: task for task in map(_function_body_task, problems)}
    tasks = (
        _infill_task(problem, task_set, first, last)
        for problem in problems
        for first, last in _spans(problem, task_set)
    )
    return {task.task_id: task for task in tasks}


def load_tasks(task_set: str = HUMANEVAL, problems_path: str | Path | None = None) -> dict[str, Problem]:
    """The tasks of a task set: the problems themselves (humaneval) or the infilling tasks built from them."""
    return tasks_of(read_problems(problems_path).problems, task_set)


def tasks_of(problems: Mapping[str, Problem], task_set: str) -> dict[str, Problem]:
    if task_set not in TASK_SETS:
        raise EvalDataError(f"unknown task set {task_set!r}; expected one of {', '.join(TASK_SETS)}")
    return dict(problems) if task_set == HUMANEVAL else infill_tasks(problems.values(), task_set)


def infer_task_set(task_ids: Iterable[str]) -> str:
    """Which task set sample task_ids belong to, from their prefix (`SingleLineInfilling/...` and so on)."""
    by_prefix: Mapping[str, str] = {prefix: name for name, prefix in _ID_PREFIX.items()}
    found = {by_prefix.get(task_id.split("/", 1)[0], HUMANEVAL) for task_id in task_ids}
    if len(found) > 1:
        raise EvalDataError(f"the samples mix task sets ({', '.join(sorted(found))}); score them separately")
    return found.pop() if found else HUMANEVAL
