"""The cost benchmark's shipped workload (benchmarks/data/cost_workload.jsonl): its schema, that the generator
(benchmarks/cost_workload.py) reproduces it for seed 0, and that it holds what each of frugal's levers acts on."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from benchmarks.cost_workload import DEFAULT_OUT, MIN_DERIVED_GAP, SYSTEM_PROMPTS
from serving.control.caches.guard import refuse
from serving.control.caches.keys import CacheRequest, Sampling, exact_key, normalise_whitespace

REPO = Path(__file__).resolve().parent.parent
ROLES = {"system", "user", "assistant"}


@pytest.fixture(scope="module")
def items() -> list[dict]:
    return [json.loads(line) for line in DEFAULT_OUT.read_text(encoding="utf-8").splitlines()]


def _key(item: dict) -> str:
    sampling = Sampling(temperature=item["temperature"], max_tokens=item["max_tokens"])
    return exact_key(CacheRequest(tenant=item["tenant"], route="small", messages=tuple(item["messages"]),
                                  sampling=sampling))


def _question(item: dict) -> str:
    return item["messages"][-1]["content"]


def _originals(items: list[dict]) -> dict[str, tuple[int, dict]]:
    """question_id -> (position, item) of each question's first single-turn asking."""
    return {item["meta"]["question_id"]: (i, item) for i, item in enumerate(items)
            if item["meta"]["variant"] == "original" and item["meta"]["shape"] == "single_turn"}


def _repeats_a_paragraph(item: dict) -> bool:
    """Whether a system or user message repeats a paragraph of an earlier one (what the dedupe step drops)."""
    paragraphs = Counter(normalise_whitespace(p).lower() for m in item["messages"] if m["role"] != "assistant"
                         for p in m["content"].split("\n\n") if len(p.split()) >= 6)
    return any(count > 1 for count in paragraphs.values())


def test_every_line_has_the_schema(items):
    assert 160 <= len(items) <= 220
    for n, item in enumerate(items):
        where = f"line {n + 1}"
        for key, kind in (("task_id", str), ("workflow_id", str), ("tenant", str), ("messages", list),
                          ("max_tokens", int), ("outcome_check", dict), ("complexity", str), ("meta", dict)):
            assert isinstance(item.get(key), kind), f"{where}: {key} is {item.get(key)!r}"
        assert item["task_id"] and item["workflow_id"] and item["tenant"], where
        assert item["messages"], where
        for message in item["messages"]:
            assert set(message) == {"role", "content"}, where
            assert message["role"] in ROLES and isinstance(message["content"], str) and message["content"], where
        assert item["messages"][-1]["role"] == "user", where
        assert not isinstance(item["max_tokens"], bool) and item["max_tokens"] >= 1, where
        assert isinstance(item["temperature"], (int, float)) and not isinstance(item["temperature"], bool), where
        assert 0 <= item["temperature"] <= 2, where
        if "context_chunks" in item:
            chunks = item["context_chunks"]
            assert isinstance(chunks, list) and chunks and all(isinstance(c, str) and c for c in chunks), where
        check = item["outcome_check"]
        assert check["kind"] in ("nonempty", "contains_any"), where
        if check["kind"] == "contains_any":
            assert check["values"] and all(isinstance(v, str) and v for v in check["values"]), where
        assert item["complexity"] in ("simple", "complex"), where


def test_tickets_are_contiguous_and_small(items):
    sizes = Counter(item["task_id"] for item in items)
    assert set(sizes.values()) <= {1, 2, 3}
    seen, previous = set(), None
    for item in items:
        if item["task_id"] != previous:
            assert item["task_id"] not in seen, f"{item['task_id']} is split"
            seen.add(item["task_id"])
            previous = item["task_id"]


def test_the_generator_reproduces_the_shipped_file(tmp_path):
    out = tmp_path / "workload.jsonl"
    subprocess.run([sys.executable, "-m", "benchmarks.cost_workload", "--out", str(out), "--seed", "0"], cwd=REPO,
                   check=True, capture_output=True, timeout=300)
    assert out.read_bytes() == DEFAULT_OUT.read_bytes(), "regenerate: python -m benchmarks.cost_workload --seed 0"
    assert DEFAULT_OUT.stat().st_size < 410_000  # NOTE: it is committed; ~400 KB is the budget


def test_each_tenant_shares_one_long_system_prompt(items):
    prompts = {}
    for item in items:
        assert item["messages"][0]["role"] == "system"
        prompts.setdefault(item["tenant"], set()).add(item["messages"][0]["content"])
    assert len(prompts) >= 2
    assert all(prompts[tenant] == {SYSTEM_PROMPTS[tenant]} for tenant in prompts)
    assert all(len(prompt) > 1_000 for prompt in SYSTEM_PROMPTS.values())  # ~300 tokens and more


def test_questions_asked_again_come_well_after_the_original(items):
    tickets = list(dict.fromkeys(item["task_id"] for item in items))
    originals = _originals(items)
    for item in items:
        if item["meta"]["variant"] in ("repeat", "paraphrase", "near_miss", "other_tenant"):
            _, original = originals[item["meta"]["question_id"]]
            gap = tickets.index(item["task_id"]) - tickets.index(original["task_id"])
            assert gap > MIN_DERIVED_GAP, f"{item['task_id']} is only {gap} tickets after {original['task_id']}"


def test_repeats_hit_the_exact_cache_of_an_earlier_question(items):
    originals = _originals(items)
    repeats = [(i, item) for i, item in enumerate(items) if item["meta"]["variant"] == "repeat"]
    assert len(repeats) >= 10
    for i, repeat in repeats:
        j, original = originals[repeat["meta"]["question_id"]]
        assert j < i and repeat["tenant"] == original["tenant"]
        assert repeat["temperature"] == 0
        assert normalise_whitespace(_question(repeat)) == normalise_whitespace(_question(original))
        assert _key(repeat) == _key(original)


def test_paraphrases_pass_the_guard_and_near_misses_do_not(items):
    originals = _originals(items)
    kinds = Counter(item["meta"]["variant"] for item in items)
    assert kinds["paraphrase"] >= 10 and kinds["near_miss"] >= 3 and kinds["other_tenant"] >= 2
    for i, item in enumerate(items):
        variant = item["meta"]["variant"]
        if variant not in ("paraphrase", "near_miss", "other_tenant"):
            continue
        j, original = originals[item["meta"]["question_id"]]
        assert j < i and item["max_tokens"] == original["max_tokens"] and item["temperature"] == 0
        if variant == "other_tenant":
            assert item["tenant"] != original["tenant"] and _question(item) == _question(original)
            assert _key(item) != _key(original)
            continue
        assert item["tenant"] == original["tenant"] and _question(item) != _question(original)
        reason = refuse(_question(item), _question(original))
        if variant == "paraphrase":
            assert reason is None, f"{_question(item)!r} vs {_question(original)!r}: {reason}"
        else:
            assert reason is not None, f"the guard lets {_question(item)!r} through for {_question(original)!r}"


def test_the_mix_has_every_lever_s_material(items):
    shapes = Counter(item["meta"]["shape"] for item in items)
    multi_turn = [item for item in items if item["meta"]["shape"] == "multi_turn"]
    assert len(multi_turn) >= 10
    assert all(3 <= len(item["messages"]) - 2 <= 8 for item in multi_turn)  # earlier turns, system and last left out
    assert any(item["messages"][1]["role"] == "assistant" for item in multi_turn)
    assert any("  " in m["content"] or "\n\n\n" in m["content"] for item in multi_turn for m in item["messages"])
    assert sum(map(_repeats_a_paragraph, multi_turn)) >= len(multi_turn) / 3

    with_context = [item for item in items if "context_chunks" in item]
    assert len(with_context) >= 10 and shapes["context"] == len(with_context)
    for item in with_context:
        relevant = item["meta"]["relevant_chunks"]
        assert 5 <= len(item["context_chunks"]) <= 10 and 1 <= len(relevant) <= 2
        assert all(0 <= i < len(item["context_chunks"]) for i in relevant)

    triage = [item for item in items if item["workflow_id"] == "ticket-triage"]
    assert 0.05 <= len(triage) / len(items) <= 0.15
    assert all(item["outcome_check"]["kind"] == "contains_any" and item["temperature"] == 0 and
               item["max_tokens"] <= 8 and item["meta"]["category"] in item["outcome_check"]["values"]
               for item in triage)

    assert sum(item["meta"]["source"] == "sharegpt" for item in items) >= 10
    assert 0 < sum(item["complexity"] == "complex" for item in items) < len(items) / 4
    assert 0 < sum(item["temperature"] > 0 for item in items) < len(items) / 4
    assert sum(item["max_tokens"] for item in items) / len(items) <= 96
