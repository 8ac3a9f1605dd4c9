"""Tokenization and chat templating off the event loop, in a small bounded pool of worker threads.

One long prompt takes seconds to template and tokenize; done on the event loop that serves gRPC and HTTP, it
would stall every other client. Each worker owns its own copy of the tokenizer: a transformers tokenizer may
change its backend's truncation and padding settings inside a call, which is not safe while another thread uses
the same object. The event loop gets a copy of its own too (`loop_tokenizer`), for the decoding the front ends do
there (logprob token texts, echoed prompts). At most `max_pending` jobs wait; past that the caller is refused with QueueFullError, like a
full waiting queue.
"""
from __future__ import annotations

import asyncio
import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from scheduler import QueueFullError
from serving.engine.chat import chat_prompt_ids

T = TypeVar("T")

# NOTE: a worker spends milliseconds on a typical prompt; 256 queued jobs is already seconds of backlog.
DEFAULT_MAX_PENDING = 256


class TokenizerPool:
    def __init__(self, tokenizer, num_workers: int = 2, max_pending: int = DEFAULT_MAX_PENDING):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self._tokenizer = tokenizer  # the original; only copied, never called here
        self.loop_tokenizer = copy.deepcopy(tokenizer)  # for the event loop's own (decode-only) use
        self._local = threading.local()
        self._executor = ThreadPoolExecutor(num_workers, thread_name_prefix="frugal-tokenize")
        self._max_pending = max_pending
        self._num_pending = 0  # jobs submitted and not done; touched only on the event loop

    async def encode(self, text: str) -> list[int]:
        """The tokenizer's default call (special tokens included), as LLMEngine.tokenize does."""
        return await self._run(lambda tok: list(tok(text).input_ids))

    async def chat(self, messages: list[dict]) -> list[int]:
        """Renders messages with the model's chat template and tokenizes them. Raises ValueError like
        serving.engine.chat.chat_prompt_ids."""
        return await self._run(lambda tok: chat_prompt_ids(tok, messages))

    async def run(self, job: Callable[[object], T]) -> T:
        """Any work that needs a tokenizer (the prompt optimizer's token counts), on a worker's own copy."""
        return await self._run(job)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, job):
        if self._num_pending >= self._max_pending:
            raise QueueFullError(f"{self._num_pending} prompts are waiting to be tokenized; retry later")
        self._num_pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, job)
        finally:
            self._num_pending -= 1

    def _call(self, job):
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._local.tokenizer = copy.deepcopy(self._tokenizer)
        return job(tokenizer)
