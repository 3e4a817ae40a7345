"""Every error of the API as ``application/problem+json`` (RFC 9457), mapped in one place.

A problem has a stable ``type`` (``/problems/<code>``), the machine-readable ``code``, a
``title`` that depends only on the code, a ``detail`` for this occurrence, the ``instance``
(request path) and the ``request_id`` to quote when reporting it. Validation problems carry
the per-field messages in ``errors``.
"""

from __future__ import annotations

import http
import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import flask
import marshmallow as ma
import structlog
from flask_smorest import Blueprint as SmorestBlueprint
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from ledger.errors import LedgerError

PROBLEM_CONTENT_TYPE = "application/problem+json"
log = structlog.get_logger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

# HTTP errors raised by Flask/werkzeug/webargs, by status: the stable code each becomes.
_HTTP_CODES = {
    400: "invalid_input",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    # webargs answers 422 by default; our parser says 400, this is a safety net.
    422: "invalid_input",
    500: "internal_error",
    503: "unavailable",
}


class Problem(Exception):
    """An error the API itself raises (authentication, readiness, missing headers)."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        errors: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = dict(headers or {})
        self.errors = errors

    @classmethod
    def invalid_body(cls, message: str) -> Problem:
        """A body whose fields are each valid but that is not as a whole (400 invalid_input)."""
        return cls(400, "invalid_input", message, errors={"json": {"_schema": [message]}})


class ProblemSchema(ma.Schema):
    """RFC 9457 problem details (documentation only: problems are built by :func:`problem`)."""

    type = ma.fields.String(metadata={"description": "Stable URI reference: /problems/<code>"})
    title = ma.fields.String(metadata={"description": "Short summary; the same for every problem of a code"})
    status = ma.fields.Integer(metadata={"description": "HTTP status"})
    detail = ma.fields.String(metadata={"description": "What went wrong in this request"})
    code = ma.fields.String(metadata={"description": "Stable machine-readable code"})
    instance = ma.fields.String(metadata={"description": "The request path"})
    request_id = ma.fields.String(metadata={"description": "Quote it when reporting the problem"})
    errors = ma.fields.Dict(metadata={"description": "Field messages of a validation problem, by location"})


def current_request_id() -> str:
    value = flask.g.get("request_id")
    return value if isinstance(value, str) else ""


def title_of(code: str) -> str:
    return code.replace("_", " ").capitalize()


def problem(
    status: int,
    code: str,
    detail: str,
    *,
    errors: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> flask.Response:
    """A problem+json response."""
    body: dict[str, Any] = {
        "type": f"/problems/{code}",
        "title": title_of(code),
        "status": status,
        "detail": detail,
        "code": code,
        "instance": flask.request.path if flask.has_request_context() else "",
        "request_id": current_request_id(),
    }
    if errors is not None:
        body["errors"] = errors
    response = flask.Response(json.dumps(body, default=str), status=status, content_type=PROBLEM_CONTENT_TYPE)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _http_code(status: int) -> str:
    known = _HTTP_CODES.get(status)
    if known is not None:
        return known
    try:
        return http.HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "http_error"


def handle_http_exception(error: HTTPException) -> flask.Response:
    status = error.code or 500
    if status == 422:
        status = 400
    data = getattr(error, "data", None) or {}
    headers: dict[str, str] = dict(data.get("headers") or {})
    if isinstance(error, MethodNotAllowed) and error.valid_methods:
        headers["Allow"] = ", ".join(sorted(error.valid_methods))
    messages = data.get("errors", data.get("messages"))
    if messages is not None:
        return problem(
            status,
            "invalid_input",
            data.get("message") or "The request is not valid; see errors for each field.",
            errors=messages,
            headers=headers,
        )
    if status >= 500:
        log.error("http.server_error", status=status, error=str(error))
        return problem(status, _http_code(status), "The server could not answer this request.")
    detail = data.get("message") or error.description or http.HTTPStatus(status).phrase
    return problem(status, _http_code(status), str(detail), headers=headers)


def handle_ledger_error(error: LedgerError) -> flask.Response:
    return problem(error.status, error.code, error.message)


def handle_problem(error: Problem) -> flask.Response:
    return problem(error.status, error.code, error.detail, headers=error.headers, errors=error.errors)


def handle_unexpected(error: Exception) -> flask.Response:
    # The client learns nothing of the internals; the log has the traceback and the request id.
    log.exception("http.unhandled_exception", error_type=type(error).__name__)
    return problem(
        500,
        "internal_error",
        "An unexpected error occurred; quote the request id when reporting it.",
    )


def register_error_handlers(app: flask.Flask) -> None:
    """Route every error of ``app`` to a problem+json response (replaces flask-smorest's)."""
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(LedgerError, handle_ledger_error)
    app.register_error_handler(Problem, handle_problem)
    app.register_error_handler(Exception, handle_unexpected)


def documents_problems(*statuses: int) -> Callable[[F], F]:
    """Document the problem responses an operation may give, besides the default one."""
    responses = {str(s): http.HTTPStatus(s).name for s in statuses}
    decorator: Callable[[F], F] = SmorestBlueprint.doc(responses=responses)
    return decorator
