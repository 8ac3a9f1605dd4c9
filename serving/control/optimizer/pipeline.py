"""The optimizer: runs a plan's steps over one chat request and reports what each saved.

Called by the admission path after authentication and limits, before the cache lookup (the cache then keys on
the prompt actually sent). Steps run in a fixed order, each on the previous one's output:

    whitespace -> dedupe -> context -> trim_history -> max_tokens_cap

NOTE: cleaning first lets dedupe and the token budgets see the text that will be sent; context goes in before
trimming so the history budget counts the chunks too (the last user message, which holds them, is never trimmed).

Pure: the caller's messages and chunks are never changed, and the same input (same plan, tokenizer and embedder)
gives the same output.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from serving.control.optimizer.chunks import select_chunks, with_context
from serving.control.optimizer.config import OptimizerPlan
from serving.control.optimizer.dedupe import dedupe_messages
from serving.control.optimizer.history import trim_history
from serving.control.optimizer.report import OptimizationReport, OptimizedRequest, StepReport
from serving.control.optimizer.tokens import CountTokens, count_chat_tokens, memoized
from serving.control.optimizer.whitespace import collapse_whitespace


def optimize(messages: Sequence[Mapping[str, str]], plan: OptimizerPlan, count_tokens: CountTokens, *,
             max_tokens: int | None = None, context_chunks: Sequence[str] | None = None,
             embedder=None) -> OptimizedRequest:
    """Optimises one chat request.

    `messages`: {"role", "content"} with string content (ChatMessage.template_dict output). `max_tokens`: the
    client's completion budget, None when unset. `context_chunks`: retrieved chunks sent apart from the question;
    they always end up in the last user message (chunks.py), selected only when the plan has `context`.
    `embedder`: an Embedder; None takes Embedder.shared(), loaded only when chunks need ranking.
    Raises ValueError naming the field for malformed input, before any work.
    """
    messages = _checked_messages(messages)
    chunks = _checked_chunks(context_chunks)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive integer, not {max_tokens!r}")
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if chunks and last_user is None:
        raise ValueError("context_chunks need a user message to answer: messages has none")
    count = memoized(count_tokens)

    kept_ids = list(range(len(chunks)))
    similarities: list[float] = []

    def prompt() -> list[dict[str, str]]:
        """The messages as they would be sent now, with the kept chunks in the last user message."""
        if not kept_ids:
            return messages
        result = list(messages)
        result[last_user] = {**messages[last_user],
                             "content": with_context(messages[last_user]["content"], chunks, kept_ids)}
        return result

    tokens_before = count_chat_tokens(prompt(), count)
    reports: list[StepReport] = []

    def record(step: str, applied: bool, tokens_at_start: int, note: str) -> int:
        tokens_now = count_chat_tokens(sent, count)
        reports.append(StepReport(step, applied, tokens_at_start, tokens_now, note))
        return tokens_now

    tokens = tokens_before
    sent = prompt()
    if plan.whitespace:
        cleaned = [{**m, "content": collapse_whitespace(m["content"])} for m in messages]
        cleaned_chunks = [collapse_whitespace(c) for c in chunks]
        num_changed = sum(a != b for a, b in zip(cleaned + cleaned_chunks, messages + chunks))
        messages, chunks = cleaned, cleaned_chunks
        sent = prompt()
        tokens = record("whitespace", num_changed > 0, tokens,
                        f"whitespace: collapsed in {num_changed} messages and chunks")
    if plan.dedupe:
        messages, num_dropped = dedupe_messages(messages)
        sent = prompt()
        tokens = record("dedupe", num_dropped > 0, tokens,
                        f"dedupe: dropped {num_dropped} repeated instruction paragraphs")
    if plan.context:
        if chunks:
            selection = select_chunks(messages[last_user]["content"], chunks, plan.context, count,
                                      embedder if embedder is not None else _shared_embedder())
            kept_ids, similarities = selection.kept_ids, selection.similarities
            sent = prompt()
            tokens = record("context", bool(selection.dropped_ids), tokens, f"context: {selection.note}")
        else:
            tokens = record("context", False, tokens, "context: the request has no context_chunks")
    num_messages_dropped = 0
    if plan.trim_history:
        trimmed = trim_history(sent, plan.trim_history, count)
        num_messages_dropped = len(sent) - len(trimmed.messages)
        sent = trimmed.messages
        tokens = record("trim_history", trimmed.num_turns_dropped > 0, tokens, f"trim_history: {trimmed.note}")
    capped = max_tokens
    if plan.max_tokens_cap:
        capped = plan.max_tokens_cap if max_tokens is None else min(max_tokens, plan.max_tokens_cap)
        record("max_tokens_cap", capped != max_tokens, tokens,
               f"max_tokens_cap: max_tokens {max_tokens} -> {capped}" if capped != max_tokens
               else f"max_tokens_cap: max_tokens {max_tokens} already within {plan.max_tokens_cap}")

    report = OptimizationReport(
        tokens_before=tokens_before, tokens_after=tokens,
        steps=tuple(r.step for r in reports if r.applied), step_reports=tuple(reports),
        chunks_kept=tuple(kept_ids), chunks_dropped=tuple(i for i in range(len(chunks)) if i not in set(kept_ids)),
        chunk_similarities=tuple(similarities), num_messages_dropped=num_messages_dropped,
        max_tokens_requested=max_tokens, max_tokens=capped, notes=tuple(r.note for r in reports))
    return OptimizedRequest(messages=[dict(m) for m in sent], max_tokens=capped, report=report)


def _checked_messages(messages) -> list[dict[str, str]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list")
    result = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}] needs a string 'role' and a string 'content'")
        result.append(dict(message))
    return result


def _checked_chunks(chunks) -> list[str]:
    if chunks is None:
        return []
    if isinstance(chunks, (str, bytes)) or not isinstance(chunks, Sequence):
        raise ValueError("context_chunks must be a list of strings")
    for i, chunk in enumerate(chunks):
        if not isinstance(chunk, str):
            raise ValueError(f"context_chunks[{i}] must be a string, not {type(chunk).__name__}")
    return list(chunks)


def _shared_embedder():
    from serving.control.embeddings import Embedder

    return Embedder.shared()
