"""HTTP bodies to prompt token lists, through prompts/ (the same code the CLI, evals and editor use)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from qgpt_code.checkpoints.assemble import LoadedModel
from qgpt_code.errors import QGPTError
from qgpt_code.prompts import (
    ContextFile,
    ContextOptions,
    chat_tokens,
    completion_budget,
    completion_prompt,
    infill_stop_id,
    infill_tokens,
    supports_infill,
)
from qgpt_code.server.errors import APIError
from qgpt_code.server.protocol import ChatCompletionRequest, CompletionRequest, InfillRequest


@dataclass(frozen=True)
class Prompt:
    tokens: list[int]
    stop_ids: tuple[int, ...]  # besides EOS: end-of-generation ids, Code Llama's EOT
    text: str = ""  # the prompt as text, for `echo`
    # /infill: trim the completion as the editor would; (text, truncated: it stopped mid-way) -> text
    postprocess: Callable[[str, bool], str] | None = None
    stop_when: Callable[[str], bool] | None = None  # /infill: the answer is complete (SamplingParams.stop_when)


class PromptBuilder:
    """Builds the prompts of one model's requests."""

    def __init__(self, loaded: LoadedModel, context: int, infill_budget: int):
        self.info, self.tokenizer = loaded.info, loaded.tokenizer
        self.context = context  # tokens a sequence may hold (the engine's max_seq_len)
        self.infill_budget = infill_budget
        self.vocab = min(self.tokenizer.vocab_size, loaded.model.args.vocab_size)
        self.add_bos = getattr(self.tokenizer, "add_bos", True)  # GGUF files say; SentencePiece models do
        # GGUF vocabularies list every end-of-generation token (SmolLM2's <|endoftext|> and <|im_end|>)
        self.end_ids = tuple(sorted(getattr(self.tokenizer, "eog_ids", ())))
        self.infill = supports_infill(self.tokenizer)

    def completion(self, body: CompletionRequest) -> list[Prompt]:
        prompts = body.prompts()
        if body.suffix is not None and (body.suffix or self.infill):  # "" on a plain model: no suffix
            return [self._infill(p, body) for p in prompts]
        return [self._text(p) if isinstance(p, str) else self._ids(p) for p in prompts]

    def chat(self, body: ChatCompletionRequest) -> Prompt:
        # OpenAI's newer clients say "developer" where older ones said "system"
        dialog = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            tokens = chat_tokens(self.info, self.tokenizer, dialog)
        except QGPTError as exc:
            raise APIError(400, str(exc), param="messages") from None
        return Prompt(tokens, self.end_ids)

    def infill_request(self, body: InfillRequest, max_new_tokens: int) -> Prompt:
        """llama.cpp's /infill through the language server's editor-context assembly."""
        # the language server's own budget, so that `qgpt lsp --server` builds the in-process prompt
        options = ContextOptions(budget=completion_budget(self.context, self.infill_budget, max_new_tokens))
        files = [ContextFile(path=f.filename, text=f.text, language_id=f.language) for f in body.input_extra]
        try:
            prompt = completion_prompt(self.tokenizer, body.input_prefix + body.prompt, body.input_suffix,
                                       path=body.path, language_id=body.language, other_files=files, options=options)
        except ValueError as exc:  # a budget too small for any text
            raise APIError(400, f"n_predict leaves no room for a prompt: {exc}", param="n_predict") from None
        complete, postprocess = prompt.stop_when, prompt.postprocess
        if body.n_indent:
            indent = body.n_indent

            def complete(text: str) -> bool:
                return prompt.stop_when(text) or line_below_indent(text, indent) is not None

            def postprocess(text: str, truncated: bool) -> str:
                cut = line_below_indent(text, indent)  # a cut there ends on a whole line: not truncated
                return prompt.postprocess(text, truncated) if cut is None else prompt.postprocess(text[:cut], False)

        return Prompt(prompt.tokens, tuple(dict.fromkeys(prompt.stop_ids + self.end_ids)),
                      postprocess=postprocess, stop_when=complete)

    # -- /v1/completions pieces ------------------------------------------------------------------
    def _text(self, text: str) -> Prompt:
        return Prompt(self.tokenizer.encode(text, bos=self.add_bos), self.end_ids, text)

    def _ids(self, ids: list[int]) -> Prompt:
        bad = next((i for i in ids if i >= self.vocab), None)
        if bad is not None:
            raise APIError(400, f"prompt: token id {bad} is outside the vocabulary (0..{self.vocab - 1})",
                           param="prompt")
        return Prompt(list(ids), self.end_ids, self.tokenizer.decode(ids))

    def _infill(self, prompt: str | list[int], body: CompletionRequest) -> Prompt:
        if not self.infill:
            raise APIError(400, "suffix: this model cannot fill in the middle (its vocabulary has no infilling "
                           "tokens; Code Llama 7B and 13B have them); send the prompt alone", param="suffix")
        if not isinstance(prompt, str):
            raise APIError(400, "suffix needs a text prompt, not token ids", param="prompt")
        if body.echo:
            raise APIError(400, "echo cannot be combined with suffix", param="echo")
        tokens = infill_tokens(self.tokenizer, prompt, body.suffix)
        return Prompt(tokens, (infill_stop_id(self.tokenizer), *self.end_ids))


def line_below_indent(text: str, n_indent: int) -> int | None:
    """Where the first line after a line break that is indented by fewer than `n_indent` whitespace
    characters (spaces and tabs count one each, as in llama.cpp) starts; None if there is none.
    Blank lines do not count: a function body has them."""
    start = text.find("\n") + 1
    while start:
        end = text.find("\n", start)
        line = text[start:] if end < 0 else text[start:end]
        content = line.lstrip(" \t")
        if content.strip() and len(line) - len(content) < n_indent:
            return start
        start = end + 1
    return None

