"""`openai`: answers with a model served over the OpenAI-compatible Chat Completions API.

Spoken by OpenAI itself and by local model servers (vLLM, llama.cpp's server, Ollama,
LM Studio...). The request is `POST {baseUrl}/chat/completions` with `stream: true`;
the answer comes back as Server-Sent Events whose `data:` is a JSON chunk, ended by
`data: [DONE]`. Its deltas become the answer's items: `content` text, `reasoning_content`
or `reasoning` a reasoning part, `tool_calls` one tool call part per `index`; an agent's
declared `tools` are sent along, and tool calls and results in the history are sent back
as `tool_calls` and `tool` messages. Every way that can go wrong becomes an
:class:`AdapterError` with a code a client can act on and a generic message (see
`docs/protocol.md`, "Model errors"); what the model server said, and where, goes to the
server log only, so that an agent's `baseUrl` cannot be used to read other services'
answers or to tell their ports apart.

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
import secrets
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from typing import Annotated, Any, Literal

import httpcore
import httpx
import msgspec

from app.logs import without_credentials
from app.streaming.adapters.base import (
    AdapterConfigError,
    AdapterError,
    AnswerEnd,
    AnswerItem,
    AppendPart,
    EndPart,
    StartPart,
)
from app.streaming.parts import Part
from app.streaming.records import HistoryItem
from app.tables import MessageRole
from app.upstream_policy import IPAddress, UpstreamPolicy, literal_address

logger = logging.getLogger("chatstream.openai")

# Bytes of an upstream error body read for its message (the rest is not needed).
_ERROR_BODY_LIMIT = 16 * 1024
_MESSAGE_LIMIT = 300
# How long to wait for the end of a response after its `[DONE]`.
_DRAIN_SECONDS = 0.5
# Limits of an agent's tool declarations.
MAX_TOOLS = 64
MAX_TOOL_PARAMETERS_BYTES = 16 * 1024


class Tool(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A function the model may call, as an agent declares it (sent upstream as
    `{"type": "function", "function": {...}}`)."""

    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    # The arguments' JSON Schema: an object schema (`"type": "object"`).
    parameters: dict[str, Any]
    description: Annotated[str, msgspec.Meta(max_length=1024)] | None = None

    def __post_init__(self) -> None:
        # Raised here, msgspec reports these at `$.tools[i]`: the error names the field.
        if self.parameters.get("type") != "object":
            raise ValueError(f'tool {self.name!r}: parameters must be a JSON Schema with "type": "object"')
        if len(msgspec.json.encode(self.parameters)) > MAX_TOOL_PARAMETERS_BYTES:
            raise ValueError(
                f"tool {self.name!r}: parameters must be at most {MAX_TOOL_PARAMETERS_BYTES} bytes of JSON"
            )


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
    # Functions the model may call; its calls end the answer with finishReason `tool_calls`.
    tools: Annotated[list[Tool], msgspec.Meta(max_length=MAX_TOOLS)] | None = None
    # Sent as `tool_choice` when set; the model server's default otherwise.
    tool_choice: Literal["auto", "none", "required"] | None = None


def check_tools(config: OpenAIConfig) -> None:
    """What the config struct alone cannot refuse about tools, as an
    :class:`AdapterConfigError` naming the field: repeated names, a `toolChoice` without tools."""
    seen: set[str] = set()
    for tool in config.tools or []:
        if tool.name in seen:
            raise AdapterConfigError("tools", f"two tools are named {tool.name!r}; names must be unique")
        seen.add(tool.name)
    if config.tool_choice is not None and not config.tools:
        raise AdapterConfigError("toolChoice", "needs tools to choose from")


# -- the request -----------------------------------------------------------------------


def _result_text(part: Part) -> str:
    """A tool result as the model reads it: its output as JSON text, or its error."""
    if part.error is not None:
        return part.error
    return msgspec.json.encode(part.value).decode()


def _sendable_call(part: Part) -> bool:
    """A tool call that can be sent back: complete (incomplete or invalid ones are left out), with an id."""
    return part.kind == "tool_call" and part.state == "complete" and bool(part.tool_call_id)


def _calls(item: HistoryItem) -> list[Part]:
    """An agent message's tool calls that can be sent back."""
    return [p for p in item.parts if _sendable_call(p)]


def _size(item: HistoryItem) -> int:
    """Characters an item costs in the request: its text, tool call arguments and results."""
    if item.role is MessageRole.tool:
        return sum(len(_result_text(p)) for p in item.parts if p.kind == "tool_result") or len(item.effective_content)
    size = len(item.effective_content)
    if item.role is MessageRole.agent:
        size += sum(len(p.text) for p in _calls(item))
        size += sum(len(_result_text(p)) for p in item.parts if p.kind == "tool_result")
    return size


def fit_history(history: Sequence[HistoryItem], budget_chars: int) -> list[HistoryItem]:
    """The newest messages whose contents (with tool call arguments and results) fit in
    `budget_chars`, in order; whole messages only. The current turn (from the last user
    message on: the question, and the tool round answering it) is always kept; an agent
    message and the tool messages right after it are kept or cut together, and a cut
    history never starts with an agent or tool message (chat templates expect a user
    turn first)."""
    # Units kept or cut whole: a message, with the tool messages that follow it.
    units: list[list[HistoryItem]] = []
    for item in history:
        if item.role is MessageRole.tool and units:
            units[-1].append(item)
        else:
            units.append([item])
    if not units:
        return []
    tail = next((i for i in range(len(units) - 1, -1, -1) if units[i][0].role is MessageRole.user), len(units) - 1)
    kept = units[tail:]
    used = sum(_size(item) for unit in kept for item in unit)
    for unit in reversed(units[:tail]):
        size = sum(_size(item) for item in unit)
        if used + size > budget_chars:
            break
        kept.insert(0, unit)
        used += size
    if len(kept) < len(units):
        while len(kept) > len(units) - tail and kept[0][0].role is not MessageRole.user:
            kept.pop(0)
    return [item for unit in kept for item in unit]


def upstream_messages(history: Sequence[HistoryItem]) -> list[dict[str, Any]]:
    """`history` as Chat Completions messages. An agent message with tool calls becomes an
    assistant message with `tool_calls`, followed by a `tool` message per result (a result
    given by a client in a tool message, or by a server-side tool inside the agent
    message). Only calls that have a result are sent (a server refuses a call left
    unanswered), and only results whose call is sent; reasoning and data are not sent."""
    # The first result of each call, counted only after the call itself.
    called: set[str] = set()
    results: dict[str, str] = {}
    for item in history:
        for part in item.parts:
            if part.tool_call_id is None:
                continue
            if item.role is MessageRole.agent and _sendable_call(part):
                called.add(part.tool_call_id)
            elif part.kind == "tool_result" and part.tool_call_id in called:
                results.setdefault(part.tool_call_id, _result_text(part))
    messages: list[dict[str, Any]] = []
    sent: set[str] = set()
    for item in history:
        if item.role is MessageRole.user:
            messages.append({"role": "user", "content": item.effective_content})
            continue
        if item.role is MessageRole.tool:
            continue  # sent right after the call it answers, or not at all
        calls = [p for p in _calls(item) if p.tool_call_id in results and p.tool_call_id not in sent]
        if not calls:
            messages.append({"role": "assistant", "content": item.effective_content})
            continue
        messages.append(
            {
                "role": "assistant",
                "content": item.effective_content or None,
                "tool_calls": [
                    {
                        "id": call.tool_call_id,
                        "type": "function",
                        # Blank arguments were a call without any: servers expect a JSON object.
                        "function": {"name": call.name, "arguments": call.text if call.text.strip() else "{}"},
                    }
                    for call in calls
                ],
            }
        )
        for call in calls:
            assert call.tool_call_id is not None  # _calls keeps calls with an id
            sent.add(call.tool_call_id)
            messages.append({"role": "tool", "tool_call_id": call.tool_call_id, "content": results[call.tool_call_id]})
    return messages


def request_body(config: OpenAIConfig, history: Sequence[HistoryItem]) -> dict[str, Any]:
    """The Chat Completions request for an answer to `history`."""
    messages = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
    messages += upstream_messages(fit_history(history, config.history_budget_chars))
    body: dict[str, Any] = {"model": config.model, "messages": messages, "stream": True}
    if config.temperature is not None:
        body["temperature"] = config.temperature
    if config.max_tokens is not None:
        body["max_tokens"] = config.max_tokens
    if config.include_usage:
        body["stream_options"] = {"include_usage": True}
    if config.tools:
        body["tools"] = [{"type": "function", "function": msgspec.to_builtins(tool)} for tool in config.tools]
    if config.tool_choice is not None:
        body["tool_choice"] = config.tool_choice
    return body


# -- the response ----------------------------------------------------------------------


class _Delta(msgspec.Struct):
    content: str | None = None
    # Reasoning text: `reasoning_content` (DeepSeek, vLLM, llama.cpp) or `reasoning` (Ollama, newer vLLM).
    reasoning_content: str | None = None
    reasoning: str | None = None
    # Checked by hand (:class:`_ToolCalls`), to say what is wrong with a malformed one.
    tool_calls: Any = None


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


def _chunk_size(chunk: str) -> str:
    """A chunk as a log line may show it: its size, not its text (which may be the answer's)."""
    return f"{len(chunk)} characters (not logged: it may hold the answer)"


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
    name, is checked again when connecting.) The tools are checked here too (:func:`check_tools`):
    this is what runs on a config being saved, after its struct."""
    check_tools(config)
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

    async def stream(self, history: Sequence[HistoryItem], config: OpenAIConfig) -> AsyncGenerator[AnswerItem]:
        # Where the key may go is checked again here, not only when the agent was saved: the
        # policy may have changed since, and a stored row proves nothing. (Addresses are
        # checked when connecting.)
        try:
            check_key_destination(config, self.policy)
        except AdapterConfigError as exc:
            logger.warning("refused a request to the model server at %s: %s", without_credentials(config.base_url), exc)
            if exc.field == "apiKeyEnv":
                raise AdapterError("api_key_not_allowed", "this server does not send the agent's key there") from None
            raise unreachable() from None
        headers = {"Accept": "text/event-stream"}
        if config.api_key_env:
            headers["Authorization"] = f"Bearer {self.api_key(config.api_key_env)}"
        url = config.base_url.rstrip("/") + "/chat/completions"
        shown = without_credentials(url)  # for log lines: a `user:password@` in the URL stays out
        body = request_body(config, history)
        answering = False
        try:
            async with self.client.stream(
                "POST", url, json=body, headers=headers, timeout=httpx.Timeout(config.timeout)
            ) as response:
                if response.status_code != 200:
                    said = error_message(await _head(response))
                    logger.warning("the model server at %s answered %s: %s", shown, response.status_code, said)
                    raise status_error(response.status_code, response.headers)
                answering = True
                lines = response.aiter_lines()
                async for item in _answer(sse_data(lines)):
                    yield item
                await _drain(lines)
        except AdapterError as exc:
            if exc.code in ("upstream_malformed", MALFORMED_TOOL_CALL, "upstream_error"):
                logger.warning("the model server at %s: %s", shown, exc.__cause__ or exc.message)
            raise
        except httpx.HTTPError as exc:
            logger.warning("request to the model server at %s failed: %r", shown, exc)
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


# The code of a tool call chunk we cannot follow (its message says what was wrong).
MALFORMED_TOOL_CALL = "upstream_malformed_tool_call"


class _BadToolCall(ValueError):
    """What is wrong with a tool call chunk (a fixed text: nothing the server sent)."""


class _ToolCalls:
    """The answer's tool calls, followed by their `index` across chunks: the first chunk
    of an index opens the call (its name, its id), later ones bring argument pieces."""

    __slots__ = ("closed", "names", "prefix")

    def __init__(self) -> None:
        self.names: dict[int, str] = {}  # open calls: index -> name
        self.closed: set[int] = set()
        # For calls the server sends without an id: unique per answer, so a client's result
        # names one call of the conversation.
        self.prefix = f"call_{secrets.token_hex(6)}"

    def items(self, raw: Any) -> list[AnswerItem]:
        """The part steps of one chunk's `delta.tool_calls`; :class:`_BadToolCall` when malformed."""
        if not isinstance(raw, list):
            raise _BadToolCall("tool_calls is not a list")
        out: list[AnswerItem] = []
        for entry in raw:
            if not isinstance(entry, dict):
                raise _BadToolCall("a tool call is not an object")
            index = entry.get("index")
            if type(index) is not int or index < 0:  # (bool is an int: refused too)
                what = "has no index" if index is None else "has an index that is not a non-negative integer"
                raise _BadToolCall(f"a tool call {what}")
            function = entry.get("function")
            if function is None:
                function = {}  # later chunks of OpenAI's own stream carry only the index (and arguments)
            elif not isinstance(function, dict):
                raise _BadToolCall(f"tool call {index}: function is not an object")
            name, arguments, call_id = function.get("name"), function.get("arguments"), entry.get("id")
            if name is not None and not isinstance(name, str):
                raise _BadToolCall(f"tool call {index}: the function name is not a string")
            if arguments is not None and not isinstance(arguments, str):
                raise _BadToolCall(f"tool call {index}: arguments are not a string")
            if call_id is not None and not isinstance(call_id, str):
                raise _BadToolCall(f"tool call {index}: id is not a string")
            key = f"call:{index}"
            if index in self.closed:
                raise _BadToolCall(f"tool call {index} continues after the answer finished")
            known = self.names.get(index)
            if known is None:
                if not name:
                    raise _BadToolCall(f"tool call {index} starts without a function name")
                self.names[index] = name
                out.append(
                    StartPart(key=key, kind="tool_call", name=name, tool_call_id=call_id or f"{self.prefix}_{index}")
                )
            elif name and name != known:
                # (Later chunks usually carry no name; some servers repeat it, unchanged.)
                raise _BadToolCall(f"tool call {index}: the function name changed mid-call")
            if arguments:
                out.append(AppendPart(key, arguments))
        return out

    def end(self) -> list[AnswerItem]:
        """Close every open call (the core parses their arguments)."""
        out: list[AnswerItem] = [EndPart(f"call:{index}") for index in sorted(self.names)]
        self.closed.update(self.names)
        self.names.clear()
        return out


async def _answer(events: AsyncIterator[str]) -> AsyncGenerator[AnswerItem]:
    """The answer's items from the stream's chunks: text as str, a reasoning part, tool
    call parts (keys `reasoning`, `call:{index}`), then an AnswerEnd; requires the closing `[DONE]`."""
    token_count: int | None = None
    finish_reason: str | None = None
    reasoning = False  # a reasoning part is open
    calls: _ToolCalls | None = None  # made at the first tool call
    async for data in events:
        if data.strip() == "[DONE]":
            if reasoning:
                yield EndPart("reasoning")
            if calls is not None:
                for item in calls.end():
                    yield item
                # Some servers say `stop` after tool calls: the answer still waits for their results.
                if calls.closed and finish_reason in (None, "stop", "function_call"):
                    finish_reason = "tool_calls"
            yield AnswerEnd(token_count=token_count, finish_reason=finish_reason or "stop")
            return
        try:
            chunk = _chunk_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            detail = ValueError(f"{exc}; the chunk: {_chunk_size(data)}")
            raise AdapterError("upstream_malformed", "the model server sent a chunk we cannot read") from detail
        if chunk.error is not None:
            detail = ValueError(error_message({"error": chunk.error}))
            raise AdapterError("upstream_error", "the model server failed mid-answer") from detail
        if chunk.usage is not None and chunk.usage.completion_tokens is not None:
            token_count = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.index != 0:
                continue  # we ask for one answer; ignore any other
            delta = choice.delta
            # The hot path: a chunk of text only, while no reasoning part is open.
            if not reasoning and delta.tool_calls is None and not delta.reasoning_content and not delta.reasoning:
                if delta.content:
                    yield delta.content
            else:
                # A server sending both fields sends the same text in each: one of them is taken.
                thought = delta.reasoning_content or delta.reasoning
                if thought:
                    if not reasoning:
                        reasoning = True
                        yield StartPart(key="reasoning", kind="reasoning")
                    yield AppendPart("reasoning", thought)
                if reasoning and (delta.content or delta.tool_calls):
                    reasoning = False  # the reasoning ends where text or a tool call begins
                    yield EndPart("reasoning")
                if delta.content:
                    yield delta.content
                if delta.tool_calls is not None:
                    if calls is None:
                        calls = _ToolCalls()
                    try:
                        steps = calls.items(delta.tool_calls)
                    except _BadToolCall as exc:
                        detail = ValueError(f"{exc}; the chunk: {_chunk_size(data)}")
                        message = f"the model server sent a malformed tool call: {exc}"
                        raise AdapterError(MALFORMED_TOOL_CALL, message) from detail
                    for item in steps:
                        yield item
            if choice.finish_reason:
                finish_reason = choice.finish_reason
                if reasoning:
                    reasoning = False
                    yield EndPart("reasoning")
                if calls is not None:
                    for item in calls.end():
                        yield item
    raise AdapterError("upstream_incomplete", "the model server ended the stream without [DONE]")
