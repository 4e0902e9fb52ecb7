"""Language-server latency under a scripted typing session (default model, real stdio LSP).

A 300-line Python file (the standard library's own `argparse.py`, first 300 lines) is opened with some of
its lines emptied; the script then types those lines back, one character every 50 ms, at their places
spread through the file. After every keystroke it sends the edit (`didChange`, incremental) and an
inline-completion request, as VS Code does, without cancelling the previous request (as Neovim does
not): the server's debounce and supersession must keep up on their own. At the end of each line it
waits for the last answer, as a user pausing would.

Reported: time from request to response (p50/p95) for all requests, for the ones answered with a
suggestion, and for the last keystroke of each line (the wait a user sees); generations started
versus requests sent; cache hits; prompt tokens served from the engine's prefix cache.

    python bench/lsp_latency.py                      # the default model (SmolLM2-135M), in process
    python bench/lsp_latency.py --lines 4            # a shorter session
    python bench/lsp_latency.py --server http://127.0.0.1:8000 --api-key KEY
    python bench/lsp_latency.py --model path/to/tiny --json out.json

The machine's other load shows in the numbers: run it on a quiet machine, and compare configurations
side by side in one run of the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path

from lsprotocol import types
from pygls.lsp.client import LanguageClient

URI = "file:///bench/argparse_part.py"


def typing_script(n_lines: int, total_lines: int = 300) -> tuple[str, list[tuple[int, str, str]]]:
    """The file with `n_lines` lines emptied (after their indentation), and (line, indentation, text) to
    type back, spread evenly through it."""
    import argparse as source_module

    lines = inspect.getsource(source_module).splitlines()[:total_lines]
    candidates = [i for i, line in enumerate(lines) if 12 <= len(line.strip()) <= 60 and not line.strip().startswith("#")]
    step = max(1, len(candidates) // n_lines)
    chosen = candidates[step // 2 :: step][:n_lines]
    targets = []
    for i in chosen:
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        targets.append((i, indent, lines[i].strip()))
        lines[i] = indent
    return "\n".join(lines) + "\n", targets


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def drain(stream, log) -> None:
    while line := await stream.readline():
        log.write(line)
        log.flush()


async def run(args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "qgpt_code.lsp"]
    if args.server:
        command += ["--server", args.server] + (["--api-key", args.api_key] if args.api_key else [])
    else:
        command += (["--model", args.model] if args.model else []) + ["--max-batch", "2"]
    client = LanguageClient("qgpt-bench", "1")

    @client.feature(types.WINDOW_LOG_MESSAGE)
    def on_log(params: types.LogMessageParams) -> None:
        pass  # the server's stderr (saved to --server-log) says the same

    @client.feature(types.WINDOW_SHOW_MESSAGE)
    def on_message(params: types.ShowMessageParams) -> None:
        print(f"server says: {params.message}", file=sys.stderr)

    await client.start_io(*command)
    log_path = Path(args.server_log)
    log = log_path.open("wb")
    stderr_task = asyncio.create_task(drain(client._server.stderr, log))

    caps = types.ClientCapabilities(
        text_document=types.TextDocumentClientCapabilities(inline_completion=types.InlineCompletionClientCapabilities()),
        window=types.WindowClientCapabilities(work_done_progress=False))
    settings = {"maxTokens": args.max_tokens, "debounceMs": args.debounce_ms, "temperature": 0,
                "contextBudget": args.context_budget}
    started = time.monotonic()
    await client.initialize_async(types.InitializeParams(capabilities=caps, initialization_options=settings))
    client.initialized(types.InitializedParams())
    initialize_seconds = time.monotonic() - started

    async def stats(recent: int = 0) -> dict:
        return await client.workspace_execute_command_async(types.ExecuteCommandParams(
            command="qgpt.stats", arguments=[{"recent": recent}]))

    while (current := await stats())["state"] == "starting":
        await asyncio.sleep(0.25)
    if current["state"] != "ready":
        raise SystemExit(f"the server did not start: {current['error']}")
    ready_seconds = time.monotonic() - started

    text, targets = typing_script(args.lines)
    client.text_document_did_open(types.DidOpenTextDocumentParams(text_document=types.TextDocumentItem(
        uri=URI, language_id="python", version=1, text=text)))
    before = await stats()
    version = 1
    requests: list[dict] = []
    pending: set[asyncio.Future] = set()

    async def request(line: int, character: int, final: bool) -> None:
        sent = time.monotonic()
        params = types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=URI), position=types.Position(line=line, character=character),
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic))
        result = await client.text_document_inline_completion_async(params)
        items = list(result.items) if result else []
        requests.append({"seconds": time.monotonic() - sent, "answered": bool(items), "final": final,
                         "text": items[0].insert_text if items else ""})

    typing_started = time.monotonic()
    for line, indent, typed in targets:
        for index, char in enumerate(typed):
            tick = time.monotonic()
            version += 1
            at = types.Position(line=line, character=len(indent) + index)
            client.text_document_did_change(types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=URI, version=version),
                content_changes=[types.TextDocumentContentChangePartial(range=types.Range(start=at, end=at), text=char)]))
            task = asyncio.ensure_future(request(line, len(indent) + index + 1, final=index == len(typed) - 1))
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.sleep(max(0.0, args.interval - (time.monotonic() - tick)))
        if pending:  # the user pauses at the end of the line until the suggestion shows
            await asyncio.wait(list(pending), timeout=60)
    typing_seconds = time.monotonic() - typing_started
    after = await stats(recent=100_000)

    await client.shutdown_async(None)
    client.exit(None)
    await asyncio.sleep(0.5)
    await client.stop()
    stderr_task.cancel()
    log.close()

    def ms(values: list[float]) -> dict:
        return {"n": len(values), "p50_ms": _ms(percentile(values, 0.5)), "p95_ms": _ms(percentile(values, 0.95))}

    engine_before, engine_after = before.get("engine", {}), after.get("engine", {})
    recent = [r for r in after["recent"] if r["id"] > before["generations_started"]]
    return {
        "backend": after["backend"],
        "settings": settings,
        "initialize_ms": _ms(initialize_seconds),
        "ready_s": round(ready_seconds, 1),
        "typed_lines": len(targets),
        "keystrokes": len(requests),
        "typing_s": round(typing_seconds, 1),
        "latency_all": ms([r["seconds"] for r in requests]),
        "latency_answered": ms([r["seconds"] for r in requests if r["answered"]]),
        "latency_end_of_line": ms([r["seconds"] for r in requests if r["final"]]),
        "requests_sent": len(requests),
        "answered": sum(r["answered"] for r in requests),
        "generations_started": after["generations_started"] - before["generations_started"],
        "generations_cancelled": sum(1 for r in recent if r["finish_reason"] == "cancelled"),
        "cache_hits": after["cache_hits"] - before["cache_hits"],
        "superseded": after["requests"].get("superseded", 0) - before["requests"].get("superseded", 0),
        "prompt_tokens": after["prompt_tokens"] - before["prompt_tokens"],
        "cached_prompt_tokens": after["cached_tokens"] - before["cached_tokens"],
        "engine_tokens_reused": engine_after.get("tokens_reused", 0) - engine_before.get("tokens_reused", 0),
        "engine_tokens_computed": engine_after.get("tokens_computed", 0) - engine_before.get("tokens_computed", 0),
        "engine_prefix_hits": engine_after.get("prefix_hits", 0) - engine_before.get("prefix_hits", 0),
        "generation_ms_p50": _ms(percentile([r["seconds"] for r in recent if r["seconds"] is not None
                                             and r["finish_reason"] != "cancelled"], 0.5)),
        "sample_suggestions": [r["text"] for r in requests if r["final"] and r["text"]][:3],
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint (default: $QGPT_MODEL, then the embedded SmolLM2-135M)")
    parser.add_argument("--server", help="use a running `qgpt serve` at this URL")
    parser.add_argument("--api-key")
    parser.add_argument("--lines", type=int, default=12, help="lines to type back (default: 12)")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between keystrokes (default: 0.05)")
    parser.add_argument("--debounce-ms", type=int, default=150, help="the server's debounce (default: 150)")
    parser.add_argument("--max-tokens", type=int, default=32, help="completion length (default: 32)")
    parser.add_argument("--context-budget", type=int, default=2048, help="prompt tokens (default: 2048)")
    parser.add_argument("--server-log", default=str(Path(tempfile.gettempdir()) / "qgpt_lsp_latency_server.log"),
                        help="the server's stderr goes here (default: in the temporary directory)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    text = json.dumps(results, indent=2, ensure_ascii=False)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
