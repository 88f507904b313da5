"""OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}` with a status.

`APIError` is raised wherever a request is found wrong (reading and checking it, building
its prompt); the app answers it with `error_response`, as it answers its own errors.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers

    def response(self) -> JSONResponse:
        return error_response(
            self.status, self.message, self.param, self.code, self.kind, self.headers
        )


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    kind: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)
