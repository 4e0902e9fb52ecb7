"""The editor's completion prompt: the text around the cursor, and other open files, under a token budget.

Layout, most stable part first, so that typing at the cursor changes only the prompt's last tokens and
the engine's prefix cache reuses all the rest:
  infilling models   [BOS] other-files [PRE, SUF] suffix [MID] path header, prefix     (suffix first)
  other models       [BOS] other-files, path header, prefix                            (prefix only)
Other files (llama.cpp's `input_extra`, an editor plugin's ring buffer of chunks) come first, as llama.cpp
puts them before FIM_PRE: they change least often. They are encoded on their own and take at most
`other_files_share` of the budget whatever the cursor and the current file, so a warm-up request (no
prefix, no suffix, the same chunks) computes exactly the tokens every later completion begins with.
Typing inserts text at the cursor: the suffix does not change, and the prefix changes only at its end.
The prefix window begins on a block boundary fixed in the document and moves only when a line is
finished (`tail_window_start`); every budget split is computed from the lines above the cursor's line,
rounded up to a granule, plus an allowance for the line being typed, so the layout stays put between
keystrokes. docs/prompts.md has the measurements behind these choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal, Sequence

from qgpt_code.prompts.infill import EOT, encode_without_leading_space, infill_tokens, supports_infill
from qgpt_code.prompts.languages import path_header
from qgpt_code.prompts.positions import split_at
from qgpt_code.prompts.blocks import Cursor, cursor_at, syntax_for
from qgpt_code.prompts.postprocess import answer_is_complete, line_before_cursor, postprocess_at, rest_of_line
from qgpt_code.prompts.windows import head_window_end, tail_window_start
from qgpt_code.tokenizer import Tokenizer


@dataclass(frozen=True)
class ContextFile:
    """Another open document offered as context (llama.cpp's `input_extra` entry)."""

    path: str
    text: str
    language_id: str = ""  # empty: same language as the current file


@dataclass(frozen=True)
class ContextOptions:
    """How a completion prompt is laid out and budgeted."""

    budget: int = 2048
    """Most tokens the prompt may have; leave room for the completion within the context window."""
    suffix_share: float = 0.25
    """Share of the budget the text after the cursor may take (more when the text before needs less)."""
    block_chars: int | None = None
    """The prefix window moves by blocks of lines that start within this many characters of each other;
    None: a quarter of the budget (about an eighth of it in tokens). 1 slides line by line."""
    granule: int = 64
    """Token counts that set budget splits are rounded up to this (at most a sixteenth of the budget), and
    the line being typed is given this many tokens ahead, so splits do not move while typing."""
    suffix_first: bool = True
    """Infilling in suffix-prefix-middle order (cache-friendly); False gives prefix-suffix-middle."""
    use_infill: bool = True
    """False makes even an infilling model complete from the prefix alone."""
    other_files_share: float = 0.5
    """Most of the budget other files may take (what they leave goes to the current file). A share of the
    budget alone, never of what the current file leaves, so their tokens do not depend on the cursor."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.suffix_share <= 1.0:
            raise ValueError(f"suffix_share must be between 0 and 1, not {self.suffix_share}")
        if not 0.0 <= self.other_files_share <= 1.0:
            raise ValueError(f"other_files_share must be between 0 and 1, not {self.other_files_share}")
        if self.granule < 1 or (self.block_chars is not None and self.block_chars < 1):
            raise ValueError("granule and block_chars must be at least 1")


@dataclass(frozen=True)
class CompletionPrompt:
    """A completion prompt, with what generation and post-processing need to know about it."""

    tokens: list[int]
    mode: Literal["infill", "prefix"]
    prefix: str  # text of the current file before the cursor that the prompt holds
    suffix: str  # text after the cursor: in the prompt (infill) or only for trimming (prefix mode)
    stop_ids: tuple[int, ...]  # generation ends at any of these (EOT for infilling, EOS)
    context_paths: tuple[str, ...] = field(default=())  # other files included, in prompt order
    language_id: str = ""  # the document's LSP language id (post-processing is language-aware)
    path: str = ""  # the document's path (its extension names the language when language_id is empty)

    @property
    def single_line(self) -> bool:
        """The cursor's line goes on after the cursor: complete this line only (stop at a line break)."""
        return bool(rest_of_line(self.suffix).strip())

    @cached_property
    def cursor(self) -> Cursor:
        """The cursor's place in the code: its enclosing block, the closing brackets ahead (blocks.py)."""
        return cursor_at(self.prefix, self.suffix, syntax_for(self.language_id, self.path))

    def postprocess(self, completion: str, truncated: bool = False) -> str:
        """The completion as the editor should insert it (see `postprocess_completion`); `truncated`: the
        generation ran out of tokens (finish reason "length")."""
        return postprocess_at(completion, self.cursor, self.suffix, truncated=truncated)

    def stop_when(self, text: str) -> bool:
        """The engine's early stop (`SamplingParams.stop_when`): True once `text`, generated so far, holds a
        whole multi-line answer (it left the block, or repeats the file after the cursor). One-line
        completions stop at the line break instead."""
        return not self.single_line and answer_is_complete(text, self.cursor, self.suffix)


def completion_prompt_at(
    tokenizer: Tokenizer,
    text: str,
    line: int,
    character: int,
    *,
    path: str = "",
    language_id: str = "",
    other_files: Sequence[ContextFile] = (),
    options: ContextOptions = ContextOptions(),
) -> CompletionPrompt:
    """The completion prompt for a document with the cursor at an LSP position (UTF-16 character)."""
    prefix, suffix = split_at(text, line, character)
    return completion_prompt(
        tokenizer, prefix, suffix, path=path, language_id=language_id, other_files=other_files, options=options
    )


def completion_prompt(
    tokenizer: Tokenizer,
    prefix: str,
    suffix: str,
    *,
    path: str = "",
    language_id: str = "",
    other_files: Sequence[ContextFile] = (),
    options: ContextOptions = ContextOptions(),
) -> CompletionPrompt:
    """The completion prompt for the text before and after the cursor (HTTP /infill, evals).

    Infilling when the model supports it (and `options.use_infill`), else prefix-only. The prompt never
    exceeds `options.budget` tokens. Other files come first, within `options.other_files_share` of the
    budget, the same tokens wherever the cursor is; the current file takes the rest, the text nearest the
    cursor first.
    """
    infill = options.use_infill and supports_infill(tokenizer)
    overhead = (1 if infill or starts_with_bos(tokenizer) else 0) + (3 if infill else 0)
    if options.budget - overhead < 1:
        raise ValueError(f"a budget of {options.budget} tokens leaves no room for text")
    layout = _Layout(tokenizer, infill, language_id, options)
    context, paths = layout.other_files(other_files, int((options.budget - overhead) * options.other_files_share))
    excess = 0
    while True:  # separate counts can differ from the joined text's count by a token or two: retry tighter
        available = options.budget - overhead - len(context) - excess
        prompt = layout.build(prefix, suffix, path, context, paths, available)
        if len(prompt.tokens) <= options.budget:
            return prompt
        excess += len(prompt.tokens) - options.budget


def completion_budget(context: int, budget: int, max_new_tokens: int) -> int:
    """Prompt tokens an editor completion may take: at most `budget`, leaving room in a `context`-token
    sequence for the completion's `max_new_tokens` (counted as at most half the context, and at least
    one token, since a prompt must be shorter than the context). The language server's in-process
    backend, `qgpt serve`'s /infill and the evals all size prompts with this, so the same request gives
    the same prompt everywhere."""
    return min(budget, context - max(1, min(max_new_tokens, context // 2)))


def starts_with_bos(tokenizer: Tokenizer) -> bool:
    """Whether a plain prompt begins with BOS: Llama vocabularies always; GGUF tokenizers carry the
    file's `add_bos_token` as `add_bos` (SmolLM2 says no)."""
    return tokenizer.bos_id >= 0 and getattr(tokenizer, "add_bos", True)


def _round_up(value: int, granule: int) -> int:
    return -(-value // granule) * granule


class _Layout:
    """One prompt's budgeting: the suffix window, then the prefix window, then other files."""

    def __init__(self, tokenizer: Tokenizer, infill: bool, language_id: str, options: ContextOptions):
        self.tokenizer, self.infill, self.language_id, self.options = tokenizer, infill, language_id, options
        self.block_chars = options.block_chars or max(1, options.budget // 4)
        self.granule = max(1, min(options.granule, options.budget // 16))  # small budgets: small granules

    def count_prefix(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def count_suffix(self, text: str) -> int:
        return len(encode_without_leading_space(self.tokenizer, text))

    def build(self, prefix: str, suffix: str, path: str, context: list[int], paths: tuple[str, ...], available: int):
        options = self.options
        header = path_header(path, self.language_id)
        header_cost = self.count_prefix(header) if header else 0
        if header_cost > available // 8:  # a tiny budget is better spent on code than on the file's name
            header, header_cost = "", 0
        room = available - header_cost

        suffix_budget = self._suffix_budget(prefix, room)
        suffix_window = suffix[: head_window_end(self.count_suffix, suffix, suffix_budget)]
        suffix_cost = self.count_suffix(suffix_window) if self.infill else 0

        prefix_budget = room - suffix_cost
        prefix_window = prefix[self._prefix_start(prefix, prefix_budget) :]

        prompt_prefix = header + prefix_window
        if self.infill:
            tokens = infill_tokens(self.tokenizer, prompt_prefix, suffix_window, suffix_first=options.suffix_first)
            if context:  # [BOS] other files, then the infilling prompt from PRE on
                bos = 1 if self.tokenizer.bos_id >= 0 else 0
                tokens = [*tokens[:bos], *context, *tokens[bos:]]
        elif context:  # other files encoded on their own: their tokens are the same whatever follows them
            bos = [self.tokenizer.bos_id] if starts_with_bos(self.tokenizer) else []
            tokens = [*bos, *context, *encode_without_leading_space(self.tokenizer, prompt_prefix)]
        else:
            tokens = self.tokenizer.encode(prompt_prefix, bos=starts_with_bos(self.tokenizer))
        return CompletionPrompt(
            tokens=tokens,
            mode="infill" if self.infill else "prefix",
            prefix=prefix_window,
            suffix=suffix_window,
            stop_ids=self._stop_ids(),
            context_paths=paths,
            language_id=self.language_id,
            path=path,
        )

    def _prefix_start(self, prefix: str, budget: int) -> int:
        allowance = min(self.granule, budget // 4)  # for the line being typed
        return tail_window_start(self.count_prefix, prefix, budget, self.block_chars, allowance)

    def _reserve(self, text: str) -> int:
        """Tokens set aside for `text`, which ends at the cursor: its whole lines rounded up to a granule,
        plus one granule for the line being typed (or the exact count once that line outgrows it).
        Typing within a line leaves this unchanged, so the budget splits made from it stay put."""
        granule = self.granule
        above = text[: len(text) - len(line_before_cursor(text))]
        return max(_round_up(self.count_prefix(above), granule) + granule, self.count_prefix(text))

    def _suffix_budget(self, prefix: str, room: int) -> int:
        """The suffix's share of the budget, plus whatever a short prefix leaves over. In suffix-first
        order any change to the suffix window invalidates the cached prompt after it, so the leftover is
        computed with `_reserve`, which typing does not move."""
        cap = int(room * self.options.suffix_share)
        if not self.infill:  # the suffix is not in the prompt; keep a window of it for trimming
            return cap
        if self._prefix_start(prefix, room - cap) > 0:
            return cap  # the prefix fills the rest
        return max(cap, room - self._reserve(prefix))

    def other_files(self, files: Sequence[ContextFile], budget: int) -> tuple[list[int], tuple[str, ...]]:
        """The other files' tokens (no BOS) and paths: a function of the files and the budget alone."""
        paths: tuple[str, ...] = ()
        tokens: list[int] = []
        while files:
            text, paths = self._other_files(files, budget)
            tokens = self.tokenizer.encode(text) if text else []
            if len(tokens) <= budget:
                break
            files = files[: len(paths) - 1]  # joined, the pieces counted a token or two more: one file less
        return tokens, paths

    def _other_files(self, files: Sequence[ContextFile], budget: int) -> tuple[str, tuple[str, ...]]:
        """Other files in the order given, each from its first line, cut at a line boundary, until the
        budget is spent; a file is skipped when not even its header and first line fit."""
        parts, paths = [], []
        for file in files:
            header = path_header(file.path, file.language_id or self.language_id)
            room = budget - self.count_prefix(header)
            body = file.text[: head_window_end(self.count_prefix, file.text, room, allow_partial_line=False)]
            if not body.strip():
                continue
            block = header + body + ("" if body.endswith("\n") else "\n") + "\n"
            budget -= self.count_prefix(block)
            parts.append(block)
            paths.append(file.path)
        return "".join(parts), tuple(paths)

    def _stop_ids(self) -> tuple[int, ...]:
        """EOT for infilling, EOS, and any other end-of-generation ids a GGUF tokenizer lists (`eog_ids`)."""
        ids = [self.tokenizer.piece_to_id(EOT)] if self.infill else []
        ids += [self.tokenizer.eos_id, *sorted(getattr(self.tokenizer, "eog_ids", ()))]
        return tuple(dict.fromkeys(i for i in ids if i is not None and i >= 0))
