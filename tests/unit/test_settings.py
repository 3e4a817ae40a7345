"""Configuration from environment variables: defaults, parsing, and refusal of bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from ledger.commands import BATCH_MAX_COMMANDS
from ledger.settings import Settings, SettingsError, load_settings


def test_an_empty_environment_gives_the_defaults() -> None:
    assert load_settings({}) == Settings()


def test_values_are_parsed_from_the_environment() -> None:
    settings = load_settings(
        {
            "TRACE_DATABASE_URL": "postgresql://u@db:5432/books",
            "TRACE_REDIS_URL": "redis://cache:6379/0",
            "TRACE_DATA_DIR": "/var/lib/tracechain",
            "TRACE_DB_ROLE": "books_app",
            "TRACE_LOG_LEVEL": "debug",
            "TRACE_LOG_JSON": "off",
            "TRACE_API_HOST": "0.0.0.0",
            "TRACE_API_PORT": "9000",
            "TRACE_API_WORKERS": "8",
            "TRACE_ENGINE_BATCH_MAX": "500",
            "TRACE_ENGINE_LINGER_MS": "2.5",
            "TRACE_GC_GEN0_THRESHOLD": "50000",
        }
    )
    assert settings.database_url == "postgresql://u@db:5432/books"
    assert settings.redis_url == "redis://cache:6379/0"
    assert settings.data_dir == Path("/var/lib/tracechain")
    assert settings.db_role == "books_app"
    assert settings.log_level == "DEBUG"
    assert settings.log_json is False
    assert (settings.api_host, settings.api_port, settings.api_workers) == ("0.0.0.0", 9000, 8)
    assert (settings.engine_batch_max, settings.engine_linger_ms) == (500, 2.5)
    assert settings.gc_gen0_threshold == 50_000


@pytest.mark.parametrize("name", ["TRACE_API_PORT", "TRACE_ENGINE_BATCH_MAX", "TRACE_LOG_JSON"])
def test_empty_values_mean_the_default(name: str) -> None:
    assert load_settings({name: ""}) == Settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TRACE_API_PORT", "http"),
        ("TRACE_API_PORT", "0"),
        ("TRACE_API_PORT", "65536"),
        ("TRACE_API_PORT", "80.5"),
        ("TRACE_API_WORKERS", "0"),
        ("TRACE_API_WORKERS", "65"),
        ("TRACE_ENGINE_BATCH_MAX", "0"),
        ("TRACE_ENGINE_BATCH_MAX", "-1"),
        ("TRACE_ENGINE_BATCH_MAX", "100001"),
        ("TRACE_ENGINE_LINGER_MS", "-1"),
        ("TRACE_ENGINE_LINGER_MS", "1001"),
        ("TRACE_ENGINE_LINGER_MS", "soon"),
        ("TRACE_ENGINE_LINGER_MS", "nan"),
        ("TRACE_ENGINE_LINGER_MS", "inf"),
        ("TRACE_LOG_JSON", "maybe"),
        ("TRACE_LOG_JSON", "2"),
        ("TRACE_LOG_LEVEL", "verbose"),
        ("TRACE_LOG_LEVEL", "CRITICAL"),
    ],
)
def test_bad_values_raise_settings_error_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        load_settings({name: value})


def test_settings_error_is_a_value_error() -> None:
    assert issubclass(SettingsError, ValueError)


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_true_spellings(value: str) -> None:
    assert load_settings({"TRACE_LOG_JSON": value}).log_json is True


def test_a_batch_size_the_engine_refuses_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="TRACE_ENGINE_BATCH_MAX"):
        load_settings({"TRACE_ENGINE_BATCH_MAX": str(BATCH_MAX_COMMANDS + 1)})
