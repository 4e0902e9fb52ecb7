"""Llama 2 chat dialogs, encoded exactly as Meta's `Llama.chat_completion` encodes them.

A dialog is an optional system message, then user and assistant messages alternating, ending on a user
message. The system message is wrapped in `<<SYS>>` and glued to the first user message; every finished
(user, assistant) exchange becomes `BOS [INST] user [/INST] answer EOS`, and the last user message
`BOS [INST] user [/INST]`. Each piece is encoded on its own and the token lists are concatenated, which is
not the same as encoding the concatenated strings.
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence, TypedDict

from qgpt_code.errors import QGPTError
from qgpt_code.tokenizer import Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
RESERVED_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")

Role = Literal["system", "user", "assistant"]
ROLES = ("system", "user", "assistant")


class Message(TypedDict):
    role: Role
    content: str


Dialog = Sequence[Mapping[str, str]]


class DialogError(QGPTError):
    """A dialog the model cannot be given: empty, badly ordered, or with a reserved tag in a message."""


def find_reserved_tag(text: str) -> str | None:
    """The first Llama 2 chat tag that occurs in `text`, or None."""
    return next((tag for tag in RESERVED_TAGS if tag in text), None)


def checked_messages(dialog: Dialog) -> list[Message]:
    """The dialog as plain messages, after checking each has a known role and string content."""
    if isinstance(dialog, (str, bytes)) or not isinstance(dialog, Sequence):
        raise DialogError("a dialog must be a list of {'role', 'content'} messages")
    if not dialog:
        raise DialogError("the dialog is empty: it needs at least one user message")
    messages: list[Message] = []
    for index, message in enumerate(dialog):
        if not isinstance(message, Mapping):
            raise DialogError(f"message {index} is not a {{'role', 'content'}} mapping")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DialogError(f"message {index} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DialogError(f"message {index} ({role}) has no text content")
        messages.append(Message(role=role, content=content))
    return messages


def _merge_system(messages: list[Message]) -> list[Message]:
    """Meta's layout: the system message becomes a `<<SYS>>` block at the head of the first user message."""
    if messages[0]["role"] != "system":
        return messages
    if len(messages) < 2:
        raise DialogError("the system message must be followed by a user message")
    system, first, rest = messages[0], messages[1], messages[2:]
    return [Message(role=first["role"], content=B_SYS + system["content"] + E_SYS + first["content"]), *rest]


def _check_turns(messages: list[Message]) -> None:
    for index, message in enumerate(messages):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise DialogError(
                "messages must alternate user/assistant after an optional first system message; "
                f"turn {index + 1} is {message['role']!r} where {expected!r} was expected"
            )
    if messages[-1]["role"] != "user":
        raise DialogError(f"the dialog must end with a user message, not {messages[-1]['role']!r}")


def dialog_tokens(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """The prompt token ids of a Llama 2 chat dialog (Meta's `chat_completion`, token for token).

    Raises DialogError when a message contains `[INST]`, `[/INST]`, `<<SYS>>` or `<</SYS>>` (where Meta
    answers with an error string, we refuse the request), when roles do not alternate user/assistant after an
    optional system message, or when the dialog does not end on a user message.
    """
    messages = checked_messages(dialog)
    for index, message in enumerate(messages):
        tag = find_reserved_tag(message["content"])
        if tag is not None:
            raise DialogError(f"message {index} ({message['role']}) contains the reserved tag {tag!r}")
    turns = _merge_system(messages)
    _check_turns(turns)
    tokens: list[int] = []
    for prompt, answer in zip(turns[0:-1:2], turns[1::2]):
        exchange = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
        tokens += tokenizer.encode(exchange, bos=True, eos=True)
    tokens += tokenizer.encode(f"{B_INST} {turns[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return tokens
