"""The model in this process: prompts from prompts/, generation through the shared serving Engine.

torch and the model are imported when `start` runs (in a worker thread, after `initialize` has been
answered), never at import time. Editor prompts are laid out so consecutive requests share all but
their last tokens (docs/prompts.md), so the engine's prefix cache serves most of each prompt.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from typing import Sequence

from qgpt_code.errors import QGPTError
from qgpt_code.prompts import (
    ContextOptions,
    EditRequest,
    Message,
    chat_tokens,
    completion_budget,
    completion_prompt,
    edit_tokens,
)

from qgpt_code.lsp.backend import (
    BackendError,
    CompletionInput,
    Generation,
    GenerationLog,
    OnTokens,
    Progress,
    finish,
    postprocess,
)
from qgpt_code.lsp.settings import Settings


class EngineBackend:
    """`options` carries the model and engine flags of `qgpt lsp` (`--model`, `--device`, `--dtype`,
    `--tokenizer`, `--max-batch`, `--max-queue`, `--max-seq-len`, `--cache-bytes`)."""

    def __init__(self, options):
        self.options = options
        self.engine = None
        self.loaded = None
        self.description = "in-process model"
        self.log = GenerationLog()
        self._made = None  # the engine once built, even if `start` was cancelled meanwhile (for `stop`)

    async def start(self, progress: Progress) -> None:
        loop = asyncio.get_running_loop()

        def report(message: str, percentage: int | None) -> None:
            loop.call_soon_threadsafe(progress, message, percentage)

        loading = loop.run_in_executor(None, self._load, report)
        try:
            self.engine = await asyncio.shield(loading)
        except asyncio.CancelledError:  # restarted while loading: close the engine once it exists
            loading.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result().close())
            raise
        self.loaded = self.engine.loaded

    def _load(self, report):
        from qgpt_code.cli_common import engine_from_args, load_from_args
        from qgpt_code.models import resolve_model_path

        options = self.options
        path = resolve_model_path(options.model)
        self.description = f"{path.name} (in process)"
        report(f"loading {path.name}", 0)
        last = [-1]

        def on_tensor(done: int, total: int) -> None:
            percent = done * 100 // max(total, 1)
            if percent // 10 != last[0] // 10:  # every 10%: a progress bar, not a message storm
                last[0] = percent
                report(f"loading {path.name}: {done}/{total} tensors", percent)

        loaded = load_from_args(options, progress=on_tensor)
        engine = self._made = engine_from_args(options, loaded)
        print(f"qgpt lsp: {path.name} ready on {loaded.device} (context {engine.max_seq_len} tokens)",
              file=sys.stderr, flush=True)
        return engine

    # -- generation ------------------------------------------------------------------------------
    async def complete(self, request: CompletionInput, settings: Settings) -> Generation:
        from qgpt_code.generation import SamplingParams

        context = self.engine.max_seq_len
        max_new = min(settings.max_tokens, context // 2)
        options = ContextOptions(budget=completion_budget(context, settings.context_budget, max_new))
        # tokenizing the windows takes milliseconds: off the event loop, which keeps reading messages
        prompt = await asyncio.to_thread(
            completion_prompt, self.engine.tokenizer, request.prefix, request.suffix, path=request.path,
            language_id=request.language_id, other_files=request.other_files, options=options)
        params = SamplingParams(max_new_tokens=max_new, temperature=settings.temperature, top_p=settings.top_p,
                                stop=("\n",) if prompt.single_line else (), stop_ids=prompt.stop_ids,
                                stop_when=prompt.stop_when)  # ends a multi-line completion once its block is done
        raw = await self._generate("complete", prompt.tokens, params, settings)
        return Generation(postprocess(raw.text, request, raw.finish_reason), raw.finish_reason)

    async def edit(self, request: EditRequest, settings: Settings, on_tokens: OnTokens) -> Generation:
        max_new = min(settings.edit_max_tokens, self.engine.max_seq_len // 2)
        tokens = edit_tokens(self.loaded.info, self.engine.tokenizer, request,
                             completion_budget(self.engine.max_seq_len, settings.edit_budget, max_new))
        return await self._generate("edit", tokens, self._chat_params(settings, max_new), settings, on_tokens)

    async def chat(self, dialog: Sequence[Message], settings: Settings, on_tokens: OnTokens) -> Generation:
        max_new = min(settings.edit_max_tokens, self.engine.max_seq_len // 2)
        tokens = chat_tokens(self.loaded.info, self.engine.tokenizer, list(dialog))
        return await self._generate("chat", tokens, self._chat_params(settings, max_new), settings, on_tokens)

    def _chat_params(self, settings: Settings, max_new: int):
        from qgpt_code.generation import SamplingParams

        tokenizer = self.engine.tokenizer
        end_ids = tuple(sorted(getattr(tokenizer, "eog_ids", ())))  # e.g. ChatML's <|im_end|>
        return SamplingParams(max_new_tokens=max_new, temperature=settings.edit_temperature,
                              top_p=settings.top_p, stop_ids=end_ids)

    async def _generate(self, kind: str, tokens, params, settings: Settings,
                        on_tokens: OnTokens | None = None) -> Generation:
        from qgpt_code.engine import Request

        try:
            handle = self.engine.submit(Request(list(tokens), params, timeout=settings.request_timeout))
        except QGPTError as exc:  # overloaded, prompt too long: nothing was queued
            raise BackendError(str(exc)) from None
        record = self.log.start(kind, len(tokens), source=handle)
        text = []
        try:
            async for event in handle:
                text.append(event.text)
                if on_tokens is not None and event.token_id is not None:
                    on_tokens(handle.completion_tokens)
        finally:
            if not handle.done:  # cancelled (superseded, $/cancelRequest, the user): stop it in the engine
                handle.cancel()
            finish(record)
        if handle.finish_reason == "error":
            raise BackendError(f"the engine failed: {handle.error}")
        return Generation("".join(text), handle.finish_reason or "stop")

    # -- the rest of the protocol ----------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        return len(self.engine.tokenizer.encode(text))

    def stats(self, recent: int = 20) -> dict:
        summary = self.log.summary(recent)
        if self.engine is not None:
            summary["engine"] = dataclasses.asdict(self.engine.stats())
        return summary

    async def close(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            await asyncio.to_thread(engine.close)

    def stop(self) -> None:
        """Close the engine (its thread finishes the step it is in, then ends), whatever state it is in."""
        if self._made is not None:
            self._made.close()

