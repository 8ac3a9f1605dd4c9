"""Prefix-cache events on a ZMQ PUB socket, in vLLM's wire format, for prefix-aware routers.

llm-d's precise prefix-cache scorer (and the Gateway API Inference Extension endpoint picker built on it) follows
each replica's cache through vLLM's KV events and sends a request to the replica that already holds the longest
part of its prefix. We publish the same messages, so those routers follow frugal replicas unchanged.

The wire format is that of vLLM's ZmqEventPublisher (vllm/distributed/kv_events.py), whose msgspec structs are
tagged and `array_like`, so every struct is a msgpack array and an event's first element is its class name:

- a message is three frames: topic (utf-8), sequence number (8 bytes, big-endian, from 0, one per batch), payload
- payload: ``[ts, [event, ...], data_parallel_rank]``: unix seconds (float64), the events, 0
- ``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name,
  extra_keys]``; ``extra_keys`` has one entry per block: None, or ``[salt]`` with ``include_salt``
- ``["BlockRemoved", block_hashes, medium]`` and ``["AllBlocksCleared"]``
- a block hash is an unsigned 64-bit int: the last 8 bytes of our sha256 digest, big-endian, which is what vLLM
  does to its own digests by default (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1); a sequence's first block has
  parent None

NOTE: this is vLLM's positional layout as of vllm-project/vllm#33304 (extra_keys); later releases append
group_idx and cache-spec fields, and since #42892 send each event as a map. llm-d-kv-cache decodes this layout
since its #346 and maps too since #661; decoders written for the positional form decode only this one.

Replay (``replay_endpoint``, a ROUTER): a DEALER sends ``[b"", start_seq]`` (8 bytes, big-endian) and gets
``[b"", seq, payload]`` for every buffered batch from ``start_seq`` on, then ``[b"", -1 (8 bytes), b""]``.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import msgpack

from scheduler.block_hash import BlockHash
from scheduler.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent
from serving.config import KVEventsConfig

logger = logging.getLogger(__name__)

# NOTE: one engine per process, so one data-parallel rank; positional decoders want the field present.
DATA_PARALLEL_RANK = 0
END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)  # the sequence frame that ends a replay
_WAIT_S = 0.05  # how long the publisher thread waits for a batch before it looks at replay requests again
_LINGER_MS = 1000  # at close, how long ZMQ may still spend sending what it has


@dataclass(slots=True)
class EventBatch:
    """One step's events, on their way from the engine thread to the publisher thread."""

    seq: int  # sequence number; taken when queued, so a dropped batch leaves a gap a subscriber can see
    ts: float  # unix seconds when the engine handed the events over
    events: list[KVCacheEvent]  # the scheduler's events, oldest first


def wire_hash(block_hash: BlockHash) -> int:
    """A block hash as it goes on the wire: its last 8 bytes as a big-endian unsigned int."""
    return int.from_bytes(block_hash[-8:], "big")


def encode_batch(ts: float, events: list[KVCacheEvent], include_salt: bool = False) -> bytes:
    """The msgpack payload of one batch (the module docstring has the layout)."""
    return msgpack.packb([ts, [_wire_event(e, include_salt) for e in events], DATA_PARALLEL_RANK],
                         use_bin_type=True)


def _wire_event(event: KVCacheEvent, include_salt: bool) -> list:
    if isinstance(event, BlockStored):
        parent = None if event.parent_block_hash is None else wire_hash(event.parent_block_hash)
        # NOTE: off by default: llm-d reads a string extra key as a multimodal hash, and the keys it computes for
        # an incoming prompt carry none, so a salted block would never match; frugal salts every block.
        extra_keys = [None if not include_salt or salt is None else [salt] for salt in event.extra_keys]
        return ["BlockStored", [wire_hash(h) for h in event.block_hashes], parent, event.token_ids,
                event.block_size, event.lora_id, event.medium, None, extra_keys]
    if isinstance(event, BlockRemoved):
        return ["BlockRemoved", [wire_hash(h) for h in event.block_hashes], event.medium]
    if isinstance(event, AllBlocksCleared):
        return ["AllBlocksCleared"]
    raise TypeError(f"not a KV cache event: {event!r}")


def topic_for(model_name: str) -> str:
    """The topic form llm-d parses, "kv@<pod>@<model>", for this host and a served model name."""
    return f"kv@{socket.gethostname()}@{model_name}"


def default_topic(model_path: str) -> str:
    """The topic when none is configured: the model named as the daemon serves it by default (the file's stem,
    or the directory's name). The daemon passes its served_model_name instead when one is set."""
    path = Path(model_path)
    return topic_for(path.stem if path.is_file() else path.name)


class _BatchQueue:
    """Bounded FIFO from the engine thread to the publisher thread. It never blocks the engine: when full, the
    oldest batch is dropped and counted."""

    def __init__(self, max_size: int) -> None:
        self._batches: deque[EventBatch] = deque()
        self._max_size = max_size
        self._cond = threading.Condition()
        self._next_seq = 0
        self.closed = False  # no more batches are accepted; the thread sends what is left and stops
        self.num_dropped = 0  # batches lost to a full queue, or offered after close

    def put(self, events: list[KVCacheEvent]) -> None:
        with self._cond:
            if self.closed:
                self.num_dropped += 1
                return
            if len(self._batches) >= self._max_size:
                self._batches.popleft()
                self.num_dropped += 1
                if self.num_dropped == 1:
                    logger.warning("KV event queue full (%d batches): dropping the oldest", self._max_size)
            self._batches.append(EventBatch(self._next_seq, time.time(), events))
            self._next_seq += 1
            self._cond.notify()

    def get(self, timeout: float) -> EventBatch | None:
        """The oldest batch, or None when none came within `timeout`."""
        with self._cond:
            if not self._batches and not self.closed:
                self._cond.wait(timeout)
            return self._batches.popleft() if self._batches else None

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    @property
    def num_queued(self) -> int:
        return len(self._batches)


class KVEventPublisher:
    """Publishes the engine's prefix-cache events from a background thread; the engine step only queues them.

    The sockets are opened here (a bad or busy address fails the engine's start) and from then on used by the
    publisher thread alone, which also closes them.
    """

    def __init__(self, config: KVEventsConfig, model_path: str) -> None:
        import zmq  # only when events are on

        self._zmq = zmq
        self.topic = config.topic if config.topic is not None else default_topic(model_path)
        self._topic_bytes = self.topic.encode()
        self._include_salt = config.include_salt
        self._queue = _BatchQueue(config.max_queue_size)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)  # (seq, payload), for replay
        self.num_published = 0  # batches sent on the PUB socket
        self._ctx = zmq.Context()  # NOTE: our own, not the process-wide instance, so close() can end it
        self._pub = self._ctx.socket(zmq.PUB)
        self._replay = None
        try:
            self._pub.setsockopt(zmq.SNDHWM, config.hwm)
            self._pub.setsockopt(zmq.LINGER, _LINGER_MS)
            self.endpoint = _open(self._pub, config.endpoint, "endpoint")
            self.replay_endpoint = None  # the replay address bound, if any
            if config.replay_endpoint is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self.replay_endpoint = _open(self._replay, config.replay_endpoint, "replay_endpoint", bind=True)
        except Exception:
            self._close_sockets(linger=0)
            self._ctx.term()
            raise
        self._thread = threading.Thread(target=self._run, name="frugal-kv-events", daemon=True)
        self._thread.start()
        logger.info("publishing KV events on %s, topic %r%s", self.endpoint, self.topic,
                    f", replay on {self.replay_endpoint}" if self.replay_endpoint else "")

    @property
    def num_dropped(self) -> int:
        """Batches never sent: dropped from a full queue, or published after close()."""
        return self._queue.num_dropped

    def publish(self, events: list[KVCacheEvent]) -> None:
        """Queue one step's events. Called from the engine thread after each step; never blocks, never raises
        for the network."""
        if events:
            self._queue.put(events)

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued (for up to `timeout`), then close the sockets. Called at engine shutdown (again:
        nothing); batches published later are dropped."""
        if self._ctx.closed:
            return
        self._queue.close()
        self._thread.join(timeout)
        if self._thread.is_alive():  # the sockets are the thread's; a daemon thread ends with the process
            logger.warning("KV event publisher did not stop within %.1f s; %d batches unsent", timeout,
                           self._queue.num_queued)
            return
        self._ctx.term()

    # -- the publisher thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                if self._replay is not None:
                    self._serve_replays()
                batch = self._queue.get(_WAIT_S)
                if batch is not None:
                    self._send(batch)
                elif self._queue.closed and not self._queue.num_queued:  # closed first: none can follow
                    return
        finally:
            self._close_sockets(linger=_LINGER_MS)

    def _send(self, batch: EventBatch) -> None:
        try:
            payload = encode_batch(batch.ts, batch.events, self._include_salt)
            # PUB never blocks: past the high-water mark ZMQ drops the message for that subscriber.
            self._pub.send_multipart([self._topic_bytes, batch.seq.to_bytes(8, "big"), payload])
        except Exception:  # one bad batch must not stop the events after it
            logger.exception("publishing KV event batch %d failed", batch.seq)
            return
        self._buffer.append((batch.seq, payload))
        self.num_published += 1

    def _serve_replays(self) -> None:
        zmq = self._zmq
        while self._replay.poll(0):
            frames = self._replay.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                logger.warning("ignoring a malformed KV event replay request (%d frames)", len(frames))
                continue
            identity, _, start = frames
            start_seq = int.from_bytes(start, "big")
            try:
                for seq, payload in self._buffer:
                    if seq >= start_seq:
                        self._replay.send_multipart([identity, b"", seq.to_bytes(8, "big"), payload])
                self._replay.send_multipart([identity, b"", END_OF_REPLAY, b""])
            except zmq.ZMQError:
                logger.exception("answering a KV event replay request failed")

    def _close_sockets(self, linger: int) -> None:
        self._pub.close(linger=linger)
        if self._replay is not None:
            self._replay.close(linger=0)


def _open(sock, address: str, key: str, bind: bool = False) -> str:
    """Binds or connects `sock`; returns the address in use (a bound "*" port resolved). vLLM's rule: an address
    with a wildcard, "::", ipc:// or inproc:// binds, any other connects (to a subscriber that binds)."""
    import zmq

    bind = bind or "*" in address or "::" in address or address.startswith(("ipc://", "inproc://"))
    try:
        if bind:
            sock.bind(address)
            return sock.getsockopt_string(zmq.LAST_ENDPOINT)
        sock.connect(address)
        return address
    except Exception as e:
        raise OSError(f"kv_events.{key}: cannot {'bind' if bind else 'connect'} {address}: {e}") from e
