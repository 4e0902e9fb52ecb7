"""Speculative decoding (n-gram guesses from the sequence's own text) against plain decoding, in one run.

Two task sets, both through the editor's own prompt paths, greedy (temperature 0), one request at a
time as one editor sends them:
  edits        HumanEval canonical solutions (prompt + solution, the whole function) as the selection
               of an edit request with an instruction such as "add type hints" or "rename x to y"
               (`prompts.edit_tokens`, the language server's edit prompt in the model's chat format);
               the answer rewrites the selection, so most of it copies the prompt
  completions  function-body infilling tasks (`evals.infill_tasks`, kind function-body) through
               `prompts.completion_prompt`, the language server's completion prompt
Each task runs on two engines over the same loaded model, one speculating and one not, alternating
which goes first. Reported per set: decode tokens/s (first token to last), request latency, the
guesses' acceptance rate, and whether the outputs were identical.

    python bench/speculative.py                    # default model, CPU, 20 edits + 20 completions
    python bench/speculative.py --tasks 5 --max-batch 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

INSTRUCTIONS = (
    "Add type hints to this function.",
    "Rename the function to {name}_impl and keep everything else the same.",
    "Add a comment above each loop and condition.",
    "Rewrite the docstring as a one-line summary and keep the code unchanged.",
)


def edit_prompts(loaded, count: int) -> list[list[int]]:
    from qgpt_code.evals.data import load_problems
    from qgpt_code.prompts import EditRequest, edit_tokens

    problems = list(load_problems().values())[:count]
    prompts = []
    for i, problem in enumerate(problems):
        function = problem.prompt + problem.canonical_solution
        instruction = INSTRUCTIONS[i % len(INSTRUCTIONS)].format(name=problem.entry_point)
        request = EditRequest(instruction, function, path="solution.py", language_id="python")
        prompts.append(edit_tokens(loaded.info, loaded.tokenizer, request, budget=1536))
    return prompts


def completion_prompts(loaded, count: int) -> list[list[int]]:
    from qgpt_code.evals.infill_tasks import load_tasks
    from qgpt_code.prompts import ContextOptions, completion_prompt

    tasks = list(load_tasks("function-body").values())[:count]
    prompts = []
    for task in tasks:  # the cursor after the body's indent, the next function below (issue 18's case)
        prompt = completion_prompt(loaded.tokenizer, task.prompt, task.suffix, path="solution.py",
                                   language_id="python", options=ContextOptions(budget=1536))
        prompts.append(prompt.tokens)
    return prompts


def run_one(engine, prompt: list[int], max_tokens: int) -> dict:
    from qgpt_code.engine import Request
    from qgpt_code.generation import SamplingParams

    started = time.perf_counter()
    handle = engine.submit(Request(prompt, SamplingParams(max_new_tokens=max_tokens, temperature=0)))
    result = handle.result()
    latency = time.perf_counter() - started
    decode_s = (handle.finished_at - handle.first_token_at) if handle.first_token_at else 0.0
    return {"tokens": result.tokens, "latency": latency, "decode_s": decode_s,
            "proposed": handle.tokens_proposed, "accepted": handle.tokens_accepted}


def summarize(runs: list[dict]) -> dict:
    tokens = sum(len(r["tokens"]) - 1 for r in runs)  # tokens after the first (the decode phase)
    decode_s = sum(r["decode_s"] for r in runs)
    proposed, accepted = sum(r["proposed"] for r in runs), sum(r["accepted"] for r in runs)
    return {"decode_tok_s": tokens / decode_s if decode_s else 0.0,
            "latency_p50": statistics.median(r["latency"] for r in runs),
            "generated": sum(len(r["tokens"]) for r in runs),
            "acceptance": accepted / proposed if proposed else 0.0, "proposed": proposed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint (default: the embedded default model)")
    parser.add_argument("--tasks", type=int, default=20, help="tasks per set (default 20)")
    parser.add_argument("--max-batch", type=int, default=8, help="decode rows: guesses use the spare ones")
    parser.add_argument("--edit-tokens", type=int, default=256)
    parser.add_argument("--completion-tokens", type=int, default=64)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from qgpt_code.checkpoints import load_model
    from qgpt_code.engine import Engine
    from qgpt_code.models import resolve_model_path

    path = resolve_model_path(args.model)
    loaded = load_model(path, device="cpu", dtype="float32")
    sets = {"edits": (edit_prompts(loaded, args.tasks), args.edit_tokens),
            "completions": (completion_prompts(loaded, args.tasks), args.completion_tokens)}
    engines = {flag: Engine(loaded, max_batch=args.max_batch, max_seq_len=2048, speculate=flag) for flag in (False, True)}
    results: dict[str, dict[bool, list[dict]]] = {}
    try:
        for engine in engines.values():  # kernels built, caches touched: not part of any measurement
            run_one(engine, [1, 2, 3, 4], 8)
        for name, (prompts, max_tokens) in sets.items():
            results[name] = {False: [], True: []}
            for i, prompt in enumerate(prompts):
                for flag in (False, True) if i % 2 == 0 else (True, False):
                    results[name][flag].append(run_one(engines[flag], prompt, max_tokens))
    finally:
        for engine in engines.values():
            engine.close()

    print(f"{path.name}, CPU ({os.cpu_count()} cores), max_batch {args.max_batch}, greedy, one request at a time")
    print(f"{'set':<12} {'plain tok/s':>11} {'spec tok/s':>10} {'speed-up':>8} {'p50 plain s':>11} {'p50 spec s':>10} "
          f"{'accepted':>8} {'identical':>9}")
    report = {}
    for name, by_flag in results.items():
        plain, spec = summarize(by_flag[False]), summarize(by_flag[True])
        same = sum(a["tokens"] == b["tokens"] for a, b in zip(by_flag[False], by_flag[True]))
        speedup = spec["decode_tok_s"] / plain["decode_tok_s"] if plain["decode_tok_s"] else 0.0
        report[name] = {"plain": plain, "speculative": spec, "speedup": speedup, "identical": same,
                        "tasks": len(by_flag[False])}
        print(f"{name:<12} {plain['decode_tok_s']:>11.1f} {spec['decode_tok_s']:>10.1f} {speedup:>7.2f}x "
              f"{plain['latency_p50']:>11.2f} {spec['latency_p50']:>10.2f} {spec['acceptance']:>8.0%} "
              f"{same:>4}/{len(by_flag[False])}")
    edits, completions = report["edits"]["speedup"], report["completions"]["speedup"]
    print(f"targets: edits >= 2x: {'PASS' if edits >= 2 else 'FAIL'} ({edits:.2f}x); "
          f"completions no slower: {'PASS' if completions >= 0.97 else 'FAIL'} ({completions:.2f}x)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "report": report}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
