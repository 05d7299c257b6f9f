"""Errors as HTTP answers: one JSON shape (OpenAI's) for every route.

    {"error": {"message": "...", "type": "invalid_request_error", "code": "bad_input",
               "param": null}}

A realm error code (docs/protocol.md §12) maps to one HTTP status; a failure
of the realm (a node that broke, no answer in time) is a 502/503/504 with the
realm's code, never a bare 500.
"""

from __future__ import annotations

from typing import Any, Final

from daemon.client import TaskFailed

# Realm error code -> HTTP status.  Not listed: 502 (the node failed it).
STATUS_OF_CODE: Final[dict[str, int]] = {
    "bad_request": 400,
    "bad_input": 400,
    "too_large": 413,
    "too_deep": 400,
    "unsupported_version": 400,
    "unknown_type": 400,
    "unauthorized": 401,
    "banned": 403,
    "forbidden": 403,
    "conflict": 409,
    "not_found": 404,
    "rate_limited": 429,
    "queue_full": 429,
    "unavailable": 503,
    "overloaded": 503,
    "shutting_down": 503,
    "rejected": 503,
    "timeout": 504,
    "no_ack": 504,
    "cancelled": 409,
    "bad_code": 403,
    "bad_value": 400,
}
TYPE_OF_STATUS: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class ApiError(Exception):
    """An answer other than success, with the status and the realm's code."""

    def __init__(self, status: int, code: str, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.code, str(self), self.param)


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    kind = TYPE_OF_STATUS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


def from_code(code: str, message: str) -> ApiError:
    return ApiError(STATUS_OF_CODE.get(code, 502), code, message)


def from_task(exc: TaskFailed) -> ApiError:
    err = exc.update.error
    return from_code(exc.code, err.message if err else str(exc))


def unauthorized(message: str = "a valid API token is required") -> ApiError:
    return ApiError(401, "unauthorized", message)
