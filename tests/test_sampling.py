"""Sampling parameters end to end on the bundled model, and bad input rejected with a named field."""
import pytest

from serving import SamplingParams

PROMPT = "Write a short story about a robot who learns to paint."


def test_seed_reproducible_and_independent_of_batch(make_llm):
    llm = make_llm()
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    alone = llm.generate(PROMPT, params)[0]
    # Same seed inside a batch of other (unseeded) requests: same tokens.
    batch = llm.generate([PROMPT, "Hello", PROMPT, "List colours:"],
                         [params, SamplingParams(max_tokens=16, temperature=1.0),
                          SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234),
                          SamplingParams(max_tokens=8, temperature=0.8)])
    assert batch[0].token_ids == alone.token_ids
    assert batch[2].token_ids == alone.token_ids
    other = llm.generate(PROMPT, SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=99))[0]
    assert other.token_ids != alone.token_ids


def test_top_k_one_and_tiny_top_p_are_greedy(make_llm):
    llm = make_llm()
    greedy = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0))[0]
    top_k = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=1.5, top_k=1, seed=3))[0]
    top_p = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=1.5, top_p=1e-6, seed=3))[0]
    assert top_k.token_ids == greedy.token_ids
    assert top_p.token_ids == greedy.token_ids


def test_stop_strings_cut_text(make_llm):
    llm = make_llm()
    full = llm.generate("1, 2, 3, 4,", SamplingParams(max_tokens=20, temperature=0))[0]
    assert "7" in full.text
    out = llm.generate("1, 2, 3, 4,", SamplingParams(max_tokens=20, temperature=0, stop=["7"]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == "7"
    assert out.text == full.text[:full.text.index("7")]
    kept = llm.generate("1, 2, 3, 4,", SamplingParams(max_tokens=20, temperature=0, stop="7",
                                                     include_stop_str_in_output=True))[0]
    assert kept.text == full.text[:full.text.index("7") + 1]


def test_stop_token_ids_min_tokens_ignore_eos(make_llm):
    llm = make_llm()
    full = llm.generate("1, 2, 3, 4,", SamplingParams(max_tokens=10, temperature=0))[0]
    k = next(i for i in range(1, len(full.token_ids)) if full.token_ids[i] not in full.token_ids[:i])
    stop_id = full.token_ids[k]
    out = llm.generate("1, 2, 3, 4,", SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_id]))[0]
    assert out.token_ids == full.token_ids[:k + 1] and out.finish_reason == "stop" and out.stop_reason == stop_id

    chat = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(max_tokens=64, temperature=0))[0]
    assert chat.finish_reason == "stop" and chat.token_ids[-1] in llm.engine.eos_token_ids
    n = len(chat.token_ids)
    longer = llm.chat([{"role": "user", "content": "Say hi."}],
                      SamplingParams(max_tokens=64, temperature=0, min_tokens=n + 3))[0]
    assert len(longer.token_ids) >= n + 3
    assert not set(longer.token_ids[:n + 2]) & set(llm.engine.eos_token_ids)
    forced = llm.chat([{"role": "user", "content": "Say hi."}],
                      SamplingParams(max_tokens=n + 5, temperature=0, ignore_eos=True))[0]
    assert len(forced.token_ids) == n + 5 and forced.finish_reason == "length"


def test_logprobs(make_llm):
    llm = make_llm()
    out = llm.generate(PROMPT, SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True))[0]
    assert len(out.logprobs) == 5
    for token, step in zip(out.token_ids, out.logprobs):
        chosen, *top = step
        assert chosen[0] == token and chosen[1] <= 0.0
        assert len(top) == 3 and top[0][0] == token  # greedy: the chosen token is the most likely
        assert abs(top[0][1] - chosen[1]) < 1e-6


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-5), "top_k"),
    (dict(stop=[3]), "stop"),
    (dict(stop=[""]), "stop"),
    (dict(logprobs=100), "logprobs"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_rejected_engine_keeps_serving(make_llm):
    llm = make_llm(max_model_len=64)
    with pytest.raises(ValueError, match="prompt must not be empty"):
        llm.generate("", SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="context length"):
        llm.generate("word " * 100, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="prompt_token_ids must be integers"):
        llm.generate({"prompt_token_ids": [1, 10**9]}, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(["a", "b"], [SamplingParams(), SamplingParams(), SamplingParams()])
    # Nothing from the failed calls lingers; the engine serves the next request.
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.stats().num_free_blocks == llm.engine.num_blocks
    out = llm.generate("Hello", SamplingParams(max_tokens=4, temperature=0))[0]
    assert len(out.token_ids) == 4


def test_generation_stops_at_context_length(make_llm):
    llm = make_llm(max_model_len=32)
    ids = llm.tokenizer("The quick brown fox").input_ids
    out = llm.generate("The quick brown fox", SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(ids) + len(out.token_ids) == 32
