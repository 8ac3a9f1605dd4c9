"""Scheduler: exact batches for tiny configs, admission, chunking, prefix hits, aborts."""
import pytest

from scheduler import (
    ModelRunnerOutput,
    Priority,
    QueueFullError,
    Request,
    RequestStatus,
    Scheduler,
    SchedulerConfig,
    num_blocks_from_memory,
)


def make_config(**overrides):
    fields = dict(num_blocks=32, max_model_len=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
    fields.update(overrides)
    return SchedulerConfig(**fields)


def make_request(req_id, prompt_len=5, first_token=0, **kwargs):
    kwargs.setdefault("max_tokens", 8)
    prompt = list(range(first_token, first_token + prompt_len))
    return Request(req_id=req_id, prompt_token_ids=prompt, **kwargs)


def step(sched, token_id=7):
    """One engine step with a model that samples `token_id` for every request."""
    out = sched.schedule()
    sampled = {seq.req_id: token_id for seq in out.seqs if seq.sample}
    sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids=sampled))
    return out


def batch(out):
    return [(seq.req_id, seq.start_pos, seq.num_tokens) for seq in out.seqs]


# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(block_size=0), "block_size must be an int >= 1, got 0"),
        (dict(num_blocks=2.5), "num_blocks must be an int >= 1"),
        (dict(max_num_seqs=True), "max_num_seqs must be an int >= 1, got True"),
        (dict(enable_prefix_caching=1), "enable_prefix_caching must be True or False"),
        (dict(max_waiting=0), "max_waiting must be an int >= 1 or None, got 0"),
        (dict(aging_steps=-1), "aging_steps must be an int >= 1 or None"),
        (dict(max_num_batched_tokens=2), r"max_num_batched_tokens must be >= max_num_seqs \(4\), got 2"),
        (dict(num_blocks=15), r"num_blocks must be >= 16 \(max_model_len 64 / block_size 4"),
        (dict(tenant_weights={"a": 0}), r"tenant_weights\['a'\] must be a number > 0"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


def test_config_defaults():
    config = SchedulerConfig(num_blocks=100, max_model_len=256)
    assert (config.block_size, config.max_num_seqs, config.max_num_batched_tokens) == (16, 64, 512)
    assert config.enable_prefix_caching and config.enable_chunked_prefill
    assert config.max_waiting is None
    assert config.max_blocks_per_seq == 16


def test_num_blocks_from_memory():
    assert num_blocks_from_memory(10_000, 1_000) == 10
    assert num_blocks_from_memory(10_999, 1_000) == 10
    with pytest.raises(ValueError, match="holds no KV block of 1000 bytes"):
        num_blocks_from_memory(999, 1_000)
    with pytest.raises(ValueError, match="bytes_per_block must be an int >= 1"):
        num_blocks_from_memory(10, 0)
    with pytest.raises(ValueError, match="budget_bytes must be an int >= 0"):
        num_blocks_from_memory(-1, 10)


# -- add_request -------------------------------------------------------------------------------


def test_add_request_rejects_what_could_never_run():
    sched = Scheduler(make_config(max_waiting=2))
    with pytest.raises(ValueError, match="prompt is empty"):
        sched.add_request(make_request("a", prompt_len=0))
    with pytest.raises(ValueError, match=r"65 tokens, more than max_model_len \(64\)"):
        sched.add_request(make_request("a", prompt_len=65))
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        sched.add_request(make_request("a", max_tokens=0))
    sched.add_request(make_request("a"))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make_request("a"))
    sched.add_request(make_request("b"))
    with pytest.raises(QueueFullError, match="2 requests"):
        sched.add_request(make_request("c"))
    assert sched.num_waiting == 2  # nothing accepted was lost


def test_max_waiting_counts_waiting_not_running():
    sched = Scheduler(make_config(max_waiting=1))
    sched.add_request(make_request("a"))
    with pytest.raises(QueueFullError):
        sched.add_request(make_request("b"))  # "a" still waits: the one waiting slot is taken
    step(sched)
    sched.add_request(make_request("b"))  # "a" runs now, so there is room
    assert (sched.num_running, sched.num_waiting) == (1, 1)
    with pytest.raises(QueueFullError):
        sched.add_request(make_request("c"))


# -- one request -------------------------------------------------------------------------------


def test_prefill_then_decode():
    sched = Scheduler(make_config())
    request = make_request("a", prompt_len=5)
    sched.add_request(request)
    out = sched.schedule()
    (seq,) = out.seqs
    assert (seq.token_ids, seq.start_pos, seq.block_ids, seq.sample) == ([0, 1, 2, 3, 4], 0, [0, 1], True)
    assert out.num_batched_tokens == 5
    assert out.schedule_time_s >= 0.0
    assert request.status == RequestStatus.RUNNING and request.num_cached_tokens == 0
    updated = sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids={"a": 42}))
    assert updated == [request]
    assert request.output_token_ids == [42] and request.num_computed_tokens == 5
    (seq,) = sched.schedule().seqs
    assert (seq.token_ids, seq.start_pos, seq.block_ids, seq.sample) == ([42], 5, [0, 1], True)


def test_update_twice_is_an_error_and_stale_outputs_are_skipped():
    sched = Scheduler(make_config())
    sched.add_request(make_request("a"))
    sched.add_request(make_request("b"))
    out = sched.schedule()
    sched.abort_request("b")  # aborted between schedule() and update_from_output()
    sched.update_from_output(out, ModelRunnerOutput({"a": 1, "b": 1}))
    with pytest.raises(ValueError, match="applied twice"):
        sched.update_from_output(out, ModelRunnerOutput({"a": 1}))


def test_no_sampled_token_means_nothing_to_schedule():
    sched = Scheduler(make_config())
    sched.add_request(make_request("a"))
    out = sched.schedule()
    sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids={}))
    assert sched.schedule().is_empty  # never a zero-token seq


# -- chunked prefill and budgets ---------------------------------------------------------------


def test_chunked_prefill_splits_a_long_prompt():
    sched = Scheduler(make_config(max_num_batched_tokens=8))
    sched.add_request(make_request("a", prompt_len=20))
    outs = [step(sched) for _ in range(4)]
    assert [batch(o) for o in outs] == [[("a", 0, 8)], [("a", 8, 8)], [("a", 16, 4)], [("a", 20, 1)]]
    assert [o.seqs[0].sample for o in outs] == [False, False, True, True]
    assert [o.seqs[0].block_ids for o in outs[:3]] == [[0, 1], [0, 1, 2, 3], [0, 1, 2, 3, 4]]


def test_decodes_come_first_then_prefill_chunks_then_admissions():
    sched = Scheduler(make_config(max_num_batched_tokens=8))
    sched.add_request(make_request("a", prompt_len=3))
    sched.add_request(make_request("b", prompt_len=12))
    assert batch(step(sched)) == [("a", 0, 3), ("b", 0, 5)]
    sched.add_request(make_request("c", prompt_len=3))
    assert batch(step(sched)) == [("a", 3, 1), ("b", 5, 7)]
    assert batch(step(sched)) == [("a", 4, 1), ("b", 12, 1), ("c", 0, 3)]


def test_chunking_disabled_waits_for_room_but_runs_an_oversized_prompt():
    sched = Scheduler(make_config(max_num_batched_tokens=8, enable_chunked_prefill=False))
    sched.add_request(make_request("a", prompt_len=6))
    sched.add_request(make_request("b", prompt_len=6, first_token=50))
    assert batch(step(sched)) == [("a", 0, 6)]  # b does not fit the 2 tokens left and is not split
    assert batch(step(sched)) == [("a", 6, 1), ("b", 0, 6)]
    sched.abort_request("a")
    sched.abort_request("b")
    sched.add_request(make_request("big", prompt_len=20, first_token=100))  # larger than the whole budget
    assert batch(step(sched)) == [("big", 0, 8)]
    assert batch(step(sched)) == [("big", 8, 8)]
    assert batch(step(sched)) == [("big", 16, 4)]


def test_max_num_seqs_and_budget_are_respected():
    sched = Scheduler(make_config(max_num_seqs=2, max_num_batched_tokens=8))
    for i in range(4):
        sched.add_request(make_request(f"r{i}", prompt_len=3))
    assert batch(step(sched)) == [("r0", 0, 3), ("r1", 0, 3)]
    assert sched.num_running == 2 and sched.num_waiting == 2
    sched.finish_requests("r0", RequestStatus.FINISHED_STOPPED)
    assert batch(step(sched)) == [("r1", 3, 1), ("r2", 0, 3)]


# -- prefix cache ------------------------------------------------------------------------------


def test_prefix_hit_starts_at_the_cached_tokens():
    sched = Scheduler(make_config())
    sched.add_request(make_request("a", prompt_len=10))
    step(sched)
    sched.finish_requests(["a"], RequestStatus.FINISHED_STOPPED)
    assert sched.kv_cache_manager.num_free_blocks == 32
    b = make_request("b", prompt_len=10)
    sched.add_request(b)
    (seq,) = sched.schedule().seqs
    assert (seq.start_pos, seq.token_ids, seq.block_ids) == (8, [8, 9], [0, 1, 2])
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 8
    pool = sched.kv_cache_manager.block_pool
    assert (pool.prefix_cache_queries, pool.prefix_cache_hits) == (20, 8)
    assert pool.prefix_cache_hit_rate == pytest.approx(0.4)


def test_tenants_do_not_share_prefixes_unless_salted_alike():
    sched = Scheduler(make_config())
    sched.add_request(make_request("a", prompt_len=10, tenant_id="acme"))
    step(sched)
    sched.add_request(make_request("b", prompt_len=10, tenant_id="globex"))
    sched.add_request(make_request("c", prompt_len=10, tenant_id="acme"))
    out = step(sched)
    assert {seq.req_id: seq.start_pos for seq in out.seqs} == {"a": 10, "b": 0, "c": 8}


# -- policy: priority, fair share, aging -------------------------------------------------------


def test_priority_classes_admit_interactive_first():
    sched = Scheduler(make_config(max_num_seqs=1))
    sched.add_request(make_request("batch", priority=Priority.BATCH))
    sched.add_request(make_request("standard", priority=Priority.STANDARD))
    sched.add_request(make_request("interactive", priority=Priority.INTERACTIVE))
    assert [seq.req_id for seq in step(sched).seqs] == ["interactive"]


def test_fcfs_by_arrival_time_within_a_class():
    sched = Scheduler(make_config(max_num_seqs=1))
    sched.add_request(make_request("late", arrival_time=20.0))
    sched.add_request(make_request("early", arrival_time=10.0))
    assert [seq.req_id for seq in step(sched).seqs] == ["early"]


def test_fair_share_lets_a_quiet_tenant_overtake_a_flood():
    sched = Scheduler(make_config(num_blocks=512, max_num_seqs=64, max_num_batched_tokens=64))
    for i in range(50):
        sched.add_request(make_request(f"a{i}", prompt_len=32, first_token=i, tenant_id="A", max_tokens=100))
    step(sched)
    sched.add_request(make_request("b0", prompt_len=32, tenant_id="B", max_tokens=100))
    out = step(sched)
    assert "b0" in [seq.req_id for seq in out.seqs]


def test_fair_share_weights():
    config = make_config(max_num_seqs=1, tenant_weights={"gold": 4.0})
    sched = Scheduler(config)
    sched.policy.charge("gold", 300, 0)
    sched.policy.charge("basic", 100, 0)
    sched.add_request(make_request("basic", tenant_id="basic"))
    sched.add_request(make_request("gold", tenant_id="gold"))
    assert [seq.req_id for seq in step(sched).seqs] == ["gold"]  # 300 / 4 < 100


def test_usage_decays_so_idle_tenants_do_not_bank_credit():
    sched = Scheduler(make_config(usage_half_life_steps=10))
    sched.policy.charge("A", 1000, 0)
    assert sched.policy.tenant_usage("A", 10) == pytest.approx(500)
    assert sched.policy.tenant_usage("A", 30) == pytest.approx(125)


def test_aging_lifts_a_waiting_batch_request():
    sched = Scheduler(make_config(max_num_seqs=1, aging_steps=2))
    sched.add_request(make_request("old-batch", priority=Priority.BATCH, max_tokens=1))
    sched.add_request(make_request("i0", priority=Priority.INTERACTIVE, max_tokens=1))
    admitted = []
    for i in range(1, 8):
        out = step(sched)
        for seq in out.seqs:
            admitted.append(seq.req_id)
            sched.finish_requests(seq.req_id, RequestStatus.FINISHED_LENGTH)
        sched.add_request(make_request(f"i{i}", priority=Priority.INTERACTIVE, max_tokens=1))
    # Arrived at step 0 with class BATCH (2): class 1 at step 2, class 0 at step 4,
    # where its earlier arrival beats the newer interactive requests.
    assert admitted[:5] == ["i0", "i1", "i2", "old-batch", "i3"]
    assert sched.policy.effective_priority(sched.get_request("i7"), 7) == 0


def test_no_aging_when_disabled():
    sched = Scheduler(make_config(aging_steps=None))
    request = make_request("b", priority=Priority.BATCH)
    sched.add_request(request)
    assert sched.policy.effective_priority(request, 10_000) == Priority.BATCH


# -- preemption --------------------------------------------------------------------------------


def test_preemption_picks_the_lowest_class():
    sched = Scheduler(make_config(num_blocks=6, max_model_len=24))
    for i, priority in enumerate([Priority.INTERACTIVE, Priority.BATCH, Priority.STANDARD]):
        sched.add_request(make_request(f"r{i}", prompt_len=4, first_token=10 * i, priority=priority, max_tokens=20))
    step(sched)  # 3 x 1 block
    for _ in range(4):  # positions 4..7: a second block each, 0 free after the first of these
        assert step(sched).preempted_req_ids == []
    assert sched.kv_cache_manager.num_free_blocks == 0
    out = step(sched)  # position 8: r0 needs a third block first
    assert out.preempted_req_ids == ["r1"]
    assert batch(out) == [("r0", 8, 1), ("r2", 8, 1)]
    victim = sched.get_request("r1")
    assert victim.status == RequestStatus.PREEMPTED and victim.num_preemptions == 1
    assert victim.num_computed_tokens == 0 and sched.get_block_ids("r1") == []
    assert sched.num_waiting == 1
    assert sched.num_preemptions == 1


def test_a_victim_already_scheduled_is_taken_out_of_the_step():
    sched = Scheduler(make_config(num_blocks=5, max_model_len=20))
    sched.add_request(make_request("x", prompt_len=5, priority=Priority.BATCH, max_tokens=20))
    step(sched)  # x: 2 blocks
    sched.add_request(make_request("y", prompt_len=12, first_token=50, max_tokens=20))
    step(sched)  # y: 3 blocks; pool full
    out = step(sched)  # x decodes (no new block), then y needs one: x ranks last
    assert out.preempted_req_ids == ["x"]
    assert batch(out) == [("y", 12, 1)]
    assert out.num_batched_tokens == 1
    assert out.seqs[0].block_ids == [2, 3, 4, 1]  # x's freed tail block (1) went to y


def test_within_a_class_the_latest_arrival_yields_even_when_it_asks():
    sched = Scheduler(make_config(num_blocks=5, max_model_len=20))
    a = make_request("a", prompt_len=8, max_tokens=20)
    b = make_request("b", prompt_len=8, first_token=50, max_tokens=20)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)  # 2 + 2 blocks, 1 free
    out = step(sched)  # a takes the last block; b finds none and is its own victim
    assert out.preempted_req_ids == ["b"]
    assert batch(out) == [("a", 8, 1)]
    assert batch(step(sched)) == [("a", 9, 1)]  # b does not fit back yet
    sched.finish_requests("a", RequestStatus.FINISHED_STOPPED)
    out = step(sched)
    # b's two prompt blocks kept their hashes: the recompute starts after them.
    assert batch(out) == [("b", 8, 1)]
    assert b.num_cached_tokens == 0  # recorded at the first schedule only
    assert b.output_token_ids == [7, 7]


def test_choose_victim_lowest_class_then_latest_arrival():
    sched = Scheduler(make_config())
    requests = [
        make_request("old-batch", priority=Priority.BATCH, arrival_time=1.0),
        make_request("new-batch", priority=Priority.BATCH, arrival_time=2.0),
        make_request("newest-standard", arrival_time=3.0),
    ]
    for request in requests:
        sched.policy.on_arrival(request, 0)
    assert sched.policy.choose_victim(requests, 0).req_id == "new-batch"
    assert sched.policy.choose_victim(requests[:1], 0).req_id == "old-batch"


# -- finish and abort --------------------------------------------------------------------------


def test_abort_waiting_and_running_frees_everything():
    sched = Scheduler(make_config(max_num_seqs=1))
    sched.add_request(make_request("running"))
    sched.add_request(make_request("waiting"))
    step(sched)
    assert sched.kv_cache_manager.num_free_blocks < 32
    sched.abort_request("waiting")
    assert sched.num_waiting == 0
    sched.abort_request("running")
    sched.abort_request("unknown")  # harmless
    assert not sched.has_unfinished_requests()
    assert sched.kv_cache_manager.num_free_blocks == 32
    assert sched.get_request("running") is None


def test_finish_requires_a_finished_status():
    sched = Scheduler(make_config())
    sched.add_request(make_request("a"))
    with pytest.raises(ValueError, match="finished status"):
        sched.finish_requests("a", RequestStatus.RUNNING)
    request = sched.get_request("a")
    sched.finish_requests(["a"], RequestStatus.FINISHED_STOPPED)
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert sched.schedule().is_empty


def test_counters():
    sched = Scheduler(make_config(max_num_seqs=1))
    sched.add_request(make_request("a", prompt_len=5))
    sched.add_request(make_request("b", prompt_len=5))
    step(sched)
    pool = sched.kv_cache_manager.block_pool
    assert (sched.num_running, sched.num_waiting, pool.num_free_blocks, sched.num_steps) == (1, 1, 30, 1)
    assert pool.usage == pytest.approx(2 / 32)
