"""The admin API application factory."""

from __future__ import annotations

import http
import re
import time
import uuid
import weakref

import flask
import sqlalchemy as sa
import structlog
from flask_smorest import Api

from admin_api.auth import SECURITY_SCHEME
from admin_api.errors import PROBLEM_CONTENT_TYPE, Problem, ProblemSchema, register_error_handlers
from admin_api.metrics import ApiMetrics
from admin_api.resources import (
    EXTENSION_KEY,
    LedgerState,
    accounts,
    assets,
    audit_log,
    entries,
    escrows,
    exceptions,
    history,
    holds,
    ledger_state,
    ops,
    points,
    reconciliation,
    staking,
    treasury,
)
from ledger.db import make_engine
from ledger.logs import configure_logging
from ledger.posting import Poster, PostingQueue
from ledger.settings import Settings, load_settings

API_VERSION = "1"
BODY_MAX_BYTES = 1024 * 1024
SWAGGER_UI_URL = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
REQUEST_ID_HEADER = "X-Request-ID"

log = structlog.get_logger("admin_api.request")


class LedgerApi(Api):  # type: ignore[misc]
    """flask-smorest's Api whose documented error responses are problem+json."""

    ERROR_SCHEMA = ProblemSchema

    def _register_responses(self) -> None:
        for status in http.HTTPStatus:
            response: dict[str, object] = {"description": status.phrase}
            if status >= 400:
                response["content"] = {PROBLEM_CONTENT_TYPE: {"schema": ProblemSchema}}
            self.spec.components.response(status.name, response, lazy=True)
        self.spec.components.response(
            self.DEFAULT_ERROR_RESPONSE_NAME,
            {
                "description": "A problem (RFC 9457)",
                "content": {PROBLEM_CONTENT_TYPE: {"schema": ProblemSchema}},
            },
            lazy=True,
        )


def create_app(
    settings: Settings | None = None,
    *,
    database_url: str | None = None,
    engine: sa.Engine | None = None,
) -> flask.Flask:
    """Build the admin API.

    The database is ``engine`` when given (the caller keeps owning it), else an engine on
    ``database_url`` or ``settings.database_url`` acting as ``settings.db_role``. The app owns
    one poster and one posting queue; :func:`close_app` (also run at exit) stops them.
    """
    settings = settings if settings is not None else load_settings()
    url = database_url or settings.database_url
    if engine is None and not url:
        raise ValueError("no database: pass database_url or engine, or set TRACE_DATABASE_URL")

    app = flask.Flask(__name__)
    app.config.update(
        API_TITLE="TraceChain Settlement admin API",
        API_VERSION=API_VERSION,
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="docs",
        OPENAPI_SWAGGER_UI_URL=SWAGGER_UI_URL,
        MAX_CONTENT_LENGTH=BODY_MAX_BYTES,
    )
    api = LedgerApi(app)
    api.spec.components.security_scheme(
        SECURITY_SCHEME,
        {"type": "http", "scheme": "bearer", "description": "Staff API key: tc_<prefix>_<secret>"},
    )
    register_error_handlers(app)
    for blueprint in (
        ops.blp,
        assets.blp,
        accounts.blp,
        history.blp,
        entries.blp,
        holds.blp,
        escrows.blp,
        points.blp,
        staking.blp,
        audit_log.blp,
        reconciliation.blp,
        exceptions.blp,
        treasury.blp,
    ):
        api.register_blueprint(blueprint)
    app.before_request(_start_request)
    app.after_request(_finish_request)
    app.teardown_request(_end_request)

    # The posting queue's threads start last, once nothing above can fail.
    owns_engine = engine is None
    if engine is None:
        engine = make_engine(str(url), role=settings.db_role)
    poster = Poster(engine)
    queue = PostingQueue(poster, batch_max=settings.engine_batch_max, linger_ms=settings.engine_linger_ms)
    state = LedgerState(engine, poster, queue, ApiMetrics(), owns_engine, settings)
    app.extensions[EXTENSION_KEY] = state
    # Runs at garbage collection or interpreter exit, whichever comes first; close is idempotent.
    weakref.finalize(app, state.close)
    return app


def close_app(app: flask.Flask) -> None:
    """Drain the app's posting queue and release its database engine (if it made it)."""
    state = app.extensions.get(EXTENSION_KEY)
    if isinstance(state, LedgerState):
        state.close()


def make_wsgi_app() -> flask.Flask:
    """The app as gunicorn serves it: settings and logging from the environment."""
    settings = load_settings()
    configure_logging(settings)
    return create_app(settings)


def _request_id() -> str:
    given = flask.request.headers.get(REQUEST_ID_HEADER, "")
    # An id that could break log lines or headers is replaced, not echoed.
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _start_request() -> None:
    flask.g.request_id = _request_id()
    flask.g.started_s = time.perf_counter()
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(
        request_id=flask.g.request_id, method=flask.request.method, path=flask.request.path
    )
    _refuse_nul(flask.request)


def _refuse_nul(request: flask.Request) -> None:
    """PostgreSQL text cannot hold NUL; a path or query parameter with one is the client's 400."""
    texts = [request.path, *(part for pair in request.args.items(multi=True) for part in pair)]
    if any("\x00" in text for text in texts):
        raise Problem(400, "invalid_input", "the path and query parameters may not contain NUL characters")


def _finish_request(response: flask.Response) -> flask.Response:
    request_id = flask.g.get("request_id") or _request_id()
    response.headers[REQUEST_ID_HEADER] = request_id
    started = flask.g.get("started_s")
    duration_s = time.perf_counter() - started if isinstance(started, float) else 0.0
    rule = flask.request.url_rule
    endpoint = rule.rule if rule is not None else "<unmatched>"
    ledger_state().metrics.observe_request(endpoint, flask.request.method, response.status_code, duration_s)
    log.info(
        "http.request",
        endpoint=endpoint,
        status=response.status_code,
        duration_ms=round(duration_s * 1000, 3),
        remote_addr=flask.request.remote_addr,
    )
    return response


def _end_request(_exc: BaseException | None) -> None:
    structlog.contextvars.clear_contextvars()
