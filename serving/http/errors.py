"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, whatever went wrong.

Every failure the client can cause or meet becomes one of these with a status OpenAI's client maps to its own
exception classes (400 BadRequestError, 404 NotFoundError, 429 RateLimitError, 503 InternalServerError). A bug
in this server becomes a 500 with a generic message and a logged traceback; the client never sees the trace.
"""
from __future__ import annotations

import logging
import math
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from scheduler import QueueFullError
from serving.control.errors import ControlError
from serving.control.ledger import LedgerUnavailable
from serving.engine.async_engine import EngineDeadError
from serving.limits import LimitExceeded

logger = logging.getLogger(__name__)

_LEADING_FIELD = re.compile(r"^([a-z_]+)(\[\d+\])?")
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


class APIError(Exception):
    """An error response; raise it anywhere in a handler."""

    def __init__(self, status_code: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code = status_code  # HTTP status
        self.message = message  # for the client: says what was wrong and, where it can, what is allowed
        self.type = type  # OpenAI's error type
        self.param = param  # the request field at fault, if one is
        self.code = code  # a stable machine-readable reason, if there is one
        self.headers = headers  # e.g. Retry-After

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unavailable(message: str, code: str) -> APIError:
    return APIError(503, message, type="service_unavailable_error", code=code)


def param_of(message: str, known_fields: set[str], aliases: dict[str, str], default: str | None) -> str | None:
    """The request field a ValueError message names. Engine messages start with the field ("top_p must be ...",
    "messages[2] needs ..."); `aliases` renames engine fields to the request's own ("prompt" -> "messages")."""
    match = _LEADING_FIELD.match(message)
    if match is None or (match.group(1) not in known_fields and match.group(1) not in aliases):
        return default
    return aliases.get(match.group(1), match.group(1)) + (match.group(2) or "")


def from_engine_error(exc: Exception, retry_after_ms: int, known_fields: set[str], aliases: dict[str, str],
                      default_param: str | None) -> APIError | None:
    """The response for an exception out of AsyncLLM.generate; None for one that is a bug here."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, LimitExceeded):
        return bad_request(str(exc), exc.param, code="limit_exceeded")
    if isinstance(exc, ValueError):
        return bad_request(str(exc), param_of(str(exc), known_fields, aliases, default_param))
    if isinstance(exc, QueueFullError):
        retry_after = max(1, math.ceil(retry_after_ms / 1000))
        return APIError(429, f"server is at capacity: {exc}", type="rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(retry_after)})
    if isinstance(exc, EngineDeadError):
        return unavailable(f"the engine is not running: {exc}", code="engine_dead")
    if isinstance(exc, LedgerUnavailable):
        return unavailable(str(exc), code="ledger_unavailable")
    if isinstance(exc, ControlError):
        return control_api_error(exc)
    return None


def control_api_error(exc: ControlError) -> APIError:
    """A control-plane refusal (401, 403, 404, 429 with Retry-After) in OpenAI's shape."""
    headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))} if exc.retry_after_s else None
    return APIError(exc.http_status, exc.message, type=exc.error_type, param=exc.param, code=exc.code,
                    headers=headers)


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status_code, headers=err.headers)


def _validation_param(loc: tuple) -> str | None:
    """("body", "messages", 0, "content") -> "messages[0].content"."""
    parts = [p for p in loc if p != "body"]
    param = ""
    for part in parts:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in part or "-" in part or part[:1].isupper():
            continue  # a union member's tag ("str", "list[int]", "ContentPart"), not a field
        else:
            param += f".{part}" if param else part
    return param or None


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    if exc.status_code == 500:  # a 503 (draining, engine gone) is expected and said elsewhere
        logger.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status_code, exc.message)
    return error_response(exc)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return error_response(bad_request("request body is not valid JSON", code="invalid_json"))
    param = _validation_param(tuple(first.get("loc", ())))
    message = f"{param}: {first['msg']}" if param else first["msg"]
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return error_response(bad_request(message, param))


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: ("not_found_error", "not_found"), 405: ("invalid_request_error", "method_not_allowed")}
    type_, code = codes.get(exc.status_code, ("invalid_request_error" if exc.status_code < 500 else "server_error",
                                             None))
    detail = exc.detail if isinstance(exc.detail, str) else "request failed"
    message = f"{request.method} {request.url.path}: {detail}"
    return error_response(APIError(exc.status_code, message, type=type_, code=code, headers=exc.headers))


async def _on_limit(request: Request, exc: LimitExceeded) -> JSONResponse:
    return error_response(bad_request(str(exc), exc.param, code="limit_exceeded"))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error in %s %s", request.method, request.url.path)
    return error_response(APIError(500, "internal server error", type="server_error", code="internal_error"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(LimitExceeded, _on_limit)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
