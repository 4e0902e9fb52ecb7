"""The editor's metrics of an infilling run (evals/editor_metrics.py), and the function-body task kind."""

from __future__ import annotations

from qgpt_code.evals.editor_metrics import editor_metrics, left_block, leading_blank
from qgpt_code.evals.infill_tasks import FOLLOWING_CODE, FUNCTION_BODY, MULTI_LINE, load_tasks
from qgpt_code.evals.prompting import editor_view

BODY = load_tasks(FUNCTION_BODY)
SPANS = load_tasks(MULTI_LINE)


def test_function_body_tasks_put_the_cursor_after_the_bodys_indent_above_another_function():
    task = BODY["FunctionBodyInfilling/HumanEval/0"]
    assert len(BODY) == 164 and task.prompt.endswith('"""\n    ') and not task.canonical_solution[0].isspace()
    prefix, suffix = editor_view(task)
    assert prefix == task.prompt and suffix == "\n" + FOLLOWING_CODE and suffix.startswith("\n\n\ndef main():")


def test_left_block_is_judged_against_the_code_the_suggestion_replaces():
    body = BODY["FunctionBodyInfilling/HumanEval/0"]
    assert not left_block("return False\n    x = 1", body)
    assert left_block("return False\n\n\ndef main():\n    pass", body)  # issue 18's Neovim case
    inner = SPANS["MultiLineInfilling/HumanEval/0/L2_L3"]  # the inner loop's body, indented 12
    assert inner.canonical_solution.startswith("            if idx != idx2:")
    assert not left_block("            if idx != idx2:\n                pass", inner)
    assert left_block("            pass\n        return True", inner)  # back in the outer loop
    one_line = load_tasks("single-line")["SingleLineInfilling/HumanEval/0/L0"]  # `    for idx, elem in ...`
    assert left_block("    for x in y:\nprint(1)", one_line) and not left_block("    for x in y:\n        z()", one_line)
    assert leading_blank("\n    return 1") and leading_blank("  \nx") and not leading_blank("return 1\n")
    assert not leading_blank("\n")  # nothing follows: an empty suggestion, counted apart


def test_metrics_of_a_run():
    ids = ["FunctionBodyInfilling/HumanEval/0", "FunctionBodyInfilling/HumanEval/1"]
    samples = [
        {"task_id": ids[0], "index": 0, "completion": "return False\n", "completion_tokens": 3, "seconds": 1.0,
         "finish_reason": "stop"},
        {"task_id": ids[1], "index": 0, "completion": "\n    x = 1\n\ndef g():\n    pass\n", "completion_tokens": 9,
         "seconds": 3.0, "finish_reason": "length"},
    ]
    results = [{"task_id": ids[0], "index": 0, "passed": True}, {"task_id": ids[1], "index": 0, "passed": False}]
    metrics = editor_metrics(samples, results, BODY)
    assert metrics["left_block_rate"] == 0.5 and metrics["leading_blank_rate"] == 0.5
    assert (metrics["mean_completion_tokens"], metrics["mean_seconds"], metrics["seconds_per_accepted"]) == (6, 2, 4)
    assert metrics["finish_reasons"] == {"stop": 1, "length": 1} and metrics["accepted"] == 1
