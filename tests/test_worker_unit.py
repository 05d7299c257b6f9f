"""The worker's own timing without a broker: deadlines and "started" acks."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from daemon.bus import Inbound
from daemon.messages import decode, encode
from daemon.protocol.task import TaskAssign, WorkerReport
from daemon.worker import ACK_DELAY, TaskRun, Worker


class FakeBus:
    """Collects what the worker posts; ``got`` is set on every post."""

    client_id = "test"

    def __init__(self) -> None:
        self.reports: list[WorkerReport] = []
        self.got = asyncio.Event()

    def post(self, topic: str, payload: Any, **_kw: Any) -> None:
        self.reports.append(decode(encode(payload), WorkerReport))
        self.got.set()

    async def wait_for(self, status: str) -> WorkerReport:
        async with asyncio.timeout(5):
            while True:
                for r in self.reports:
                    if r.status == status:
                        return r
                self.got.clear()
                await self.got.wait()


class Sleeper:
    """Sleeps ``input`` seconds; records whether it saw its cancel flag."""

    def __init__(self) -> None:
        self.flagged = False

    async def execute(self, run: TaskRun) -> Any:
        try:
            await asyncio.sleep(float(run.input))
        finally:
            self.flagged = run.cancel_flag.is_set()
        return "slept"


def _assign(task_id: str, seconds: float, deadline_in: float) -> Inbound:
    msg = TaskAssign(
        task_id=task_id,
        attempt=1,
        capability="sleep",
        input=seconds,
        deadline=time.time() + deadline_in,
    )
    return Inbound(topic="mtor/home/node/w1/task", payload=encode(msg), qos=1)


async def test_a_task_past_its_deadline_is_cancelled_and_reported_as_timeout() -> None:
    bus = FakeBus()
    worker = Worker(bus, "home", "w1")  # type: ignore[arg-type]
    node = Sleeper()
    worker.set_routes({"sleep": (node, 4)})  # type: ignore[dict-item]
    started = time.monotonic()
    await worker._on_message(_assign("slow", 30, 0.2))
    report = await bus.wait_for("failed")
    assert report.error is not None and report.error.code == "timeout"
    assert 0.2 <= time.monotonic() - started < 2
    assert node.flagged
    assert not worker.running and worker.load["sleep"] == 0
    assert [r.status for r in bus.reports] == ["started", "failed"]  # acked after ACK_DELAY


async def test_a_fast_task_is_acked_by_its_result_alone() -> None:
    bus = FakeBus()
    worker = Worker(bus, "home", "w1")  # type: ignore[arg-type]
    worker.set_routes({"sleep": (Sleeper(), 4)})  # type: ignore[dict-item]
    await worker._on_message(_assign("fast", 0, 10))
    done = await bus.wait_for("done")
    assert done.output == "slept"
    await asyncio.sleep(ACK_DELAY * 3)  # past the ack round: nothing more may come
    assert [r.status for r in bus.reports] == ["done"]
