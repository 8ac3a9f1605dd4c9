"""A short soak (benchmarks/soak.py): streaming clients over gRPC and HTTP for a while; no request may fail, and
the daemon's memory after the run may not have grown past a bound over its memory after warm-up. The full soak
is `python -m benchmarks.soak` (five minutes by default)."""
import asyncio

import pytest

from benchmarks.sharegpt import sample_requests
from benchmarks.soak import soak
from serving.loaders import default_model_path, load_tokenizer
from support import assert_clean, report

pytestmark = pytest.mark.slow

# NOTE: allocator noise on a warm daemon is a few MiB either way; a leak of even a few KiB a request
# (hundreds of requests here) would show as steady growth well past this.
MAX_RSS_GROWTH_MIB = 48


def test_short_soak(daemon):
    requests = sample_requests(load_tokenizer(default_model_path()), 32, seed=0, max_prompt_len=64,
                               max_output_len=16)
    result = asyncio.run(soak(daemon.proc.target, daemon.http_url.removeprefix("http://"), daemon.proc.proc.pid,
                              requests, duration_s=25, warmup_s=8, num_clients=3))
    print(result.format())
    growth_mib = result.rss_growth_bytes / 2**20
    report("soak: requests, error rate", f"{result.num_requests} in {result.duration_s:.0f} s, "
                                         f"{result.num_errors / max(result.num_requests, 1):.1%}")
    report("soak: RSS growth after warm-up", f"{growth_mib:+.1f} MiB ({result.rss_after_warmup_bytes / 2**20:.0f} MiB"
                                             f" after warm-up)")
    assert result.num_requests > 0 and result.num_errors == 0, result.errors
    assert growth_mib < MAX_RSS_GROWTH_MIB
    assert_clean(daemon)
