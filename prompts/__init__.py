"""Prompt construction for every front end: pure functions over a tokenizer (no torch, no I/O).

Installed as `qgpt_code.prompts`. What lives where:
  dialog         Llama 2 `[INST]` chat dialogs, token for token as Meta encodes them
  chat_template  chat prompts from a model's own Jinja template (ChatML...), rendered in a sandbox
  chat           `chat_tokens`: picks one of the two from the model's info
  infill         Code Llama fill-in-the-middle prompts, the EOT stop id
  positions      LSP positions (UTF-16) to string offsets
  windows        cutting text at line boundaries to a token budget, nearest the cursor first
  context        the editor's completion prompt, laid out so the prefix cache reuses it
  postprocess    trimming a completion for insertion at the cursor, and when to stop generating it
  blocks         the block enclosing the cursor and where a completion leaves it, per language (a table)
  languages      one-line comment syntax per LSP language id (file path headers)
  edit           chat-edit prompts (instruction + selection + surrounding code)
  edit_reply     the replacement code in a chat model's reply
"""

from qgpt_code.prompts.chat import ChatModelInfo, chat_tokens
from qgpt_code.prompts.chat_template import ChatTemplateError, render_chat_template
from qgpt_code.prompts.context import (
    CompletionPrompt,
    ContextFile,
    ContextOptions,
    completion_budget,
    completion_prompt,
    completion_prompt_at,
)
from qgpt_code.prompts.dialog import DialogError, Message, dialog_tokens
from qgpt_code.prompts.edit import (
    EditRequest,
    edit_dialog,
    edit_dialog_within,
    edit_request_at,
    edit_tokens,
    estimate_tokens,
)
from qgpt_code.prompts.edit_reply import NO_CODE_MESSAGE, EditReply, extract_code, parse_edit_reply
from qgpt_code.prompts.infill import (
    InfillUnsupportedError,
    decode_without_leading_space,
    infill_stop_id,
    infill_tokens,
    supports_infill,
)
from qgpt_code.prompts.positions import offset_at, position_at, split_at, split_at_range
from qgpt_code.prompts.postprocess import postprocess_completion

__all__ = [
    "ChatModelInfo", "ChatTemplateError", "CompletionPrompt", "ContextFile", "ContextOptions", "DialogError",
    "EditReply", "EditRequest", "InfillUnsupportedError", "Message", "NO_CODE_MESSAGE", "chat_tokens",
    "completion_budget", "completion_prompt", "completion_prompt_at", "decode_without_leading_space", "dialog_tokens", "edit_dialog",
    "edit_dialog_within", "edit_request_at", "edit_tokens", "estimate_tokens", "extract_code", "infill_stop_id",
    "infill_tokens", "offset_at", "parse_edit_reply", "position_at", "postprocess_completion",
    "render_chat_template", "split_at", "split_at_range", "supports_infill",
]
