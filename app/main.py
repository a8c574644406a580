"""The application factory."""

from __future__ import annotations

import logging
from pathlib import Path

from litestar import Litestar, Router
from litestar.datastructures import State
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.static_files import create_static_files_router

from app import metrics
from app.agents.controllers import AgentController
from app.auth.controllers import ApiKeyController, MeController, SessionController, TokenController
from app.auth.guards import provide_principal
from app.auth.middleware import ApiKeyAuthMiddleware
from app.auth.principal_cache import PrincipalCache
from app.chat.answer_store import ChatAnswerStore
from app.chat.controllers import ConversationController, GenerationController, provide_core
from app.config import Settings, get_settings
from app.db import close_pool, open_pool
from app.exception_handlers import EXCEPTION_HANDLERS
from app.generation_log import GenerationLog
from app.health import healthz, readyz
from app.http_security import HttpSecurityMiddleware, with_security_headers
from app.logs import configure_logging, litestar_logging_config
from app.metrics_http import counting_http_requests, metrics_route
from app.openapi import close_request_bodies
from app.protocol_documents import asyncapi_json, protocol_json
from app.rate_limit import RedisWindows, Windows
from app.request_log import with_request_log
from app.streaming.adapters import build_adapters
from app.streaming.ai_sdk import ai_sdk_chat, ai_sdk_resume
from app.streaming.broker import Broker, InProcessBroker
from app.streaming.core import StreamingCore
from app.streaming.policy import StreamPolicy
from app.streaming.quotas import Quotas
from app.streaming.redis_broker import RedisBroker
from app.streaming.sse import stream_conversation
from app.streaming.ws import ws_endpoint
from app.strict_json import StrictJSONRequest
from app.tables import Company

API_VERSION = "0.1.0"
# The web chat client: static files, no build step.
WEB_DIR = Path(__file__).resolve().parent / "web"


def answer_options_for_the_whole_path(app: Litestar) -> None:
    """Litestar answers OPTIONS with the methods of a route it made while registering one
    controller's handlers (`Allow: OPTIONS, POST` for `/api/agents`, which also has GET), not
    of the final route of the path: point each generated OPTIONS answer at its final route."""
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            fn = handler.fn
            code = getattr(fn, "__code__", None)
            if "create_options_handler" in getattr(fn, "__qualname__", "") and code and code.co_freevars == ("self",):
                fn.__closure__[0].cell_contents = route  # its one free variable, `self`: the route


def create_app(settings: Settings | None = None) -> Litestar:
    """Build the ASGI app: `/api` (authenticated), health probes and OpenAPI at `/schema`."""
    settings = settings or get_settings()
    configure_logging(settings)  # text, or JSON lines (CHATSTREAM_LOG_FORMAT)
    # httpx logs every request to a model server at INFO: one line per answer is noise.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLevelName(settings.log_level)))
    engine = Company._meta.db
    principal_cache = PrincipalCache(ttl=settings.auth_cache_seconds)
    policy = StreamPolicy(
        disconnect_grace=settings.disconnect_grace, partial=settings.partial, if_busy=settings.if_busy
    )

    async def startup(app: Litestar) -> None:
        await open_pool(engine)
        broker: Broker
        if settings.redis_url:
            broker = RedisBroker(
                settings.redis_url,
                prefix=settings.redis_prefix,
                retain=settings.log_retain,
                log_ttl=settings.log_ttl,
                conversation_retain=settings.conversation_log_retain,
                conversation_ttl=settings.conversation_log_ttl,
            )
            windows: Windows | None = RedisWindows(broker.commands, prefix=settings.redis_prefix)
        else:
            broker = InProcessBroker(
                retain=settings.log_retain,
                log_ttl=settings.log_ttl,
                conversation_retain=settings.conversation_log_retain,
                conversation_ttl=settings.conversation_log_ttl,
            )
            windows = None
        core = StreamingCore(
            broker,
            policy,
            store=ChatAnswerStore(),
            adapters=build_adapters(settings),
            sse_ping_interval=settings.sse_ping_interval,
            credential_recheck=settings.credential_recheck,
            quotas=Quotas(settings, windows),
        )
        core.on_revoked(principal_cache.forget)
        if settings.metrics:  # answers started and ended, TTFT, duration, tokens (app/metrics.py)
            core.observers.append(metrics.AnswerMetrics())
            metrics.process_started()
        core.observers.append(GenerationLog())  # a line when each answer starts and ends
        await core.startup()
        app.state.core = core

    async def shutdown(app: Litestar) -> None:
        core: StreamingCore | None = app.state.get("core")
        if core is not None:
            await core.shutdown()
        await close_pool(engine)

    api = Router(
        path="/api",
        route_handlers=[
            SessionController,
            MeController,
            ApiKeyController,
            TokenController,
            AgentController,
            ConversationController,
            GenerationController,
            stream_conversation,
            ws_endpoint,
            ai_sdk_chat,
            ai_sdk_resume,
        ],
        middleware=[DefineMiddleware(ApiKeyAuthMiddleware)],
        dependencies={
            "principal": Provide(provide_principal, sync_to_thread=False),
            "core": Provide(provide_core, sync_to_thread=False),
        },
        security=[{"bearer": []}, {"cookie": []}],
    )
    web = create_static_files_router(
        path="/", directories=[WEB_DIR], html_mode=True, name="web", include_in_schema=False
    )
    app = Litestar(
        route_handlers=[
            api,
            healthz,
            readyz,
            asyncapi_json,
            protocol_json,
            *([metrics_route(settings.metrics_token)] if settings.metrics else []),
            web,
        ],
        middleware=[HttpSecurityMiddleware(settings)],
        state=State({"principal_cache": principal_cache}),
        on_startup=[startup],
        on_shutdown=[shutdown],
        exception_handlers=EXCEPTION_HANDLERS,
        request_class=StrictJSONRequest,
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="chatstream",
            version=API_VERSION,
            description="Realtime chat streaming for conversations with AI agents.",
            path="/schema",
            # The JSON document only: an HTML viewer would load scripts from a CDN into our origin.
            render_plugins=[JsonRenderPlugin()],
            components=Components(
                security_schemes={
                    "bearer": SecurityScheme(
                        type="http", scheme="bearer", description="an API key, or an access token (POST /api/tokens)"
                    ),
                    "cookie": SecurityScheme(
                        type="apiKey",
                        name=settings.cookie_name,
                        security_scheme_in="cookie",
                    ),
                }
            ),
        ),
        debug=False,
        logging_config=litestar_logging_config(settings),
    )
    close_request_bodies(app.openapi_schema)  # the document is made once; this edits it in place
    answer_options_for_the_whole_path(app)
    if settings.metrics:  # every HTTP request, by route template and status
        app.asgi_handler = counting_http_requests(app.asgi_handler)
    # Around Litestar's whole handler (its error responses and 404s too), not a `before_send` hook.
    app.asgi_handler = with_security_headers(app.asgi_handler)
    # Outermost: a request id (header, log context) and one log line for every request.
    app.asgi_handler = with_request_log(app.asgi_handler)
    return app
