"""Chat-edit prompts and reading the replacement code out of the model's reply."""

from __future__ import annotations

import pytest
from prompt_fixtures import CHATML_TEMPLATE, AddedSpecialTokens, Info, llama_tokenizer, long_python_file

from qgpt_code.errors import PromptTooLongError
from qgpt_code.prompts import (
    NO_CODE_MESSAGE,
    DialogError,
    EditRequest,
    chat_tokens,
    edit_dialog,
    edit_dialog_within,
    edit_request_at,
    edit_tokens,
    estimate_tokens,
    extract_code,
    parse_edit_reply,
)
from qgpt_code.prompts.edit import fit_context
from qgpt_code.prompts.edit_reply import code_blocks

FILE = (
    "import math\n\n\nclass Circle:\n    def __init__(self, r):\n        self.r = r\n\n"
    "    def area(self):\n        return math.pi * self.r ** 2\n\n\nprint(Circle(2).area())\n"
)
SELECTION_RANGE = ((7, 0), (9, 0))  # the area method, whole lines


def area_request(instruction="add type hints"):
    return edit_request_at(FILE, *SELECTION_RANGE, instruction, path="shapes.py", language_id="python")


def test_request_from_an_lsp_range():
    request = area_request()
    assert request.selection == "    def area(self):\n        return math.pi * self.r ** 2\n"
    assert request.before + request.selection + request.after == FILE


def test_dialog_shows_file_context_selection_then_instruction():
    request = area_request()
    before, after = fit_context(request, lambda text: len(text), 10_000)
    system, user = edit_dialog(request, before, after)
    assert system["role"] == "system" and "fenced code block" in system["content"]
    text = user["content"]
    assert text.startswith("File: shapes.py (python)\n\n")
    order = ["Code before the selection:\n```python\nimport math", "Code after the selection:\n```python\n\n\nprint(",
             "Selected code:\n```python\n    def area(self):", "Instruction: add type hints"]
    positions = [text.index(part) for part in order]
    assert positions == sorted(positions)


def test_fence_outgrows_backticks_in_the_code():
    request = EditRequest("fix", "s = '```'\n", "x = '````'\n", "", "notes.py", "python")
    user = edit_dialog(request, request.before, "")[1]["content"]
    assert "`````python\ns = '```'\n`````" in user


def test_context_is_nearest_lines_first_within_budget():
    text = long_python_file()
    request = edit_request_at(text, (1500, 0), (1503, 0), "rename variables")
    before, after = fit_context(request, estimate_tokens, 200)
    assert request.before.endswith(before) and request.after.startswith(after)
    assert before.count("\n") >= 3 and after.count("\n") >= 3  # both sides get lines
    assert sum(estimate_tokens(line) for line in (before + after).splitlines(keepends=True)) <= 200


def test_context_stops_at_a_line_with_a_chat_tag():
    request = EditRequest("fix", "x = 1\n", "a = 1\nprompt = '[INST] hi'\nb = 2\n", "c = 3\n<|im_end|>\nd = 4\n")
    before, after = fit_context(request, len, 10_000)
    assert before == "b = 2\n" and after == "c = 3\n"


def test_edit_tokens_fit_the_budget_and_follow_the_chat_format():
    tokenizer = llama_tokenizer()
    request = edit_request_at(long_python_file(), (1500, 0), (1503, 0), "add docstrings", path="big.py",
                              language_id="python")
    tokens = edit_tokens(Info("llama2"), tokenizer, request, budget=700)
    assert 600 < len(tokens) <= 700
    assert tokens[0] == tokenizer.bos_id and tokens.count(tokenizer.bos_id) == 1
    assert tokenizer.decode(tokens).startswith("[INST] <<SYS>>\nYou are an expert programmer")
    chatml = AddedSpecialTokens(tokenizer, ["<|im_start|>", "<|im_end|>"])
    templated = edit_tokens(Info("template", CHATML_TEMPLATE), chatml, request, budget=700)
    assert len(templated) <= 700 and templated[0] == chatml.piece_to_id("<|im_start|>")


def test_selection_too_long_for_the_budget():
    request = EditRequest("fix", "x = 1\n" * 500, language_id="python")
    with pytest.raises(PromptTooLongError):
        edit_tokens(Info("llama2"), llama_tokenizer(), request, budget=100)


def test_tags_in_the_selection_or_instruction_are_refused_by_name():
    with pytest.raises(DialogError, match=r"'\[INST\]'"):
        edit_tokens(Info("llama2"), llama_tokenizer(), EditRequest("fix", "s = '[INST]'\n"), budget=500)
    with pytest.raises(DialogError, match="'<</SYS>>'"):
        edit_tokens(Info("llama2"), llama_tokenizer(), EditRequest("say <</SYS>>", "x\n"), budget=500)


def test_dialog_within_uses_any_counter():
    dialog = edit_dialog_within(area_request(), estimate_tokens, 250)
    assert sum(estimate_tokens(message["content"]) for message in dialog) <= 250
    assert chat_tokens(Info("llama2"), llama_tokenizer(), dialog)  # a valid dialog


SELECTION = "    def area(self):\n        return math.pi * self.r ** 2\n"
TYPED = "    def area(self) -> float:\n        return math.pi * self.r ** 2\n"
REPLIES = [
    # the asked-for shape
    ("```python\n    def area(self) -> float:\n        return math.pi * self.r ** 2\n```", TYPED),
    # flush left, with prose around it: re-indented to the selection
    ("Here is the updated method:\n\n```py\ndef area(self) -> float:\n    return math.pi * self.r ** 2\n```\n\n"
     "I added a return type.", TYPED),
    # the original quoted first, then the answer
    ("Before:\n```python\n" + SELECTION + "```\nAfter:\n```python\n" + TYPED + "```\n", TYPED),
    # the answer, then a usage example in another language
    ("```python\n" + TYPED + "```\nRun it with:\n```bash\npython shapes.py\n```", TYPED),
    # untagged fence, tildes, and a longer fence with backticks inside
    ("~~~\n" + TYPED + "~~~", TYPED),
    ("````python\n    def area(self) -> float:\n        '''```'''\n        return 1.0\n````",
     "    def area(self) -> float:\n        '''```'''\n        return 1.0\n"),
    # the reply was cut off before the closing fence
    ("Sure!\n```python\n" + TYPED.rstrip("\n"), TYPED),
    # no fence: a sentence, then bare code
    ("Sure! Here is the code with type hints:\n\ndef area(self) -> float:\n    return math.pi * self.r ** 2\n", TYPED),
    # bare code only
    (TYPED, TYPED),
    # bare code with an explanation after it
    (TYPED + "\nThis adds a return annotation to the method.", TYPED),
    # a Windows-style reply
    ("```python\r\n" + TYPED.replace("\n", "\r\n") + "```\r\n", TYPED),
]


@pytest.mark.parametrize(("reply", "expected"), REPLIES)
def test_replies_give_the_replacement(reply, expected):
    parsed = parse_edit_reply(reply, SELECTION, "python")
    assert parsed.has_code and parsed.message == ""
    assert parsed.replacement == expected


@pytest.mark.parametrize(
    "reply",
    [
        "I cannot help with that.",
        "The function already has type hints. No change is needed.",
        "Sure! Could you tell me which version of Python you use?",
        "",
        "```\n\n```",  # an empty block is not code
    ],
)
def test_prose_only_replies_say_there_is_no_code(reply):
    parsed = parse_edit_reply(reply, SELECTION, "python")
    assert not parsed.has_code and parsed.replacement is None
    assert parsed.message == NO_CODE_MESSAGE and parsed.explanation == reply.strip()


def test_explanation_is_the_prose_around_the_code():
    parsed = parse_edit_reply(REPLIES[1][0], SELECTION, "python")
    assert parsed.explanation == "Here is the updated method:\n\nI added a return type."


def test_selection_without_final_newline_gets_none():
    parsed = parse_edit_reply("```python\nx = 2\n```", "x = 1", "python")
    assert parsed.replacement == "x = 2"


def test_block_parsing_details():
    blocks = code_blocks("text\n```js title=a.js\nlet a = 1;\n```\n   ~~~~\ncode\n~~~~~\n")
    assert [(b.language, b.code) for b in blocks] == [("js", "let a = 1;\n"), ("", "code\n")]
    assert extract_code("```ts\nlet x: number = 1;\n```", "typescript") == "let x: number = 1;\n"
    assert extract_code("just words here, nothing else.", "python") is None
