"""The engine watchdog: health that tells the truth.

A thread beside the engine loop declares the engine dead when
- the engine thread has stopped (crashed), or
- work waits and no step has made progress for `stall_timeout_s` (a hung step, or a scheduler that schedules
  nothing), or
- `max_consecutive_failed_steps` steps in a row have failed.
Declaring it dead fails every open request at once (AsyncLLM.declare_dead); from then on gRPC health says
NOT_SERVING, /readyz and /healthz answer 503, and the daemon exits after `exit_after_s` so that a supervisor
(Kubernetes liveness, systemd) restarts it. It runs in its own thread, not on the event loop, so it keeps
watching even while the loop is busy.
"""
from __future__ import annotations

import logging
import threading
import time
from serving.config import WatchdogConfig
from serving.engine.async_engine import AsyncLLM

logger = logging.getLogger(__name__)


class Watchdog:
    def __init__(self, async_llm: AsyncLLM, config: WatchdogConfig | None = None):
        self.async_llm = async_llm
        self.config = config or WatchdogConfig()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="frugal-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def check(self) -> str | None:
        """Why the engine should be declared dead now, or None while it is healthy."""
        llm, config = self.async_llm, self.config
        health = llm.health()
        if not health.healthy:
            return health.reason
        engine = llm.engine
        num_failed = engine.stats().steps.num_consecutive_failed_steps
        if num_failed >= config.max_consecutive_failed_steps:
            return f"{num_failed} engine steps failed in a row"
        num_unfinished = engine.num_unfinished_requests
        stalled_s = time.monotonic() - llm.heartbeat.progress_at
        if num_unfinished and stalled_s > config.stall_timeout_s:
            started = llm.heartbeat.step_started_at
            where = f"a step has been running for {time.monotonic() - started:.1f} s" if started is not None \
                else f"no step has made progress for {stalled_s:.1f} s"
            return f"the engine is stuck: {where} with {num_unfinished} requests waiting"
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.config.interval_s):
            reason = self.check()
            if reason is not None:
                self.async_llm.declare_dead(reason)
                return
