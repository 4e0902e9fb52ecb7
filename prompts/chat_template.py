"""Chat prompts from a model's own Jinja chat template (ChatML and the like), as Hugging Face renders them.

The template comes from the model file, so it is untrusted code: it runs in jinja2's
`ImmutableSandboxedEnvironment` with the same options and helpers as transformers' `apply_chat_template`
(trim_blocks, lstrip_blocks, loop controls, `raise_exception`, a non-escaping `tojson`, `strftime_now`,
a no-op `{% generation %}` block), so a template renders here exactly as it does there.

The rendered text holds special-token strings such as `<|im_start|>`; they must become their single ids,
never be spelled out as ordinary text. A message whose content holds such a string is refused, for the
same reason Llama 2 dialogs refuse `[INST]`: a user must not be able to forge a turn boundary.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Mapping, Sequence

from qgpt_code.errors import QGPTError
from qgpt_code.prompts.dialog import DialogError, Message
from qgpt_code.tokenizer import Tokenizer

# ChatML and Llama-3 style control tokens. Other special tokens are only recognised when the model's
# metadata names them (bos_token, eos_token): a looser pattern would also catch ordinary vocabulary
# pieces such as `<div>` or byte pieces such as `<0x0A>`.
CONTROL_TOKEN_SHAPE = re.compile(r"<\|[^<>|\s]{1,64}\|>")
_METADATA_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplateError(QGPTError):
    """The model's chat template is broken (syntax error, sandbox violation, or a runtime error)."""


def render_chat_template(
    template: str,
    messages: Sequence[Message],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    **variables: Any,
) -> str:
    """The template's text for `messages`. A template's own `raise_exception(...)` call (e.g. "roles must
    alternate") is the dialog's fault and raises DialogError; every other template failure raises
    ChatTemplateError."""
    import jinja2

    compiled = _compile(template)
    try:
        return compiled.render(
            messages=[dict(message) for message in messages],
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **variables,
        )
    except DialogError:
        raise
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the model's chat template failed: {exc}") from None
    except Exception as exc:  # a template can fail in any way Python can (bad index, division...)
        raise ChatTemplateError(f"the model's chat template failed: {type(exc).__name__}: {exc}") from None


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """transformers' `{% generation %}...{% endgeneration %}` marks assistant text; rendering ignores it."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message: str):
        raise DialogError(f"the model's chat template refused the dialog: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from None


def special_tokens_in(text: str, tokenizer: Tokenizer, metadata: Mapping[str, Any]) -> list[tuple[int, int, int]]:
    """Occurrences of special-token strings in `text` as (start, end, token id), in order, not overlapping.

    Candidates are the token strings the model's metadata declares (bos_token, eos_token, ...) and
    anything shaped like a control token (`<|...|>`); a candidate counts only if the vocabulary has it.
    """
    declared = [metadata.get(key) for key in _METADATA_TOKEN_KEYS]
    named = sorted({token for token in declared if isinstance(token, str) and token}, key=len, reverse=True)
    pattern = "|".join([*map(re.escape, named), CONTROL_TOKEN_SHAPE.pattern])
    found = []
    for match in re.finditer(pattern, text):
        token_id = tokenizer.piece_to_id(match.group())
        if token_id is not None:
            found.append((match.start(), match.end(), token_id))
    return found


def encode_with_special_tokens(tokenizer: Tokenizer, text: str, metadata: Mapping[str, Any]) -> list[int]:
    """Token ids of rendered template text, special-token strings mapped to their ids, no BOS/EOS added
    (the template writes those itself).

    Tokenizers that know their special tokens (GGUF) offer `encode_special(text)`; for the others the text
    is split around the special strings and each plain stretch is encoded on its own, the way Meta encodes
    each `[INST]` segment separately.
    """
    encode_special = getattr(tokenizer, "encode_special", None)
    if callable(encode_special):
        return list(encode_special(text))
    ids: list[int] = []
    position = 0
    for start, end, token_id in special_tokens_in(text, tokenizer, metadata):
        if start > position:
            ids += tokenizer.encode(text[position:start])
        ids.append(token_id)
        position = end
    if position < len(text):
        ids += tokenizer.encode(text[position:])
    return ids


def template_tokens(
    template: str, tokenizer: Tokenizer, messages: Sequence[Message], metadata: Mapping[str, Any]
) -> list[int]:
    """Prompt ids for a chat model with its own template. Refuses messages that spell a special token."""
    for index, message in enumerate(messages):
        spans = special_tokens_in(message["content"], tokenizer, metadata)
        if spans:
            start, end, _ = spans[0]
            token = message["content"][start:end]
            raise DialogError(f"message {index} ({message['role']}) contains the special token {token!r}")
    text = render_chat_template(
        template,
        messages,
        bos_token=str(metadata.get("bos_token") or ""),
        eos_token=str(metadata.get("eos_token") or ""),
    )
    return encode_with_special_tokens(tokenizer, text, metadata)
