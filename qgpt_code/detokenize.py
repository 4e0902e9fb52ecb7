"""Turning a growing list of token ids into text pieces, safely.

Two problems: a token may hold only part of a UTF-8 character (byte-fallback pieces), and
SentencePiece decodes a piece's leading space differently at the start of a string. So each new
token is decoded together with a few tokens before it and only the new, complete characters are
emitted (the offsets scheme text-generation-inference uses). Stop strings are handled here too: text
that could be the start of a stop string is held back until it is clearly not one.
"""

from __future__ import annotations

from typing import Sequence

from qgpt_code.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"  # what decoders produce for an incomplete UTF-8 sequence
CONTEXT_TOKENS = 5  # prompt tokens decoded with the first new ones, so a leading space survives


class IncrementalDecoder:
    """Feed token ids one by one; get back the text each one completes."""

    def __init__(self, tokenizer: Tokenizer, prompt_tokens: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_tokens[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        after = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT_CHAR):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before) :]
        return ""  # an incomplete character: wait for the bytes that finish it

    def flush(self) -> str:
        """Text still held back when generation ends (an unfinished character decodes as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        after = self.tokenizer.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before) :]


class StopStringFilter:
    """Passes text through until a stop string appears; the stop string itself is never emitted."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Text safe to emit now (possibly empty); sets `stopped` when a stop string is found."""
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = self._partial_match_length()
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        """What was held back, once generation ends without a stop string."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _partial_match_length(self) -> int:
        """Length of the longest suffix of `pending` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:n]):
                    best = n
                    break
        return best
