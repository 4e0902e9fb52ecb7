"""Generating samples: which tasks, which requests, run concurrently through a backend, written as they finish.

    backend = EngineBackend(loaded, engine)            # or HTTPBackend("http://127.0.0.1:8000")
    tasks = select_tasks(load_tasks("humaneval"), limit=10)
    settings = RunSettings("humaneval", mode="base", n=1, temperature=0.0, top_p=0.95, max_tokens=512, seed=0)
    stats = generate_samples(backend, tasks, settings, "run/")    # run/samples.jsonl, run/run.json

A rerun with the same out folder resumes: samples already in samples.jsonl are skipped, and each sample's seed
depends only on the run's seed and the sample, so the finished file is the same as an uninterrupted run's.
run.json records the settings and the model; a rerun with other settings or another model is refused rather
than mixing samples of two runs in one file.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qgpt_code.errors import QGPTError
from qgpt_code.evals.data import Problem
from qgpt_code.evals.prompting import (
    CHAT_INSTRUCTION,
    CHAT_STOPS,
    HUMANEVAL_STOPS,
    MODES,
    Generation,
    GenerationRequest,
    completion_of,
    make_request,
)
from qgpt_code.evals.samples import SampleWriter, completed_samples

SAMPLES_FILE = "samples.jsonl"
RUN_FILE = "run.json"
PROMPT_VERSION = 2  # bump when prompts or post-processing change, so old runs are not resumed into new ones


class RunMismatchError(QGPTError):
    """The out folder holds samples of a run with other settings or another model."""


@dataclass(frozen=True)
class RunSettings:
    """What decides the samples (and so must match when a run is resumed)."""

    task_set: str  # humaneval | single-line | multi-line
    mode: str  # base | chat | infill
    n: int  # samples per task
    temperature: float
    top_p: float
    max_tokens: int
    seed: int

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}")
        if self.n < 1 or self.max_tokens < 1:
            raise QGPTError("--n and --max-tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise QGPTError("--temperature must be >= 0 and --top-p in (0, 1]")

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "prompt_version": PROMPT_VERSION}


def prompt_description(mode: str) -> dict[str, Any]:
    """How prompts were built, for the summary."""
    if mode == "base":
        return {"prompt": "the problem's prompt as it is", "stop": list(HUMANEVAL_STOPS)}
    if mode == "chat":
        return {"prompt": "one user message in the model's chat format", "instruction": CHAT_INSTRUCTION,
                "stop": list(CHAT_STOPS), "reply": "sanitized to definitions or a body (evals/chat_reply.py)"}
    return {"prompt": "prompts/ completion_prompt (the editor's context), cursor on an empty line",
            "postprocess": "CompletionPrompt.postprocess (the language server's trimming), then a line break"}


def select_tasks(tasks: Mapping[str, Problem], limit: int | None = None, every: int = 1) -> dict[str, Problem]:
    """Every `every`-th task (a spread-out subset), then the first `limit` of those."""
    chosen = list(tasks.items())[::every]
    return dict(chosen[:limit] if limit is not None else chosen)


def plan(tasks: Mapping[str, Problem], settings: RunSettings) -> list[GenerationRequest]:
    """Every sample of the run, task by task (the samples of one task together, so they share its prompt's
    cached prefix)."""
    return [
        make_request(problem, index, settings.mode, max_tokens=settings.max_tokens,
                     temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed)
        for problem in tasks.values()
        for index in range(settings.n)
    ]  # fmt: skip


def check_run_file(out_dir: Path, settings: RunSettings, model_key: str) -> None:
    """Write run.json for a new run; refuse to resume a run made with other settings or another model."""
    path = out_dir / RUN_FILE
    wanted = {"settings": settings.record(), "model": model_key}
    if path.exists():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise RunMismatchError(f"{path}: unreadable ({error}); delete it or choose another --out") from None
        differences = [
            f"{name}: {found.get('settings', {}).get(name)!r} there, {value!r} now"
            for name, value in wanted["settings"].items() if found.get("settings", {}).get(name) != value
        ]  # fmt: skip
        if found.get("model") != model_key:
            differences.append(f"model: {found.get('model')!r} there, {model_key!r} now")
        if differences:
            raise RunMismatchError(
                f"{out_dir} holds samples of another run ({'; '.join(differences)}): choose another --out, "
                "or delete the folder to start over"
            )
        return
    if (out_dir / SAMPLES_FILE).exists():
        raise RunMismatchError(
            f"{out_dir} holds a {SAMPLES_FILE} without {RUN_FILE} (not made by `qgpt eval`, or by an older version): "
            "choose another --out; score that file with `qgpt eval score`"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")


@dataclass
class GenerationStats:
    planned: int = 0
    resumed: int = 0  # already in samples.jsonl
    generated: int = 0
    errors: int = 0  # requests that could not run (written with an empty completion)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_time_s: float = 0.0
    finish_reasons: Counter | None = None

    def record(self) -> dict[str, Any]:
        record = asdict(self)
        record["finish_reasons"] = dict(self.finish_reasons or {})
        record["wall_time_s"] = round(self.wall_time_s, 3)
        record["completion_tokens_per_s"] = (
            round(self.completion_tokens / self.wall_time_s, 2) if self.wall_time_s > 0 else None
        )
        return record


def generate_samples(
    backend,
    tasks: Mapping[str, Problem],
    settings: RunSettings,
    out_dir: str | Path,
    *,
    model_key: str,
    progress: bool = True,
) -> GenerationStats:
    """Generate the samples samples.jsonl does not hold yet, `backend.concurrency` at a time, each written
    (and flushed) as soon as it is finished."""
    out_dir = Path(out_dir)
    check_run_file(out_dir, settings, model_key)
    samples_path = out_dir / SAMPLES_FILE
    done = completed_samples(samples_path)
    requests = plan(tasks, settings)
    todo = [r for r in requests if (r.task_id, r.index) not in done]
    stats = GenerationStats(planned=len(requests), resumed=len(requests) - len(todo), finish_reasons=Counter())
    started = time.monotonic()
    with SampleWriter(samples_path) as writer, _progress_bar(len(todo), progress) as bar:
        for request, generation in run_concurrently(backend.generate, todo, backend.concurrency):
            completion = completion_of(tasks[request.task_id], request, generation)
            extra = {"raw": generation.text, "finish_reason": generation.finish_reason,
                     "completion_tokens": generation.completion_tokens, "seconds": round(generation.seconds, 4)}
            if generation.error is not None:
                extra["error"] = generation.error
                stats.errors += 1
            writer.write(request.task_id, request.index, completion, **extra)
            stats.generated += 1
            stats.prompt_tokens += generation.prompt_tokens
            stats.completion_tokens += generation.completion_tokens
            stats.finish_reasons[generation.finish_reason] += 1
            elapsed = time.monotonic() - started
            bar.set_postfix_str(f"{stats.completion_tokens / max(elapsed, 1e-9):.1f} tok/s", refresh=False)
            bar.update(1)
    stats.wall_time_s = time.monotonic() - started
    return stats


def run_concurrently(
    work: Callable[[GenerationRequest], Generation], items: Iterable[GenerationRequest], workers: int
) -> Iterator[tuple[GenerationRequest, Generation]]:
    """(item, work(item)) as each finishes, at most `workers` calls at a time, started in the items' order.

    Daemon threads rather than a ThreadPoolExecutor: on Ctrl-C or an error the caller returns at once
    instead of waiting for calls in flight (an HTTP request can take minutes); the engine backend's close()
    cancels what the engine still runs. The first exception a call raises is re-raised here.
    """
    pending: queue.Queue = queue.Queue()
    for item in items:
        pending.put(item)
    total = pending.qsize()
    finished: queue.Queue = queue.Queue()
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            try:
                item = pending.get_nowait()
            except queue.Empty:
                return
            try:
                finished.put((item, work(item), None))
            except BaseException as error:  # handed to the caller's thread
                finished.put((item, None, error))
                return

    threads = [threading.Thread(target=worker, daemon=True, name=f"qgpt-eval-{i}") for i in range(min(workers, total))]
    for thread in threads:
        thread.start()
    try:
        for _ in range(total):
            item, result, error = finished.get()
            if error is not None:
                raise error
            yield item, result
    finally:
        stop.set()


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="generating", unit="sample", file=sys.stderr, disable=not enabled, smoothing=0.05)
