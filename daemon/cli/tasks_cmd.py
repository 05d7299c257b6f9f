"""``mtor orchestrator``, ``mtor ask``, ``mtor tasks|history|stats`` and ``mtor admin``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

from daemon.cli import tables
from daemon.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_TEMPFAIL,
    Command,
    api_token,
    client_bus,
    environ,
    install_stop_signals,
)
from daemon.config import Config

ADMIN_OPS = {
    "users": ("users", []),
    "user-add": ("user_add", ["name"]),
    "user-rm": ("user_remove", ["name"]),
    "ban": ("ban", ["name"]),
    "unban": ("unban", ["name"]),
    "drain": ("drain", ["node"]),
    "undrain": ("undrain", ["node"]),
    "blacklist": ("blacklist", ["node"]),
    "unblacklist": ("unblacklist", ["node"]),
    "cancel": ("cancel", ["task_id"]),
}


def add_commands(sub: Any, common: argparse.ArgumentParser) -> dict[str, Command]:
    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name, help=help_text, description=help_text, parents=[common]
        )
        return p

    add("orchestrator", "run the realm orchestrator")
    ask = add("ask", "submit a task and stream its progress and result")
    ask.add_argument("capability", help="e.g. echo, sleep, chat, stt, tts, vision.detect")
    ask.add_argument("input", nargs="*", help="JSON, or words joined into a string")
    ask.add_argument(
        "--priority",
        choices=["alarm", "interactive", "batch"],
        default="interactive",
        help="queue order: alarm first, batch last (default interactive)",
    )
    ask.add_argument("--timeout", type=float, default=120.0, help="seconds")
    ask.add_argument("--node", help="pin to this node")
    ask.add_argument("--json", action="store_true", help="print every update as JSON")
    ask.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    _identity(ask)
    for name, help_text in (
        ("tasks", "the live queue and running tasks"),
        ("stats", "orchestrator statistics"),
    ):
        p = add(name, help_text)
        p.add_argument("--json", action="store_true", help="the orchestrator's answer as JSON")
        _identity(p)
    hist = add("history", "finished tasks (newest first)")
    hist.add_argument("--limit", type=int, default=20, help="at most this many rows (default 20)")
    hist.add_argument("--of-user", dest="of_user", help="only this user's tasks")
    hist.add_argument("--capability", help="only tasks of this capability (e.g. chat)")
    hist.add_argument("--json", action="store_true", help="the rows as JSON (epoch times, ms)")
    _identity(hist)
    adm = add("admin", "sysop operations")
    adm.add_argument("op", choices=sorted(ADMIN_OPS), help="what to do")
    adm.add_argument("target", nargs="?", help="user name, node id or task id")
    adm.add_argument(
        "--role",
        default="user",
        choices=["sysop", "user", "guest", "device"],
        help="user-add: the new user's role (default user)",
    )
    adm.add_argument("--reason", help="ban, cancel: why (kept in the log and the record)")
    _identity(adm)
    return {
        "orchestrator": cmd_orchestrator,
        "ask": cmd_ask,
        "tasks": cmd_view,
        "stats": cmd_view,
        "history": cmd_view,
        "admin": cmd_admin,
    }


def _identity(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user", dest="as_user", help="submit as this user (env MTOR_USER)")
    p.add_argument("--token", help="API token (env MTOR_TOKEN; default: the sysop token file)")


def _token(args: argparse.Namespace, config: Config) -> str | None:
    return api_token(config, getattr(args, "token", None))


def cmd_orchestrator(args: argparse.Namespace, config: Config) -> int:
    from daemon.orchestrator.ha import SteppedDown
    from daemon.orchestrator.service import Orchestrator
    from daemon.sdnotify import Notifier

    async def main() -> int:
        stop = asyncio.Event()
        install_stop_signals(stop)
        try:
            await Orchestrator(config, notifier=Notifier(environ())).run(stop)
        except SteppedDown as exc:
            # Another orchestrator took over while this one was away: start again, as
            # its standby (systemd and `mtor up` restart a daemon that exits 75).
            print(f"mtor orchestrator: stepped down: {exc}", file=sys.stderr)
            return EXIT_TEMPFAIL
        return EXIT_OK

    from daemon.cli.main import run_async

    return run_async(main())


def parse_input(words: list[str]) -> Any:
    if not words:
        return None
    text = " ".join(words)
    if len(words) == 1:
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


def cmd_ask(args: argparse.Namespace, config: Config) -> int:
    from daemon.client import RealmClient
    from daemon.protocol.task import Constraints

    async def main() -> int:
        async with client_bus(config, "ask") as bus:
            client = RealmClient(
                bus,
                config.realm,
                user=args.as_user or environ().get("MTOR_USER"),
                token=getattr(args, "token", None) or environ().get("MTOR_TOKEN"),
            )
            await client.start()
            stop = asyncio.Event()
            install_stop_signals(stop)
            handle = await client.submit(
                args.capability,
                parse_input(args.input),
                priority=args.priority,
                timeout=args.timeout,
                progress=True,
                constraints=Constraints(node=args.node),
            )
            streamed = False
            async with asyncio.timeout(args.timeout + 10):
                async for update in handle:
                    if stop.is_set():
                        await handle.cancel()
                    if args.json:
                        print(update.model_dump_json(exclude_none=True), flush=True)
                        continue
                    if update.status == "partial":
                        out = update.output
                        delta = out.get("delta") if isinstance(out, dict) else None
                        if isinstance(delta, str):
                            sys.stdout.write(delta)
                            streamed = True
                        else:
                            print(json.dumps(update.output), flush=True)
                        sys.stdout.flush()
                    elif update.waiting and not args.quiet:
                        cap = args.capability
                        print(f"[waiting for {cap}: {update.waiting}]", file=sys.stderr)
                    elif update.status in ("queued", "assigned", "started") and not args.quiet:
                        where = f" on {update.node}" if update.node else ""
                        pos = f" (position {update.position})" if update.position else ""
                        print(f"[{update.status}{where}{pos}]", file=sys.stderr)
            final = handle.final
            assert final is not None
            if args.json:
                return EXIT_OK if final.status == "done" else EXIT_FAILURE
            if final.status != "done":
                err = final.error
                print(
                    f"\n{final.status}: {err.code}: {err.message}" if err else final.status,
                    file=sys.stderr,
                )
                return EXIT_FAILURE
            if streamed:
                print()
            else:
                out = final.output
                text = out.get("text") if isinstance(out, dict) and "text" in out else out
                print(text if isinstance(text, str) else json.dumps(text, indent=2))
            return EXIT_OK

    from daemon.cli.main import run_async

    return run_async(main())


def _admin_call(config: Config, args: argparse.Namespace, op: str, **kw: Any) -> Any:
    """The orchestrator's answer to an admin request (exit 69 / 77 when the broker
    cannot be reached or refuses us, as every other command)."""
    from daemon.cli.main import run_async
    from daemon.client import RealmClient

    result: list[Any] = []

    async def main() -> int:
        async with client_bus(config, "admin") as bus:
            client = RealmClient(
                bus, config.realm, user=args.as_user or "sysop", token=_token(args, config)
            )
            await client.start()
            result.append(await client.admin(op, **kw))
        return EXIT_OK

    code = run_async(main())
    if code != EXIT_OK:
        raise SystemExit(code)
    return result[0]


def cmd_view(args: argparse.Namespace, config: Config) -> int:
    kw: dict[str, Any] = {}
    if args.command == "history":
        kw = {"limit": args.limit, "user": args.of_user, "capability": args.capability}
    result = _admin_call(config, args, args.command, **kw)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(VIEWS[args.command](result))
    return EXIT_OK


def tasks_table(tasks: list[dict[str, Any]]) -> str:
    if not tasks:
        return "no active tasks"
    header = ("TASK", "CAPABILITY", "USER", "PRIORITY", "STATE", "NODE", "ATTEMPT", "AGE")
    rows = [
        (t["task_id"], t["capability"], t["user"], t["priority"], t["state"], t["node"],
         t["attempt"] or None, tables.age(t.get("age_s")))
        for t in tasks
    ]  # fmt: skip
    return tables.table(header, rows)


def history_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no finished tasks"
    header = ("WHEN", "TASK", "CAPABILITY", "USER", "NODE", "OUTCOME", "QUEUE", "RUN", "TOTAL")
    out = []
    for r in rows:
        outcome = r["outcome"] + (f" ({r['error_code']})" if r.get("error_code") else "")
        out.append(
            (tables.when(r["submitted"]), r["task_id"], r["capability"], r["user"], r["node"],
             outcome, tables.ms(r["queue_ms"]), tables.ms(r["run_ms"]), tables.ms(r["total_ms"]))
        )  # fmt: skip
    return tables.table(header, out)


def stats_table(stats: dict[str, Any]) -> str:
    caps = sorted(
        set(stats["queues"]) | set(stats["running"]) | set(stats["completed"])
        | set(stats["failed"])
    )  # fmt: skip
    head = (
        f"up {tables.age(stats['uptime_s'])}, {stats['peers_online']} peer(s) online, "
        f"{sum(stats['completed'].values())} done, {sum(stats['failed'].values())} failed"
    )
    lat = stats["latency_ms"]
    per_cap = [
        (cap, stats["queues"].get(cap, 0), stats["running"].get(cap, 0),
         stats["completed"].get(cap, 0), stats["failed"].get(cap, 0),
         stats["throughput_per_s"].get(cap), tables.ms(lat.get(cap, {}).get("p50")),
         tables.ms(lat.get(cap, {}).get("p99")))
        for cap in caps
    ]  # fmt: skip
    parts = [head]
    if per_cap:
        header = ("CAPABILITY", "QUEUED", "RUNNING", "DONE", "FAILED", "PER S", "P50", "P99")
        parts += ["", tables.table(header, per_cap)]
    peers = [
        (node, _peer_state(p), name, f"{s['in_use']}/{s['capacity']}", tables.ms(s["latency_ms"]),
         f"{s['success'] * 100:.0f} %", s["breaker"])
        for node, p in sorted(stats["peers"].items())
        for name, s in sorted(p["slots"].items())
    ]  # fmt: skip
    if peers:
        peer_header = ("PEER", "STATE", "CAPABILITY", "IN USE", "LATENCY", "SUCCESS", "BREAKER")
        parts += ["", tables.table(peer_header, peers)]
    return "\n".join(parts)


def _peer_state(p: dict[str, Any]) -> str:
    flags = [f for f in ("drained", "blacklisted") if p.get(f)]
    return ",".join(flags) if flags else ("online" if p.get("online") else "offline")


VIEWS: dict[str, Callable[[Any], str]] = {
    "tasks": tasks_table,
    "history": history_table,
    "stats": stats_table,
}


def cmd_admin(args: argparse.Namespace, config: Config) -> int:
    op, needs = ADMIN_OPS[args.op]
    kw: dict[str, Any] = {}
    if needs:
        if not args.target:
            print(f"mtor admin {args.op}: give the {needs[0]}", file=sys.stderr)
            return 64
        kw[needs[0]] = args.target
    if op == "user_add":
        kw["role"] = args.role
    if args.reason:
        kw["reason"] = args.reason
    result = _admin_call(config, args, op, **kw)
    print(json.dumps(result, indent=2))
    return EXIT_OK
