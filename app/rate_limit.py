"""Per-key limit on posting messages over HTTP (each one can start an answer).

Litestar's rate-limit middleware counts requests per identifier in the app's store (in
this process): here the identifier is the caller's credential, so each key has its own
budget, and only `POST …/messages` is counted.
"""

from __future__ import annotations

import hashlib
from typing import Any

from litestar import Request
from litestar.middleware.rate_limit import RateLimitConfig, get_remote_address

from app.auth.middleware import credentials
from app.errors import Unauthorized


def _caller(request: Request[Any, Any, Any]) -> str:
    try:
        token = credentials(request)
    except Unauthorized:
        token = None
    # A hash, so that no credential sits in the limiter's store.
    return hashlib.sha256(token.encode()).hexdigest() if token else get_remote_address(request)


def _posts_a_message(request: Request[Any, Any, Any]) -> bool:
    return request.method == "POST" and request.url.path.rstrip("/").endswith("/messages")


def message_rate_limit(per_minute: int) -> RateLimitConfig:
    """At most `per_minute` message posts per key per minute; more get 429 with Retry-After."""
    return RateLimitConfig(
        rate_limit=("minute", per_minute),
        identifier_for_request=_caller,
        check_throttle_handler=_posts_a_message,
    )
