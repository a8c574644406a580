"""Command line: `chatstream …` or `python -m app …`.

Plain text for people; `--json` on the data commands prints one JSON document for scripts.
Tokens are printed once, at creation: they are not stored and cannot be shown again.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any
from uuid import UUID

import msgspec

from app.config import SettingsError, get_settings

_json = msgspec.json.Encoder()


def _emit(as_json: bool, data: Any, text: str) -> None:
    if as_json:
        sys.stdout.write(_json.encode(data).decode() + "\n")
    else:
        print(text)


def _login_link(host: str, port: int, token: str) -> str:
    base = get_settings().public_url
    if base is None:
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        base = f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}"
    # The key travels in the fragment, which browsers never send to a server or write to its logs.
    return f"{base}/#key={token}"


def _say(text: str, **fields: Any) -> None:
    """A line of `serve`'s own, before the server starts: a JSON log line in JSON log format."""
    if get_settings().log_format == "json":
        from app.logs import json_line

        text = json_line(text, "chatstream.cli", **fields)
    print(text)


async def _prepare_serve(args: argparse.Namespace) -> None:
    from app.demo import seed_demo_if_empty
    from app.migrations import apply_migrations

    if not args.no_migrate:
        await apply_migrations(quiet=True)
        _say("database: migrations applied")
    if args.no_demo:
        return
    seed = await seed_demo_if_empty()
    if seed is None:
        _say("Sign in with an API key (create one with `chatstream key create --company <name or id>`).")
        return
    if get_settings().log_format == "json":  # log lines hold no key: make one to sign in
        _say(
            "Created a demo company with an `echo` agent; its key is not shown in JSON logs: "
            f"create one with `chatstream key create --company {seed.company_id}`",
            companyId=seed.company_id,
        )
        return
    print("Created a demo company with an `echo` agent and a member key (shown once, not stored):")
    print(f"  key: {seed.member_token}")
    print(f"  Open this link to sign in: {_login_link(args.host, args.port, seed.member_token)}")


def cmd_serve(args: argparse.Namespace) -> int:
    from app.server import run

    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers > 1 and not get_settings().redis_url:
        # With the in-process broker an answer lives in the process producing it: a reader,
        # a resume or a cancel landing on another worker would not find it.
        print(
            "error: --workers above 1 needs the workers to share their answers through Redis: "
            "set REDIS_URL (e.g. REDIS_URL=redis://127.0.0.1:6379/0) or run one worker. See docs/deploy.md.",
            file=sys.stderr,
        )
        return 2
    asyncio.run(_prepare_serve(args))
    run(args.host, args.port, get_settings().log_level.lower(), reload=args.reload, workers=args.workers)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.migrations import apply_migrations

    report = asyncio.run(apply_migrations(quiet=args.json))
    _emit(args.json, {"ok": True}, report.strip() or "migrations applied")
    return 0


def cmd_company_create(args: argparse.Namespace) -> int:
    from app.companies.service import create_company

    created = asyncio.run(create_company(args.name))
    key = created.admin_key
    _emit(
        args.json,
        created,
        f"company {created.company.name} ({created.company.id})\n"
        f"admin key {key.name} ({key.id}), user {key.user_id}\n"
        f"token (shown once, store it now): {key.token}",
    )
    return 0


def cmd_company_list(args: argparse.Namespace) -> int:
    from app.companies.service import list_companies

    companies = asyncio.run(list_companies())
    _emit(
        args.json,
        companies,
        "\n".join(f"{c.id}  {c.name}" for c in companies) or "no companies",
    )
    return 0


def cmd_key_create(args: argparse.Namespace) -> int:
    from app.auth.schemas import ApiKeyCreate
    from app.auth.service import create_key
    from app.companies.service import find_company

    async def run() -> Any:
        company = await find_company(args.company)
        data = msgspec.convert({"name": args.name, "role": args.role, "userId": args.user_id}, ApiKeyCreate)
        return await create_key(company.id, data)

    key = asyncio.run(run())
    _emit(
        args.json,
        key,
        f"{key.role.value} key {key.name} ({key.id}), user {key.user_id}\n"
        f"token (shown once, store it now): {key.token}",
    )
    return 0


def cmd_agent_create(args: argparse.Namespace) -> int:
    from app.agents.schemas import AgentCreate
    from app.agents.service import create_agent
    from app.companies.service import find_company

    data = msgspec.json.decode(
        _json.encode(
            {
                "name": args.name,
                "adapter": args.adapter,
                "config": msgspec.json.decode(args.config),
            }
        ),
        type=AgentCreate,
    )

    async def run() -> Any:
        company = await find_company(args.company)
        return await create_agent(company.id, data)

    agent = asyncio.run(run())
    _emit(args.json, agent, f"agent {agent.name} ({agent.id}), adapter {agent.adapter}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from app.terminal_client import run_chat

    if not args.key:
        print("error: an API key is needed: --key or CHATSTREAM_KEY", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run_chat(args))
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatstream", description="Realtime chat streaming for AI agents.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the server (applies migrations, seeds a demo on an empty database)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1; more need REDIS_URL)")
    serve.add_argument("--reload", action="store_true", help="restart on code changes (development)")
    serve.add_argument(
        "--no-migrate",
        action="store_true",
        help="do not apply pending migrations on start",
    )
    serve.add_argument(
        "--no-demo",
        action="store_true",
        help="do not create the demo company on an empty database",
    )
    serve.set_defaults(func=cmd_serve)

    migrate = sub.add_parser("migrate", help="apply pending database migrations")
    migrate.add_argument("--json", action="store_true")
    migrate.set_defaults(func=cmd_migrate)

    company = sub.add_parser("company", help="companies (tenants)").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    c_create = company.add_parser("create", help="create a company and its first admin key")
    c_create.add_argument("name")
    c_create.add_argument("--json", action="store_true")
    c_create.set_defaults(func=cmd_company_create)
    c_list = company.add_parser("list", help="list companies")
    c_list.add_argument("--json", action="store_true")
    c_list.set_defaults(func=cmd_company_list)

    key = sub.add_parser("key", help="API keys").add_subparsers(dest="action", required=True, metavar="ACTION")
    k_create = key.add_parser("create", help="create an API key (the token is printed once)")
    k_create.add_argument("--company", required=True, help="company id or exact name")
    k_create.add_argument("--name", default="key", help="a label for the key")
    k_create.add_argument("--role", choices=["member", "admin"], default="member")
    k_create.add_argument("--user-id", type=UUID, default=None, help="add a key for an existing user")
    k_create.add_argument("--json", action="store_true")
    k_create.set_defaults(func=cmd_key_create)

    agent = sub.add_parser("agent", help="agents").add_subparsers(dest="action", required=True, metavar="ACTION")
    a_create = agent.add_parser("create", help="create an agent")
    a_create.add_argument("--company", required=True, help="company id or exact name")
    a_create.add_argument("--name", required=True)
    a_create.add_argument("--adapter", choices=["echo", "openai"], default="echo")
    a_create.add_argument(
        "--config", default="{}", help='adapter settings as a JSON object, e.g. \'{"baseUrl": ..., "model": ...}\''
    )
    a_create.add_argument("--json", action="store_true")
    a_create.set_defaults(func=cmd_agent_create)
    chat = sub.add_parser("chat", help="chat in the terminal over the WebSocket channel")
    chat.add_argument("--url", default=os.environ.get("CHATSTREAM_URL", "http://127.0.0.1:8000"), help="server URL")
    chat.add_argument("--key", default=os.environ.get("CHATSTREAM_KEY"), help="API key (or CHATSTREAM_KEY)")
    chat.add_argument("--conversation", help="open this conversation id")
    chat.add_argument("--new", nargs="?", const="", default=None, metavar="TITLE", help="start a new conversation")
    chat.add_argument("--message", action="append", help="send this message, print the answer, exit (repeatable)")
    chat.add_argument("--msgpack", action="store_true", help="use MessagePack frames instead of JSON")
    chat.add_argument(
        "--reconnect-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="after a drop, give up (exit 1) when no connection has worked for this long (default 60)",
    )
    chat.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `chatstream` console script."""
    from app.db import is_missing_table
    from app.errors import ApiError
    from app.migrations import MigrationError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ApiError, MigrationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        print(f"error: invalid input: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if is_missing_table(exc):
            print(
                "error: the database has no chatstream tables yet; run `chatstream migrate` first",
                file=sys.stderr,
            )
            return 1
        raise
