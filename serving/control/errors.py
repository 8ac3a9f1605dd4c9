"""The control plane's refusals, each with the HTTP status, OpenAI-style code and gRPC status both front ends send.

The messages are for the client: they name what was refused and why (the budget's scope, id, limit and period;
the limit that was hit), never another tenant's data and never a key.
"""
from __future__ import annotations

import grpc


class ControlError(Exception):
    http_status = 400
    code = "invalid_request"
    error_type = "invalid_request_error"
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, retry_after_s: float | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s  # for 429s: when trying again can succeed
        self.param = param  # the request field at fault, if one is


class InvalidApiKey(ControlError):
    http_status, code, error_type, grpc_status = 401, "invalid_api_key", "authentication_error", \
        grpc.StatusCode.UNAUTHENTICATED


class ModelNotAllowed(ControlError):
    http_status, code, error_type, grpc_status = 403, "model_not_allowed", "permission_error", \
        grpc.StatusCode.PERMISSION_DENIED


class NotPermitted(ControlError):
    http_status, code, error_type, grpc_status = 403, "permission_denied", "permission_error", \
        grpc.StatusCode.PERMISSION_DENIED


class RateLimitExceeded(ControlError):
    http_status, code, error_type, grpc_status = 429, "rate_limit_exceeded", "rate_limit_error", \
        grpc.StatusCode.RESOURCE_EXHAUSTED


class BudgetExceeded(ControlError):
    """The message starts with `budget_exceeded` and names the budget."""

    http_status, code, error_type, grpc_status = 429, "budget_exceeded", "rate_limit_error", \
        grpc.StatusCode.RESOURCE_EXHAUSTED


class TaskNotFound(ControlError):
    http_status, code, error_type, grpc_status = 404, "task_not_found", "not_found_error", grpc.StatusCode.NOT_FOUND


class ControlUnavailable(ControlError):
    """The store behind budgets and limits (Redis) did not answer; the request was not admitted."""

    http_status, code, error_type, grpc_status = 503, "control_unavailable", "service_unavailable_error", \
        grpc.StatusCode.UNAVAILABLE
