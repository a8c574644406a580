"""`openai`: answers with a model served over the OpenAI-compatible Chat Completions API.

Spoken by OpenAI itself and by local model servers (vLLM, llama.cpp's server, Ollama,
LM Studio...). The request is `POST {baseUrl}/chat/completions` with `stream: true`;
the answer comes back as Server-Sent Events whose `data:` is a JSON chunk, ended by
`data: [DONE]`. Every way that can go wrong becomes an :class:`AdapterError` with a code
a client can act on (see `docs/protocol.md`, "Model errors").
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from typing import Annotated, Any

import httpx
import msgspec

from app.chat.schemas import HistoryItem
from app.streaming.adapters.base import AdapterError, AnswerEnd
from app.tables import MessageRole

# Bytes of an upstream error body read for its message (the rest is not needed).
_ERROR_BODY_LIMIT = 16 * 1024
_MESSAGE_LIMIT = 300
# How long to wait for the end of a response after its `[DONE]`.
_DRAIN_SECONDS = 0.5


class OpenAIConfig(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    """An `openai` agent's `config`. The API key itself is never stored: `apiKeyEnv`
    names the server's environment variable that holds it."""

    # Up to the version prefix, e.g. `https://api.openai.com/v1`, `http://127.0.0.1:11434/v1`.
    base_url: Annotated[str, msgspec.Meta(pattern=r"^https?://[^\s/?#]+[^\s?#]*$", max_length=2000)]
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    api_key_env: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=200)] | None = None
    system_prompt: Annotated[str, msgspec.Meta(max_length=50_000)] = ""
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    # Seconds to connect, and the longest silence allowed between two chunks of the answer.
    timeout: Annotated[float, msgspec.Meta(gt=0, le=600)] = 60.0
    # Characters of conversation history sent (the newest messages, whole); the system
    # prompt comes on top. About 4 characters make a token in English text.
    history_budget_chars: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 48_000
    # Ask for the token count (`stream_options.include_usage`); turn off for servers that refuse it.
    include_usage: bool = True


# -- the request -----------------------------------------------------------------------

_ROLES = {MessageRole.user: "user", MessageRole.agent: "assistant"}


def fit_history(history: Sequence[HistoryItem], budget_chars: int) -> list[HistoryItem]:
    """The newest messages whose contents fit in `budget_chars`, in order; whole messages
    only. The newest message is always kept (it is what the model answers), and a cut
    history never starts with an agent message (chat templates expect a user turn first)."""
    kept: list[HistoryItem] = []
    used = 0
    for item in reversed(history):
        size = len(item.effective_content)
        if kept and used + size > budget_chars:
            break
        kept.append(item)
        used += size
    kept.reverse()
    if len(kept) < len(history):
        while len(kept) > 1 and kept[0].role is not MessageRole.user:
            kept.pop(0)
    return kept


def request_body(config: OpenAIConfig, history: Sequence[HistoryItem]) -> dict[str, Any]:
    """The Chat Completions request for an answer to `history`."""
    messages = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
    messages += [
        {"role": _ROLES[item.role], "content": item.effective_content}
        for item in fit_history(history, config.history_budget_chars)
    ]
    body: dict[str, Any] = {"model": config.model, "messages": messages, "stream": True}
    if config.temperature is not None:
        body["temperature"] = config.temperature
    if config.max_tokens is not None:
        body["max_tokens"] = config.max_tokens
    if config.include_usage:
        body["stream_options"] = {"include_usage": True}
    return body


# -- the response ----------------------------------------------------------------------


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta = msgspec.field(default_factory=_Delta)
    finish_reason: str | None = None
    index: int = 0


class _Usage(msgspec.Struct):
    completion_tokens: int | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = msgspec.field(default_factory=list)
    usage: _Usage | None = None
    # Some servers report a failure inside the stream instead of with a status code.
    error: Any = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)
_json_decoder = msgspec.json.Decoder()


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The `data` of each complete Server-Sent Event in `lines` (comments and other fields skipped)."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value.removeprefix(" "))
    # An event not ended by a blank line when the body ends is incomplete: dropped (as the
    # SSE standard says), so a cut-off stream is reported as one, not as a malformed chunk.


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 1] + "…"


def error_message(payload: Any) -> str:
    """The human part of an upstream error body: OpenAI's `{"error": {"message"}}`,
    `{"error": "..."}`, `{"message": "..."}` or plain text."""
    if isinstance(payload, bytes):
        try:
            payload = _json_decoder.decode(payload)
        except msgspec.DecodeError:
            return _short(payload.decode("utf-8", "replace"))
    if isinstance(payload, dict):
        inner = payload.get("error", payload)
        if isinstance(inner, dict):
            inner = inner.get("message") or inner.get("detail") or ""
        return _short(str(inner or ""))
    return _short(str(payload or ""))


def retry_after(headers: httpx.Headers) -> float | None:
    """Seconds the server asked us to wait: `retry-after-ms`, `retry-after` in seconds or as a date."""
    value = headers.get("retry-after-ms")
    try:
        if value is not None:
            return max(float(value) / 1000, 0.0)
        value = headers.get("retry-after")
        if value is None:
            return None
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def status_error(status: int, body: bytes, headers: httpx.Headers, config: OpenAIConfig) -> AdapterError:
    """The AdapterError for a non-200 answer from the model server."""
    detail = error_message(body)
    said = f": {detail}" if detail else ""
    if status in (401, 403):
        return AdapterError("upstream_auth", f"the model server refused our credentials ({status}){said}")
    if status == 404:
        return AdapterError(
            "upstream_not_found",
            f"the model server at {config.base_url} has no model {config.model!r} (404){said}",
        )
    if status == 429:
        wait = retry_after(headers)
        when = f"; retry after {wait:g} s" if wait is not None else ""
        return AdapterError("upstream_rate_limited", f"the model server is rate limiting us (429){when}{said}", wait)
    if status >= 500:
        return AdapterError("upstream_unavailable", f"the model server failed ({status}){said}", retry_after(headers))
    return AdapterError("upstream_rejected", f"the model server rejected the request ({status}){said}")


# -- the adapter -----------------------------------------------------------------------


class OpenAIAdapter:
    """One pooled HTTP client for every answer of the process, made on first use (on the
    running event loop) and closed by :meth:`aclose` when the server stops."""

    name = "openai"

    def __init__(self, allowed_key_vars: Iterable[str] = ("OPENAI_API_KEY",)) -> None:
        # Agents are set up by company admins, the environment by the operator: an agent may
        # only name a variable the operator listed (else it could send e.g. DATABASE_URL out).
        self.allowed_key_vars = frozenset(allowed_key_vars)
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        """The process's client for model servers."""
        if self._client is None or self._client.is_closed:
            # Every running answer holds a connection: no cap on open ones (answers are
            # limited upstream of here), a few kept alive for the next answers.
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=50)
            self._client = httpx.AsyncClient(limits=limits, headers={"User-Agent": "chatstream"})
        return self._client

    def api_key(self, variable: str) -> str:
        """The key held by the environment variable an agent names."""
        if variable not in self.allowed_key_vars:
            raise AdapterError(
                "api_key_not_allowed",
                f"this server does not let agents read {variable}; allow it in CHATSTREAM_MODEL_KEY_VARS",
            )
        key = os.environ.get(variable, "").strip()
        if not key:
            raise AdapterError("api_key_missing", f"{variable} is not set on this server")
        return key

    async def stream(self, history: Sequence[HistoryItem], config: OpenAIConfig) -> AsyncGenerator[str | AnswerEnd]:
        headers = {"Accept": "text/event-stream"}
        if config.api_key_env:
            headers["Authorization"] = f"Bearer {self.api_key(config.api_key_env)}"
        url = config.base_url.rstrip("/") + "/chat/completions"
        body = request_body(config, history)
        try:
            async with self.client.stream(
                "POST", url, json=body, headers=headers, timeout=httpx.Timeout(config.timeout)
            ) as response:
                if response.status_code != 200:
                    raise status_error(response.status_code, await _head(response), response.headers, config)
                lines = response.aiter_lines()
                async for item in _answer(sse_data(lines)):
                    yield item
                await _drain(lines)
        except httpx.ConnectError as exc:
            raise AdapterError("upstream_unreachable", f"cannot connect to the model server at {url}: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise AdapterError(
                "upstream_timeout", f"the model server sent nothing for {config.timeout:g} s (timeout)"
            ) from exc
        except httpx.RemoteProtocolError as exc:
            raise AdapterError("upstream_incomplete", f"the model server broke off the answer: {exc}") from exc
        except httpx.HTTPError as exc:
            raise AdapterError("upstream_failed", f"talking to the model server failed: {exc!r}") from exc

    async def aclose(self) -> None:
        """Close the pooled connections."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None


async def _drain(lines: AsyncIterator[str]) -> None:
    """Read what follows `[DONE]` (normally just the end of the body), briefly: a response
    read to its end lets its connection serve the next answer instead of being closed."""
    with contextlib.suppress(httpx.HTTPError, TimeoutError):
        async with asyncio.timeout(_DRAIN_SECONDS):
            async for _ in lines:
                pass


async def _head(response: httpx.Response) -> bytes:
    """The start of an error response's body (enough for its message)."""
    body = b""
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= _ERROR_BODY_LIMIT:
            break
    return body[:_ERROR_BODY_LIMIT]


async def _answer(events: AsyncIterator[str]) -> AsyncGenerator[str | AnswerEnd]:
    """Text pieces from the stream's chunks, then an AnswerEnd; requires the closing `[DONE]`."""
    token_count: int | None = None
    finish_reason: str | None = None
    async for data in events:
        if data.strip() == "[DONE]":
            yield AnswerEnd(token_count=token_count, finish_reason=finish_reason or "stop")
            return
        try:
            chunk = _chunk_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise AdapterError("upstream_malformed", f"the model server sent a chunk we cannot read ({exc})") from exc
        if chunk.error is not None:
            raise AdapterError(
                "upstream_error", f"the model server failed mid-answer: {error_message({'error': chunk.error})}"
            )
        if chunk.usage is not None and chunk.usage.completion_tokens is not None:
            token_count = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.index != 0:
                continue  # we ask for one answer; ignore any other
            if choice.finish_reason:
                finish_reason = choice.finish_reason
            if choice.delta.content:
                yield choice.delta.content
    raise AdapterError("upstream_incomplete", "the model server ended the stream without [DONE]")
