"""``mtor workflows list | validate [FILE] | run NAME | history [NAME]``.

``list`` and ``validate`` read the configuration (no broker needed);
``run`` and ``history`` talk to the engine over ``workflows/request``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any

from daemon.cli.common import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    Command,
    client_bus,
    environ,
)
from daemon.config import Config
from daemon.errors import ConfigError


def add_commands(sub: Any, common: argparse.ArgumentParser) -> dict[str, Command]:
    p: argparse.ArgumentParser = sub.add_parser(
        "workflows", help="list, validate, run workflows and read their history", parents=[common]
    )
    wsub = p.add_subparsers(dest="wf_command", metavar="ACTION", required=True)
    ls = wsub.add_parser("list", help="workflows of the config (and live counters with --live)")
    ls.add_argument("--live", action="store_true", help="ask the orchestrator for its counters")
    ls.add_argument("--json", action="store_true", help="rows as JSON")
    val = wsub.add_parser("validate", help="check the config's workflows or a workflows file")
    val.add_argument(
        "file", nargs="?", help="a workflows file (name -> definition), or a config file"
    )
    run = wsub.add_parser("run", help="start a workflow by hand")
    run.add_argument("name", help="the workflow's name")
    run.add_argument("--input", help="JSON input (the run's `input`)")
    run.add_argument("--wait", action="store_true", help="wait for the run to finish")
    run.add_argument(
        "--timeout", type=float, default=600.0, help="with --wait: give up after (s, 600)"
    )
    hist = wsub.add_parser("history", help="finished runs, newest first (from the orchestrator)")
    hist.add_argument("name", nargs="?", help="only this workflow's runs")
    hist.add_argument("--limit", type=int, default=20, help="at most this many runs (20)")
    hist.add_argument("--json", action="store_true", help="rows as JSON")
    return {"workflows": cmd_workflows}


def cmd_workflows(args: argparse.Namespace, config: Config) -> int:
    from daemon.workflows.loader import load_workflows

    if args.wf_command == "validate":
        try:
            flows = _validate(args.file, config)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return EXIT_CONFIG
        print(f"{args.file or 'config'}: {len(flows)} workflow(s) OK")
        return EXIT_OK
    if args.wf_command == "list" and not args.live:
        try:
            flows = load_workflows(config)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return EXIT_CONFIG
        rows = [
            {
                "name": n,
                "where": "node" if w.local else "orchestrator",
                "enabled": w.enabled,
                "triggers": [t.type for t in w.triggers] or ["manual"],
                "steps": len(w.steps),
                "description": w.description,
            }
            for n, w in flows.items()
        ]
        _print_rows(
            rows, args.json, ["name", "where", "enabled", "triggers", "steps", "description"]
        )
        return EXIT_OK
    from daemon.cli.main import run_async

    return run_async(_remote(args, config))


def _validate(file: str | None, config: Config) -> dict[str, Any]:
    """The workflows of ``file`` (a workflows file; a realm config file is recognised
    and its ``workflows:`` section checked), else of the loaded config."""
    from daemon.config import Config as ConfigModel
    from daemon.config import read_yaml
    from daemon.workflows.loader import load_workflows, parse_mapping

    if file is None:
        return load_workflows(config)
    data = read_yaml(Path(file))
    keys = set(ConfigModel.model_fields) - {"workflows"}
    sections = sorted(  # a workflow may be called "broker": it has steps
        k for k, v in data.items() if k in keys and not (isinstance(v, dict) and "steps" in v)
    )
    if not sections:
        return parse_mapping(data, file)
    print(
        f"{file} is a realm config file ({', '.join(sections)}), not a workflows file: "
        "checking its workflows section (`mtor config validate FILE` checks the rest)",
        file=sys.stderr,
    )
    section = data.get("workflows") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{file}: workflows: must be a mapping of name -> workflow")
    return parse_mapping(section, f"{file}: workflows")


async def _remote(args: argparse.Namespace, config: Config) -> int:
    from daemon import topics
    from daemon.accounts import ANONYMOUS, account_name
    from daemon.bus import Inbound
    from daemon.messages import decode
    from daemon.protocol.workflow import WorkflowEvent, WorkflowReply, WorkflowRequest

    async with client_bus(config, "workflows") as bus:
        me = account_name(bus.config.username, environ().get("MTOR_USER") or ANONYMOUS)
        reply_topic = topics.REPLY.build(
            realm=config.realm, user=me, rest=f"{uuid.uuid4().hex[:16]}/wf"
        )
        replies: asyncio.Queue[WorkflowReply] = asyncio.Queue()
        events: asyncio.Queue[WorkflowEvent] = asyncio.Queue()

        async def on_reply(msg: Inbound) -> None:
            replies.put_nowait(decode(msg.payload, WorkflowReply))

        async def on_event(msg: Inbound) -> None:
            events.put_nowait(decode(msg.payload, WorkflowEvent))

        await bus.subscribe(reply_topic, on_reply)
        if args.wf_command == "run" and args.wait:
            flt = topics.WORKFLOW_EVENT.build(realm=config.realm, name=args.name)
            await bus.subscribe(flt, on_event)
        token = environ().get("MTOR_TOKEN")
        if args.wf_command == "run":
            req = WorkflowRequest(
                op="run",
                name=args.name,
                input=json.loads(args.input) if args.input else None,
                token=token,
            )
        elif args.wf_command == "history":
            req = WorkflowRequest(op="history", name=args.name, limit=args.limit, token=token)
        else:
            req = WorkflowRequest(op="list", token=token)
        await bus.publish(
            topics.WORKFLOW_REQUEST.build(realm=config.realm, user=me),
            req,
            response_topic=reply_topic,
            correlation_data=uuid.uuid4().hex.encode(),
        )
        try:
            async with asyncio.timeout(5):
                reply = await replies.get()
        except TimeoutError:
            print(
                "mtor: no answer from the workflow engine (is the orchestrator running?)",
                file=sys.stderr,
            )
            return EXIT_UNAVAILABLE
        if not reply.ok:
            print(f"mtor: {reply.code}: {reply.error}", file=sys.stderr)
            return EXIT_FAILURE
        if args.wf_command == "history":
            rows = [
                {**r, "steps": len(r["steps"]), "error": r.get("error_code") or ""}
                for r in reply.result
            ]
            if args.json:
                print(json.dumps(reply.result, indent=2))
            else:
                cols = [
                    "run_id",
                    "workflow",
                    "where",
                    "trigger",
                    "outcome",
                    "duration_ms",
                    "steps",
                    "error",
                ]
                _print_rows(rows, False, cols)
            return EXIT_OK
        if args.wf_command == "list":
            _print_rows(reply.result, args.json, ["name", "where", "enabled", "running", "counts"])
            return EXIT_OK
        run_id = reply.result["run_id"]
        print(run_id)
        if not args.wait:
            return EXIT_OK
        return await _follow(events, run_id, args.timeout)


async def _follow(events: asyncio.Queue[Any], run_id: str, timeout: float) -> int:
    """Print a run's step events until it finishes; the exit code is its outcome."""
    async with asyncio.timeout(timeout):
        while True:
            ev = await events.get()
            if ev.run_id != run_id:
                continue
            err = f" {ev.error.code}: {ev.error.message}" if ev.error else ""
            if ev.kind == "step":
                line = f"  {ev.step} ({ev.step_kind}) {ev.status} {ev.duration_ms} ms{err}"
                print(line, file=sys.stderr)
            if ev.kind == "finished":
                print(f"{ev.status} in {ev.duration_ms} ms{err}")
                return EXIT_OK if ev.status == "done" else EXIT_FAILURE


def _print_rows(rows: list[dict[str, Any]], as_json: bool, cols: list[str]) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in table]) for i, c in enumerate(cols)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _cell(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    if isinstance(v, dict):
        return " ".join(f"{k}={x}" for k, x in v.items())
    return "" if v is None else str(v)
