"""The tokenizer pool: the same ids as the tokenizer itself, computed off the event loop by workers that each own
a copy, and a bounded queue."""
import asyncio
import threading

import pytest

from scheduler import QueueFullError
from serving.engine.chat import chat_prompt_ids
from serving.engine.tokenizer_pool import TokenizerPool

GATE = threading.Event()  # module level: the fake tokenizer is deep-copied, and a lock cannot be


class _Encoding:
    def __init__(self, ids):
        self.input_ids = ids


class RecordingTokenizer:
    """Splits on spaces; records which thread and which copy ran each call; waits on GATE for "wait" texts."""

    calls: list[tuple[str, int]] = []  # class level, shared by the copies: (thread name, id of the copy)

    def __call__(self, text, add_special_tokens=True):
        RecordingTokenizer.calls.append((threading.current_thread().name, id(self)))
        if text == "wait":
            GATE.wait(10)
        return _Encoding([len(w) for w in text.split()])


def test_same_ids_as_the_tokenizer(loaded_model):
    tokenizer = loaded_model.tokenizer
    pool = TokenizerPool(tokenizer, num_workers=2)
    texts = [f"Sample number {i}: " + "word " * i for i in range(40)]
    messages = [{"role": "user", "content": t} for t in texts[:5]]

    async def run():
        encoded = await asyncio.gather(*(pool.encode(t) for t in texts))
        chat = await pool.chat(messages)
        with pytest.raises(ValueError, match="messages"):
            await pool.chat([])
        return encoded, chat

    try:
        encoded, chat = asyncio.run(run())
    finally:
        pool.close()
    assert encoded == [list(tokenizer(t).input_ids) for t in texts]
    assert chat == chat_prompt_ids(tokenizer, messages)


def test_runs_off_the_loop_on_copies_and_bounds_the_queue():
    RecordingTokenizer.calls.clear()
    original = RecordingTokenizer()
    pool = TokenizerPool(original, num_workers=2, max_pending=3)

    async def run():
        GATE.clear()
        stuck = [asyncio.create_task(pool.encode("wait")) for _ in range(3)]
        await asyncio.sleep(0.1)
        with pytest.raises(QueueFullError):
            await pool.encode("one too many")
        ticks = 0
        for _ in range(5):  # the loop keeps running while the workers are busy
            await asyncio.sleep(0.01)
            ticks += 1
        GATE.set()
        assert await asyncio.gather(*stuck) == [[4]] * 3
        return ticks, await pool.encode("a bb ccc")

    try:
        ticks, ids = asyncio.run(run())
    finally:
        GATE.set()
        pool.close()
    assert ticks == 5 and ids == [1, 2, 3]
    threads = {name for name, _ in RecordingTokenizer.calls}
    copies = {copy_id for _, copy_id in RecordingTokenizer.calls}
    assert all(name.startswith("frugal-tokenize") for name in threads)
    assert id(original) not in copies and len(copies) == len(threads)  # one copy per worker thread
