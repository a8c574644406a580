"""Messages between the server processes sharing a broker (several workers or nodes).

A generation is produced by one process; a request about it can land on any other. These
ask the producing process to act; every process receives them and only the producer acts.
A revoked credential concerns every process: each closes its own connections that use it.
"""

from __future__ import annotations

from uuid import UUID

import msgspec


class CancelRequest(msgspec.Struct, tag="cancel", kw_only=True):
    """Stop this generation (a user's cancel, a deleted conversation, an interrupting message)."""

    generation_id: UUID
    reason: str


class ReadersGone(msgspec.Struct, tag="unread", kw_only=True):
    """The generation's last reader left (on some process): start the disconnect grace."""

    generation_id: UUID


class CredentialRevoked(msgspec.Struct, tag="revoked", kw_only=True):
    """A key was revoked (`session_id` None: everything opened with it, through any session)
    or one session ended: close the sockets and streams that use it."""

    key_id: UUID
    session_id: UUID | None = None


ControlMessage = CancelRequest | ReadersGone | CredentialRevoked

control_encoder = msgspec.json.Encoder()
control_decoder = msgspec.json.Decoder(ControlMessage)
