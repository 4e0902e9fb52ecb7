"""The `qgpt` command. Only argparse at import time, so `qgpt --help` is instant; torch loads on use.

stdout carries results only (a completion, a reply, a table); progress and errors go to stderr. A
`QGPTError` becomes one line `qgpt: error: ...` and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from qgpt_code.cli_common import (
    add_model_options,
    add_sampling_options,
    check_model_options,
    check_sampling_options,
    load_from_args,
    sampling_from_args,
)
from qgpt_code.errors import PromptTooLongError, QGPTError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qgpt", description="QGPT Code: a self-hosted Llama-2-family code assistant.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    complete = commands.add_parser("complete", help="continue a prompt; prints only the completion")
    add_model_options(complete)
    add_sampling_options(complete)
    complete.add_argument("prompt", metavar="PROMPT")
    complete.set_defaults(run=cmd_complete)

    chat = commands.add_parser("chat", help="one chat turn in the model's own dialog format")
    add_model_options(chat)
    add_sampling_options(chat)
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("message", metavar="MESSAGE")
    chat.set_defaults(run=cmd_chat)

    models = commands.add_parser("models", help="list the models found (default, $QGPT_MODEL, given paths)")
    models.add_argument("paths", nargs="*", metavar="PATH", help="more checkpoints to describe")
    models.set_defaults(run=cmd_models)

    for register in _front_end_commands():
        register(commands)

    commands.add_parser("eval", help="code-quality evals (HumanEval pass@k, infilling); `qgpt eval -h`",
                        add_help=False, prefix_chars="\0")
    return parser


def _front_end_commands():
    """`register(subparsers)` functions of the front ends (argparse-only modules: --help stays instant)."""
    from qgpt_code.lsp.command import add_lsp_command
    from qgpt_code.server.command import add_serve_command

    return [add_serve_command, add_lsp_command]


def _version() -> str:
    from qgpt_code import __version__

    return __version__


def _check_generation_args(args: argparse.Namespace, text: str, what: str) -> None:
    """Everything a generating command was given, checked before torch is imported or a model loads."""
    if not text.strip():
        raise QGPTError(f"the {what} is empty: give some text")
    check_model_options(args)
    check_sampling_options(args)


def _print_stream(loaded, prompt_tokens: list[int], params, eager: bool, speculate: bool) -> None:
    """The completion as it is generated, then a newline if it did not end with one (the shell's
    prompt must not land on its last line; the text itself is otherwise printed as is)."""
    from qgpt_code.distributed.launch import tensor_parallel

    if tensor_parallel():  # under torchrun: the decode step is built on every rank together
        from qgpt_code.distributed.runner import stream_text

        options = {}  # no speculation under tensor parallelism yet (docs/scale.md)
    else:
        from qgpt_code.generation import stream_text

        options = {"speculate": speculate}

    last = ""
    try:
        for piece in stream_text(loaded, prompt_tokens, params, eager=eager, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
            last = piece
    except PromptTooLongError as exc:  # the library's advice (--max-seq-len) is for serve and lsp
        raise QGPTError(f"the prompt is {exc.n_prompt} tokens but at most {exc.limit} fit in the model's context "
                        f"window of {exc.limit + 1} (one is left for the completion): shorten it") from None
    if last and not last.endswith("\n"):
        sys.stdout.write("\n")


def cmd_complete(args: argparse.Namespace) -> int:
    _check_generation_args(args, args.prompt, "prompt")
    params = sampling_from_args(args)
    loaded = load_from_args(args)
    tokenizer = loaded.tokenizer
    prompt_tokens = tokenizer.encode(args.prompt, bos=getattr(tokenizer, "add_bos", True))
    _print_stream(loaded, prompt_tokens, params, eager=args.eager, speculate=args.speculate == "ngram")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    _check_generation_args(args, args.message, "message")
    from qgpt_code.prompts import chat_tokens

    params = sampling_from_args(args)
    loaded = load_from_args(args)
    dialog = ([{"role": "system", "content": args.system}] if args.system else [])
    dialog.append({"role": "user", "content": args.message})
    prompt_tokens = chat_tokens(loaded.info, loaded.tokenizer, dialog)
    _print_stream(loaded, prompt_tokens, params, eager=args.eager, speculate=args.speculate == "ngram")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from qgpt_code.models import format_models_table, list_models

    print(format_models_table(list_models(args.paths)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "eval":
            from qgpt_code.evals.cli import main as eval_main

            return eval_main(argv[1:])
        args = build_parser().parse_args(argv)
        from qgpt_code.distributed.launch import follower_main, is_follower, shutdown_leader

        if is_follower():  # under torchrun: ranks other than 0 only compute (docs/scale.md)
            return follower_main(args)
        try:
            return args.run(args)
        finally:
            shutdown_leader()  # under torchrun, rank 0: the other ranks stop with it
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
