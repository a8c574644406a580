"""Messages between the server processes sharing a broker (several workers or nodes).

A generation is produced by one process; a request about it can land on any other. These
ask the producing process to act; every process receives them and only the producer acts.
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


ControlMessage = CancelRequest | ReadersGone

control_encoder = msgspec.json.Encoder()
control_decoder = msgspec.json.Decoder(ControlMessage)
