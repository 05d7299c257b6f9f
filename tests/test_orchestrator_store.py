"""The orchestrator's SQLite journal batching and its timeout wheel (no broker)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

from daemon.orchestrator.store import Store
from daemon.timers import TimerWheel


def _row(task_id: str) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "user": "u",
        "capability": "echo",
        "node": "n1",
        "priority": "interactive",
        "submitted": time.time(),
        "queue_ms": 0.1,
        "run_ms": 0.2,
        "total_ms": 0.5,
        "outcome": "done",
        "error_code": None,
        "attempts": 1,
        "input_bytes": 3,
        "output_bytes": 3,
    }


def _active(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return [r[0] for r in db.execute("SELECT task_id FROM active ORDER BY task_id")]


async def test_journal_survives_a_flush_and_short_tasks_never_touch_it(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    store = Store(path, 30, 1000)
    await store.open()
    built: list[str] = []

    def doc(task_id: str) -> Any:
        def make() -> dict[str, Any]:
            built.append(task_id)
            return {"id": task_id}

        return make

    # 'long' is still active at the flush: journalled.  'short' ends within the
    # window: neither written nor deleted, its document never built; its history is.
    store.journal_add("long", 1.0, doc("long"))
    store.journal_add("short", 2.0, doc("short"))
    store.journal_remove("short")
    store.record(_row("short"))
    await store.flush()
    assert built == ["long"]
    assert _active(path) == ["long"]
    assert await store.load_active() == [{"id": "long"}]
    assert [r["task_id"] for r in await store.history()] == ["short"]

    # An id that ends and is submitted again within one window stays journalled.
    store.journal_remove("long")
    store.journal_add("long", 3.0, doc("long"))
    await store.flush()
    assert _active(path) == ["long"]
    store.journal_remove("long")
    await store.flush()
    assert _active(path) == []

    # History rows go in several rows per statement; more than one statement's worth.
    for i in range(150):
        store.record(_row(f"t{i}"))
    await store.flush()
    rows = await store.history(limit=1000)
    assert len(rows) == 151
    assert rows[-1] == {**_row("short"), "submitted": rows[-1]["submitted"]}
    await store.close()


async def test_timer_wheel_fires_late_never_early_and_forgets_discarded() -> None:
    fired: list[tuple[str, float]] = []
    loop = asyncio.get_running_loop()
    two = asyncio.Event()

    def fire(item: str) -> None:
        fired.append((item, loop.time()))
        if len(fired) == 2:
            two.set()

    wheel: TimerWheel[str] = TimerWheel(fire, 0.02)
    start = loop.time()
    wheel.add_in("a", 0.05)
    key_b = wheel.add_in("b", 0.05)
    wheel.add_in("c", 0.0)
    wheel.discard("b", key_b)
    assert len(wheel) == 2
    async with asyncio.timeout(2):
        await two.wait()
    assert [name for name, _ in fired] == ["c", "a"]
    assert fired[1][1] - start >= 0.05
    assert len(wheel) == 0
    wheel.add_in("d", 10)
    wheel.close()
    assert len(wheel) == 0
