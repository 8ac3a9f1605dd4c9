"""The typed request context both front ends build: who is asking (from an authenticated key, never from what
the client claims), for which workflow and task, and how sensitive the data is."""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TENANT = "default"
SENSITIVITIES = ("standard", "private")


@dataclass(frozen=True, slots=True)
class Caller:
    """What a front end read off the wire, before anything is trusted."""

    api_key: str | None  # `Authorization: Bearer ...` (HTTP header or gRPC metadata)
    workflow_id: str | None  # x-frugal-workflow-id / RequestContext.workflow_id
    task_id: str | None  # x-frugal-task-id / RequestContext.task_id
    on_behalf_of: str | None = None  # x-frugal-tenant-id: honoured for admin keys only
    sensitivity: str | None = None  # x-frugal-sensitivity: "private" keeps the data on self-hosted routes


@dataclass(frozen=True, slots=True)
class RequestContext:
    """The authenticated context a request carries through admission, the engine and the ledger."""

    tenant: str  # from the key (or "default" with auth: none); also the prefix-cache salt
    key_id: str | None  # the key's public id; None with auth: none
    role: str  # user | admin
    workflow_id: str | None  # the business workflow this call belongs to
    task_id: str | None  # the agent task (a run of several calls) it belongs to
    private: bool  # the data must not leave self-hosted routes
    allowed_models: tuple[str, ...] | None  # the key's allowlist; None: every model
    key_rpm: int | None  # the key's requests per minute
    key_tpm: int | None  # the key's tokens per minute
