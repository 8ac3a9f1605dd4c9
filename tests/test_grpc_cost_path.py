"""The HTTP chat path's cost steps on gRPC Generate / GenerateStream, in a real daemon: a repeated greedy chat call
is answered by the exact cache (cost 0, FrugalInfo.cache, a ledger row with its savings), a paraphrase by the
semantic one, a stream too; an answer HTTP stored serves gRPC for the same tenant and no other; context_chunks go
through the optimizer's steps and what they saved is reported; bad cache metadata is INVALID_ARGUMENT naming the
key. The cache-request rules themselves are checked without a daemon."""
from __future__ import annotations

import time

import grpc
import pytest

from serving.control.context import RequestContext
from serving.engine.sampling_params import SamplingParams
from serving.metrics import names
from serving.rpc import cached
from serving.rpc.gen.frugal.v1 import inference_pb2 as pb
from serving.rpc.gen.frugal.v1 import inference_pb2_grpc as pb_grpc
from test_caches_daemon import REFUND_CHUNKS, chat, cost_path_daemon, ledger_rows, metric, until_cached
from test_control_daemon import create_key

SYSTEM = "You are the support desk of Acme."  # as test_caches_daemon.chat sends it, so HTTP and gRPC agree


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    proc = cost_path_daemon(tmp_path_factory.mktemp("grpc-cost"))
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def stub(daemon):
    with grpc.insecure_channel(daemon.target) as channel:
        yield pb_grpc.InferenceServiceStub(channel)


def ask(question: str, max_tokens: int = 96, **fields) -> pb.GenerateRequest:
    """The gRPC twin of test_caches_daemon.chat: the same messages and sampling, so the same cache key."""
    messages = [pb.ChatMessage(role="system", content=SYSTEM), pb.ChatMessage(role="user", content=question)]
    return pb.GenerateRequest(chat=pb.ChatMessages(messages=messages), **fields,
                              sampling=pb.SamplingParams(max_tokens=max_tokens, stop=["\n"], temperature=0.0))


def generate(stub, key: str, request: pb.GenerateRequest, stream: bool = False, **metadata):
    meta = (("authorization", f"Bearer {key}"), *((k.replace("_", "-"), v) for k, v in metadata.items()))
    if stream:
        return list(stub.GenerateStream(request, metadata=meta, timeout=120))
    return stub.Generate(request, metadata=meta, timeout=120)


def until_grpc_cached(stub, key: str, request: pb.GenerateRequest) -> pb.GenerateResponse:
    """Answers are stored in the background, after the response: ask until the exact cache answers."""
    deadline = time.monotonic() + 30
    while True:
        resp = generate(stub, key, request)
        if resp.frugal.cache == "exact":
            return resp
        assert time.monotonic() < deadline, f"never served from the exact cache: {resp.frugal}"
        time.sleep(0.2)


def semantic_hit(stub, key: str, paraphrases: list[str]) -> bool:
    """The semantic entry is stored after the exact one, in the background (an embedding): asks paraphrases, a new
    one each time (a miss stores its own answer, so the same one again would be an exact hit), until one is
    answered by the semantic cache."""
    for i, question in enumerate(paraphrases):
        if i:
            time.sleep(0.5 * i)
        resp = generate(stub, key, ask(question))
        if resp.frugal.cache == "semantic":
            return True
        assert resp.frugal.cache == "", resp.frugal  # not yet stored: a miss, never another kind of hit
    return False


# NOTE: first, so the embedder the semantic cache shares with the context step is loaded before the cache tests.
@pytest.mark.slow
def test_context_chunks_go_through_the_optimizer_and_report_what_it_saved(daemon, stub):
    keys = {tenant: create_key(daemon, tenant) for tenant in ("lean", "plain")}
    instruction = "Always answer politely and in one sentence, and never promise a date you cannot keep."
    messages = [pb.ChatMessage(role="system", content=f"You are Acme's support desk.\n\n{instruction}"),
                pb.ChatMessage(role="user", content=f"{instruction}\n\nHow   do I    get my money back?")]
    request = pb.GenerateRequest(chat=pb.ChatMessages(messages=messages), context_chunks=REFUND_CHUNKS,
                                 sampling=pb.SamplingParams(max_tokens=32, temperature=0.0))
    plain = generate(stub, keys["plain"], request, x_frugal_cache="off")
    lean = generate(stub, keys["lean"], request, stream=True, x_frugal_cache="off")[-1]
    without = pb.GenerateRequest(chat=request.chat, sampling=pb.SamplingParams(max_tokens=1))
    no_chunks = generate(stub, keys["plain"], without, x_frugal_cache="off")
    # No step for this tenant: every chunk goes into the prompt, and nothing is removed.
    assert plain.frugal.tokens_saved == 0 and plain.usage.prompt_tokens > no_chunks.usage.prompt_tokens
    saved = lean.frugal.tokens_saved
    assert saved > 0 and lean.usage.prompt_tokens < plain.usage.prompt_tokens
    assert lean.usage.completion_tokens <= 8  # the route's max_tokens_cap
    rows = ledger_rows(daemon)
    assert rows[lean.request_id].tokens_saved == saved
    assert metric(daemon, names.TOKENS_SAVED, tenant="lean") >= saved

    only_system = pb.GenerateRequest(chat=pb.ChatMessages(messages=messages[:1]), context_chunks=REFUND_CHUNKS)
    with pytest.raises(grpc.RpcError) as err:
        generate(stub, keys["lean"], only_system)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("context_chunks")


@pytest.mark.slow
def test_a_repeated_greedy_call_is_answered_by_the_caches_at_no_cost(daemon, stub):
    key = create_key(daemon, "acme")
    request = ask("How do I reset my password?")
    first = generate(stub, key, request)
    assert first.frugal.cache == "" and first.frugal.route.startswith("self-hosted:")
    assert first.usage.cost_usd > 0 and first.finish_reason == pb.FINISH_REASON_STOP  # complete: cacheable
    hit = until_grpc_cached(stub, key, request)
    assert hit.text == first.text and hit.finish_reason == pb.FINISH_REASON_STOP
    assert hit.usage.cost_usd == 0 and hit.usage.prompt_tokens == first.usage.prompt_tokens
    assert hit.usage.completion_tokens == first.usage.completion_tokens and not hit.token_ids
    assert (hit.frugal.route, hit.frugal.similarity) == ("cache:exact", 1.0)
    rows = ledger_rows(daemon)
    assert rows[hit.request_id].cost_usd == 0 and rows[hit.request_id].cache == "exact"
    assert rows[hit.request_id].saved_usd == pytest.approx(first.usage.cost_usd)
    assert rows[first.request_id].cache is None and rows[first.request_id].cost_usd > 0

    chunks = generate(stub, key, request, stream=True)
    assert len(chunks) == 1 and chunks[0].text == first.text and chunks[0].finish_reason == pb.FINISH_REASON_STOP
    assert chunks[0].usage.cost_usd == 0 and chunks[0].frugal.cache == "exact"

    time.sleep(0.5)  # the semantic entry is stored after the exact one, in the background
    paraphrase = generate(stub, key, ask("How can I reset my password?"))
    assert paraphrase.frugal.cache == "semantic" and 0.85 <= paraphrase.frugal.similarity < 1.0, paraphrase.frugal
    assert paraphrase.text == first.text and paraphrase.usage.cost_usd == 0

    skipped = generate(stub, key, request, x_frugal_cache="off")
    assert skipped.frugal.cache == "" and skipped.usage.cost_usd > 0
    assert metric(daemon, names.EXACT_CACHE_HITS) >= 2 and metric(daemon, names.SEMANTIC_CACHE_HITS) >= 1


@pytest.mark.slow
def test_a_stream_stores_its_answer_and_http_and_grpc_share_one_tenants_cache(daemon, stub):
    # NOTE: shared on purpose: the scope (tenant, route, system prompt, earlier turns) and the exact key
    # (messages, sampling) are the same whichever front end asked, and so is the answer.
    owner = create_key(daemon, "owner")
    question = "Where is my invoice for March?"
    http_answer = chat(daemon, owner, question).json()
    until_cached(daemon, owner, question)
    from_grpc = generate(stub, owner, ask(question))
    assert from_grpc.frugal.cache == "exact" and from_grpc.text == http_answer["choices"][0]["message"]["content"]
    assert semantic_hit(stub, owner, ["Where can I find my invoice for March?", "Where do I find my invoice for March?",
                                      "Where can I find the invoice for March?"])

    streamed = generate(stub, owner, ask("What are your opening hours?"), stream=True)
    assert streamed[-1].frugal.cache == "" and streamed[-1].usage.cost_usd > 0
    until_grpc_cached(stub, owner, ask("What are your opening hours?"))

    # Each stranger asks once (its own answer is stored after it), so any hit could only be the owner's.
    for i, q in enumerate((question, "Where can I find my invoice for March?", "What are your opening hours?")):
        stranger = create_key(daemon, f"stranger-{i}")
        resp = generate(stub, stranger, ask(q), stream=i == 2)
        last = resp[-1] if i == 2 else resp
        assert last.frugal.cache == "" and last.usage.cost_usd > 0, (q, last.frugal)


@pytest.fixture(scope="module")
def careless_key(daemon):
    return create_key(daemon, "careless")


@pytest.mark.slow
@pytest.mark.parametrize("request_fields, metadata, message", [
    ({}, {"x_frugal_cache": "maybe"}, "x-frugal-cache must be on or off"),
    ({}, {"x_frugal_cache_tags": ",".join(f"t{i}" for i in range(17))}, "x-frugal-cache-tags takes at most 16"),
    ({"prompt": "Hello", "context_chunks": ["a chunk"]}, {}, "context_chunks need chat input"),
    ({"prompt_token_ids": pb.TokenIds(ids=[1, 2]), "context_chunks": ["a chunk"]}, {},
     "context_chunks need chat input"),
])
def test_bad_cache_metadata_and_misplaced_chunks_are_invalid_argument(stub, careless_key, request_fields, metadata,
                                                                      message):
    request = pb.GenerateRequest(**request_fields) if request_fields else ask("Hello?", max_tokens=4)
    for stream in (False, True):
        with pytest.raises(grpc.RpcError) as err:
            generate(stub, careless_key, request, stream=stream, **metadata)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert err.value.details().startswith(message), err.value.details()


# -- the cache-request rules, without a daemon -----------------------------------------------------------------
CTX = RequestContext(tenant="acme", key_id=None, role="user", workflow_id=None, task_id=None, private=False,
                     allowed_models=None, key_rpm=None, key_tpm=None)
MESSAGES = [{"role": "user", "content": "Hi"}]


def test_cache_options_read_the_http_header_names():
    assert cached.cache_options([]) == cached.CacheOptions(enabled=True, cache_nondeterministic=False, tags=())
    on = cached.cache_options([("authorization", "Bearer x"), ("x-frugal-cache", "On"),
                               ("x-frugal-cache-tags", " faq, billing ,,")])
    assert on == cached.CacheOptions(enabled=True, cache_nondeterministic=True, tags=("faq", "billing"))
    assert not cached.cache_options([("x-frugal-cache", "off")]).enabled


def test_a_cache_request_only_for_chat_calls_its_key_can_describe():
    greedy = SamplingParams(max_tokens=9, temperature=0.0, stop=["\n"])
    options = cached.cache_options([("x-frugal-cache-tags", "faq")])
    req = cached.cache_request(CTX, greedy, MESSAGES, "self-hosted:m", options)
    assert req.tenant == "acme" and req.tags == ("faq",) and req.cacheable
    assert (req.sampling.max_tokens, req.sampling.stop, req.sampling.temperature) == (9, ("\n",), 0.0)
    assert not cached.cache_request(CTX, SamplingParams(max_tokens=9), MESSAGES, "r", options).cacheable  # sampled
    assert cached.cache_request(CTX, greedy, None, "r", options) is None  # a prompt, not chat
    assert cached.cache_request(CTX, greedy, MESSAGES, "r", cached.cache_options([("x-frugal-cache", "off")])) is None
    # Every field that changes the answer is part of the key, so calls that differ in one never share an entry.
    base = cached.cache_request(CTX, greedy, MESSAGES, "r", options).sampling
    for changed in ({"min_tokens": 2}, {"ignore_eos": True}, {"stop_token_ids": [5]},
                    {"include_stop_str_in_output": True}):
        params = SamplingParams(max_tokens=9, temperature=0.0, stop=["\n"], **changed)
        assert cached.cache_request(CTX, params, MESSAGES, "r", options).sampling != base, changed
