"""The daemon's YAML config: defaults, overrides, and errors that name the bad key."""
import subprocess
import sys

import pytest

from serving.server.config import DEFAULT_MAX_WAITING, ConfigError, config_from_dict, load_config

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_defaults_bound_the_queue():
    config = load_config(None)
    engine = config.engine_config()
    assert (config.host, config.grpc_port, config.http_port) == ("127.0.0.1", 50051, 8000)
    assert engine.max_waiting == DEFAULT_MAX_WAITING and engine.model is None


def test_shipped_example_is_valid():
    config = load_config(str(REPO_ROOT / "frugal.yaml"))
    engine = config.engine_config()
    assert engine.kv_cache_memory_bytes == 1 << 30 and engine.max_waiting == 256 and config.log_level == "INFO"


def test_limits_and_watchdog_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tokenizer_workers: 3\nlimits:\n  max_body_bytes: 1MiB\n  max_stop_strings: 4\n"
                    "watchdog:\n  stall_timeout_s: 5\n  exit_after_s: 0\n")
    config = load_config(str(path))
    assert config.tokenizer_workers == 3
    assert (config.limits.max_body_bytes, config.limits.max_stop_strings) == (1 << 20, 4)
    assert config.limits.max_prompt_chars == 262_144  # the rest keep their defaults
    assert (config.watchdog.stall_timeout_s, config.watchdog.exit_after_s) == (5.0, 0.0)
    assert config.watchdog.max_consecutive_failed_steps == 5


def test_file_values_and_cli_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("grpc_port: 6000\nhttp_port: null\nlog_level: debug\nengine:\n"
                    "  kv_cache_memory_bytes: 96MiB\n  max_model_len: 1024\n  enable_prefix_caching: false\n"
                    "  max_waiting: 8\n  tenant_weights: {a: 2}\n")
    config = load_config(str(path), {"grpc_port": 7000, "host": None})
    engine = config.engine_config()
    assert config.grpc_port == 7000 and config.host == "127.0.0.1" and config.http_port is None
    assert config.log_level == "DEBUG"
    assert engine.kv_cache_memory_bytes == 96 << 20 and engine.max_model_len == 1024
    assert engine.enable_prefix_caching is False and engine.max_waiting == 8 and engine.tenant_weights == {"a": 2.0}


@pytest.mark.parametrize("raw, message", [
    ({"grpc_prot": 1}, "unknown key grpc_prot"),
    ({"engine": {"max_num_seq": 4}}, "unknown key engine.max_num_seq"),
    ({"engine": {"model": "x"}}, "unknown key engine.model"),
    ({"grpc_port": "50051"}, "grpc_port must be an integer"),
    ({"grpc_port": 70000}, "grpc_port must be an integer in [0, 65535]"),
    ({"http_port": True}, "http_port must be an integer"),
    ({"host": ""}, "host must be a non-empty string"),
    ({"drain_grace_s": -1}, "drain_grace_s must be a number >= 0"),
    ({"log_level": "LOUD"}, "log_level must be one of"),
    ({"engine": {"max_waiting": 0}}, "engine.max_waiting must be an integer >= 1"),
    ({"engine": {"backend": "tgi"}}, "engine.backend must be one of native, vllm"),
    ({"engine": {"backend": "vllm"}, "kv_events": {"enabled": True}}, "engine.backend: vllm publishes vLLM's own"),
    ({"engine": {"enable_prefix_caching": "yes"}}, "engine.enable_prefix_caching must be true or false"),
    ({"engine": {"kv_cache_memory_bytes": "lots"}}, "engine.kv_cache_memory_bytes must be a positive number"),
    ({"engine": {"max_model_len": 1.5}}, "engine.max_model_len must be an integer"),
    ({"engine": {"dtype": "int3"}}, "engine.dtype must be one of"),
    ({"engine": {"tenant_weights": {"a": -1}}}, "engine.tenant_weights must map"),
    ({"engine": [1, 2]}, "engine must be a mapping"),
    ({"model": "/no/such/model.gguf"}, "model: no such file"),
    ({"grpc_port": 9000, "http_port": 9000}, "http_port and grpc_port must differ"),
    ({"limits": {"max_stop": 4}}, "unknown key limits.max_stop; allowed: limits.max_body_bytes"),
    ({"limits": {"max_body_bytes": "huge"}}, "limits.max_body_bytes must be a positive number of bytes"),
    ({"limits": {"max_logprobs": 21}}, "limits.max_logprobs must be an integer in [1, 20]"),
    ({"limits": {"max_prompt_chars": 0}}, "limits.max_prompt_chars must be an integer >= 1"),
    ({"limits": [1]}, "limits must be a mapping"),
    ({"watchdog": {"stall_timeout_s": 0}}, "watchdog.stall_timeout_s must be a number >= 0.001"),
    ({"watchdog": {"max_consecutive_failed_steps": 0}}, "watchdog.max_consecutive_failed_steps must be an integer"),
    ({"watchdog": {"exit_after": 1}}, "unknown key watchdog.exit_after"),
    ({"tokenizer_workers": 0}, "tokenizer_workers must be an integer in [1, 64]"),
    ({"control": {"auth": "maybe"}}, "control.auth: Input should be 'none' or 'keys'"),
    ({"control": {"budgets": [{"scope": "tenant", "id": "a"}]}}, "control.budgets[0]: a budget needs usd, tokens"),
    ({"control": {"budgets": [{"scope": "team", "id": "a", "usd": 1}]}}, "control.budgets[0].scope"),
    ({"control": {"budgets": [{"scope": "tenant", "id": "a", "usd": -1}]}}, "control.budgets[0].usd"),
    ({"control": {"budgets": [{"scope": "tenant", "id": "a", "usd": 1, "perod": "day"}]}},
     "control.budgets[0].perod: Extra inputs are not permitted"),
    ({"control": {"budgets": [{"scope": "tenant", "id": "a", "usd": 1, "fallback": {"max_tokens": 8}}]}},
     "fallback applies to soft budgets only"),
    ({"control": {"budgets": [{"scope": "tenant", "id": "a", "usd": 1}, {"scope": "tenant", "id": "a", "tokens": 5}]}},
     "two budgets for tenant 'a' over the same period"),
    ({"control": {"pricing": {"models": {"m": {"usd_per_hour": 1, "usd_per_m_input": 1}}}}},
     "control.pricing.models.m: give usd_per_hour or the usd_per_m_* token prices"),
    ({"control": {"tasks": {"max_calls": 0}}}, "control.tasks.max_calls"),
    ({"control": {"redis": "localhost"}}, "control.redis: Extra inputs are not permitted"),
])
def test_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert message in str(err.value)


def test_bad_override_and_bad_files_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="grpc_port"):
        config_from_dict({}, {"grpc_port": -1})
    path = tmp_path / "bad.yaml"
    path.write_text("engine: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path))
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "missing.yaml"))


def test_serve_refuses_a_bad_config_before_loading_anything(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("engine:\n  max_waitng: 4\n")
    result = subprocess.run([sys.executable, "-m", "serving.cli", "serve", "--config", str(path)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "engine.max_waitng" in result.stderr and "engine.max_waiting" in result.stderr
