"""Engine logprob rows -> OpenAI's two logprob shapes (chat's per-token objects, completions' parallel lists).

An engine row is one generated token: `[(chosen_id, logprob), (top1_id, logprob), ...]`.
"""
from __future__ import annotations

from serving.engine.outputs import RequestOutput
from serving.http.responses import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob

# NOTE: JSON has no -inf; a token the sampler masked out reports this floor instead (vLLM does the same).
_LOGPROB_FLOOR = -9999.0

LogprobRow = list[tuple[int, float]]


class TokenTexts:
    """Token id -> the text shown for it. Cached: the vocabulary bounds the cache, and decoding is per token."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            # NOTE: a token holding part of a multi-byte character decodes to U+FFFD, as in vLLM.
            text = self._tokenizer.decode([token_id])
            self._texts[token_id] = text
        return text


def delta_rows(out: RequestOutput) -> list[LogprobRow]:
    """The rows of the tokens new in this output (the engine's list is cumulative)."""
    if not out.logprobs:
        return []
    return out.logprobs[len(out.token_ids) - len(out.delta_token_ids):]


def _lp(value: float) -> float:
    return max(value, _LOGPROB_FLOOR)


def chat_logprobs(rows: list[LogprobRow], texts: TokenTexts) -> ChatLogprobs:
    content = []
    for (token_id, logprob), *top in rows:
        text = texts(token_id)
        content.append(TokenLogprob(
            token=text, logprob=_lp(logprob), bytes=list(text.encode()),
            top_logprobs=[TopLogprob(token=texts(t), logprob=_lp(lp), bytes=list(texts(t).encode())) for t, lp in top]))
    return ChatLogprobs(content=content)


def completion_logprobs(rows: list[LogprobRow], texts: TokenTexts, text_offset: int) -> CompletionLogprobs:
    """`text_offset`: where the first of these tokens starts in the choice's text."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for (token_id, logprob), *top in rows:
        text = texts(token_id)
        tokens.append(text)
        token_logprobs.append(_lp(logprob))
        top_logprobs.append({texts(t): _lp(lp) for t, lp in top})
        offsets.append(text_offset)
        text_offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top_logprobs,
                              text_offset=offsets)
