"""What the end-to-end tests share."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def own_redis_db(url: str, number: int) -> str:
    """The test Redis server on database ``number``, one per e2e module, so its queues meet no
    other test's. An embedded server is already this test worker's own and is used as it is."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return url
    return urlunsplit(parts._replace(path=f"/{number}"))
