"""The early stop's effect on latency, side by side in one run (DESIGN.md: speed as a ratio, never a lone time).

    python -m qgpt_code.evals.early_stop_ab --kind function-body --every 10

For each infilling task, the editor's prompt (as `qgpt eval infill` builds it) is first computed into the
prefix cache (an editor's steady state: the file is cached, typing changes its last tokens), then
generated twice on one engine at batch 1, greedy, once with the prompt's `stop_when` and once without, in
alternating order, so both sides see the same cache and the same machine load. Prints tokens and seconds per completion for each side, their ratios,
and how many suggestions differ after post-processing (the early stop must change none).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qgpt_code.evals.early_stop_ab", description=__doc__.split("\n")[0])
    parser.add_argument("--kind", default="function-body", choices=("function-body", "multi-line", "single-line"))
    parser.add_argument("--every", type=int, default=10, help="every K-th task (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=64, help="as the language server's maxTokens (default: %(default)s)")
    args = parser.parse_args(argv)

    from qgpt_code.cli_common import engine_from_args, load_from_args
    from qgpt_code.engine import Request
    from qgpt_code.evals.backends import infill_budget
    from qgpt_code.evals.generate import select_tasks
    from qgpt_code.evals.infill_tasks import load_tasks
    from qgpt_code.evals.prompting import LANGUAGE, editor_view
    from qgpt_code.generation import SamplingParams
    from qgpt_code.prompts import ContextOptions, completion_prompt

    options = argparse.Namespace(model=None, tokenizer=None, device="cpu", dtype=None, quantize=None, eager=False,
                                 max_batch=1, max_queue=2, max_seq_len=None, cache_bytes=None)
    loaded = load_from_args(options)
    engine = engine_from_args(options, loaded)
    tasks = select_tasks(load_tasks(args.kind), every=args.every)
    sides: dict[str, list[tuple[int, float]]] = {"early stop": [], "no early stop": []}
    differ = 0
    try:
        for number, problem in enumerate(tasks.values()):
            prefix, suffix = editor_view(problem)
            budget = infill_budget(engine.max_seq_len, args.max_tokens)
            prompt = completion_prompt(loaded.tokenizer, prefix, suffix, language_id=LANGUAGE,
                                       options=ContextOptions(budget=budget))
            stop_ids = tuple(dict.fromkeys(prompt.stop_ids + tuple(sorted(getattr(loaded.tokenizer, "eog_ids", ())))))
            engine.submit(Request(list(prompt.tokens), SamplingParams(max_new_tokens=0))).result()  # cache it
            shown = {}
            order = ["early stop", "no early stop"][:: 1 if number % 2 == 0 else -1]
            for side in order:
                params = SamplingParams(max_new_tokens=args.max_tokens, temperature=0, stop_ids=stop_ids,
                                        stop=("\n",) if prompt.single_line else (),
                                        stop_when=prompt.stop_when if side == "early stop" else None)
                started = time.monotonic()
                result = engine.submit(Request(list(prompt.tokens), params)).result()
                sides[side].append((len(result.tokens), time.monotonic() - started))
                shown[side] = prompt.postprocess(result.text, truncated=result.finish_reason == "length")
            differ += shown["early stop"] != shown["no early stop"]
            print(f"{problem.task_id}: " + ", ".join(f"{side} {sides[side][-1][0]} tokens {sides[side][-1][1]:.2f} s"
                                                     for side in sides), file=sys.stderr, flush=True)
    finally:
        engine.close()
    tokens = {side: statistics.mean(t for t, _ in rows) for side, rows in sides.items()}
    seconds = {side: statistics.mean(s for _, s in rows) for side, rows in sides.items()}
    print(f"{args.kind}, {len(tasks)} tasks, batch 1, greedy, max {args.max_tokens} tokens")
    for side in sides:
        print(f"  {side}: {tokens[side]:.1f} tokens, {seconds[side]:.2f} s per completion")
    print(f"  early stop / none: tokens {tokens['early stop'] / tokens['no early stop']:.2f}x, "
          f"seconds {seconds['early stop'] / seconds['no early stop']:.2f}x; suggestions that differ: {differ}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
