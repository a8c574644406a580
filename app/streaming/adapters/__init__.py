"""Adapters turn a conversation's history into a stream of answer text.

A generation asks the adapter named by its agent; `echo` is built in, real
models come through further adapters registered here.
"""

from __future__ import annotations

from app.streaming.adapters.base import Adapter, AdapterError
from app.streaming.adapters.echo import EchoAdapter

ADAPTERS: dict[str, Adapter] = {adapter.name: adapter for adapter in (EchoAdapter(),)}

__all__ = ["ADAPTERS", "Adapter", "AdapterError"]
