"""The `whatslike` command line: `serve` runs roles, `token` prints a signed JWT, `stuck`,
`dlq list|replay` and `webhooks list|parked|replay` are for operators.

Settings come from `WHATSLIKE_*` variables; flags win. A start that cannot succeed exits
non-zero with one line on stderr naming the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import logging.handlers
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
import uvloop

from whatslike import __version__, serving
from whatslike.api.webhooks import endpoint_json, parked_json
from whatslike.app import Runtime, check_wiring
from whatslike.auth import TokenService
from whatslike.clock import format_time, utcnow
from whatslike.errors import ConfigError, WhatslikeError
from whatslike.roles import dead_letters
from whatslike.roles.watchdog import find_stuck
from whatslike.settings import (
    ROLES,
    Settings,
    check_safety,
    load_settings,
    resolve_jwt_secret,
    unknown_variables,
)
from whatslike.store import open_store
from whatslike.store.base import Store


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="whatslike",
        description="Whatslike: outbound WhatsApp/Instagram messages with live statuses.",
        epilog="Every setting can also be given as a WHATSLIKE_<NAME> variable; see README.",
    )
    parser.add_argument("--version", action="version", version=f"whatslike {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run roles (default: all, embedded backends, simulator on)",
        description="Run Whatslike's roles in this process. With no options: every role, "
        "a SQLite store under --data-dir, the in-process bus and fan-out, and the "
        "built-in Meta simulator.",
    )
    serve.add_argument("--roles", help=f"comma-separated, from: {','.join(ROLES)}")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000; 0 = any)")
    serve.add_argument("--data-dir", type=Path, help="where the SQLite file lives (./data)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])

    token = commands.add_parser(
        "token",
        help="print a signed JWT for a user of an organization",
        description="Print a JWT signed with the configured secret (the same settings and "
        "data directory as serve), for tests and demos.",
    )
    token.add_argument("--org", required=True, help="organization id (claim org_id)")
    token.add_argument("--user", required=True, help="user id (claim sub)")
    token.add_argument("--ttl", type=int, help="seconds until it expires (default 3600)")
    token.add_argument("--data-dir", type=Path, help="where serve keeps its data (./data)")

    stuck = commands.add_parser(
        "stuck",
        help="list messages that stopped moving (for operators)",
        description="List the messages the watchdog counts as stuck, from the configured "
        "store: PENDING with no send under way, PENDING with a send of unknown outcome, "
        "SENT with no provider news — by the thresholds in the settings "
        "(STUCK_PENDING_S, SEND_UNKNOWN_FAIL_S, STUCK_SENT_S) or --older-than.",
    )
    stuck.add_argument("--older-than", type=float, help="seconds, for every kind")
    stuck.add_argument("--json", action="store_true", help="one JSON object per line")
    stuck.add_argument("--data-dir", type=Path, help="where serve keeps its data (./data)")

    dlq = commands.add_parser(
        "dlq",
        help="list and replay dead letters (for operators)",
        description="Dead letters are events set aside as poison (never for an outage: "
        "those are retried for as long as they last). Each is kept in the configured "
        "store; a status among them that would still change its message is 'unapplied' "
        "(the watchdog counts those) and can be replayed.",
    )
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    listing = dlq_commands.add_parser("list", help="the newest dead letters, newest first")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (100)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.add_argument("--data-dir", type=Path, help="where serve keeps its data (./data)")
    replaying = dlq_commands.add_parser(
        "replay",
        help="hand a dead-lettered status to the outbox again",
        description="The relay of a running process publishes it and the status worker "
        "applies it (or sets it aside again if it is poison still). Sends are not "
        "replayed: their message is FAILED send_failed and the agent sends it again.",
    )
    replaying.add_argument("id", help="the id `whatslike dlq list` shows")
    replaying.add_argument("--data-dir", type=Path, help="where serve keeps its data (./data)")

    hooks = commands.add_parser(
        "webhooks",
        help="an organization's webhook endpoints and parked deliveries (for operators)",
        description="A delivery that failed for the whole retry period "
        "(WHATSLIKE_WEBHOOK_RETRY_FOR_S) is parked; replaying an endpoint's parked "
        "deliveries makes them due again, with a fresh retry period. The same as the "
        "API's /api/webhooks operations, for one organization.",
    )
    hooks_commands = hooks.add_subparsers(dest="hooks_command", required=True, metavar="ACTION")
    for action, text in (
        ("list", "the organization's endpoints (no secrets)"),
        ("parked", "an endpoint's parked deliveries, oldest first"),
        ("replay", "deliver an endpoint's parked deliveries again"),
    ):
        sub = hooks_commands.add_parser(action, help=text)
        sub.add_argument("--org", required=True, help="the organization id")
        if action != "list":
            sub.add_argument("endpoint", help="the endpoint id `whatslike webhooks list` shows")
        if action == "parked":
            sub.add_argument("--limit", type=int, default=100, help="at most this many (100)")
        sub.add_argument("--json", action="store_true", help="one JSON object per line")
        sub.add_argument("--data-dir", type=Path, help="where serve keeps its data (./data)")
    return parser


def _bind(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio only sets TCP_NODELAY on sockets that say they are TCP,
    # and without it every keep-alive response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        sock.close()
        raise WhatslikeError(f"cannot listen on {settings.host}:{settings.port}: {exc}") from exc
    return sock


class _Server(uvicorn.Server):
    """uvicorn, but WebSockets are closed by the hub (1001, "server shutting down") before
    uvicorn would fail them with its own 1012."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self._runtime = runtime

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:  # the socket accepts from now on: only now say where it listens
            _settle_heap()
            _announce(self._runtime)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self._runtime.close_connections()
        await super().shutdown(sockets)


#: Allocations (net of frees) between two young collections: each connection holds a few
#: hundred tracked objects, and Python's default (700) collects every few connects.
GC_YOUNG_THRESHOLD = 20_000


def _settle_heap() -> None:
    """Move everything made during start-up (modules, settings, the app) out of the
    collector's sight, so no full collection walks it again, and collect less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def _announce(runtime: Runtime) -> None:
    settings = runtime.settings
    print(f"Whatslike listening on {settings.base_url} (roles: {','.join(settings.roles)})")
    demo = runtime.demo_url()
    if demo is not None:
        print(f"Demo (embedded mode only): {demo}")
    sys.stdout.flush()


#: Log records of a start held back at most (beyond, they are written at once).
START_LOG_RECORDS = 10_000


def _log_to_stderr(level: str) -> logging.handlers.MemoryHandler:
    """Log to stderr, but hold the records of the start back (see `_serve`)."""
    stream = logging.StreamHandler()
    stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    held = logging.handlers.MemoryHandler(
        START_LOG_RECORDS, flushLevel=logging.CRITICAL + 1, target=stream, flushOnClose=False
    )
    root = logging.getLogger()
    root.setLevel(level.upper())
    root.addHandler(held)
    return held


def _release_start_logs(held: logging.handlers.MemoryHandler, *, started: bool) -> None:
    """Write the held records and log straight to stderr from now on (a start that
    succeeded, or any start while debugging); drop them when it failed, since its one
    line says why (a driver's own error lines about the same refused connection are
    noise there)."""
    root = logging.getLogger()
    if started or root.level <= logging.DEBUG:
        held.flush()
    held.buffer.clear()
    root.removeHandler(held)
    if held.target is not None:
        root.addHandler(held.target)
    held.close()


async def _serve(
    settings: Settings, sock: socket.socket, log_level: str, held: logging.handlers.MemoryHandler
) -> None:
    runtime = Runtime(settings)
    secrets = serving.secrets_of(settings, runtime.deps.jwt_secret)
    serving.redact_logs(secrets)
    # Started before uvicorn, not in its lifespan: a start that fails (a backend away)
    # then ends here with its one-line reason (WhatslikeError), having undone itself,
    # instead of uvicorn's traceback, "Application startup failed" and a process that a
    # leftover thread keeps alive.
    try:
        await runtime.start()
    except BaseException:
        _release_start_logs(held, started=False)
        raise
    _release_start_logs(held, started=True)
    try:
        config = serving.server_config(runtime.app, settings, log_level, runtime.ws_protocol)
        # On the handlers that write from now on: the root's, and uvicorn's own, which
        # its configuration has just made.
        serving.defer_access_flush()
        serving.redact_logs(secrets)
        server = _Server(config, runtime)
        await server.serve(sockets=[sock])
    finally:
        await runtime.stop()  # already done by the lifespan, unless uvicorn never ran it
    if not server.started:
        raise WhatslikeError(f"the server did not start on {settings.host}:{settings.port}")


def serve(args: argparse.Namespace) -> int:
    settings = load_settings(
        roles=args.roles, host=args.host, port=args.port, data_dir=args.data_dir
    )
    for warning in unknown_variables():
        print(f"whatslike: warning: {warning}", file=sys.stderr)
    # Before the port is taken: a start that cannot succeed says why, whatever the port.
    check_wiring(settings)
    check_safety(settings)
    sock = _bind(settings)
    bound_port = sock.getsockname()[1]
    if bound_port != settings.port:
        settings = settings.model_copy(update={"port": bound_port})
    held = _log_to_stderr(args.log_level)
    # uvloop: the event loop in C (uvicorn only picks it when it creates the loop itself).
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(settings, sock, args.log_level, held))
    return 0


def token(args: argparse.Namespace) -> int:
    settings = load_settings(data_dir=args.data_dir, token_ttl_s=args.ttl)
    service = TokenService.from_settings(settings, resolve_jwt_secret(settings))
    try:
        print(service.mint(args.user, args.org, settings.token_ttl_s))
    except ValueError as exc:
        raise ConfigError(f"invalid setting token_ttl_s (--ttl): {exc}") from exc
    return 0


def stuck(args: argparse.Namespace) -> int:
    settings = load_settings(data_dir=args.data_dir)
    return asyncio.run(_print_stuck(settings, args.older_than, as_json=args.json))


async def _print_stuck(settings: Settings, older_than_s: float | None, *, as_json: bool) -> int:
    store = open_store(
        settings.effective_database_url, sqlite_synchronous=settings.sqlite_synchronous
    )
    await store.open()
    try:
        found = await find_stuck(store, settings, utcnow(), older_than_s)
    finally:
        await store.close()
    rows = [
        (kind, message)
        for kind, messages in (
            ("pending", found.pending),
            ("unknown", found.unknown),
            ("sent", found.sent),
        )
        for message in messages
    ]
    for kind, message in rows:
        since = message.send_started_at if kind == "unknown" else message.updated_at
        fields = {
            "kind": kind,
            "message_id": message.id,
            "conversation_id": message.conversation_id,
            "org_id": message.org_id,
            "channel": message.channel,
            "status": message.status.value,
            "provider_message_id": message.provider_message_id,
            "since": format_time(since) if since else None,
        }
        if as_json:
            print(json.dumps(fields))
        else:
            print("  ".join(str(value) for value in fields.values()))
    if not as_json:
        print(f"{len(rows)} stuck", file=sys.stderr)
    return 0


def dlq(args: argparse.Namespace) -> int:
    settings = load_settings(data_dir=args.data_dir)
    if args.dlq_command == "list":
        if args.limit < 1:
            raise ConfigError("--limit must be at least 1")
        return asyncio.run(_print_dead_letters(settings, args.limit, as_json=args.json))
    return asyncio.run(_replay(settings, args.id))


async def _print_dead_letters(settings: Settings, limit: int, *, as_json: bool) -> int:
    async with _opened_store(settings) as store:
        reviews = await dead_letters.review(store, limit)
    for reviewed in reviews:
        fields = {
            "id": reviewed.dead.id,
            "at": format_time(reviewed.dead.at),
            "topic": reviewed.source,
            "kind": reviewed.kind.value,
            "message_id": reviewed.status.message_id if reviewed.status else None,
            "status": reviewed.status.status.value if reviewed.status else None,
            "reason": reviewed.dead.reason,
        }
        if as_json:
            print(json.dumps(fields))
        else:
            print("  ".join(str(value) for value in fields.values()))
    if not as_json:
        unapplied = sum(r.kind is dead_letters.Kind.UNAPPLIED for r in reviews)
        print(f"{len(reviews)} dead letters, {unapplied} unapplied", file=sys.stderr)
    return 0


async def _replay(settings: Settings, dead_letter_id: str) -> int:
    async with _opened_store(settings) as store:
        reviewed = await dead_letters.replay(store, dead_letter_id)
    status = reviewed.status
    assert status is not None  # replay refuses a dead letter without one
    print(
        f"dead letter {reviewed.dead.id} ({reviewed.kind.value}): status {status.status.value} "
        f"of message {status.message_id} handed to the outbox again"
    )
    return 0


def webhooks(args: argparse.Namespace) -> int:
    settings = load_settings(data_dir=args.data_dir)
    if args.hooks_command == "parked" and args.limit < 1:
        raise ConfigError("--limit must be at least 1")
    return asyncio.run(_webhooks(settings, args))


async def _webhooks(settings: Settings, args: argparse.Namespace) -> int:
    async with _opened_store(settings) as store:
        rows: list[dict[str, Any]]
        if args.hooks_command == "list":
            rows = [endpoint_json(e) for e in await store.webhook_endpoints(args.org)]
        elif args.hooks_command == "parked":
            parked = await store.parked_webhook_deliveries(args.org, args.endpoint, args.limit)
            if parked is None:
                raise ConfigError(f"no webhook endpoint {args.endpoint} of {args.org}")
            rows = [parked_json(d) for d in parked]
        else:
            replayed = await store.replay_parked_webhooks(args.org, args.endpoint, utcnow())
            if replayed is None:
                raise ConfigError(f"no webhook endpoint {args.endpoint} of {args.org}")
            rows = [{"endpoint": args.endpoint, "replayed": replayed}]
    for row in rows:
        print(json.dumps(row) if args.json else "  ".join(str(v) for v in row.values()))
    return 0


@asynccontextmanager
async def _opened_store(settings: Settings) -> AsyncIterator[Store]:
    store = open_store(
        settings.effective_database_url, sqlite_synchronous=settings.sqlite_synchronous
    )
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"serve": serve, "token": token, "stuck": stuck, "dlq": dlq, "webhooks": webhooks}
    try:
        return commands[args.command](args)
    except WhatslikeError as exc:
        print(f"whatslike: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
