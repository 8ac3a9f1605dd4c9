"""Property tests: the scheduler driven by a fake model under random arrivals, finishes and aborts.

The fake runner keeps a fake KV cache (block id -> token ids) written through the
block tables the scheduler hands out, and samples from what it reads back. So a
wrong table, a shared block overwritten, or a bad prefix hit changes the output,
and every request that was not aborted must produce exactly the tokens it
produces when run alone (house rule: a scheduler is checked against running
requests one at a time).
"""
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler import (
    BlockPool,
    ModelRunnerOutput,
    Priority,
    QueueFullError,
    Request,
    RequestStatus,
    Scheduler,
    SchedulerConfig,
)
from scheduler.block_hash import hash_block_tokens
from scheduler.policy import FairSharePolicy, WaitingQueue

VOCAB = 16
STOP_TOKEN = 0
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12], [1, 2, 3, 4, 13, 14]]  # shared starts make prefix hits
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def next_token(tokens: list[int]) -> int:
    """The fake model: a deterministic function of the whole sequence."""
    h = 17
    for token_id in tokens:
        h = (h * 31 + token_id + 1) % 1_000_003
    return (h >> 3) % VOCAB


def run_alone(prompt: list[int], max_tokens: int, max_model_len: int) -> list[int]:
    tokens, output = list(prompt), []
    while True:
        token_id = next_token(tokens)
        tokens.append(token_id)
        output.append(token_id)
        if token_id == STOP_TOKEN or len(output) >= max_tokens or len(tokens) >= max_model_len:
            return output


@dataclass
class Arrival:
    step: int
    prompt: list[int]
    tenant_id: str
    priority: Priority
    max_tokens: int
    cache_salt: str | None


@st.composite
def scenarios(draw):
    block_size = draw(st.sampled_from([1, 2, 4]))
    max_model_len = draw(st.integers(8, 32))
    max_num_seqs = draw(st.integers(1, 6))
    min_blocks = -(-max_model_len // block_size)
    config = SchedulerConfig(
        block_size=block_size,
        max_model_len=max_model_len,
        num_blocks=draw(st.integers(min_blocks, min_blocks + 8)),  # tight: preemption happens
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=draw(st.integers(max_num_seqs, 24)),
        enable_prefix_caching=draw(st.booleans()),
        enable_chunked_prefill=draw(st.booleans()),
        max_waiting=draw(st.none() | st.integers(1, 8)),
        aging_steps=draw(st.none() | st.integers(1, 10)),
        usage_half_life_steps=draw(st.integers(1, 50)),
    )
    arrival = st.builds(
        Arrival,
        step=st.integers(0, 12),
        prompt=st.tuples(st.sampled_from([[], *PREFIXES]), st.lists(st.integers(0, VOCAB - 1), max_size=12)).map(
            lambda parts: parts[0] + parts[1]
        ),
        tenant_id=st.sampled_from(["a", "b", "c"]),
        priority=st.sampled_from(list(Priority)),
        max_tokens=st.integers(1, 16),
        cache_salt=st.sampled_from([None, None, "shared"]),
    )
    arrivals = draw(st.lists(arrival, min_size=2, max_size=16))
    aborts = draw(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 15)), max_size=6))
    return config, arrivals, aborts


def check_pool(sched: Scheduler) -> None:
    """Every block is in the free queue exactly once or held; ref_cnt counts the tables holding it."""
    manager = sched.kv_cache_manager
    pool = manager.block_pool
    free_ids = pool.free_block_queue.block_ids()
    assert len(free_ids) == len(set(free_ids)) == pool.num_free_blocks
    holders = [0] * pool.num_blocks
    for req_id, blocks in manager.req_to_blocks.items():
        assert req_id in sched.running
        assert [b.block_id for b in blocks] == manager.req_to_block_ids[req_id]
        for block in blocks:
            holders[block.block_id] += 1
    free = set(free_ids)
    for block in pool.blocks:
        assert block.ref_cnt == holders[block.block_id]
        assert (block.ref_cnt == 0) == (block.block_id in free)
    for block_hash, block in pool.cached_blocks.items():
        assert block.block_hash == block_hash


def check_output(sched: Scheduler, out, kv: dict[int, list], config: SchedulerConfig) -> dict[str, int]:
    """Invariants of one SchedulerOutput; runs the fake model on it and returns its samples."""
    bs = config.block_size
    assert out.num_batched_tokens == sum(seq.num_tokens for seq in out.seqs) <= config.max_num_batched_tokens
    assert len(out.seqs) <= config.max_num_seqs and len(sched.running) <= config.max_num_seqs
    assert len({seq.req_id for seq in out.seqs}) == len(out.seqs)
    pool = sched.kv_cache_manager.block_pool
    sampled = {}
    for seq in out.seqs:
        request = sched.running[seq.req_id]
        end = seq.start_pos + seq.num_tokens
        assert seq.num_tokens >= 1
        assert seq.start_pos == request.num_computed_tokens
        assert seq.token_ids == request.all_token_ids[seq.start_pos:end]
        assert seq.sample == (end == request.num_tokens)
        assert len(seq.block_ids) == -(-end // bs)
        for i, token_id in enumerate(seq.token_ids):
            pos = seq.start_pos + i
            block_id = seq.block_ids[pos // bs]
            assert pool.blocks[block_id].ref_cnt == 1, "writing into a shared block"
            kv.setdefault(block_id, [None] * bs)[pos % bs] = token_id
        if seq.sample:
            seen = [kv[seq.block_ids[p // bs]][p % bs] for p in range(end)]
            assert seen == request.all_token_ids  # the KV the runner reads is the request's own
            sampled[seq.req_id] = next_token(seen)
    return sampled


@st.composite
def bursts(draw):
    """Many long requests at once into a pool barely larger than one request: preemption all the time."""
    block_size = draw(st.sampled_from([1, 2, 4]))
    max_model_len = draw(st.integers(16, 32))
    max_num_seqs = draw(st.integers(3, 6))
    min_blocks = -(-max_model_len // block_size)
    config = SchedulerConfig(
        block_size=block_size,
        max_model_len=max_model_len,
        num_blocks=min_blocks + draw(st.integers(0, 2)),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=draw(st.integers(max_num_seqs, 32)),
        enable_prefix_caching=draw(st.booleans()),
        enable_chunked_prefill=draw(st.booleans()),
        aging_steps=draw(st.none() | st.integers(1, 10)),
    )
    arrival = st.builds(
        Arrival,
        step=st.integers(0, 2),
        prompt=st.lists(st.integers(0, VOCAB - 1), min_size=4, max_size=16),
        tenant_id=st.sampled_from(["a", "b"]),
        priority=st.sampled_from(list(Priority)),
        max_tokens=st.integers(8, 16),
        cache_salt=st.just(None),
    )
    return config, draw(st.lists(arrival, min_size=4, max_size=12)), []


@SETTINGS
@given(scenarios())
def test_random_traffic_finishes_everything_without_leaks(scenario):
    drive(*scenario)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bursts())
def test_bursts_under_constant_preemption_finish_without_leaks(scenario):
    drive(*scenario)


def drive(config: SchedulerConfig, arrivals: list[Arrival], aborts: list[tuple[int, int]]) -> None:
    """Step the scheduler with the fake model until every request is done, checking invariants each step."""
    sched = Scheduler(config)
    kv: dict[int, list] = {}
    added: dict[str, Arrival] = {}
    finished: dict[str, RequestStatus] = {}
    outputs: dict[str, list[int]] = {}
    last_event = max([a.step for a in arrivals] + [step for step, _ in aborts] + [0])
    max_steps = last_event + 1000
    for step in range(max_steps):
        for i, arrival in enumerate(arrivals):
            if arrival.step != step:
                continue
            request = Request(
                req_id=f"r{i}",
                prompt_token_ids=list(arrival.prompt),
                max_tokens=arrival.max_tokens,
                priority=arrival.priority,
                tenant_id=arrival.tenant_id,
                cache_salt=arrival.cache_salt,
                arrival_time=float(step),
            )
            try:
                sched.add_request(request)
            except QueueFullError:
                # Preempted requests re-enter the queue without the check: nothing accepted is dropped.
                assert sched.num_waiting >= config.max_waiting
                continue
            except ValueError:
                assert not arrival.prompt or len(arrival.prompt) > config.max_model_len
                continue
            added[request.req_id] = arrival
        for abort_step, index in aborts:
            if abort_step == step and f"r{index}" in sched.requests:
                sched.abort_request(f"r{index}")
                finished[f"r{index}"] = RequestStatus.FINISHED_ABORTED

        out = sched.schedule()
        assert sched.num_waiting + sched.num_running == len(sched.requests)
        check_pool(sched)
        sampled = check_output(sched, out, kv, config)
        for request in sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids=sampled)):
            token_id = request.output_token_ids[-1]
            if (
                token_id == STOP_TOKEN
                or len(request.output_token_ids) >= request.max_tokens
                or request.num_tokens >= config.max_model_len
            ):
                sched.finish_requests(request.req_id, RequestStatus.FINISHED_STOPPED)
                finished[request.req_id] = RequestStatus.FINISHED_STOPPED
                outputs[request.req_id] = list(request.output_token_ids)
        check_pool(sched)
        if step >= last_event and not sched.has_unfinished_requests():
            break

    assert not sched.has_unfinished_requests(), f"requests still unfinished after {max_steps} steps"
    assert set(finished) == set(added)
    # No leaks: every block is back and nothing is left of any request.
    manager = sched.kv_cache_manager
    assert manager.num_free_blocks == config.num_blocks
    assert manager.req_to_blocks == manager.req_to_block_ids == manager.req_to_block_hashes == {}
    assert sched.policy._arrival_step == {}
    # The reference: each completed request's tokens match running it alone.
    for req_id, output in outputs.items():
        arrival = added[req_id]
        assert output == run_alone(arrival.prompt, arrival.max_tokens, config.max_model_len), req_id


@SETTINGS
@given(
    st.integers(1, 8),
    st.lists(
        st.tuples(st.sampled_from(["get", "free", "cache", "touch"]), st.integers(0, 7), st.integers(0, 5)),
        max_size=60,
    ),
)
def test_block_pool_random_ops_keep_every_block_accounted_for(num_blocks, ops):
    pool = BlockPool(num_blocks)
    held: list = []  # one entry per reference taken
    for op, n, key in ops:
        if op == "get":
            n = min(n, pool.num_free_blocks)
            held += pool.get_new_blocks(n)
        elif op == "free" and held:
            pool.free_blocks([held.pop(n % len(held))])
        elif op == "cache" and held:
            pool.cache_full_block(held[n % len(held)], hash_block_tokens(None, [key], None))
        elif op == "touch":
            block = pool.get_cached_block(hash_block_tokens(None, [key], None))
            if block is not None:
                pool.touch([block])
                held.append(block)
        free_ids = pool.free_block_queue.block_ids()
        assert len(free_ids) == len(set(free_ids)) == pool.num_free_blocks
        for block in pool.blocks:
            assert block.ref_cnt == sum(1 for b in held if b is block)
            assert (block.ref_cnt == 0) == (block.block_id in free_ids)
        for block_hash, block in pool.cached_blocks.items():
            assert block.block_hash == block_hash
    pool.free_blocks(list(reversed(held)))
    assert pool.num_free_blocks == num_blocks


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "add", "admit", "remove", "step"]),
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from(list(Priority)),
            st.integers(0, 50),
        ),
        min_size=20,
        max_size=80,
    ),
    st.none() | st.integers(1, 4),
)
def test_waiting_queue_admits_in_exactly_the_policy_order(ops, aging_steps):
    """The bucketed heap must pick what a brute-force min over every waiting request picks."""
    policy = FairSharePolicy(aging_steps=aging_steps, usage_half_life_steps=5)
    queue = WaitingQueue(policy)
    waiting: list[Request] = []
    step, pending = 0, {}
    for i, (op, tenant_id, priority, n) in enumerate(ops):
        if op == "add":
            request = Request(f"r{i}", [1], 1, priority=priority, tenant_id=tenant_id, arrival_time=float(step))
            policy.on_arrival(request, step)
            queue.add(request)
            waiting.append(request)
        elif op == "remove" and waiting:
            request = waiting.pop(n % len(waiting))
            assert queue.remove(request)
            assert not queue.remove(request)
        elif op == "step":
            for tenant, num_tokens in pending.items():
                policy.charge(tenant, num_tokens, step)
            step, pending = step + 1, {}
        elif op == "admit":
            request = queue.peek(step, pending)
            if not waiting:
                assert request is None
                continue
            assert request is min(waiting, key=lambda r: policy.admission_key(r, step, pending))
            queue.pop(request)
            waiting.remove(request)
            pending[request.tenant_id] = pending.get(request.tenant_id, 0) + n
        assert len(queue) == len(waiting)
        assert sorted(r.req_id for r in queue) == sorted(r.req_id for r in waiting)
