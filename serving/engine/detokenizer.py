"""Incremental detokenization and stop-string matching for one request.

Decoding the whole output every step costs O(n^2) over a long answer; instead each step decodes a short window
starting at `prefix_offset` twice (with and without the new tokens) and emits the difference. Both decodes start
at the same token, so tokenizers that strip a leading space from the first token treat them alike. A window that
ends inside a multi-byte character decodes to U+FFFD and is held back until the character completes.
"""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str], include_stop_str_in_output: bool, skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.num_emitted_chars = 0
        # While running, hold back text that could be the start of a stop string.
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.stop_reason: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> bool:
        """Adds one token; returns True when a stop string matched (the text is then cut)."""
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return False
        delta = new_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return self._append(delta)

    def flush(self) -> None:
        """At finish: emit whatever is pending, even an incomplete character."""
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and self.stop_reason is None:
            self._append(new_text[len(prefix_text):])
        self.prefix_offset = self.read_offset = len(self.token_ids)

    def _append(self, delta: str) -> bool:
        start = max(0, len(self.text) - self.holdback)
        self.text += delta
        for stop in self.stop:
            idx = self.text.find(stop, start)
            if idx != -1:
                self.text = self.text[:idx + len(stop)] if self.include_stop else self.text[:idx]
                self.stop_reason = stop
                return True
        return False

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out; while running, keeps back what could still become a stop string."""
        limit = len(self.text) if finished else max(self.num_emitted_chars, len(self.text) - self.holdback)
        delta = self.text[self.num_emitted_chars:limit]
        self.num_emitted_chars = limit
        return delta
