"""The HTTP side of the control plane: the caller's credentials and ids from the headers, control-plane refusals
in OpenAI's error shape, and the routes agents report to (outcomes, tool calls).

Headers: `Authorization: Bearer KEY`, `x-frugal-workflow-id`, `x-frugal-task-id`, `x-frugal-sensitivity:
private`, and `x-frugal-tenant-id` (admin keys only: act for another tenant).
"""
from __future__ import annotations

import dataclasses

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from serving.control.context import Caller, RequestContext
from serving.control.errors import ControlError
from serving.http.errors import APIError, control_api_error
from serving.server_state import ServerState

_ID_MAX_CHARS = 128  # workflow and task ids: what the ledger's columns hold


def _header_id(request: Request, name: str) -> str | None:
    value = request.headers.get(name)
    if value is None or value == "":
        return None
    if len(value) > _ID_MAX_CHARS:
        raise APIError(400, f"{name} may have at most {_ID_MAX_CHARS} characters", param=name,
                       code="invalid_header")
    return value


def caller_from_request(request: Request) -> Caller:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    api_key = token.strip() if scheme.lower() == "bearer" else None
    sensitivity = request.headers.get("x-frugal-sensitivity")
    if sensitivity not in (None, "", "standard", "private"):
        raise APIError(400, f"x-frugal-sensitivity must be standard or private, got {sensitivity!r}",
                       param="x-frugal-sensitivity", code="invalid_header")
    return Caller(api_key=api_key or None, workflow_id=_header_id(request, "x-frugal-workflow-id"),
                  task_id=_header_id(request, "x-frugal-task-id"),
                  on_behalf_of=_header_id(request, "x-frugal-tenant-id"), sensitivity=sensitivity or None)


async def authenticate(state: ServerState, request: Request) -> RequestContext:
    try:
        return await state.control.authenticate(caller_from_request(request))
    except ControlError as e:
        raise control_api_error(e) from None


class OutcomeReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task_id: str = Field(min_length=1, max_length=_ID_MAX_CHARS)  # the agent task the outcome belongs to
    workflow_id: str | None = Field(default=None, max_length=_ID_MAX_CHARS)  # its workflow, if any
    outcome: str  # resolved | escalated | failed
    quality: float | None = None  # in [0, 1]


class ToolCallReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    count: int = 1  # tool calls about to be made


def install_control_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/outcomes")
    async def report_outcome(body: OutcomeReport, request: Request) -> dict:
        ctx = await authenticate(state, request)
        try:
            await state.control.report_outcome(ctx, body.task_id, body.workflow_id, body.outcome, body.quality)
        except ControlError as e:
            raise control_api_error(e) from None
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None
        return {"object": "outcome", "task_id": body.task_id, "outcome": body.outcome}

    @app.post("/v1/tasks/{task_id}/tool_calls")
    async def report_tool_calls(task_id: str, body: ToolCallReport, request: Request) -> dict:
        ctx = await authenticate(state, request)
        try:
            task = await state.control.report_tool_calls(ctx, task_id, body.count)
        except ControlError as e:
            raise control_api_error(e) from None
        except ValueError as e:
            raise APIError(400, str(e), param="count") from None
        return {"object": "task", "task_id": task_id, "calls": task.calls, "tool_calls": task.tool_calls}


async def admit_job(state: ServerState, job) -> None:
    """Admits a Job (serving/http/generation.py) through the control plane: sets `job.admission`, and lowers
    its max_tokens when a soft budget says so. Raises the refusal as an APIError."""
    try:
        job.admission = await state.control.admit(job.ctx, job.request_id, state.model_name,
                                                  sum(len(p) for p in job.prompts), job.params.max_tokens,
                                                  num_prompts=len(job.prompts), num_choices_per_prompt=job.n)
    except ControlError as e:
        raise control_api_error(e) from None
    job.admission.tokens_saved = job.tokens_saved
    if state.routing:
        job.admission.route_reason = f"{state.model_name}: the model the client asked for"
    capped = job.admission.max_tokens
    if capped < job.params.max_tokens:
        job.params = dataclasses.replace(job.params, max_tokens=capped, min_tokens=min(job.params.min_tokens, capped))
