"""Sensor readers: host metrics (via :mod:`daemon.hostinfo`), commands and files.

Every reader is an object with an async ``read()`` that returns a
:class:`Reading` or raises :class:`SensorError` with a one-line reason.
Parsing is a pure function (:func:`parse_value`) so it can be tested alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from daemon import hostinfo
from nodes.sensors.config import BuiltinName, SensorSpec, disk_sensor_name

# How much of a failing command's stderr goes into the error text.
STDERR_TAIL: Final = 200
# After a timeout the killed command gets this long to be reaped.
KILL_WAIT: Final = 2.0


class SensorError(Exception):
    """A sensor could not be read (command failed, output unparsable, file missing)."""


@dataclass(frozen=True, slots=True)
class Reading:
    value: float
    attrs: dict[str, Any] = field(default_factory=dict)


class Reader(Protocol):
    name: str
    unit: str | None
    device_class: str | None

    async def read(self) -> Reading: ...


# ------------------------------------------------------------------ parsing


def parse_value(text: str, *, json_field: str | None = None, regex: str | None = None) -> float:
    """The number in ``text``: JSON path first, then regex, then a float parse."""
    raw: Any = text
    if json_field is not None:
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise SensorError(f"output is not JSON: {_short(text)}") from exc
        for part in json_field.split("."):
            raw = _step(raw, part, json_field)
        if isinstance(raw, bool):
            return 1.0 if raw else 0.0
        if isinstance(raw, int | float) and regex is None:
            return _finite(float(raw), raw)
        if not isinstance(raw, str | int | float):
            raise SensorError(f"{json_field} is not a number: {_short(json.dumps(raw))}")
        raw = str(raw)
    if regex is not None:
        match = re.search(regex, raw)
        if match is None:
            raise SensorError(f"regex {regex!r} does not match {_short(raw)}")
        raw = match.group(1) if match.re.groups else match.group(0)
        if raw is None:
            raise SensorError(f"regex {regex!r} matched but its group 1 is empty")
    try:
        number = float(raw.strip())
    except ValueError as exc:
        raise SensorError(f"not a number: {_short(raw)}") from exc
    return _finite(number, raw)


def _finite(number: float, raw: object) -> float:
    # NaN / inf would defeat the deadband and are not valid JSON numbers.
    if not math.isfinite(number):
        raise SensorError(f"not a finite number: {_short(str(raw))}")
    return number


def _step(node: Any, part: str, path: str) -> Any:
    if isinstance(node, dict) and part in node:
        return node[part]
    if isinstance(node, list) and part.lstrip("-").isdigit():
        with contextlib.suppress(IndexError):
            return node[int(part)]
    raise SensorError(f"no {part!r} in the JSON output (json_field {path!r})")


def scaled(value: float, spec: SensorSpec) -> float:
    """``value * scale + offset``, rounded to ``precision`` (or float noise removed)."""
    out = value * spec.scale + spec.offset
    if spec.precision is not None:
        return round(out, spec.precision)
    return float(f"{out:.12g}")  # 0.1 * 3 → 0.3, not 0.30000000000000004


def convert(text: str, spec: SensorSpec) -> Reading:
    """A custom sensor's output → its scaled reading."""
    return Reading(scaled(parse_value(text, json_field=spec.json_field, regex=spec.regex), spec))


def _short(text: str, limit: int = 80) -> str:
    text = text.strip()
    return repr(text if len(text) <= limit else text[:limit] + "...")


# ----------------------------------------------------------- custom sensors


class CommandReader:
    """Runs a shell command; its stdout is the reading."""

    def __init__(self, spec: SensorSpec) -> None:
        assert spec.command is not None
        self.spec = spec
        self.name = spec.name
        self.unit = spec.unit
        self.device_class = spec.device_class
        self.command = spec.command

    async def read(self) -> Reading:
        spec = self.spec
        try:
            proc = await asyncio.create_subprocess_shell(
                self.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own process group: a timeout kills the whole pipe
            )
        except OSError as exc:
            raise SensorError(f"cannot run {self.command!r}: {exc}") from exc
        try:
            async with asyncio.timeout(spec.timeout):
                out, err = await proc.communicate()
        except TimeoutError as exc:
            await _kill(proc)
            raise SensorError(f"command timed out after {spec.timeout:g}s") from exc
        except BaseException:  # cancelled: leave no orphan behind
            await _kill(proc)
            raise
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip()[-STDERR_TAIL:]
            raise SensorError(
                f"command exited with status {proc.returncode}" + (f": {tail}" if tail else "")
            )
        return convert(out.decode(errors="replace"), spec)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError, ProcessLookupError):
        async with asyncio.timeout(KILL_WAIT):
            await proc.wait()


class FileReader:
    """Reads a file (sysfs value, 1-wire ``w1_slave``) off the event loop.

    A 1-wire read blocks for ~750 ms while the sensor converts, hence the thread.
    """

    def __init__(self, spec: SensorSpec) -> None:
        assert spec.file is not None
        self.spec = spec
        self.name = spec.name
        self.unit = spec.unit
        self.device_class = spec.device_class
        self.path = Path(spec.file)

    async def read(self) -> Reading:
        spec = self.spec
        try:
            async with asyncio.timeout(spec.timeout):
                text = await asyncio.to_thread(self.path.read_text, errors="replace")
        except TimeoutError as exc:
            raise SensorError(f"reading {self.path} took over {spec.timeout:g}s") from exc
        except OSError as exc:
            raise SensorError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        return convert(text, spec)


def custom_reader(spec: SensorSpec) -> Reader:
    return CommandReader(spec) if spec.command is not None else FileReader(spec)


# ----------------------------------------------------------------- builtins


class BuiltinReader:
    """A host metric from :mod:`daemon.hostinfo` (cheap /proc and /sys reads, inline)."""

    def __init__(
        self,
        kind: BuiltinName,
        name: str,
        unit: str | None,
        device_class: str | None,
        probe: Callable[[], Reading | None],
    ) -> None:
        self.kind = kind  # which deadband applies (every disk_<mount> is a "disk")
        self.name = name
        self.unit = unit
        self.device_class = device_class
        self._probe = probe

    def sample(self) -> Reading | None:
        return self._probe()

    async def read(self) -> Reading:
        reading = self.sample()
        if reading is None:
            raise SensorError(f"{self.name} is not available on this host")
        return reading


def _temperature() -> Reading | None:
    temp = hostinfo.cpu_temperature()
    return None if temp is None else Reading(round(temp, 1))


def _load() -> Reading | None:
    loads = hostinfo.load()
    if loads is None:
        return None
    return Reading(loads[0], {"load5": loads[1], "load15": loads[2]})


def _memory() -> Reading | None:
    mem = hostinfo.memory()
    if not mem or not mem[0]:
        return None
    total, available = mem
    return Reading(
        round(100.0 * (1 - available / total), 1),
        {"used_mb": int((total - available) / 1024), "total_mb": int(total / 1024)},
    )


def _uptime() -> Reading | None:
    up = hostinfo.uptime()
    return None if up is None else Reading(float(int(up)))


def _disk(path: str) -> Callable[[], Reading | None]:
    def probe() -> Reading | None:
        pct = hostinfo.disk_percent(path)
        return None if pct is None else Reading(round(pct, 1), {"path": path})

    return probe


def builtin_readers(names: list[BuiltinName], disk_paths: list[str]) -> list[BuiltinReader]:
    """One reader per builtin metric (one per path for ``disk``), in config order."""
    readers: list[BuiltinReader] = []
    for name in dict.fromkeys(names):
        if name == "cpu_temperature":
            readers.append(BuiltinReader(name, name, "°C", "temperature", _temperature))
        elif name == "load":
            readers.append(BuiltinReader(name, name, None, None, _load))
        elif name == "memory":
            readers.append(BuiltinReader(name, name, "%", None, _memory))
        elif name == "uptime":
            readers.append(BuiltinReader(name, name, "s", "duration", _uptime))
        else:
            readers.extend(
                BuiltinReader(name, disk_sensor_name(p), "%", None, _disk(p))
                for p in dict.fromkeys(disk_paths)
            )
    return readers
