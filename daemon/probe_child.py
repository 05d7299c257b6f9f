"""The probe child (``python -m daemon.probe_child``): import, make, set up and
close the nodes it is handed, one after the other, and say how far it got.

It reads from stdin (pickled, from its own parent :mod:`daemon.probe`) the
parent's ``sys.path``, then the configuration and the nodes to probe (name,
implementation, the modules to keep out).  It writes one JSON line per step
to the fd it was given (``{"node", "step"}``, ``{"node", "import"}`` for each
third-party package a node's loading imports first, ``{"node", "done",
"error"}``), so that when a backend kills it the parent knows the last step it
reached.  :mod:`faulthandler` writes the stacks of a fatal signal to stderr,
which the parent reads too.  Nothing here connects to the broker: the nodes
get a bus that is never run.
"""

from __future__ import annotations

import asyncio
import contextvars
import faulthandler
import json
import os
import pickle
import sys
from typing import IO, Any

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("probe_node", default=None)


def _emit(out: IO[str], **fields: Any) -> None:
    out.write(json.dumps(fields) + "\n")
    out.flush()


def _import_hook(out: IO[str]) -> None:
    seen = set(sys.modules)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event != "import":
            return
        top = str(args[0]).partition(".")[0]
        if top in seen:
            return
        seen.add(top)
        node = _current.get()
        if node is not None and top not in sys.stdlib_module_names:
            _emit(out, node=node, **{"import": top})

    sys.addaudithook(hook)


async def _probe(out: IO[str], config: Any, item: dict[str, Any]) -> None:
    from daemon.bus import Bus
    from daemon.node import NodeContext
    from daemon.plugins import load_attr

    name = item["name"]
    _current.set(name)
    error: str | None = None
    try:
        _emit(out, node=name, step=f"import {item['impl'].partition(':')[0]}")
        cls = load_attr(item["impl"])
        _emit(out, node=name, step="construct")

        async def announce() -> None:
            return None

        ctx = NodeContext(
            node_id=config.effective_node_id,
            config=config,
            bus=Bus(config.broker, f"mtor-probe-{os.getpid()}"),
            state_dir=config.daemon.state_dir,
            announce=announce,
        )
        node = cls(name, config.nodes[name], ctx)
        _emit(out, node=name, step="setup")
        try:
            await node.setup()
            _emit(out, node=name, step="capabilities")
            node.capabilities()
        finally:
            _emit(out, node=name, step="close")
            await node.close()
    except Exception as exc:  # not a crash: the daemon's own load reports it
        error = f"{type(exc).__name__}: {exc}"[:300]
    _emit(out, node=name, done=True, error=error)


def main() -> None:
    # The step lines go to a fd of their own: node code printing to stdout must not
    # mix into them, so stdout goes to stderr from here on.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    faulthandler.enable(file=sys.stderr, all_threads=True)
    stdin = sys.stdin.buffer
    sys.path[:] = pickle.load(stdin)
    request = pickle.load(stdin)
    from daemon.probe_fault import BLOCKER

    for module, reason in request["blocked"].items():
        BLOCKER.block(module, reason)
    _import_hook(out)
    for item in request["nodes"]:
        asyncio.run(_probe(out, request["config"], item))
    out.flush()
    # Skip interpreter teardown: a backend's atexit or thread join may hang or crash,
    # and what counted (the steps) is written.
    os._exit(0)


if __name__ == "__main__":
    main()
