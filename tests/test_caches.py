"""The response caches: exact and semantic, scoped per tenant / route / system prompt, in process and in Redis."""
from __future__ import annotations

import asyncio
import hashlib
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.control.caches import (CachedResponse, CacheRequest, CachesConfig, ExactCacheConfig, LocalStore,
                                    ResponseCaches, Sampling, SemanticCacheConfig, caches_config, refuse)
from serving.control.caches.evaluation import (TARGET_MAX_FALSE_HIT_RATE, TARGET_MIN_HIT_RATE, guard_passes,
                                               load_pairs, rates, similarities)
from serving.control.caches.store_redis import RedisStore

SYSTEM = "You are the support assistant of Acme."


@pytest.fixture(scope="module")
def embedder():
    from serving.control.embeddings import Embedder

    return Embedder.shared()


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def req(question="How do I reset my password?", tenant="acme", route="support", system=SYSTEM, tags=(),
        opt_in=False, **sampling) -> CacheRequest:
    sampling.setdefault("temperature", 0)
    messages = ({"role": "system", "content": system},) if system is not None else ()
    return CacheRequest(tenant=tenant, route=route, messages=messages + ({"role": "user", "content": question},),
                        sampling=Sampling(**sampling), tags=tuple(tags), cache_nondeterministic=opt_in)


def answer(text="Use the reset link.", finish_reason="stop", completion_tokens=12) -> CachedResponse:
    return CachedResponse(text=text, finish_reason=finish_reason, prompt_tokens=30,
                          completion_tokens=completion_tokens, cost_usd=0.0021, model="smollm2")


def config(exact=True, semantic=True, **semantic_fields) -> CachesConfig:
    return CachesConfig(exact=ExactCacheConfig(enabled=exact, ttl_s=60),
                        semantic=SemanticCacheConfig(enabled=semantic, ttl_s=60, **semantic_fields))


@pytest.fixture(params=["local", "redis"])
def backend(request):
    """Runs a test body against each store: `backend(body)` calls `await body(make_store)`."""
    if request.param == "local":
        def run(body):
            return asyncio.run(body(lambda **kw: LocalStore(**kw)))
        return run
    url = request.getfixturevalue("redis_url")

    def run(body):
        async def main():
            import redis.asyncio as aioredis

            client = aioredis.from_url(url, decode_responses=True)
            prefix = f"test:{uuid.uuid4().hex[:8]}:"
            try:
                return await body(lambda max_entries_per_scope=512, **_: RedisStore(client, max_entries_per_scope,
                                                                                     prefix))
            finally:
                await client.aclose()
        return asyncio.run(main())
    return run


# -- exact -------------------------------------------------------------------------------------------------------
def test_exact_hit_reports_the_saved_cost_and_whitespace_does_not_matter(backend):
    async def body(make_store):
        caches = ResponseCaches(config(semantic=False), make_store())
        assert await caches.lookup(req()) is None
        await caches.store(req(), answer())
        hit = await caches.lookup(req("  How do I   reset my password?  "))
        assert hit is not None and hit.kind == "exact" and hit.similarity == 1.0
        assert hit.response == answer() and hit.saved_usd == pytest.approx(0.0021)
    backend(body)


@pytest.mark.parametrize("changed", [
    dict(temperature=0, top_p=0.5), dict(temperature=0, top_k=5), dict(temperature=0, max_tokens=10),
    dict(temperature=0, stop=("\n",)), dict(temperature=0, seed=7), dict(temperature=0, presence_penalty=0.5),
    dict(tenant="globex"), dict(system="You are a pirate."), dict(system=None), dict(route="large-model"),
    dict(question="How do I reset my password now?"),
])
def test_exact_misses_when_anything_that_changes_the_output_changes(changed):
    async def body():
        caches = ResponseCaches(config(semantic=False), LocalStore())
        await caches.store(req(), answer())
        assert await caches.lookup(req()) is not None
        assert await caches.lookup(req(**changed)) is None
    asyncio.run(body())


def test_a_sampled_request_is_cached_only_when_the_client_opts_in():
    async def body():
        caches = ResponseCaches(config(), LocalStore())
        sampled = req(temperature=0.7)
        assert not await caches.exact.put(sampled, answer())
        assert await caches.lookup(sampled) is None
        assert await caches.exact.put(req(temperature=0.7, seed=3), answer())  # a seed makes it repeatable
        opted = req(temperature=0.7, opt_in=True)
        assert await caches.exact.put(opted, answer("opted"))
        hit = await caches.lookup(opted)
        assert hit is not None and hit.response.text == "opted"
        assert not await caches.exact.put(req(logprobs=True), answer())  # no logprobs to give back
        assert not await caches.exact.put(req(n=2), answer())  # one choice stored
        assert not await caches.exact.put(req("cut"), answer(finish_reason="error"))
    asyncio.run(body())


def test_entries_expire_after_their_ttl(backend):
    async def body(make_store):
        clock = Clock()
        caches = ResponseCaches(config(), make_store(), embedder=FakeEmbedder(), clock=clock)
        await caches.store(req(), answer())
        clock.now += 59
        hit = await caches.lookup(req())
        assert hit is not None and hit.age_s == pytest.approx(59)
        assert (await caches.semantic.get(req())) is not None
        clock.now += 2
        assert await caches.lookup(req()) is None
    backend(body)


def test_invalidation_by_tag_and_by_tenant_stays_inside_the_tenant(backend):
    async def body(make_store):
        caches = ResponseCaches(config(), make_store(), embedder=FakeEmbedder())
        for tenant in ("acme", "globex"):
            await caches.store(req("What is the refund policy?", tenant=tenant, tags=("policy",)), answer(tenant))
            await caches.store(req("How do I reset my password?", tenant=tenant, tags=("account",)), answer(tenant))
        assert await caches.invalidate_tag("acme", "policy") == 2  # its exact and its semantic entry
        assert await caches.lookup(req("What is the refund policy?", tenant="acme")) is None
        assert await caches.lookup(req("How do I reset my password?", tenant="acme")) is not None
        assert await caches.lookup(req("What is the refund policy?", tenant="globex")) is not None
        assert await caches.invalidate_tenant("acme") == 2
        assert await caches.lookup(req("How do I reset my password?", tenant="acme")) is None
        assert await caches.semantic.get(req("How do I reset my password?", tenant="acme")) is None
        assert await caches.lookup(req("How do I reset my password?", tenant="globex")) is not None
        assert await caches.invalidate_tenant("acme") == 0
    backend(body)


# -- semantic ----------------------------------------------------------------------------------------------------
def test_semantic_hit_reports_its_similarity(backend, embedder):
    async def body(make_store):
        caches = ResponseCaches(config(exact=False), make_store(), embedder=embedder)
        await caches.store(req("How do I reset my password?"), answer())
        hit = await caches.lookup(req("How can I reset my password?"))
        assert hit is not None and hit.kind == "semantic"
        assert caches.config.semantic.threshold <= hit.similarity < 1.0
        assert hit.matched_question == "How do I reset my password?" and hit.saved_usd == pytest.approx(0.0021)
        assert await caches.lookup(req("How can I reset my password?", tenant="globex")) is None
        assert await caches.lookup(req("How can I reset my password?", system="Other prompt.")) is None
    backend(body)


def test_semantic_guard_refuses_a_close_polarity_flip(embedder):
    async def body():
        caches = ResponseCaches(config(exact=False), LocalStore(), embedder=embedder)
        on, off = "How do I turn on two-factor authentication?", "How do I turn off two-factor authentication?"
        await caches.store(req(on), answer())
        similarity = float(embedder.encode_one(on) @ embedder.encode_one(off))
        assert similarity >= caches.config.semantic.threshold  # cosine alone would serve it
        assert await caches.lookup(req(off)) is None
        assert caches.semantic.num_refused == 1
    asyncio.run(body())


def test_semantic_cache_serves_an_answer_only_to_a_request_that_could_have_got_it():
    async def body():
        caches = ResponseCaches(config(exact=False), LocalStore(), embedder=FakeEmbedder())
        assert not await caches.semantic.put(req("Aborted?"), answer(finish_reason="abort"))
        await caches.store(req(), answer(completion_tokens=200))
        assert await caches.lookup(req(max_tokens=500)) is not None  # a whole answer within the budget
        assert await caches.lookup(req(max_tokens=100)) is None  # longer than this request may be
        cut = "How do I change my billing address?"
        assert await caches.semantic.put(req(cut, max_tokens=64), answer(finish_reason="length", completion_tokens=64))
        assert await caches.lookup(req(cut, max_tokens=64)) is not None  # cut where this one would be cut
        assert await caches.lookup(req(cut, max_tokens=128)) is None  # this one would have gone on
        assert await caches.lookup(req(cut, max_tokens=32)) is None
    asyncio.run(body())


def test_per_route_threshold_and_bounded_scope(backend):
    async def body(make_store):
        cfg = config(exact=False, threshold=0.5, routes={"strict": {"threshold": 0.999}}, max_entries_per_scope=3)
        caches = ResponseCaches(cfg, make_store(max_entries_per_scope=3), embedder=FakeEmbedder())
        assert cfg.semantic.threshold_for("strict") == 0.999 and cfg.semantic.threshold_for("other") == 0.5
        for i in range(5):
            await caches.store(req(f"question {chr(97 + i)}"), answer(f"answer {i}"))
        entry_ids, vectors = await caches.semantic.store.scan(_scope_key(req()), 0.0)
        assert len(entry_ids) == 3 and vectors.shape == (3, FakeEmbedder.dimension)  # the two oldest went
        assert entry_ids == [hashlib.sha256(f"question {c}".encode()).hexdigest()[:32] for c in "cde"]
        hit = await caches.semantic.get(req("question e", route="strict"))
        assert hit is None  # another route is another scope
    backend(body)


def _scope_key(request: CacheRequest) -> str:
    from serving.control.caches import scope_of

    return scope_of(request).key


@pytest.mark.parametrize("a, b", [
    ("How do I turn on dark mode?", "How do I turn dark mode off?"),
    ("How do I enable notifications?", "How do I disable notifications?"),
    ("Can I cancel my order?", "Can't I cancel my order?"),
    ("I can log in.", "I cannot log in."),
    ("Can I export with attachments?", "Can I export without attachments?"),
    ("What is the status of order 48213?", "What is the status of order 48214?"),
    ("I was charged $49.", "I was charged $94."),
    ("I was charged $50.", "I was charged €50."),
    ("Can I add 5 seats?", "Can I add ten seats?"),
    ("My invoice from April is wrong.", "My invoice from August is wrong."),
    ("Why was I billed last month?", "Why was I billed this month?"),
    ("Reset the password for Sarah.", "Reset the password for Michael."),
    ("Send the receipt to anna@example.com.", "Send the receipt to anne@example.com."),
    ("Is product SKU-4471 in stock?", "Is product SKU-4417 in stock?"),
    ("Can I upgrade to the Pro plan?", "Can I upgrade to the Business plan?"),
    ("How do I upgrade my plan?", "How do I downgrade my plan?"),
])
def test_guard_refuses_known_false_hits(a, b):
    assert refuse(a, b) is not None and refuse(b, a) is not None


@pytest.mark.parametrize("a, b", [
    ("How do I set up two-factor authentication?", "How can I set up 2FA?"),
    ("Can I get a refund for order 48213?", "Can I get my money back for order #48213?"),
    ("My plan is $29 but I was billed $49.", "I was charged $49 but my plan costs $29."),
    ("How do I upgrade from Pro to Business?", "Can I move from the pro plan to the business plan?"),
    ("The password reset email never arrived.", "I never received the password reset e-mail."),
    ("Mr. Brown needs a new API key.", "A new API key for Mr. Brown, please."),
])
def test_guard_lets_paraphrases_through(a, b):
    assert refuse(a, b) is None


# -- the labelled set --------------------------------------------------------------------------------------------
def test_labelled_set_meets_the_targets_whole_and_held_out(embedder):
    pairs = load_pairs()
    assert len(pairs) >= 240
    assert sum(not p.paraphrase for p in pairs) >= 0.45 * len(pairs)
    assert {"paraphrase", "negation", "entity", "number", "date", "name", "topic"} <= {p.kind for p in pairs}
    hits = (similarities(pairs, embedder) >= SemanticCacheConfig().threshold) & guard_passes(pairs)
    held = np.array([p.held_out for p in pairs])
    for part, mask in (("whole", np.ones(len(pairs), dtype=bool)), ("held out", held)):
        measured = rates([p for p, m in zip(pairs, mask) if m], hits[mask])
        assert measured.false_hit_rate <= TARGET_MAX_FALSE_HIT_RATE, (part, measured)
        assert measured.hit_rate >= TARGET_MIN_HIT_RATE, (part, measured)


# -- isolation ---------------------------------------------------------------------------------------------------
class FakeEmbedder:
    """A vector per text from its digest: identical texts in different scopes have identical vectors (cosine 1),
    so only the scope can keep them apart."""

    dimension = 16

    def encode_one(self, text: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        vector = np.random.default_rng(seed).standard_normal(self.dimension).astype(np.float32)
        return vector / np.linalg.norm(vector)


TENANTS = st.sampled_from(["acme", "globex", "initech", "a", "a:b", "ACME"])
SYSTEMS = st.sampled_from([SYSTEM, "You are a pirate.", None])
PROMPTS = st.sampled_from(["How do I reset my password?", "Refund order 123", "Where is my parcel?", "hi"])
OPS = st.lists(st.tuples(st.booleans(), TENANTS, SYSTEMS, PROMPTS), min_size=1, max_size=30)


async def _check_isolation(caches: ResponseCaches, ops) -> None:
    stored = set()
    for is_store, tenant, system, prompt in ops:
        request = req(prompt, tenant=tenant, system=system)
        if is_store:
            await caches.store(request, answer(f"{tenant}|{system}|{prompt}"))
            stored.add((tenant, system, prompt))
            continue
        hit = await caches.lookup(request)
        if hit is not None:
            hit_tenant, hit_system, _ = hit.response.text.split("|")
            assert (hit_tenant, hit_system) == (tenant, str(system)), "a hit crossed scopes"
        if (tenant, system, prompt) in stored:
            assert hit is not None and hit.kind == "exact"


@settings(max_examples=60, deadline=None)
@given(ops=OPS)
def test_no_hit_crosses_tenants_or_system_prompts_in_process(ops):
    asyncio.run(_check_isolation(ResponseCaches(config(threshold=-1.0), LocalStore(), embedder=FakeEmbedder()), ops))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_no_hit_crosses_tenants_or_system_prompts_in_redis(redis_url, ops):
    async def main():
        import redis.asyncio as aioredis

        client = aioredis.from_url(redis_url, decode_responses=True)
        try:
            store = RedisStore(client, prefix=f"iso:{uuid.uuid4().hex[:8]}:")
            await _check_isolation(ResponseCaches(config(threshold=-1.0), store, embedder=FakeEmbedder()), ops)
        finally:
            await client.aclose()
    asyncio.run(main())


def test_replicas_share_entries_through_redis(redis_url, embedder):
    async def main():
        import redis.asyncio as aioredis

        client = aioredis.from_url(redis_url, decode_responses=True)
        prefix = f"rep:{uuid.uuid4().hex[:8]}:"
        one = ResponseCaches(config(), RedisStore(client, prefix=prefix), embedder=embedder)
        two = ResponseCaches(config(), RedisStore(client, prefix=prefix), embedder=embedder)
        await one.store(req("How do I reset my password?"), answer())
        exact = await two.lookup(req("How do I reset my password?"))
        semantic = await two.lookup(req("How can I reset my password?"))
        await client.aclose()
        assert exact is not None and exact.kind == "exact"
        assert semantic is not None and semantic.kind == "semantic" and semantic.response == answer()
    asyncio.run(main())


# -- config ------------------------------------------------------------------------------------------------------
def test_config_defaults_and_errors_name_the_key():
    cfg = caches_config(None)
    assert not cfg.exact.enabled and not cfg.semantic.enabled and cfg.exact.ttl_s == 3600
    with pytest.raises(ValueError, match=r"caches\.semantic\.threshold"):
        caches_config({"semantic": {"threshold": 2}})
    with pytest.raises(ValueError, match=r"caches\.exact\.ttl"):
        caches_config({"exact": {"ttl": 5}})
    with pytest.raises(ValueError, match="tenant"):
        CacheRequest(tenant="", route="r", messages=())


@pytest.mark.parametrize("change", [{"min_tokens": 4}, {"ignore_eos": True}, {"stop_token_ids": [7]},
                                    {"include_stop_str_in_output": True}, {"skip_special_tokens": False},
                                    {"max_tokens": 9}, {"seed": 3}, {"logprobs": 0}])
def test_every_sampling_field_that_changes_the_answer_is_in_the_exact_key(change):
    from serving.control.caches.keys import exact_key, sampling_of
    from serving.engine.sampling_params import SamplingParams

    def key(params):
        return exact_key(CacheRequest(tenant="t", route="r", messages=({"role": "user", "content": "hi"},),
                                      sampling=sampling_of(params)))

    base = dict(max_tokens=8, temperature=0.0, stop=["\n"])
    assert key(SamplingParams(**base)) == key(SamplingParams(**base))
    assert key(SamplingParams(**base)) != key(SamplingParams(**{**base, **change}))


def test_questions_from_one_template_are_compared_where_they_differ(embedder):
    from serving.control.caches.template import differing_parts

    template = ("Classify this support ticket into one category: billing, technical, account or shipping. "
                "Reply with the category word only. Ticket: {}")
    setup, send = template.format("How do I set up recurring invoices?"), template.format("How do I send an invoice reminder?")
    assert differing_parts(setup, send) == ("How do I set up recurring invoices?", "How do I send an invoice reminder?")
    assert differing_parts("How do I reset my password?", "How can I reset my password?") is None  # no template

    async def body():
        caches = ResponseCaches(config(exact=False), LocalStore(), embedder=embedder)
        await caches.store(req(setup), answer("billing"))
        assert float(embedder.encode_one(setup) @ embedder.encode_one(send)) >= caches.config.semantic.threshold
        assert await caches.lookup(req(send)) is None  # the shared instruction alone made them look alike
        same = template.format("How can I set up invoices that recur?")
        hit = await caches.lookup(req(same))
        assert hit is not None and hit.response.text == "billing"
    asyncio.run(body())
