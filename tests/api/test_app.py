"""The app itself: factory, health and readiness, OpenAPI and docs, request ids, errors, metrics."""

from __future__ import annotations

import re
import threading

import flask
import pytest
import sqlalchemy as sa
from flask.testing import FlaskClient

from admin_api.app import close_app, create_app
from ledger.db import head_revision
from ledger.settings import Settings
from tests.api.conftest import Chart, assert_problem, bearer, snapshot
from tests.conftest import Databases


def test_healthz_answers_without_a_key(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_on_a_migrated_database(client: FlaskClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ready", "revision": head_revision()}


def test_readyz_is_503_on_an_unmigrated_database(databases: Databases) -> None:
    empty = databases.url(databases.create())
    app = create_app(database_url=empty)
    try:
        response = app.test_client().get("/readyz")
        body = assert_problem(response, 503, "not_ready")
        assert "None" in body["detail"] and head_revision() in body["detail"]
        assert app.test_client().get("/healthz").status_code == 200
    finally:
        close_app(app)


def test_readyz_is_503_when_the_database_does_not_answer() -> None:
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    app = create_app(database_url="postgresql://postgres@127.0.0.1:1/nothing")
    try:
        assert_problem(app.test_client().get("/readyz"), 503, "not_ready")
    finally:
        close_app(app)


def test_database_url_comes_from_the_argument_then_the_settings(db_url: str) -> None:
    from_settings = create_app(Settings(database_url=db_url))
    from_argument = create_app(
        Settings(database_url="postgresql://postgres@127.0.0.1:1/x"), database_url=db_url
    )
    try:
        assert from_settings.test_client().get("/readyz").status_code == 200
        assert from_argument.test_client().get("/readyz").status_code == 200
    finally:
        close_app(from_settings)
        close_app(from_argument)


def test_an_explicit_engine_wins_over_urls(app_engine: sa.Engine) -> None:
    app = create_app(Settings(database_url="postgresql://postgres@127.0.0.1:1/x"), engine=app_engine)
    try:
        assert app.test_client().get("/readyz").status_code == 200
    finally:
        close_app(app)
    # The caller owns the engine: closing the app leaves it usable.
    with app_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1


def test_create_app_needs_a_database() -> None:
    with pytest.raises(ValueError, match="no database"):
        create_app(Settings(database_url=None))


def test_close_app_is_idempotent_and_stops_the_posting_queue(app_engine: sa.Engine) -> None:
    app = create_app(engine=app_engine)
    state = app.extensions["tracechain"]
    close_app(app)
    close_app(app)
    assert state.closed
    assert not any(t.is_alive() for t in state.queue._threads)


def test_openapi_document_and_docs_ui(client: FlaskClient) -> None:
    spec = client.get("/openapi.json")
    assert spec.status_code == 200
    doc = spec.get_json()
    assert doc["openapi"].startswith("3.")
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "Staff API key: tc_<prefix>_<secret>",
    }
    assert {"/entries", "/accounts/{code}/balance", "/holds/{pending_key}/post", "/audit"} <= set(
        doc["paths"]
    )
    post_entries = doc["paths"]["/entries"]["post"]
    assert {"201", "200", "400", "401", "403", "409", "422"} <= set(post_entries["responses"])
    assert "unknown_account" in post_entries["description"]
    headers = [p for p in post_entries["parameters"] if p["in"] == "header"]
    assert headers == [
        {
            "in": "header",
            "name": "Idempotency-Key",
            "required": True,
            "schema": {"type": "string"},
            "description": headers[0]["description"],
        }
    ]
    problem = doc["components"]["responses"]["UNPROCESSABLE_ENTITY"]["content"]
    assert list(problem) == ["application/problem+json"]
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "/openapi.json" in docs.get_data(as_text=True)


def test_request_id_is_echoed_or_generated(client: FlaskClient) -> None:
    given = client.get("/healthz", headers={"X-Request-ID": "req-123.abc"})
    assert given.headers["X-Request-ID"] == "req-123.abc"
    generated = client.get("/healthz")
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["X-Request-ID"])
    # An id that could forge log lines or headers is replaced, not echoed.
    hostile = client.get("/healthz", headers={"X-Request-ID": "a b\tc" + "x" * 200})
    assert re.fullmatch(r"[0-9a-f]{32}", hostile.headers["X-Request-ID"])


def test_unknown_route_and_wrong_method_are_problems(client: FlaskClient) -> None:
    assert_problem(client.get("/no/such/route"), 404, "not_found")
    wrong = client.delete("/healthz")
    assert_problem(wrong, 405, "method_not_allowed")
    assert "GET" in wrong.headers["Allow"]


def test_unexpected_exception_is_a_500_problem_without_internals(app_engine: sa.Engine) -> None:
    app = create_app(engine=app_engine)

    def explode() -> flask.Response:
        raise RuntimeError("password=hunter2 in /srv/secret/path.py")

    app.add_url_rule("/explode", "explode", explode)
    try:
        response = app.test_client().get("/explode", headers={"X-Request-ID": "boom-1"})
        body = assert_problem(response, 500, "internal_error")
        text = response.get_data(as_text=True)
        assert "hunter2" not in text and "secret" not in text and "RuntimeError" not in text
        assert body["request_id"] == "boom-1"
    finally:
        close_app(app)


def test_oversized_body_is_refused(client: FlaskClient, api_keys: dict[str, str]) -> None:
    response = client.post(
        "/assets",
        data=b'{"code": "' + b"A" * (2 * 1024 * 1024) + b'"}',
        content_type="application/json",
        headers=bearer(api_keys["admin"]),
    )
    assert_problem(response, 413, "payload_too_large")


def test_metrics_count_requests_and_entries(
    client: FlaskClient, api_keys: dict[str, str], chart: Chart, app_engine: sa.Engine
) -> None:
    headers = bearer(api_keys["finance"])
    ok = {"transfers": [{"debit": chart.source, "credit": chart.alice, "amount": "5"}]}
    bad = {"transfers": [{"debit": chart.source, "credit": chart.alice + "-missing", "amount": "5"}]}
    key = chart.alice + ":m"
    assert client.post("/entries", json=ok, headers={**headers, "Idempotency-Key": key}).status_code == 201
    assert client.post("/entries", json=ok, headers={**headers, "Idempotency-Key": key}).status_code == 200
    assert (
        client.post("/entries", json=bad, headers={**headers, "Idempotency-Key": key + "b"}).status_code
        == 422
    )
    client.get("/healthz")
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["Content-Type"].startswith("text/plain")
    text = metrics.get_data(as_text=True)
    assert 'tracechain_api_requests_total{endpoint="/entries",method="POST",status="201"} 1.0' in text
    assert 'tracechain_api_requests_total{endpoint="/entries",method="POST",status="200"} 1.0' in text
    assert 'tracechain_api_requests_total{endpoint="/healthz",method="GET",status="200"} 1.0' in text
    assert 'tracechain_api_request_duration_seconds_count{endpoint="/entries",method="POST"} 3.0' in text
    assert 'tracechain_api_entries_created_total{kind="transfer"} 1.0' in text
    assert "tracechain_api_entries_existing_total 1.0" in text
    assert 'tracechain_api_entries_rejected_total{code="unknown_account"} 1.0' in text


def test_two_apps_in_one_process_keep_their_own_metrics(app_engine: sa.Engine) -> None:
    first, second = create_app(engine=app_engine), create_app(engine=app_engine)
    try:
        first.test_client().get("/healthz")
        first.test_client().get("/healthz")
        second.test_client().get("/healthz")
        line = 'tracechain_api_requests_total{endpoint="/healthz",method="GET",status="200"}'
        assert f"{line} 2.0" in first.test_client().get("/metrics").get_data(as_text=True)
        assert f"{line} 1.0" in second.test_client().get("/metrics").get_data(as_text=True)
    finally:
        close_app(first)
        close_app(second)


def test_concurrent_requests_all_book_through_the_queue(
    app: flask.Flask, api_keys: dict[str, str], chart: Chart, app_engine: sa.Engine
) -> None:
    threads_n, each_n = 8, 5
    statuses: list[int] = []
    ids: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        client = app.test_client()
        for i in range(each_n):
            response = client.post(
                "/entries",
                json={"transfers": [{"debit": chart.source, "credit": chart.alice, "amount": "3"}]},
                headers=bearer(api_keys["operator"], **{"Idempotency-Key": f"{chart.alice}:c:{n}:{i}"}),
            )
            with lock:
                statuses.append(response.status_code)
                ids.append(response.get_json()["id"])

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert statuses == [201] * threads_n * each_n
    assert len(set(ids)) == threads_n * each_n
    after = snapshot(app_engine, [chart.alice])
    assert after["balances"][chart.alice][1] == 3 * threads_n * each_n


@pytest.mark.parametrize(
    "url",
    ["/audit?actor=a%00b", "/accounts/bad%00code", "/entries?account=x&kind=%00"],
)
def test_nul_in_a_path_or_query_is_the_client_s_400(
    client: FlaskClient, api_keys: dict[str, str], url: str
) -> None:
    # PostgreSQL text cannot hold NUL: refused before the database sees it.
    problem = assert_problem(client.get(url, headers=bearer(api_keys["admin"])), 400, "invalid_input")
    assert "NUL" in problem["detail"]


def test_nul_in_a_json_body_is_refused_and_writes_nothing(
    client: FlaskClient, api_keys: dict[str, str], chart: Chart, app_engine: sa.Engine
) -> None:
    before = snapshot(app_engine, chart.codes())
    response = client.post(
        "/entries",
        data='{"transfers": [{"debit": "' + chart.source + '", "credit": "' + chart.alice + '",'
        ' "amount": "5"}], "metadata": {"note": "a\\u0000b"}}',
        headers=bearer(
            api_keys["finance"], **{"Idempotency-Key": "nul-body", "Content-Type": "application/json"}
        ),
    )
    problem = assert_problem(response, 400, "invalid_input")
    assert "NUL" in str(problem["errors"]["json"]["metadata.note"])
    assert snapshot(app_engine, chart.codes()) == before
