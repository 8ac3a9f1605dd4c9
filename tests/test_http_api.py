"""The OpenAI-compatible API through OpenAI's own client over real HTTP: answers, streams, usage, logprobs."""
import httpx
import pytest

from http_support import MODEL_NAME, serve
from serving import SamplingParams
from serving.engine.chat import chat_prompt_ids

MESSAGES = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def served(loaded_model):
    with serve(loaded_model) as s:
        yield s


@pytest.fixture(scope="module")
def client(served):
    return served.client()


def test_models_and_probes(served, client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    card = client.models.retrieve(MODEL_NAME)
    assert card.id == MODEL_NAME and card.max_model_len == 1024
    assert httpx.get(f"{served.base_url}/healthz").status_code == 200
    ready = httpx.get(f"{served.base_url}/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}


def test_chat_matches_offline_engine_and_counts_usage(served, client, make_llm):
    resp = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=12, temperature=0,
                                          user="alice")
    ref = make_llm().chat(MESSAGES, SamplingParams(max_tokens=12, temperature=0))[0]
    choice = resp.choices[0]
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-") and resp.model == MODEL_NAME
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason
    num_prompt = len(chat_prompt_ids(served.state.async_llm.tokenizer, MESSAGES))
    assert resp.usage.prompt_tokens == num_prompt
    assert resp.usage.completion_tokens == len(ref.token_ids)
    assert resp.usage.total_tokens == num_prompt + len(ref.token_ids)


def test_chat_stream_equals_non_stream(client):
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=16, temperature=0)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert "".join(content) == full.choices[0].message.content
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (full.usage.prompt_tokens, full.usage.completion_tokens)
    assert {c.id for c in chunks} == {chunks[0].id}


def test_completion_stop_string_streamed_and_not(client):
    kwargs = dict(model=MODEL_NAME, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 8,", "zzz"])
    full = client.completions.create(**kwargs)
    choice = full.choices[0]
    assert choice.finish_reason == "stop" and choice.stop_reason == " 8,"
    assert choice.text.startswith(" 5, 6, 7") and "8" not in choice.text
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "stop"
    single = client.completions.create(**{**kwargs, "stop": " 6,"})
    assert single.choices[0].text == " 5,"  # a single stop string works too


def test_seed_reproducible_and_n_choices(client):
    kwargs = dict(model=MODEL_NAME, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=1234)
    first, second = (client.completions.create(**kwargs) for _ in range(2))
    assert first.choices[0].text == second.choices[0].text
    many = client.completions.create(**kwargs, n=3, logprobs=0)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].text == first.choices[0].text  # choice 0 keeps the seed; choice i draws with seed + i
    assert many.usage.prompt_tokens == first.usage.prompt_tokens  # the prompt counts once
    assert many.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in many.choices)
    texts = {}
    for chunk in client.completions.create(**kwargs, n=3, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {c.index: c.text for c in many.choices}


def test_chat_logprobs_streamed_and_not(client):
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    resp = client.chat.completions.create(**kwargs)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert bytes(entry.bytes).decode() == entry.token
    assert "".join(e.token for e in content) == resp.choices[0].message.content
    streamed = [e for c in client.chat.completions.create(**kwargs, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]


def test_completion_logprobs(client):
    resp = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=5,
                                     temperature=0, logprobs=2)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == resp.usage.completion_tokens
    assert "".join(lp.tokens) == resp.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(chosen)
               for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))


def test_cached_tokens_reported(client):
    prompt = "Here is a long shared preamble about rivers, mountains and the sea. " * 4 + "Question: why?"
    kwargs = dict(model=MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0)
    cold, warm = (client.completions.create(**kwargs) for _ in range(2))
    assert cold.usage.prompt_tokens == warm.usage.prompt_tokens >= 48
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    # Full blocks of 16 tokens are reused; the last, partial one is recomputed.
    assert warm.usage.prompt_tokens_details.cached_tokens == (warm.usage.prompt_tokens - 1) // 16 * 16


def test_batched_prompts_token_ids_echo_and_extensions(served, client):
    ids = served.engine.tokenize("Hello")
    resp = client.completions.create(
        model=MODEL_NAME, prompt=["Red, green,", "One, two,"], max_tokens=4, temperature=0, echo=True,
        extra_body={"top_k": 5, "min_tokens": 4, "ignore_eos": True, "priority": "interactive"})
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.choices[0].text.startswith("Red, green,") and resp.choices[1].text.startswith("One, two,")
    assert resp.usage.completion_tokens == 8
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=3, temperature=0)
    by_text = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert served.wait_idle()
