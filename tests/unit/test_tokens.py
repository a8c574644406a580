"""API key tokens: prefixed, random, stored only as a sha256 hash."""

from __future__ import annotations

import hashlib

from app.auth.tokens import DISPLAY_PREFIX_CHARS, TOKEN_PREFIX, display_prefix, hash_token, new_token


def test_new_token_has_the_cs_prefix_and_enough_randomness() -> None:
    """A token is `cs_` followed by a URL-safe encoding of 256 random bits."""
    token = new_token()
    assert TOKEN_PREFIX == "cs_"
    assert token.startswith("cs_")
    body = token[len("cs_") :]
    # 32 random bytes in unpadded base64url are 43 characters.
    assert len(body) == 43
    assert set(body) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_new_tokens_are_unique() -> None:
    """Two calls never give the same token."""
    tokens = {new_token() for _ in range(1000)}
    assert len(tokens) == 1000


def test_hash_token_is_deterministic_hex_sha256() -> None:
    """The stored form is the hex sha256 of the token, the same every time."""
    token = new_token()
    assert hash_token(token) == hash_token(token)
    assert hash_token(token) == hashlib.sha256(token.encode()).hexdigest()
    assert len(hash_token(token)) == 64
    assert token not in hash_token(token)


def test_hash_token_differs_between_tokens() -> None:
    """Different tokens hash differently (no collisions among fresh tokens)."""
    hashes = {hash_token(new_token()) for _ in range(200)}
    assert len(hashes) == 200


def test_display_prefix_is_the_start_of_the_token_only() -> None:
    """The display prefix is the first characters of the token: enough to tell keys apart, not the secret."""
    token = new_token()
    prefix = display_prefix(token)
    assert prefix == token[:DISPLAY_PREFIX_CHARS]
    assert prefix.startswith("cs_")
    assert len(prefix) == DISPLAY_PREFIX_CHARS
    assert len(prefix) < len(token) // 2


def test_display_prefix_fits_the_stored_column() -> None:
    """`api_key.token_prefix` is a varchar(16); the prefix must fit."""
    assert len(display_prefix(new_token())) <= 16
