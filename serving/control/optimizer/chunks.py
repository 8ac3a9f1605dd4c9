"""Context step: choose which of the client's retrieved chunks go into the prompt, and how they are written there.

Clients may send retrieved chunks apart from the question (`context_chunks`). Without this step every chunk is
sent; with it, chunks are ranked by embedding similarity to the last user message, those under min_similarity
go, and the best are packed into max_tokens greedily by rank (a chunk that does not fit is skipped and a smaller,
lower-ranked one may still go in).

How the chunks are written: a block at the start of the last user message,

    Context:
    [1] first chunk

    [4] fourth chunk

    <the user's message as sent>

NOTE: in the last user message, not in a system message after the system prompt: the system prompt and the
earlier turns then stay a byte-identical prefix from one turn to the next (the KV prefix cache reuses them while
the context changes every turn), templates that allow only one leading system message (Gemma 3) still render, and
a conversation without a system prompt keeps the template's default one.
NOTE: selected chunks keep their original order and their original 1-based numbers: the client's retriever
ordered them (often with a better reranker than ours), the prompt only ever loses entries, and a citation "[4]"
in the answer points at context_chunks[3] whatever was dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

from serving.control.optimizer.config import ContextConfig
from serving.control.optimizer.tokens import CountTokens

CONTEXT_HEADER = "Context:"


def chunk_entry(index: int, chunk: str) -> str:
    """How chunk `index` (0-based, into context_chunks) is written in the context block."""
    return f"[{index + 1}] {chunk}"


def with_context(content: str, chunks: list[str], indices: list[int]) -> str:
    """The last user message's content with the context block for `indices` in front; unchanged for none."""
    if not indices:
        return content
    entries = "\n\n".join(chunk_entry(i, chunks[i]) for i in sorted(indices))
    return f"{CONTEXT_HEADER}\n{entries}\n\n{content}"


@dataclass(frozen=True, slots=True)
class Selection:
    kept_ids: list[int]  # indices into context_chunks, in their original order
    dropped_ids: list[int]  # the others, in their original order
    similarities: list[float]  # cosine similarity of each chunk to the question, in the original order
    kept_tokens: int  # tokens of the kept entries, as rendered
    note: str  # what was kept and why the rest was dropped


def select_chunks(question: str, chunks: list[str], config: ContextConfig, count_tokens: CountTokens,
                  embedder) -> Selection:
    """Ranks `chunks` against `question` and packs the best into config.max_tokens."""
    vectors = embedder.encode([question, *chunks])
    similarities = [float(s) for s in vectors[1:] @ vectors[0]]
    # Ties go to the earlier chunk, so the same input always selects the same chunks.
    ranked = sorted(range(len(chunks)), key=lambda i: (-similarities[i], i))
    kept, num_below, num_too_big, total = [], 0, 0, 0
    for i in ranked:
        if similarities[i] < config.min_similarity:
            num_below += 1
            continue
        tokens = count_tokens(chunk_entry(i, chunks[i]))
        if total + tokens > config.max_tokens:
            num_too_big += 1
            continue
        kept.append(i)
        total += tokens
    kept.sort()
    dropped = [i for i in range(len(chunks)) if i not in set(kept)]
    note = (f"kept {len(kept)} of {len(chunks)} context chunks ({total} tokens of max_tokens={config.max_tokens}); "
            f"{num_below} under min_similarity={config.min_similarity:g}, {num_too_big} did not fit")
    return Selection(kept, dropped, similarities, total, note)
