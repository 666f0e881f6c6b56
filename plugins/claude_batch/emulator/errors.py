"""API errors as the Claude API reports them: an HTTP status plus a typed JSON body.

Every error body has the shape ``{"type": "error", "error": {"type", "message"}, "request_id"}``.
"""

from __future__ import annotations

# The error type the real API uses for each HTTP status it returns.
ERROR_TYPE_BY_STATUS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

DEFAULT_MESSAGE_BY_STATUS: dict[int, str] = {
    429: "Number of requests has exceeded your rate limit (emulated).",
    500: "Internal server error (emulated).",
    504: "Request timed out (emulated).",
    529: "Overloaded",
}


class ApiError(Exception):
    """An error the emulator answers with instead of a normal response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or ERROR_TYPE_BY_STATUS.get(status, "api_error")
        self.headers = headers or {}

    def body(self, request_id: str) -> dict:
        return error_body(self.error_type, self.message, request_id)


def error_body(error_type: str, message: str, request_id: str | None) -> dict:
    """The JSON error envelope, used both for HTTP errors and nested in errored batch results."""
    return {"type": "error", "error": {"type": error_type, "message": message}, "request_id": request_id}


def invalid_request(message: str) -> ApiError:
    return ApiError(400, message)


def not_found(message: str) -> ApiError:
    return ApiError(404, message)
