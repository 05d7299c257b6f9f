"""Shared fixtures: a real Mosquitto on a free port, config builders, `mtor` processes."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.broker import PrivateBroker, mosquitto_path
from daemon.bus import Bus, Inbound
from daemon.config import Config, build_config

ROOT = Path(__file__).resolve().parent.parent

if mosquitto_path() is None:  # pragma: no cover - install.sh installs it
    pytest.exit("mosquitto is not installed: run ./install.sh --dev", returncode=3)


@pytest.fixture(scope="session")
def broker() -> Iterator[PrivateBroker]:
    """One private broker for the whole session (tests use unique realms)."""
    with PrivateBroker() as b:
        yield b


@pytest.fixture
def own_broker() -> Iterator[PrivateBroker]:
    """A broker of the test's own, for tests that stop or kill it."""
    with PrivateBroker() as b:
        yield b


@pytest.fixture
def realm() -> str:
    return "t" + uuid.uuid4().hex[:10]


def make_config(broker_url: str, realm: str, **extra: Any) -> Config:
    data: dict[str, Any] = {"realm": realm, "broker": {"url": broker_url}, "nodes": {}}
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return build_config(data)


@pytest.fixture
def config(broker: PrivateBroker, realm: str) -> Config:
    return make_config(broker.url, realm)


@contextlib.asynccontextmanager
async def running_bus(config: Config, client_id: str | None = None) -> AsyncIterator[Bus]:
    """A connected test client bus."""
    bus = Bus(
        config.broker,
        client_id or f"test-{uuid.uuid4().hex[:8]}",
        password=config.broker_password(),
    )
    task = asyncio.create_task(bus.run())
    try:
        await bus.wait_connected(5)
        yield bus
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Collector:
    """Collects messages of a subscription; await ``wait_for`` with a predicate."""

    def __init__(self) -> None:
        self.messages: list[Inbound] = []
        self._changed = asyncio.Condition()

    async def __call__(self, msg: Inbound) -> None:
        async with self._changed:
            self.messages.append(msg)
            self._changed.notify_all()

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> Inbound:
        async with asyncio.timeout(timeout), self._changed:
            while True:
                for m in self.messages:
                    if predicate(m):
                        return m
                await self._changed.wait()

    async def wait_count(self, n: int, timeout: float = 10.0) -> list[Inbound]:
        async with asyncio.timeout(timeout), self._changed:
            while len(self.messages) < n:
                await self._changed.wait()
        return self.messages


def write_config(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def mtor_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTOR_")}
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class InProcess:
    """Runs realm roles in this process (``Orchestrator``, ``NodeDaemon``: anything
    with ``run(stop)``) as tasks, and stops them in reverse order on ``close``."""

    def __init__(self) -> None:
        self.tasks: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    def _run(self, fn: Any) -> asyncio.Event:
        stop = asyncio.Event()
        self.tasks.append((stop, asyncio.create_task(fn(stop))))
        return stop

    async def stop_first(self) -> None:
        stop, task = self.tasks.pop(0)
        stop.set()
        await asyncio.wait_for(task, 10)

    async def close(self) -> None:
        for stop, _ in reversed(self.tasks):
            stop.set()
        for _, task in reversed(self.tasks):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)


class MtorProcess:
    """A real `mtor` subprocess (python -m daemon.cli.main ...).

    Its output is read all the time by a thread (the last ``KEEP_LINES`` lines are
    kept): a process that logs more than a pipe holds (64 KiB) would otherwise
    block in its next write and look hung."""

    KEEP_LINES = 20_000

    def __init__(self, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None):
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli.main", *args],
            env=env or mtor_env(),
            cwd=cwd or ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._lines: collections.deque[bytes] = collections.deque(maxlen=self.KEEP_LINES)
        self._reader = threading.Thread(target=self._read, name="mtor-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.append(line)

    def _collected(self, timeout: float) -> str:
        self._reader.join(timeout)
        return b"".join(self._lines).decode(errors="replace")

    def terminate(self, timeout: float = 10.0) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode, self._collected(5)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(5)

    def close(self) -> None:
        """Kill if still running and close the output pipe."""
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(5)
            self._reader.join(5)
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def output(self) -> str:
        """Output so far (only whole once the process has ended)."""
        if self.proc.poll() is None:
            return b"".join(list(self._lines)).decode(errors="replace")
        return self._collected(10)


@pytest.fixture
def processes() -> Iterator[list[MtorProcess]]:
    procs: list[MtorProcess] = []
    yield procs
    for p in procs:
        p.close()
