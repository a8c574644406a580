"""API key and session tokens: random, prefixed, and stored only as a sha256 hash."""

from __future__ import annotations

import hashlib
import secrets

TOKEN_PREFIX = "cs_"
# Browser session tokens (the cookie): a prefix of their own, never taken for a key.
SESSION_TOKEN_PREFIX = "css_"
# Characters of the token kept in clear so people can tell their keys apart.
DISPLAY_PREFIX_CHARS = 10


def new_token() -> str:
    """A fresh token: the `cs_` prefix and 256 random bits, URL-safe."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_session_token() -> str:
    """A fresh session token: the `css_` prefix and 256 random bits, URL-safe."""
    return SESSION_TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The stored form of a token (hex sha256)."""
    return hashlib.sha256(token.encode()).hexdigest()


def display_prefix(token: str) -> str:
    """The part of a token safe to show again later, e.g. `cs_AbC1234`."""
    return token[:DISPLAY_PREFIX_CHARS]
