"""KV cache events: recorded by the block pool, published in vLLM's wire format, followed by a subscriber.

The end-to-end test is what a prefix-aware router (llm-d) does: subscribe, decode, rebuild the replica's set of
cached blocks from BlockStored / BlockRemoved / AllBlocksCleared, and compare it with the engine's block pool.
"""
import random
import subprocess
import sys
import time

import msgpack
import pytest
import zmq

from scheduler.block_hash import hash_block_tokens
from scheduler.kv_cache_manager import KVCacheManager
from scheduler.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from scheduler.request import Request
from serving.config import EngineConfig, KVEventsConfig
from serving.engine.kv_events import END_OF_REPLAY, KVEventPublisher, _BatchQueue, encode_batch, wire_hash
from serving.engine.sampling_params import SamplingParams
from serving.server.config import ConfigError, config_from_dict, load_config

BS = 4
TOPIC = "kv@test-host@tiny"


def make_request(req_id, prompt, tenant_id="t", cache_salt=None):
    return Request(req_id=req_id, prompt_token_ids=list(prompt), max_tokens=8, tenant_id=tenant_id,
                   cache_salt=cache_salt)


def run_prefill(manager, request, computed_blocks=None):
    num_cached = len(computed_blocks) * BS if computed_blocks else 0
    assert manager.allocate_slots(request, request.num_tokens - num_cached, computed_blocks) is not None
    request.num_computed_tokens = request.num_tokens
    manager.cache_blocks(request, request.num_computed_tokens)


# -- recording in the scheduler -------------------------------------------------------------------


def test_nothing_is_recorded_by_default():
    manager = KVCacheManager(num_blocks=3, block_size=BS)
    for i in range(3):  # each request evicts the previous one's cached blocks
        request = make_request(f"r{i}", [i] * 9)
        run_prefill(manager, request)
        manager.free(request)
    assert manager.block_pool.kv_events is None
    assert manager.take_events() == []


def test_store_evict_and_reset_are_recorded_in_order():
    manager = KVCacheManager(num_blocks=4, block_size=BS)
    manager.enable_kv_events()
    a = make_request("a", range(10), tenant_id="acme")
    run_prefill(manager, a)
    h0 = hash_block_tokens(None, [0, 1, 2, 3], "acme")
    h1 = hash_block_tokens(h0, [4, 5, 6, 7], "acme")
    assert manager.take_events() == [BlockStored(block_hashes=[h0, h1], parent_block_hash=None,
                                                 token_ids=list(range(8)), block_size=BS,
                                                 extra_keys=["acme", "acme"])]
    # A decode step that fills the third block: one event, chained to the second.
    a.output_token_ids += [10, 11]
    a.num_computed_tokens = a.num_tokens
    assert manager.allocate_slots(a, 1) is not None
    manager.cache_blocks(a, a.num_computed_tokens)
    h2 = hash_block_tokens(h1, [8, 9, 10, 11], "acme")
    assert manager.take_events() == [BlockStored(block_hashes=[h2], parent_block_hash=h1, token_ids=[8, 9, 10, 11],
                                                 block_size=BS, extra_keys=["acme"])]
    assert manager.take_events() == []
    manager.free(a)  # free queue, head first: [unused, h2, h1, h0]
    b = make_request("b", [50] * 13, tenant_id="beta")  # 4 blocks: evicts h2, h1, h0 in that order
    assert manager.allocate_slots(b, b.num_tokens) is not None
    assert manager.take_events() == [BlockRemoved(block_hashes=[h2, h1, h0])]
    manager.free(b)
    assert manager.reset_prefix_cache()
    assert manager.take_events() == [AllBlocksCleared()]


def test_a_block_already_cached_elsewhere_is_not_announced_again():
    manager = KVCacheManager(num_blocks=8, block_size=BS)
    manager.enable_kv_events()
    prompt = list(range(9))
    first, second = make_request("x", prompt), make_request("y", prompt + [20, 21, 22, 23])
    # Both admitted before either is cached: the second computes the shared blocks again.
    assert manager.allocate_slots(first, first.num_tokens) is not None
    assert manager.allocate_slots(second, second.num_tokens) is not None
    for request in (first, second):
        request.num_computed_tokens = request.num_tokens
        manager.cache_blocks(request, request.num_computed_tokens)
    h0 = hash_block_tokens(None, prompt[:4], "t")
    h1 = hash_block_tokens(h0, prompt[4:8], "t")
    h2 = hash_block_tokens(h1, [8, 20, 21, 22], "t")
    stored = manager.take_events()
    assert [e.block_hashes for e in stored] == [[h0, h1], [h2]]
    assert stored[1].parent_block_hash == h1 and stored[1].token_ids == [8, 20, 21, 22]


# -- the wire format ------------------------------------------------------------------------------


def test_wire_bytes_are_vllms_tagged_arrays():
    """The bytes msgspec writes for vLLM's array_like, tagged, omit_defaults structs (vllm/distributed/
    kv_events.py), built here from the msgpack spec: fixarray 0x9N, fixstr 0xaN, nil 0xc0, float64 0xcb,
    uint8 0xcc, uint64 0xcf."""
    low = b"\x00" * 24 + (5).to_bytes(8, "big")
    high = b"\xaa" * 24 + bytes.fromhex("8000000000000001")
    events = [
        BlockStored(block_hashes=[low, high], parent_block_hash=None, token_ids=[1, 200], block_size=1,
                    extra_keys=["t", "t"]),
        BlockRemoved(block_hashes=[low]),
        AllBlocksCleared(),
    ]
    stored = (b"\x99\xabBlockStored" + b"\x92\x05\xcf\x80\x00\x00\x00\x00\x00\x00\x01" + b"\xc0"
              + b"\x92\x01\xcc\xc8" + b"\x01" + b"\xc0" + b"\xa3GPU" + b"\xc0")
    tail = b"\x93\xacBlockRemoved\x91\x05\xa3GPU" + b"\x91\xb0AllBlocksCleared" + b"\x00"
    head = b"\x93\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00\x93"  # [1.5, [3 events], ...
    assert encode_batch(1.5, events) == head + stored + b"\x92\xc0\xc0" + tail
    assert encode_batch(1.5, events, include_salt=True) == head + stored + b"\x92\x91\xa1t\x91\xa1t" + tail
    assert wire_hash(high) == 0x8000000000000001


def test_a_full_queue_drops_the_oldest_batch_and_counts_it():
    queue = _BatchQueue(max_size=2)
    for i in range(3):
        queue.put([AllBlocksCleared()] * (i + 1))
    assert queue.num_dropped == 1
    assert [queue.get(0).seq for _ in range(2)] == [1, 2]  # seq 0 is the gap the subscriber sees
    assert queue.get(0) is None


# -- the publisher --------------------------------------------------------------------------------


def _publisher(**kwargs):
    return KVEventPublisher(KVEventsConfig(enabled=True, endpoint="tcp://127.0.0.1:*", topic=TOPIC, **kwargs),
                            model_path="unused")


def _subscribe(ctx, publisher):
    """A SUB socket that is surely connected, and the number of probes that took: empty-cache AllBlocksCleared
    batches, sent until one arrives, since a PUB drops what it sends before the subscription reaches it."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(publisher.endpoint)
    sub.subscribe(TOPIC.encode())
    num_probes = 0
    deadline = time.monotonic() + 10
    while not sub.poll(20):
        assert time.monotonic() < deadline, "the subscription never reached the publisher"
        publisher.publish([AllBlocksCleared()])
        num_probes += 1
    return sub, num_probes


def _receive_all(sub, publisher):
    """Every message up to the last batch the publisher sent (call after close())."""
    messages = []
    while not messages or int.from_bytes(messages[-1][1], "big") < publisher.num_published - 1:
        assert sub.poll(5000), f"stopped after {len(messages)} of {publisher.num_published} batches"
        messages.append(sub.recv_multipart())
    return messages


def test_replay_resends_buffered_batches_from_a_sequence_number():
    publisher = _publisher(replay_endpoint="tcp://127.0.0.1:*", buffer_steps=3)
    ctx = zmq.Context()
    try:
        for i in range(5):
            publisher.publish([BlockRemoved(block_hashes=[bytes([i]) * 32])])
        deadline = time.monotonic() + 10
        while publisher.num_published < 5:  # sent (to no subscriber) and buffered
            assert time.monotonic() < deadline
            time.sleep(0.01)
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(publisher.replay_endpoint)
        dealer.send_multipart([b"", (1).to_bytes(8, "big")])
        replies = []
        while True:
            assert dealer.poll(5000), "no replay answer"
            empty, seq, payload = dealer.recv_multipart()
            assert empty == b""
            if seq == END_OF_REPLAY:
                assert payload == b""
                break
            replies.append((int.from_bytes(seq, "big"), payload))
    finally:
        publisher.close()
        ctx.destroy(linger=0)
    # buffer_steps=3 keeps seqs 2..4; asked from 1, that is all of them, in order.
    assert [seq for seq, _ in replies] == [2, 3, 4]
    for seq, payload in replies:
        assert msgpack.unpackb(payload)[1] == [["BlockRemoved", [wire_hash(bytes([seq]) * 32)], "GPU"]]


def test_a_busy_address_fails_naming_the_key():
    first = _publisher()
    try:
        with pytest.raises(OSError, match=r"kv_events\.endpoint: cannot bind"):
            KVEventPublisher(KVEventsConfig(enabled=True, endpoint=first.endpoint.replace("127.0.0.1", "*")),
                             model_path="unused")
    finally:
        first.close()


# -- the engine, end to end -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 2-layer Llama (vocab 96) from test_loaders, fast enough to run a real workload in seconds."""
    from test_loaders import _tiny_hf
    from serving.loaders import load_model

    path = tmp_path_factory.mktemp("tiny-llama")
    _tiny_hf(path, "llama")
    return load_model(str(path))


def _engine_config(**kv_events):
    # 2 layers x 2 KV heads x 16 dims x K and V x fp32 = 2048 bytes per 4-token block: 24 blocks, 96 tokens.
    return EngineConfig(block_size=BS, kv_cache_memory_bytes=24 * 2048, max_model_len=64, max_num_seqs=6,
                        max_num_batched_tokens=48, quantization="none", num_threads=1,
                        kv_events=KVEventsConfig(**kv_events))


def _run_workload(engine, rng, num_rounds, requests):
    """Random arrivals with shared prefixes and several tenants; fills `requests` (req_id -> [salt, tokens])."""
    prefixes = [[rng.randrange(2, 96) for _ in range(rng.randrange(8, 21))] for _ in range(3)]
    for _ in range(num_rounds):
        for _ in range(rng.randrange(0, 4)):
            prompt = rng.choice(prefixes) + [rng.randrange(2, 96) for _ in range(rng.randrange(0, 13))]
            tenant = rng.choice(["alpha", "beta", "gamma"])
            salt = "shared" if rng.random() < 0.25 else None
            params = SamplingParams(max_tokens=rng.randrange(1, 11), temperature=0, ignore_eos=True)
            req_id = engine.add_request(prompt, params, tenant_id=tenant, cache_salt=salt)
            requests[req_id] = [salt or tenant, list(prompt)]
        for out in engine.step():
            if out.finished:
                requests[out.req_id][1] = out.prompt_token_ids + out.token_ids
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                requests[out.req_id][1] = out.prompt_token_ids + out.token_ids


def test_subscriber_rebuilds_the_engines_cached_blocks(tiny_model):
    from serving.engine.llm_engine import LLMEngine

    engine = LLMEngine(_engine_config(enabled=True, endpoint="tcp://127.0.0.1:*", topic=TOPIC, include_salt=True),
                       loaded=tiny_model)
    publisher = engine.kv_event_publisher
    ctx = zmq.Context()
    try:
        sub, num_probes = _subscribe(ctx, publisher)
        rng = random.Random(1234)
        requests = {}
        _run_workload(engine, rng, 40, requests)
        assert engine.scheduler.reset_prefix_cache()  # idle: its AllBlocksCleared goes out with the next step
        _run_workload(engine, rng, 40, requests)
        pool = engine.scheduler.kv_cache_manager.block_pool
        expected = {wire_hash(h) for h in pool.cached_blocks}
        engine.close()
        messages = _receive_all(sub, publisher)
    finally:
        ctx.destroy(linger=0)

    assert publisher.num_dropped == 0
    seqs = [int.from_bytes(seq, "big") for _, seq, _ in messages]
    first_seq = seqs[0]  # probes sent before the subscription took are lost; from the first one on, nothing is
    assert first_seq < num_probes and seqs == list(range(first_seq, publisher.num_published))
    cached: set[int] = set()
    digests: dict[int, bytes] = {}  # wire hash -> full digest, for every block ever stored
    prefixes: dict[int, tuple[str, list[int]]] = {}  # wire hash -> (salt, every token up to the block's end)
    counts = {"BlockStored": 0, "BlockRemoved": 0, "AllBlocksCleared": 0}
    for topic, _, payload in messages:
        assert topic == TOPIC.encode()
        ts, events, rank = msgpack.unpackb(payload)
        assert isinstance(ts, float) and rank == 0
        for event in events:
            counts[event[0]] += 1
            if event[0] == "AllBlocksCleared":
                assert event == ["AllBlocksCleared"]
                cached.clear()
            elif event[0] == "BlockRemoved":
                _, hashes, medium = event
                assert medium == "GPU" and set(hashes) <= cached
                cached.difference_update(hashes)
            else:
                _, hashes, parent, token_ids, block_size, lora_id, medium, lora_name, extra_keys = event
                assert (block_size, lora_id, medium, lora_name) == (BS, None, "GPU", None)
                assert len(token_ids) == BS * len(hashes) and len(extra_keys) == len(hashes)
                # The parent is the root or a block announced before. NOTE: not always one still cached: when
                # two requests computed the same block at once, only one copy is indexed, and once that copy
                # is evicted the other request's next block names a parent the pool no longer has.
                assert parent is None or parent in digests
                for i, block_hash in enumerate(hashes):
                    (salt,) = extra_keys[i]
                    tokens = token_ids[i * BS:(i + 1) * BS]
                    digest = hash_block_tokens(None if parent is None else digests[parent], tokens, salt)
                    assert wire_hash(digest) == block_hash, "hash does not follow from parent, tokens and salt"
                    before = [] if parent is None else prefixes[parent][1]
                    prefixes[block_hash] = (salt, before + tokens)
                    digests[block_hash] = digest
                    cached.add(block_hash)
                    parent = block_hash
    assert cached == expected and len(expected) == len(pool.cached_blocks)
    # Every stored block's tokens are a prefix of some request of the same salt.
    for salt, prefix in prefixes.values():
        assert any(s == salt and tokens[:len(prefix)] == prefix for s, tokens in requests.values())
    # The workload did what it is for: evictions, prefix hits, several salts, the reset.
    assert counts["BlockRemoved"] > 0 and pool.prefix_cache_hits > 0
    assert len({salt for salt, _ in prefixes.values()}) == 4
    assert counts["AllBlocksCleared"] == num_probes - first_seq + 1


def test_events_are_off_by_default_and_import_no_zmq(tiny_model):
    """Off by default: nothing recorded, no publisher; in a fresh process zmq is never even imported."""
    from serving.engine.llm_engine import LLMEngine

    engine = LLMEngine(_engine_config(), loaded=tiny_model)
    assert engine.kv_event_publisher is None
    engine.add_request([5, 6, 7, 8, 9, 10, 11, 12, 13], SamplingParams(max_tokens=3, temperature=0))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler.kv_cache_manager.block_pool.kv_events is None
    engine.close()
    code = ("import sys\nfrom serving.loaders import load_model\nfrom serving.engine.llm_engine import LLMEngine\n"
            "from serving.config import EngineConfig\nfrom serving.engine.sampling_params import SamplingParams\n"
            f"engine = LLMEngine(EngineConfig(model={tiny_model.path!r}, block_size=4, "
            "kv_cache_memory_bytes=24 * 2048, max_model_len=64, quantization='none', num_threads=1))\n"
            "engine.add_request([5, 6, 7, 8, 9], SamplingParams(max_tokens=2, temperature=0))\n"
            "while engine.has_unfinished_requests():\n    engine.step()\n"
            "print('zmq' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


# -- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, key", [
    ({"max_queue_size": 0}, "max_queue_size"),
    ({"hwm": -1}, "hwm"),
    ({"endpoint": "localhost:5557"}, "endpoint"),
    ({"replay_endpoint": "tcp://*:5557"}, "replay_endpoint"),
    ({"enabled": "yes"}, "enabled"),
])
def test_a_bad_value_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"^{key} must"):
        KVEventsConfig(**kwargs)


def test_frugal_yaml_kv_events_section(tmp_path):
    path = tmp_path / "frugal.yaml"
    path.write_text("served_model_name: smol\n"
                    "kv_events:\n  enabled: true\n  endpoint: tcp://epp.default:5557\n"
                    "  replay_endpoint: tcp://*:5558\n  max_queue_size: 64\n")
    config = load_config(str(path))
    assert config.kv_events == KVEventsConfig(enabled=True, endpoint="tcp://epp.default:5557",
                                              replay_endpoint="tcp://*:5558", max_queue_size=64)
    engine_events = config.engine_config().kv_events
    assert engine_events.enabled and engine_events.endpoint == "tcp://epp.default:5557"
    # The topic names the model as clients ask for it, the form llm-d parses.
    assert engine_events.topic.startswith("kv@") and engine_events.topic.endswith("@smol")
    assert engine_events.topic.count("@") == 2
    assert not config_from_dict({}).engine_config().kv_events.enabled
    with pytest.raises(ConfigError, match=r"kv_events\.max_queue_size must be an integer >= 1"):
        config_from_dict({"kv_events": {"max_queue_size": 0}})
    with pytest.raises(ConfigError, match=r"unknown key kv_events\.port"):
        config_from_dict({"kv_events": {"port": 5557}})
    with pytest.raises(ConfigError, match=r"kv_events\.endpoint must be a ZMQ address"):
        config_from_dict({"kv_events": {"enabled": True, "endpoint": "5557"}})
