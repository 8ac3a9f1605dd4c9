"""The model router: its rules (sensitivity, tier, latency, budget, task type), the cheapest-eligible choice and
fallback order, the learned complexity classifier against the majority baseline, the CLI end to end, and the
cascade's escalation decision. Rule tests pass the complexity in, so only the classifier tests load the embedder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serving.control.router import (NoEligibleRoute, RoutePrice, Router, RouteRequest, router_config,
                                    should_escalate)
from serving.control.router.cascade import CascadePlan

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "router_examples.jsonl"

ROUTES = [
    # cheapest of all, but external: private requests must never land here
    {"id": "ext-mini", "model": "external:mini", "self_hosted": False, "usd_per_m_input": 0.01,
     "usd_per_m_output": 0.02, "quality": 1, "max_latency_ms": 900},
    {"id": "local-small", "model": "self-hosted:smollm2-135m", "self_hosted": True, "usd_per_m_input": 0.05,
     "usd_per_m_output": 0.10, "quality": 1, "max_latency_ms": 300},
    {"id": "local-large", "model": "self-hosted:gemma3-270m", "self_hosted": True, "usd_per_m_input": 0.20,
     "usd_per_m_output": 0.40, "quality": 2, "max_latency_ms": 1500, "task_types": ["code", "analysis", "faq"]},
    {"id": "ext-strong", "model": "external:strong", "self_hosted": False, "usd_per_m_input": 2.0,
     "usd_per_m_output": 8.0, "quality": 3, "max_latency_ms": 4000},
]


def make_router(**overrides) -> Router:
    raw = {"routes": ROUTES, "quality": {"simple": 1, "complex": 2}, **overrides}
    return Router(router_config(raw))


def decide(router: Router, **kwargs):
    kwargs.setdefault("tenant", "acme")
    kwargs.setdefault("private", False)
    return router.decide(RouteRequest(**kwargs))


# -- config --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, message", [
    ({"routes": [{**ROUTES[0], "self_hosted": True}]}, "router.routes[0]: route 'ext-mini': an external:"),
    ({"routes": [{**ROUTES[1], "model": "smollm2"}]}, "model must start with"),
    ({"routes": [ROUTES[1], ROUTES[1]]}, "repeated: local-small"),
    ({"routes": ROUTES, "tiers": {"free": ["nope"]}}, "tier 'free' names unknown routes nope"),
    ({"routes": ROUTES, "tenants": {"acme": "gold"}}, "unknown tier 'gold'"),
    ({"routes": [{**ROUTES[1], "qualty": 2}]}, "router.routes[0].qualty"),
    ({"routes": [{**ROUTES[1], "usd_per_m_output": None}]}, "give both usd_per_m_input and usd_per_m_output"),
])
def test_config_errors_name_the_key(raw, message):
    with pytest.raises(ValueError) as e:
        router_config(raw)
    assert message in str(e.value)


def test_unpriced_route_needs_price_of():
    raw = {"routes": [{k: v for k, v in ROUTES[1].items() if not k.startswith("usd")}]}
    with pytest.raises(ValueError, match="local-small have no usd_per_m_input"):
        Router(router_config(raw))
    router = Router(router_config(raw), price_of=lambda route: RoutePrice(0.3, 0.6))
    assert decide(router, p_complex=0.1, prompt_tokens=1000, max_tokens=500).estimated_usd == pytest.approx(6e-4)


# -- rules ---------------------------------------------------------------------------------------------------
def test_cheapest_eligible_and_fallback_order():
    d = decide(make_router(), p_complex=0.1)
    assert d.route.id == "ext-mini"  # simple: quality 1 suffices, and it is the cheapest
    # fallbacks: those meeting every rule first (cheapest first), then the rest
    assert [r.id for r in d.fallbacks] == ["local-small", "local-large", "ext-strong"]
    assert d.required_quality == 1 and "simple (p=0.10)" in d.reason


def test_complex_needs_the_strong_tier():
    d = decide(make_router(), p_complex=0.9)
    assert d.route.id == "local-large" and d.required_quality == 2
    assert [r.id for r in d.fallbacks] == ["ext-strong", "ext-mini", "local-small"]
    unknown = decide(make_router())  # no classifier, no score: the complex tier
    assert unknown.route.id == "local-large" and unknown.p_complex is None


def test_private_never_external_even_when_cheapest():
    router = make_router()
    simple = decide(router, private=True, p_complex=0.0)
    assert simple.route.id == "local-small"  # ext-mini is cheaper but external
    hard = decide(router, private=True, p_complex=1.0, over_soft_budget=True, latency_target_ms=5000)
    for d in (simple, hard, decide(router, private=True, p_complex=1.0, task_type="writing")):
        assert d.route.self_hosted and all(r.self_hosted for r in d.fallbacks)
        assert "private: self-hosted only" in d.reason
    # quality 3 exists only externally: a private complex request keeps the strongest self-hosted route
    strong = make_router(quality={"simple": 1, "complex": 3})
    d = decide(strong, private=True, p_complex=0.99)
    assert d.route.id == "local-large" and d.relaxed == ("quality",)
    # no self-hosted route open to the tenant: refused, never sent out
    tiered = make_router(tiers={"free": ["ext-mini", "ext-strong"]}, tenants={"acme": "free"})
    with pytest.raises(NoEligibleRoute, match="private data may not leave self-hosted routes"):
        decide(tiered, private=True, p_complex=0.0)


def test_latency_target_skips_slow_routes():
    d = decide(make_router(), p_complex=0.1, latency_target_ms=500)
    assert d.route.id == "local-small"  # ext-mini (900 ms) is cheaper but too slow
    # every other route misses the target: the fallbacks are ordered by cost
    assert [r.id for r in d.fallbacks] == ["ext-mini", "local-large", "ext-strong"]
    assert "latency target 500 ms" in d.reason
    complex_fast = decide(make_router(), p_complex=0.9, latency_target_ms=2000)
    assert complex_fast.route.id == "local-large"
    # nothing meets 100 ms: the fastest route is kept and the reason says so
    d = decide(make_router(), p_complex=0.1, latency_target_ms=100)
    assert d.route.id == "local-small" and "latency" in d.relaxed


def test_soft_budget_downgrades_to_cheapest_eligible():
    d = decide(make_router(), p_complex=0.95, over_soft_budget=True)
    assert d.route.id == "ext-mini" and d.required_quality is None
    assert "past a soft budget" in d.reason and d.cascade is None
    # still within the other rules: latency
    d = decide(make_router(), p_complex=0.95, over_soft_budget=True, latency_target_ms=500)
    assert d.route.id == "local-small"


def test_tenant_tier_limits_routes():
    router = make_router(tiers={"free": ["ext-mini", "local-small"], "pro": [r["id"] for r in ROUTES]},
                         tenants={"bigco": "pro", "*": "free"})
    d = decide(router, tenant="acme", p_complex=0.9)
    assert d.route.id in ("ext-mini", "local-small") and "tier free" in d.reason
    assert {r.id for r in d.fallbacks} <= {"ext-mini", "local-small"}
    assert d.relaxed == ("quality",) and d.route.id == "ext-mini"  # the strongest open to free, cheapest first
    assert decide(router, tenant="bigco", p_complex=0.9).route.id == "local-large"


def test_task_type_prefers_routes_good_for_it():
    router = make_router()
    # local-large lists code/analysis/faq; "writing" goes to the general strong route
    assert decide(router, p_complex=0.9, task_type="writing").route.id == "ext-strong"
    assert decide(router, p_complex=0.9, task_type="code").route.id == "local-large"
    d = decide(router, p_complex=0.9, task_type="writing")
    assert "task writing (header)" in d.reason and d.fallbacks[-1].id == "local-large"


def test_cost_estimate_uses_token_counts():
    d = decide(make_router(), p_complex=0.1, prompt_tokens=2_000, max_tokens=1_000)
    assert d.estimated_usd == pytest.approx((2_000 * 0.01 + 1_000 * 0.02) / 1e6)
    with pytest.raises(ValueError, match="latency_target_ms"):
        decide(make_router(), latency_target_ms=0)
    with pytest.raises(ValueError, match="p_complex"):
        decide(make_router(), p_complex=1.5)


# -- cascade -------------------------------------------------------------------------------------------------
def test_cascade_plan_escalates_to_next_stronger_route():
    router = make_router(cascade={"enabled": True, "min_mean_logprob": -0.8, "min_classifier_confidence": 0.7})
    d = decide(router, p_complex=0.2)
    assert d.route.id == "ext-mini" and d.cascade.escalate_to == "local-large"
    assert "cascade to local-large" in d.reason
    assert decide(router, p_complex=0.2, private=True).cascade.escalate_to == "local-large"
    assert decide(router, p_complex=0.9).cascade.escalate_to == "ext-strong"
    assert decide(make_router(), p_complex=0.2).cascade is None  # disabled by default


def test_cascade_escalation_decision():
    plan = CascadePlan("local-large", min_mean_logprob=-0.8, min_classifier_confidence=0.7)
    confident = should_escalate(plan, logprobs=[-0.1, -0.3, -0.2])
    assert not confident.escalate and confident.mean_logprob == pytest.approx(-0.2)
    unsure = should_escalate(plan, logprobs=[-0.5, -2.5, -1.0])
    assert unsure.escalate and "escalating to local-large" in unsure.reason
    assert unsure.mean_logprob == pytest.approx(-4.0 / 3)
    # logprobs win over the classifier
    assert not should_escalate(plan, logprobs=[-0.1], p_complex=0.9).escalate
    # without logprobs the classifier decides: p(simple) 0.6 < 0.7
    assert should_escalate(plan, p_complex=0.4).escalate
    assert not should_escalate(plan, p_complex=0.1).escalate
    assert not should_escalate(CascadePlan("x", -0.8, None), p_complex=0.4).escalate
    assert not should_escalate(None, logprobs=[-9.0]).escalate
    with pytest.raises(ValueError, match="logprobs must be finite"):
        should_escalate(plan, logprobs=[0.5])


# -- the learned classifier ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedder():
    from serving.control.embeddings import Embedder

    return Embedder.shared()


def test_training_data_is_valid_and_varied():
    from serving.control.router.training import read_examples

    examples = read_examples(DATA)
    assert len(examples) >= 300
    assert len({e.prompt for e in examples}) == len(examples)
    labels = [e.label for e in examples]
    assert 0.4 < labels.count("simple") / len(labels) < 0.6
    assert len({e.task_type for e in examples}) >= 8


def test_read_examples_names_the_bad_line(tmp_path):
    from serving.control.router.training import read_examples

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "label": "simple"}\n{"prompt": "x", "label": "hard"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: label must be one of simple, complex"):
        read_examples(bad)


def test_classifier_beats_majority_baseline_and_round_trips(embedder, tmp_path):
    from serving.control.router.classifier import ComplexityClassifier
    from serving.control.router.training import fit, read_examples, split

    examples = read_examples(DATA)
    classifier, report = fit(examples, embedder, test_fraction=0.25, seed=0)
    assert report.num_test >= 70
    assert report.accuracy >= 0.85
    assert report.accuracy >= report.baseline + 0.25, report.summary()
    assert report.task_accuracy is not None and report.task_accuracy >= report.task_baseline + 0.3

    # the saved model predicts what the fitted one does; its held-out accuracy is the one sklearn measured
    classifier.save(tmp_path / "model", {"held_out": report.as_dict()})
    loaded = ComplexityClassifier.load(tmp_path / "model")
    _, test_i = split(examples, 0.25, 0)
    texts = [examples[i].prompt for i in test_i]
    before, after = classifier.classify(texts, embedder), loaded.classify(texts, embedder)
    assert np.allclose([c.p_complex for c in before], [c.p_complex for c in after], atol=1e-5)
    assert [c.task_type for c in before] == [c.task_type for c in after]
    accuracy = np.mean([c.label == examples[i].label for c, i in zip(after, test_i)])
    assert accuracy == pytest.approx(report.accuracy)
    task_accuracy = np.mean([c.task_type == examples[i].task_type for c, i in zip(after, test_i)])
    assert task_accuracy == pytest.approx(report.task_accuracy)


def test_cli_train_then_route_with_the_classifier(embedder, tmp_path):
    out = tmp_path / "router-model"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, "-m", "serving.cli", "router", "train", "--data", str(DATA),
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "held-out accuracy" in proc.stdout and "majority baseline" in proc.stdout
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["embedder"]["name"] == "all-MiniLM-L6-v2" and meta["format_version"] == 1
    printed = float(proc.stdout.split("held-out accuracy ")[1].split()[0])
    assert printed == pytest.approx(meta["held_out"]["accuracy"], abs=1e-3)

    # the router loads it from config and classifies offline
    router = Router.from_config(router_config({"routes": ROUTES, "classifier_dir": str(out),
                                               "quality": {"simple": 1, "complex": 2}}), embedder=embedder)
    simple = decide(router, prompt="Hi, can you tell me where my order 5512 is?")
    assert simple.p_complex < 0.5 and simple.route.id == "ext-mini"
    assert simple.task_type == "status" and "(classifier)" in simple.reason
    hard = decide(router, prompt="Our Redis-backed job queue loses jobs when a worker crashes mid-task. "
                                 "Design an at-least-once delivery scheme and explain how to make handlers idempotent.")
    assert hard.p_complex >= 0.5 and hard.route.quality >= 2
    assert decide(router, prompt="Where is my order?", task_type="faq").task_type == "faq"  # the header wins

    bad = subprocess.run([sys.executable, "-m", "serving.cli", "router", "classify", "--model", str(tmp_path),
                          "--prompt", "hi"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a router classifier directory" in bad.stderr
