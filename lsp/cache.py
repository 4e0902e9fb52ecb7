"""Recent completions, so that typing along a suggestion is answered at once.

A suggestion "abc(x)" shown after "def " stays valid while the user types its first characters: after
"def ab" the rest "c(x)" is the same suggestion, provided the text after the cursor did not change. The
cache keeps the last few (document, text before, text after, completion) and answers such a request
without a generation, and without the debounce.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    before: str
    after: str
    completion: str


class CompletionCache:
    def __init__(self, size: int = 32):
        self.size = size
        self._entries: OrderedDict[tuple[str, int], Entry] = OrderedDict()
        self.hits = 0

    def resize(self, size: int) -> None:
        self.size = size
        while len(self._entries) > size:
            self._entries.popitem(last=False)

    def store(self, uri: str, before: str, after: str, completion: str) -> None:
        if self.size <= 0 or not completion.strip():
            return
        key = (uri, len(before))
        self._entries[key] = Entry(before, after, completion)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def lookup(self, uri: str, before: str, after: str) -> str | None:
        """What is left of a cached completion once the text typed since is taken off its front."""
        for (entry_uri, length), entry in reversed(self._entries.items()):
            if entry_uri != uri or length > len(before) or entry.after != after:
                continue
            typed = before[length:]
            if len(typed) >= len(entry.completion) or not entry.completion.startswith(typed):
                continue
            if before[:length] != entry.before:
                continue
            self.hits += 1
            return entry.completion[len(typed):]
        return None

    def forget(self, uri: str) -> None:
        for key in [k for k in self._entries if k[0] == uri]:
            del self._entries[key]
