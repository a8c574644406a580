"""`openai`: answers with a model served over the OpenAI-compatible Chat Completions API.

Spoken by OpenAI itself and by local model servers (vLLM, llama.cpp's server, Ollama,
LM Studio...). The request is `POST {baseUrl}/chat/completions` with `stream: true`;
the answer comes back as Server-Sent Events whose `data:` is a JSON chunk, ended by
`data: [DONE]`. Every way that can go wrong becomes an :class:`AdapterError` with a code
a client can act on and a generic message (see `docs/protocol.md`, "Model errors"); what
the model server said, and where, goes to the server log only, so that an agent's
`baseUrl` cannot be used to read other services' answers or to tell their ports apart.

Requests go only where the operator's :class:`UpstreamPolicy` allows: the host is
resolved here, every address checked, and the connection made to a checked address.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import ipaddress
import logging
import os
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from typing import Annotated, Any

import httpcore
import httpx
import msgspec

from app.chat.schemas import HistoryItem
from app.streaming.adapters.base import AdapterConfigError, AdapterError, AnswerEnd
from app.tables import MessageRole
from app.upstream_policy import IPAddress, UpstreamPolicy, literal_address

logger = logging.getLogger("chatstream.openai")

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


def status_error(status: int, headers: httpx.Headers) -> AdapterError:
    """The AdapterError for a non-200 answer from the model server: its code and a generic
    message (the server's own words are logged, not shown)."""
    if status in (401, 403):
        return AdapterError("upstream_auth", "the model server refused the agent's credentials")
    if status == 404:
        return AdapterError("upstream_not_found", "the model server has no such model")
    if status == 429:
        wait = retry_after(headers)
        when = f"; retry after {wait:g} s" if wait is not None else ""
        return AdapterError("upstream_rate_limited", f"the model server is rate limiting requests{when}", wait)
    if status >= 500:
        return AdapterError("upstream_unavailable", "the model server is unavailable", retry_after(headers))
    return AdapterError("upstream_rejected", "the model server rejected the request")


# What tenants are told when the model server cannot be talked to. One code and one text
# for refused, unreachable, not allowed, TLS and non-HTTP answers: telling them apart
# would let a `baseUrl` probe which hosts and ports exist.
def unreachable() -> AdapterError:
    """The error for a model server that cannot be talked to, whatever the reason."""
    return AdapterError("upstream_unreachable", "cannot reach the model server")


def check_upstream(config: OpenAIConfig, policy: UpstreamPolicy) -> None:
    """Refuse, with an :class:`AdapterConfigError` naming the field, what
    :func:`check_key_destination` refuses and a literal address (an IP, `localhost`) the
    policy does not allow: caught when the agent is saved. (Every address, also of a host
    name, is checked again when connecting.)"""
    url = check_key_destination(config, policy)
    address = literal_address(url.host)
    if address is not None and not policy.address_allowed(url.host, address, _port_of(url)):
        raise AdapterConfigError(
            "baseUrl",
            f"{url.host} is not a public address (loopback, private, link-local...); "
            "the server's operator can allow it with CHATSTREAM_UPSTREAM_ALLOW",
        )


def check_key_destination(config: OpenAIConfig, policy: UpstreamPolicy) -> httpx.URL:
    """The `baseUrl`, parsed as it will be requested; :class:`AdapterConfigError` for a URL
    with a user name or password, or a key variable the policy does not let go to its host."""
    try:
        url = httpx.URL(config.base_url)
    except httpx.InvalidURL:
        raise AdapterConfigError("baseUrl", "is not a valid URL") from None
    if url.userinfo:
        raise AdapterConfigError(
            "baseUrl", "must not hold a user name or password; name the key's variable in apiKeyEnv instead"
        )
    port = _port_of(url)
    variable = config.api_key_env
    if variable is None:
        return url
    hosts = policy.key_hosts.get(variable)
    if hosts is None:
        listed = ", ".join(sorted(policy.key_hosts)) or "none"
        raise AdapterConfigError(
            "apiKeyEnv",
            f"this server lets agents read only these variables: {listed} (operators: CHATSTREAM_MODEL_KEY_VARS)",
        )
    if not policy.key_may_go_to(variable, url.host, port):
        allowed = ", ".join(str(host) for host in hosts)
        raise AdapterConfigError(
            "apiKeyEnv",
            f"this server sends {variable} only to {allowed}, not to baseUrl's host "
            "(operators: CHATSTREAM_MODEL_KEY_VARS)",
        )
    return url


def _port_of(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


# -- connections -----------------------------------------------------------------------


class CheckedNetworkBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network layer, connecting only where the policy allows. The host is
    resolved here, every address it resolves to is checked, and the connection is made to
    a checked address, so a DNS answer that changes after the check cannot redirect it.
    TLS (SNI, certificate) and the `Host` header still use the host name."""

    def __init__(self, policy: UpstreamPolicy) -> None:
        self.policy = policy
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await _resolve(host, port, timeout)
        denied = [a for a in addresses if not self.policy.address_allowed(host, a, port)]
        if denied:
            raise httpcore.ConnectError(f"{host} resolves to {denied[0]}, not allowed by CHATSTREAM_UPSTREAM_ALLOW")
        failure: httpcore.ConnectError | None = None
        for address in addresses:
            try:
                return await self._backend.connect_tcp(str(address), port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                failure = exc
        assert failure is not None  # _resolve gives at least one address
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("model servers are reached over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


async def _resolve(host: str, port: int, seconds: float | None) -> list[IPAddress]:
    """Every address `host` resolves to, in the resolver's order, without repeats."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(seconds):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise httpcore.ConnectTimeout(f"resolving {host} took over {seconds} s") from None
    except OSError as exc:
        raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not addresses:
        raise httpcore.ConnectError(f"{host} resolves to no address")
    return list(dict.fromkeys(addresses))


def checked_transport(policy: UpstreamPolicy, limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose connections go through :class:`CheckedNetworkBackend`.
    (With a transport of its own, httpx also ignores proxy variables: no proxy can carry
    a request past the check.)"""
    transport = httpx.AsyncHTTPTransport(limits=limits)
    # httpx takes no network backend: give it a pool made as its own, with ours.
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=CheckedNetworkBackend(policy),
    )
    return transport


# -- the adapter -----------------------------------------------------------------------


class OpenAIAdapter:
    """One pooled HTTP client for every answer of the process, made on first use (on the
    running event loop) and closed by :meth:`aclose` when the server stops."""

    name = "openai"

    def __init__(self, policy: UpstreamPolicy, max_connections: int = 100) -> None:
        # Agents are set up by company admins, the policy by the operator: which addresses
        # answers may come from, which key variables may be read and where each may go.
        self.policy = policy
        # Every running answer holds a connection; past the cap an answer waits for one
        # (for its `timeout`), a few are kept alive for the next answers.
        self.limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=min(50, max_connections))
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        """The process's client for model servers."""
        if self._client is None or self._client.is_closed:
            self._client = httpx.AsyncClient(
                transport=checked_transport(self.policy, self.limits), headers={"User-Agent": "chatstream"}
            )
        return self._client

    def api_key(self, variable: str) -> str:
        """The key held by the environment variable an agent names."""
        key = os.environ.get(variable, "").strip()
        if not key:
            raise AdapterError("api_key_missing", f"{variable} is not set on this server")
        return key

    async def stream(self, history: Sequence[HistoryItem], config: OpenAIConfig) -> AsyncGenerator[str | AnswerEnd]:
        # Where the key may go is checked again here, not only when the agent was saved: the
        # policy may have changed since, and a stored row proves nothing. (Addresses are
        # checked when connecting.)
        try:
            check_key_destination(config, self.policy)
        except AdapterConfigError as exc:
            logger.warning("refused a request to the model server at %s: %s", config.base_url, exc)
            if exc.field == "apiKeyEnv":
                raise AdapterError("api_key_not_allowed", "this server does not send the agent's key there") from None
            raise unreachable() from None
        headers = {"Accept": "text/event-stream"}
        if config.api_key_env:
            headers["Authorization"] = f"Bearer {self.api_key(config.api_key_env)}"
        url = config.base_url.rstrip("/") + "/chat/completions"
        body = request_body(config, history)
        answering = False
        try:
            async with self.client.stream(
                "POST", url, json=body, headers=headers, timeout=httpx.Timeout(config.timeout)
            ) as response:
                if response.status_code != 200:
                    said = error_message(await _head(response))
                    logger.warning("the model server at %s answered %s: %s", url, response.status_code, said)
                    raise status_error(response.status_code, response.headers)
                answering = True
                lines = response.aiter_lines()
                async for item in _answer(sse_data(lines)):
                    yield item
                await _drain(lines)
        except AdapterError as exc:
            if exc.code in ("upstream_malformed", "upstream_error"):
                logger.warning("the model server at %s: %s", url, exc.__cause__ or exc.message)
            raise
        except httpx.HTTPError as exc:
            logger.warning("request to the model server at %s failed: %r", url, exc)
            raise _network_error(exc, answering, config.timeout) from None

    async def aclose(self) -> None:
        """Close the pooled connections."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _network_error(exc: httpx.HTTPError, answering: bool, timeout: float) -> AdapterError:
    """What tenants are told about a failure talking to the model server."""
    if isinstance(exc, httpx.PoolTimeout):
        # Every pooled connection is busy (CHATSTREAM_MODEL_MAX_CONNECTIONS) for too long.
        return AdapterError("upstream_unavailable", "too many answers are running; send again later")
    if isinstance(exc, httpx.ConnectTimeout):
        return unreachable()  # like a refused connection: no hint whether anything is there
    if isinstance(exc, httpx.TimeoutException):
        return AdapterError("upstream_timeout", f"the model server sent nothing for {timeout:g} s (timeout)")
    if not answering:
        return unreachable()
    if isinstance(exc, httpx.RemoteProtocolError):
        return AdapterError("upstream_incomplete", "the model server broke off the answer")
    return AdapterError("upstream_failed", "talking to the model server failed")


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
            detail = ValueError(f"{exc}; the chunk: {_short(data)}")
            raise AdapterError("upstream_malformed", "the model server sent a chunk we cannot read") from detail
        if chunk.error is not None:
            detail = ValueError(error_message({"error": chunk.error}))
            raise AdapterError("upstream_error", "the model server failed mid-answer") from detail
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
