"""Adapters turn a conversation's history into a stream of answer text.

A generation asks the adapter named by its agent, with the agent's `config` converted
to that adapter's config struct. `echo` repeats the user; `openai` asks a model served
over the OpenAI-compatible Chat Completions API.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from app.config import Settings, get_settings
from app.streaming.adapters.base import (
    Adapter,
    AdapterConfigError,
    AdapterError,
    AnswerEnd,
    AnswerItem,
    AppendPart,
    EndPart,
    StartPart,
)
from app.streaming.adapters.echo import EchoAdapter, EchoConfig
from app.streaming.adapters.openai import OpenAIAdapter, OpenAIConfig, check_upstream
from app.upstream_policy import UpstreamPolicy

# Each adapter's config struct, by adapter name (the names agents may use).
CONFIG_TYPES: dict[str, type[msgspec.Struct]] = {"echo": EchoConfig, "openai": OpenAIConfig}

# Keys that look like a secret: refused in any config, so a key never lands in the database.
_SECRET_KEYS = frozenset({"apikey", "api_key", "key", "token", "secret", "password", "authorization"})

# What a field's pattern means, said plainly.
_PATTERN_HINTS = {
    "baseUrl": "must be an http:// or https:// URL, such as http://127.0.0.1:11434/v1",
    "apiKeyEnv": "must be the name of an environment variable, such as OPENAI_API_KEY",
}


def build_adapters(settings: Settings | None = None) -> dict[str, Adapter]:
    """One instance of every adapter, for one streaming core (one per process)."""
    settings = settings or get_settings()
    openai = OpenAIAdapter(settings.upstream_policy, max_connections=settings.model_max_connections)
    return {"echo": EchoAdapter(), "openai": openai}


def parse_config(adapter: str, raw: Mapping[str, Any]) -> Any:
    """`raw` converted to the adapter's config struct, or :class:`AdapterConfigError`."""
    config_type = CONFIG_TYPES.get(adapter)
    if config_type is None:
        raise AdapterConfigError("", f"no adapter named {adapter!r}")
    for key in raw:
        if key.lower() in _SECRET_KEYS:
            raise AdapterConfigError(
                key, "never put a secret in an agent; keep it in the server's environment and name the variable"
            )
    try:
        return msgspec.convert(raw, config_type)
    except msgspec.ValidationError as exc:
        # The field's whole path (`tools[2].name`), so a nested one is named as such.
        message, _, path = str(exc).partition(" - at `$.")
        field = path.rstrip("`")
        if message.startswith(("Object missing required field `", "Object contains unknown field `")):
            name = message.split("`")[1]
            missing = message.startswith("Object missing")
            if field:
                field, message = f"{field}.{name}", "required" if missing else "unknown field"
            elif missing:
                field, message = name, "required"
            else:
                known = ", ".join(config_type.__struct_encode_fields__)
                field, message = name, f"unknown field; {adapter!r} takes: {known}"
        elif "matching regex" in message:
            message = _PATTERN_HINTS.get(field, message)
        raise AdapterConfigError(field, message) from exc


def normalize_config(adapter: str, raw: Mapping[str, Any], policy: UpstreamPolicy) -> dict[str, Any]:
    """The config as stored: checked (against the operator's upstream policy too), with
    its defaults left out."""
    config = parse_config(adapter, raw)
    if isinstance(config, OpenAIConfig):
        check_upstream(config, policy)
    # By equality: msgspec's own `omit_defaults` keeps e.g. a float equal to its default.
    kept = {
        field.encode_name: getattr(config, field.name)
        for field in msgspec.structs.fields(config)
        if field.required or getattr(config, field.name) != field.default
    }
    normalized: dict[str, Any] = msgspec.to_builtins(kept)
    return normalized


__all__ = [
    "CONFIG_TYPES",
    "Adapter",
    "AdapterConfigError",
    "AdapterError",
    "AnswerEnd",
    "AnswerItem",
    "AppendPart",
    "EndPart",
    "StartPart",
    "build_adapters",
    "normalize_config",
    "parse_config",
]
