"""``mtor`` — the realm's command line.

Exit codes follow sysexits(3): 64 usage, 69 broker unreachable, 77 refused
by the broker, 78 bad configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import yaml

from daemon import __version__, gctune
from daemon.cli.common import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_NOPERM,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    Command,
    add_common_options,
    environ,
    install_stop_signals,
)
from daemon.config import Config, Overrides, config_for_show, load_config, read_yaml
from daemon.errors import BusAuthError, BusNotConnectedError, ConfigError, MtorError
from daemon.logs import setup_logging

log = logging.getLogger("mtor")

# Long-running commands; the others are one-shot and log only warnings by default.
DAEMON_COMMANDS = {"node", "up", "orchestrator", "gateway"}

_COMMANDS: dict[str, Command] = {}


def command(name: str) -> Callable[[Command], Command]:
    def register(fn: Command) -> Command:
        _COMMANDS[name] = fn
        return fn

    return register


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    add_common_options(common, sub=True)
    parser = argparse.ArgumentParser(
        prog="mtor",
        description="M-TOR: an event-driven AI operating realm for edge devices.",
    )
    add_common_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common])

    node = add(
        "node",
        "run the node daemon: the nodes named in config; without `nodes:` in it, "
        "every node type that works on this machine",
    )
    node.add_argument(
        "--auto-nodes",
        action="store_true",
        help="beside the nodes the config names, run every other node type that works "
        "here (what `mtor up` does)",
    )
    up = add("up", "all-in-one: broker if none is reachable, orchestrator and a node")
    up.add_argument("--no-broker", action="store_true", help="never start a private broker")
    st = add("status", "table of the realm's nodes (from retained topics)")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    ev = add("events", "tail events, readable")
    ev.add_argument("filter", nargs="?", help="node id, or a filter under event/ (e.g. +/sensor/#)")
    ev.add_argument("--json", action="store_true", help="one JSON object per line")
    ev.add_argument("--count", type=int, help="exit after this many events")
    ev.add_argument("--timeout", type=float, help="exit after this many seconds")
    cfg = add("config", "validate or show the configuration")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    val = cfg_sub.add_parser("validate", help="check a config file and explain every error")
    val.add_argument("file", nargs="?", help="file to check (default: the one in use)")
    show = cfg_sub.add_parser("show", help="print the effective config, secrets masked")
    show.add_argument("--json", action="store_true", help="as JSON (secrets masked)")
    ver = add("version", "print the version")
    ver.add_argument("--json", action="store_true", help="version and Python as JSON")
    for module_name in EXTENSION_MODULES:
        module = importlib.import_module(module_name)
        _COMMANDS.update(module.add_commands(sub, common))
    _common_options_everywhere(parser)
    return parser


def _common_options_everywhere(parser: argparse.ArgumentParser) -> None:
    """The realm options after a sub-command however deep, as after a first-level one
    (`mtor workflows list --config FILE`, `mtor config show --realm R`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in {id(c): c for c in action.choices.values()}.values():
                if not any("--config" in a.option_strings for a in child._actions):
                    add_common_options(child, sub=True)
                _common_options_everywhere(child)


# Other parts of the CLI live in their own modules.  Each has
# ``add_commands(subparsers, common_parent) -> dict[name, handler]`` where a
# handler is ``(args, config) -> exit code``; argparse setup stays cheap, the
# heavy imports happen inside the handlers.
EXTENSION_MODULES: list[str] = [
    "daemon.cli.models_cmd",
    "daemon.cli.tasks_cmd",
    "daemon.cli.workflows_cmd",
    "daemon.cli.vision_cmd",
    "daemon.cli.voice_cmd",
    "daemon.cli.broker_cmd",
    "daemon.cli.swarm_cmd",
    "daemon.cli.gateway_cmd",
]


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    gctune.configure()
    try:
        return asyncio.run(coro)
    except BaseException as exc:
        for kind, code in ((BusAuthError, EXIT_NOPERM), (BusNotConnectedError, EXIT_UNAVAILABLE)):
            found = _find(exc, kind)
            if found is not None:
                print(f"mtor: {found}", file=sys.stderr)
                return code
        inner = _find(exc, MtorError)
        if inner is not None and inner is not exc:
            raise inner from exc
        raise


def _find(exc: BaseException, kind: type[Exception]) -> BaseException | None:
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    return None


@command("node")
def cmd_node(args: argparse.Namespace, config: Config) -> int:
    from daemon.cli.nodes import hosted_config
    from daemon.runtime import NodeDaemon
    from daemon.sdnotify import Notifier

    hosted = hosted_config(config, add_offers=args.auto_nodes)

    async def main() -> int:
        stop = asyncio.Event()
        install_stop_signals(stop)
        daemon = NodeDaemon(hosted, notifier=Notifier(environ()))
        await daemon.run(stop)
        return EXIT_OK

    return run_async(main())


@command("up")
def cmd_up(args: argparse.Namespace, config: Config) -> int:
    from daemon.cli.up import run_up

    return run_async(run_up(config, args))


@command("status")
def cmd_status(args: argparse.Namespace, config: Config) -> int:
    from daemon.cli.inspect import collect_nodes, print_status, status_rows

    async def main() -> int:
        rows = status_rows(await collect_nodes(config))
        print_status(rows, args.json)
        return EXIT_OK

    return run_async(main())


@command("events")
def cmd_events(args: argparse.Namespace, config: Config) -> int:
    from daemon.cli.inspect import tail_events

    async def main() -> int:
        stop = asyncio.Event()
        install_stop_signals(stop)
        tail = asyncio.create_task(
            tail_events(
                config, args.filter, as_json=args.json, count=args.count, timeout=args.timeout
            )
        )
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({tail, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not tail.done():
            tail.cancel()
            return EXIT_OK
        seen = tail.result()
        if args.count is None or seen >= args.count:
            return EXIT_OK
        # Not 69 (the broker could not be reached): it was, the events did not come.
        print(f"mtor events: {seen} of {args.count} event(s) in {args.timeout:g}s", file=sys.stderr)
        return EXIT_FAILURE

    return run_async(main())


@command("version")
def cmd_version(args: argparse.Namespace, config: Config) -> int:
    if args.json:
        print(json.dumps({"version": __version__, "python": sys.version.split()[0]}))
    else:
        print(f"mtor {__version__}")
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    overrides = Overrides(args.broker, args.realm, args.node_id)
    if args.config_command == "validate":
        from daemon.config import build_config

        try:
            if args.file:
                from pathlib import Path

                build_config(read_yaml(Path(args.file)), {}, overrides, args.file)
                print(f"{args.file}: OK")
            else:
                _, used = load_config(args.config, environ(), overrides)
                print(f"{used or 'built-in defaults'}: OK")
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return EXIT_CONFIG
        return EXIT_OK
    try:
        config, _ = load_config(args.config, environ(), overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    data = config_for_show(config)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False), end="")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config":
        return cmd_config(args)
    try:
        config, used = load_config(
            args.config, environ(), Overrides(args.broker, args.realm, args.node_id)
        )
    except ConfigError as exc:
        print(f"mtor: configuration error\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    # One-shot commands stay quiet unless asked; daemons log at the configured level.
    level = config.logging.level if args.command in DAEMON_COMMANDS else "warning"
    setup_logging(args.log_level or level, config.logging.format)
    log.debug("config: %s", used or "built-in defaults")
    try:
        return _COMMANDS[args.command](args, config)
    except ConfigError as exc:
        print(f"mtor: configuration error\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    except MtorError as exc:
        print(f"mtor: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
