"""Garbage-collector settings for the `mtor` processes.

CPython's cyclic collector runs a full collection now and then that walks
every tracked object: the modules, pydantic's schemas, the registry, models.
In the orchestrator that was a 15-16 ms stall (the worst latency of a task at
one in flight, against a p99 of 1.2-1.5 ms).  Objects that live as long as
the process need not be walked: :func:`configure` raises the thresholds
(fewer young collections for the many short-lived message objects) and
:func:`settle` moves everything alive into the permanent generation (see
:func:`gc.freeze`) once startup is over.  Measured in docs/benchmarks.md.

Only the CLI turns this on (:func:`configure`): a test or a program that runs
the daemons in its own process keeps its collector as it was.
"""

from __future__ import annotations

import gc
from typing import Final

# gen0 every 7,000 net container allocations (CPython's default is 700), gen1
# after 50 of those, gen2 after 100 gen1 collections.
THRESHOLDS: Final = (7000, 50, 100)

_state = {"enabled": False}


def configure() -> None:
    """In a process about to run a daemon: tuned thresholds, imports frozen."""
    _state["enabled"] = True
    gc.set_threshold(*THRESHOLDS)
    gc.freeze()


def settle() -> None:
    """Once a daemon is up: what startup made (config, connections, models) is
    frozen too.  A no-op unless :func:`configure` ran in this process."""
    if _state["enabled"]:
        gc.collect()
        gc.freeze()
