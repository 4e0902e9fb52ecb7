"""The `qgpt` command. Only argparse at import time, so `qgpt --help` is instant; torch loads on use.

stdout carries results only (a completion, a reply, a table); progress and errors go to stderr. A
`QGPTError` becomes one line `qgpt: error: ...` and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from qgpt_code.errors import QGPTError


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint: a .gguf file, a Meta or an HF directory "
                        "(default: $QGPT_MODEL, then the embedded SmolLM2-135M)")
    parser.add_argument("--tokenizer", help="tokenizer.model to use instead of the one beside the weights")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="weights' dtype (default: bfloat16 on CUDA, float32 on CPU)")


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256, help="new tokens at most (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 for greedy (default: 0.6, as Meta)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus mass (default: 0.9, as Meta)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens; 0: off")
    parser.add_argument("--seed", type=int, help="seed for reproducible sampling")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qgpt", description="QGPT Code: a self-hosted Llama-2-family code assistant.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    complete = commands.add_parser("complete", help="continue a prompt; prints only the completion")
    _add_model_options(complete)
    _add_sampling_options(complete)
    complete.add_argument("prompt", metavar="PROMPT")

    chat = commands.add_parser("chat", help="one chat turn in the model's own dialog format")
    _add_model_options(chat)
    _add_sampling_options(chat)
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("message", metavar="MESSAGE")

    models = commands.add_parser("models", help="list the models found (default, $QGPT_MODEL, given paths)")
    models.add_argument("paths", nargs="*", metavar="PATH", help="more checkpoints to describe")

    commands.add_parser("eval", help="code-quality evals (HumanEval pass@k, infilling); `qgpt eval -h`",
                        add_help=False, prefix_chars="\0")
    return parser


def _version() -> str:
    from qgpt_code import __version__

    return __version__


def _load(args: argparse.Namespace):
    from qgpt_code.checkpoints import load_model, stderr_progress
    from qgpt_code.models import resolve_model_path

    path = resolve_model_path(args.model)
    print(f"qgpt: loading {path}", file=sys.stderr)
    return load_model(path, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer,
                      progress=stderr_progress("qgpt: loading weights"))


def _sampling(args: argparse.Namespace):
    from qgpt_code.generation import SamplingParams

    return SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))


def _print_stream(loaded, prompt_tokens: list[int], params) -> None:
    from qgpt_code.generation import stream_text

    text = ""
    for piece in stream_text(loaded, prompt_tokens, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
        text += piece
    if sys.stdout.isatty() and not text.endswith("\n"):
        sys.stdout.write("\n")


def cmd_complete(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise QGPTError("the prompt is empty: give some text to continue")
    params = _sampling(args)  # bad values fail before the model loads
    loaded = _load(args)
    tokenizer = loaded.tokenizer
    prompt_tokens = tokenizer.encode(args.prompt, bos=getattr(tokenizer, "add_bos", True))
    _print_stream(loaded, prompt_tokens, params)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from qgpt_code.prompts import chat_tokens

    if not args.message.strip():
        raise QGPTError("the message is empty")
    params = _sampling(args)
    loaded = _load(args)
    dialog = ([{"role": "system", "content": args.system}] if args.system else [])
    dialog.append({"role": "user", "content": args.message})
    prompt_tokens = chat_tokens(loaded.info, loaded.tokenizer, dialog)
    _print_stream(loaded, prompt_tokens, params)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from qgpt_code.models import format_models_table, list_models

    print(format_models_table(list_models(args.paths)))
    return 0


COMMANDS = {"complete": cmd_complete, "chat": cmd_chat, "models": cmd_models}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "eval":
            from qgpt_code.evals.cli import main as eval_main

            return eval_main(argv[1:])
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except QGPTError as exc:
        print(f"qgpt: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qgpt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `qgpt complete ... | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
