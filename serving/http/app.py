"""The OpenAI-compatible HTTP app: `create_app(state)` -> FastAPI, served by uvicorn inside the daemon.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /v1/models/{model}, the agent
reports POST /v1/outcomes and POST /v1/tasks/{task_id}/tool_calls (serving/http/control.py), GET /metrics
(Prometheus; serving/metrics/), and plain probes: GET /healthz (liveness: 200 while the engine is alive, 503 once
the watchdog has declared it dead, so that Kubernetes restarts the pod) and GET /readyz (200 only while new
requests are welcome).
"""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from serving.http.body_limit import BodyLimitMiddleware
from serving.http.cache_admin import install_cache_routes
from serving.http.chat import create_chat_completion
from serving.http.completions import create_completion
from serving.http.control import install_control_routes
from serving.http.dashboard import dashboard_router
from serving.http.errors import install_error_handlers
from serving.http.generation import ServingContext, check_model, readiness
from serving.http.logprobs import TokenTexts
from serving.http.protocol import ChatCompletionRequest, CompletionRequest
from serving.http.responses import ModelCard, ModelList
from serving.server_state import ServerState


def create_app(state: ServerState) -> FastAPI:
    tokenizer = state.tokenizers.loop_tokenizer
    ctx = ServingContext(state=state, tokenizer=tokenizer, token_texts=TokenTexts(tokenizer))
    app = FastAPI(title="frugal", summary="OpenAI-compatible API of the frugal serving daemon")
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=state.limits.max_body_bytes)

    def model_card(model_id: str | None = None) -> ModelCard:
        served = state.models.get(model_id) if model_id is not None else None
        if served is not None:
            return ModelCard(id=served.id, created=state.created, max_model_len=served.max_model_len)
        if model_id is not None and model_id in state.upstreams:
            return ModelCard(id=model_id, created=state.created, owned_by="external")
        return ModelCard(id=state.model_name, created=state.created, max_model_len=state.max_model_len)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        health = state.async_llm.health()
        if health.healthy:
            return JSONResponse({"status": "alive"})
        return JSONResponse({"status": "unhealthy", "reason": health.reason}, status_code=503)

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        status = readiness(state)
        return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        """Prometheus scrape endpoint (an operator endpoint: unauthenticated, like vLLM's)."""
        if state.metrics is None:
            return JSONResponse({"error": {"message": "metrics are off (metrics.enabled: false)",
                                           "type": "not_found_error", "code": "not_found"}}, status_code=404)
        from serving.metrics.registry import CONTENT_TYPE

        return Response(await state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        if state.routing:
            return ModelList(data=[model_card(m) for m in state.model_ids()])
        return ModelList(data=[model_card()])

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> ModelCard:
        if state.routing and model in state.model_ids():
            return model_card(model)
        check_model(state, model)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(ctx, body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(ctx, body, request)

    install_control_routes(app, state)
    install_cache_routes(app, state)
    app.include_router(dashboard_router())  # operator page over /metrics (no key, like /metrics)

    return app
