"""What the resource blueprints share: the app's ledger state, the strict parser and fields."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar, cast

import flask
import marshmallow as ma
import sqlalchemy as sa
from flask_smorest import Blueprint as SmorestBlueprint
from webargs import core
from webargs.flaskparser import FlaskParser, abort, is_json_request

from admin_api.metrics import ApiMetrics
from contracts.deployment import Deployment, DeploymentError
from ledger import jsonsafe
from ledger.errors import InvalidInput, LedgerError
from ledger.money import parse_amount
from ledger.posting import Poster, PostingQueue
from ledger.settings import Settings

EXTENSION_KEY = "tracechain"
PAGE_MAX = 500
PAGE_DEFAULT = 100
BIGINT_MAX = 2**63 - 1

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(slots=True)
class LedgerState:
    """The ledger objects one app owns: its engine, poster, posting queue and metrics."""

    engine: sa.Engine
    poster: Poster
    queue: PostingQueue
    metrics: ApiMetrics
    owns_engine: bool
    settings: Settings = field(default_factory=Settings)
    closed: bool = field(default=False)
    _deployment: Deployment | None = field(default=None, repr=False)

    def deployment(self) -> Deployment:
        """The platform's contracts (the deployment record every process reads); 503 until
        `tracechain deploy` has written it."""
        if self._deployment is None:
            path = self.settings.deployment_path
            try:
                self._deployment = Deployment.load(path)
            except (OSError, DeploymentError) as exc:
                raise ServiceUnavailable(
                    "chain_not_deployed", f"no usable deployment record at {path} (run tracechain deploy)"
                ) from exc
        return self._deployment

    def close(self) -> None:
        """Drain and stop the posting queue; dispose the engine if the app created it."""
        if self.closed:
            return
        self.closed = True
        self.queue.close()
        if self.owns_engine:
            self.engine.dispose()


class ServiceUnavailable(LedgerError):
    """A part the request needs is not set up (503)."""

    status = 503


def ledger_state() -> LedgerState:
    """The :class:`LedgerState` of the current app."""
    state = flask.current_app.extensions.get(EXTENSION_KEY)
    if not isinstance(state, LedgerState):
        raise RuntimeError("the app was not built by admin_api.app.create_app")
    return state


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


class StrictParser(FlaskParser):
    """Validation errors are 400; unknown query parameters are refused as well as unknown fields.

    A misspelt ``as_of`` silently ignored would answer with the wrong balance, so every
    location except headers refuses what it does not know.
    """

    DEFAULT_VALIDATION_STATUS = 400
    DEFAULT_UNKNOWN_BY_LOCATION: dict[str, str | None] = {
        **FlaskParser.DEFAULT_UNKNOWN_BY_LOCATION,
        "json": ma.RAISE,
        "querystring": ma.RAISE,
        "query": ma.RAISE,
    }

    def _raw_load_json(self, req: flask.Request) -> Any:
        raw = req.get_data(cache=True)
        if not is_json_request(req):
            if raw:
                abort(400, messages={"json": ["The body must be JSON (Content-Type: application/json)."]})
            return core.missing
        if not raw:
            return core.missing
        try:
            # NaN/Infinity are not JSON; over-long numbers and deep nesting raise ValueError
            # and RecursionError, which must be the client's 400, not our 500.
            body = jsonsafe.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            abort(400, exc=exc, messages={"json": ["Invalid JSON body."]})
        bad = _nul_field(body)
        if bad is not None:
            # PostgreSQL text cannot hold it: refused here rather than failing in the database.
            abort(
                400, messages={"json": {bad or "<body>": ["Text may not contain NUL (\\u0000) characters."]}}
            )
        return body


def _nul_field(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string, key or value holding a NUL character, or None."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    items: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in key:
                return path or "<key>"
            items.append((f"{path}.{key}" if path else key, item))
    elif isinstance(value, list):
        items = [(f"{path}.{i}" if path else str(i), item) for i, item in enumerate(value)]
    for item_path, item in items:
        found = _nul_field(item, item_path)
        if found is not None:
            return found
    return None


class Blueprint(SmorestBlueprint):  # type: ignore[misc]
    """flask-smorest's Blueprint with the strict parser, its decorators typed for mypy."""

    ARGUMENTS_PARSER = StrictParser()

    def route(self, rule: str, **options: Any) -> Callable[[F], F]:
        return cast("Callable[[F], F]", super().route(rule, **options))

    def arguments(self, schema: type[ma.Schema] | ma.Schema, **kwargs: Any) -> Callable[[F], F]:
        return cast("Callable[[F], F]", super().arguments(schema, **kwargs))

    def response(self, status_code: int, schema: Any = None, **kwargs: Any) -> Callable[[F], F]:
        return cast("Callable[[F], F]", super().response(status_code, schema, **kwargs))

    def alt_response(self, status_code: int, **kwargs: Any) -> Callable[[F], F]:
        return cast("Callable[[F], F]", super().alt_response(status_code, **kwargs))

    @staticmethod
    def doc(**kwargs: Any) -> Callable[[F], F]:
        return cast("Callable[[F], F]", SmorestBlueprint.doc(**kwargs))


class StrictSchema(ma.Schema):
    class Meta:
        unknown = ma.RAISE


class BaseUnits(ma.fields.String):
    """An amount: a JSON string of base-unit digits, 0 < amount < 2^256 (never a JSON number)."""

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> Any:
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            return parse_amount(text)
        except InvalidInput as exc:
            raise ma.ValidationError(exc.message) from exc

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        return None if value is None else str(value)


class StrictBoolean(ma.fields.Boolean):
    """Only JSON true/false (marshmallow's Boolean would also take 1, "yes", ...)."""

    def _deserialize(
        self, value: Any, attr: str | None, data: Mapping[str, Any] | None, **kwargs: Any
    ) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return value


def page_limit() -> ma.fields.Integer:
    return ma.fields.Integer(
        load_default=PAGE_DEFAULT,
        validate=ma.validate.Range(1, PAGE_MAX),
        metadata={"description": f"Page size (1-{PAGE_MAX})."},
    )


def id_cursor() -> ma.fields.Integer:
    return ma.fields.Integer(
        validate=ma.validate.Range(0, BIGINT_MAX),
        metadata={"description": "Continue after this id (the `next` of the previous page)."},
    )


def json_object() -> ma.fields.Dict:
    return ma.fields.Dict(keys=ma.fields.String())


def ledger_check(check: Callable[[Any], object]) -> Callable[[Any], None]:
    """A marshmallow validator from one of the ledger's input checks (same rules, field messages)."""

    def validate(value: Any) -> None:
        try:
            check(value)
        except InvalidInput as exc:
            raise ma.ValidationError(exc.message) from exc

    return validate


def signed_int(request: Mapping[str, Any], name: str) -> int:
    """An integer field of a signed party request: a JSON number or a string of up to 78 digits
    (any uint256); anything else is refused naming ``request.{name}``."""
    value = request.get(name)
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 78:
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"request.{name} must be an integer")
    return value
