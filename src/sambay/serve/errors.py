"""Errors in OpenAI's format, ``{"error": {"message", "type", "param", "code"}}``, and their HTTP statuses.

    400  malformed JSON; a lone surrogate in a string; semantic errors (a message the chat template
         rejects, max_tokens past the context)
    401  missing or wrong API key, with ``WWW-Authenticate: Bearer`` (RFC 6750)
    404  unknown model or route
    413  the prompt does not fit the context
    422  request fields of the wrong type, out of range, or missing (pydantic validation)
    429  the waiting queue is full: retry later
    503  the server is shutting down
    500  anything else: a generic message, never internals or another request's data
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from sambay.serve.schemas import ErrorResponse

log = logging.getLogger("sambay.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable_error"}


_HEADERS = {401: {"WWW-Authenticate": "Bearer"}, 429: {"Retry-After": "1"}, 503: {"Retry-After": "1"}}


class APIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        body = ErrorResponse.of(self.message, _TYPES.get(self.status, "server_error"), self.param, self.code)
        return JSONResponse(body, status_code=self.status, headers=_HEADERS.get(self.status))


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid" or (not loc and first.get("type") != "missing"):
        return APIError(400, f"the request body must be a JSON object: {first.get('msg', '')}",
                        code="invalid_json").response()
    param = ".".join(loc) or None
    message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
    return APIError(422, message, param=param, code="invalid_value").response()


def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return APIError(exc.status_code, str(exc.detail), code=None).response()


def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled %s while serving %s", type(exc).__name__, request.url.path)
    return APIError(500, "internal server error", code="internal_error").response()


def install_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` in OpenAI's format."""
    app.add_exception_handler(APIError, lambda request, exc: exc.response())
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
