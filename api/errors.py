"""One error shape for every failure: ``{"error": {"code", "message", "details"}}``.

FastAPI's own 422 (request validation) and Starlette's 404/405 are rewritten into it, and an
unexpected exception becomes a 500 in the same shape (its text is logged, not returned).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ldd.api")


class APIError(Exception):
    """Raise anywhere in a request to answer ``status`` with the error shape."""

    def __init__(
        self, status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.headers = status, code, message, details, headers


class ErrorBody(BaseModel):
    code: str = Field(..., examples=["invalid_request"])
    message: str = Field(..., examples=["schedule.epochs: Input should be greater than or equal to 1"])
    details: Any = Field(None, description="structured details (field errors, dataset problems, ...)")


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_response(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": jsonable_encoder(details)}}
    return JSONResponse(body, status_code=status, headers=headers)


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
    507: "insufficient_storage",
}


# What each error status means, for the ``responses=`` of the routes' OpenAPI documentation.
_MEANINGS = {
    400: "malformed request (bad JSON, bad zip, undecodable image)",
    401: "missing or wrong API key",
    404: "not found",
    409: "conflict with the resource's state",
    413: "upload too large",
    415: "unsupported media type",
    422: "validation failed (the message says which field and why)",
    429: "too many active jobs for this tenant (LDD_MAX_ACTIVE_JOBS)",
    503: "the model's detect queue is full (LDD_DETECT_QUEUE; see Retry-After) or the model cannot be loaded",
    504: "not served within X-Request-Timeout-Ms",
    507: "not enough free space in the data folder (LDD_MIN_FREE_BYTES)",
}


def error_docs(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``{status: {"model": ErrorResponse, "description": ...}}`` for a route's ``responses=``."""
    return {s: {"model": ErrorResponse, "description": _MEANINGS[s]} for s in statuses}


def _field_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        # "body" is FastAPI's own prefix; users know the fields by their names in the JSON.
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        out.append({"field": ".".join(loc) or None, "message": e.get("msg", ""), "type": e.get("type", "")})
    return out


def validation_message(details: list[dict[str, Any]]) -> str:
    parts = [f"{d['field']}: {d['message']}" if d["field"] else d["message"] for d in details[:5]]
    more = f" (and {len(details) - 5} more)" if len(details) > 5 else ""
    return "; ".join(parts) + more


def invalid_request(e: ValidationError) -> APIError:
    """A pydantic error on a body the route parsed itself (FastAPI did not) -> the same 422 as FastAPI's."""
    details = [
        {"field": ".".join(str(p) for p in err["loc"]) or None, "message": err["msg"], "type": err["type"]}
        for err in e.errors()
    ]
    return APIError(422, "invalid_request", validation_message(details), details)


def _allowed_methods(request: Request) -> list[str]:
    """The methods the OpenAPI document gives the request's path (what a client was told it may send)."""
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        if re.fullmatch(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)), request.url.path):
            methods |= {m.upper() for m in operations}
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            ctx = next(e for e in errors if e.get("type") == "json_invalid").get("ctx") or {}
            return error_response(
                400, "malformed_json", f"the request body is not valid JSON: {ctx.get('error', 'parse error')}"
            )
        details = _field_errors(errors)
        return error_response(422, "invalid_request", validation_message(details), details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        if exc.status_code == 405:
            # Starlette names the methods of the first route matching the path only; a path served by two
            # routes (GET and POST /v1/jobs) must answer with both.
            allowed = _allowed_methods(request)
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
            message = f"{request.method} is not allowed on {request.url.path}; allowed: {', '.join(allowed)}"
        return error_response(exc.status_code, code, message, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error; the server log has the details")
