"""Crash isolation for native backends: a backend that kills the process with a
signal (SIGSEGV, SIGABRT, an OOM kill) costs its own node, never the daemon.

Two guards, chosen by measurement (docs/operations.md, "Native backends"):

* **A probe before the load.**  A node whose verdict is not known yet is first
  imported, made, set up and closed in a short-lived child
  (:mod:`daemon.probe_child`), all such nodes in one child, one after the other.
  A node whose probe died is not loaded in-process: its verdict (the signal, the
  last step it reached, the module it died in and that package's version) is
  kept per node in ``<state_dir>/backends/`` and is good until the installed
  packages, the Python or mtor version, or the node's config entry change.  When
  the crash lies in a module the node imports (a backend: ``onnxruntime``,
  ``llama_cpp``), that module is blocked (:class:`daemon.probe_fault.Blocker`)
  and the node probed again: its lazy import then fails soft as a missing
  package does, and the node runs with what is left.
* **A fault log during the run.**  The daemon's :mod:`faulthandler` writes to
  ``<state_dir>/backends/<realm>.<node_id>.fault``.  A crash at inference takes
  the daemon down (systemd or ``mtor up`` start it again); the next start reads
  the stacks, blames the node whose code is on the crashed stack and the module
  it died in, blocks that module, or — when the crash is in the node's own
  code — delays the node's start with exponential backoff and stops starting it
  after :data:`MAX_IDENTICAL_CRASHES` identical crashes.  The other nodes start
  at once every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import faulthandler
import hashlib
import json
import logging
import os
import pickle
import resource
import signal as signals
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

from daemon import __version__
from daemon.probe_fault import BLOCKER, Frame, culprit, parse_fault, relevant_stack, within
from daemon.supervisor import HEALTHY_RUN

if TYPE_CHECKING:
    from daemon.config import Config
    from daemon.worker import Executor, TaskRun

log = logging.getLogger(__name__)

# One step of a probe (a model load on a Pi) may take this long; a probe that hangs
# is not a crash: the node then loads in-process as it did before probes.
PROBE_STEP_TIMEOUT: Final = 180.0
# Modules blocked for one node before it is given up on.
MAX_BLOCKS: Final = 3
# Identical crashes of one node (same signal and place, each within the supervisor's
# HEALTHY_RUN of its start) before the daemon stops starting it.
MAX_IDENTICAL_CRASHES: Final = 3
# How much of a probe child's stderr is kept (faulthandler's stacks are at its end).
STDERR_KEEP: Final = 64 * 1024
STORE_VERSION: Final = 1
# Node types of Python only (no C extension of their own or of a backend): nothing in
# them dies of a signal, so they are spared the probe and load at once, as every small
# daemon and test needs.  Their home would be a flag of register_node_type (plugins).
PURE_PYTHON: Final = frozenset({"nodes.reference", "nodes.sensors"})


def fingerprint() -> str:
    """The installed software: Python, mtor, and every distribution's name and version
    (their ``.dist-info`` folder names), so an upgrade of any package re-probes."""
    h = hashlib.sha256(f"{sys.version}|{__version__}".encode())
    for entry in sys.path:
        with contextlib.suppress(OSError):
            h.update(
                "|".join(
                    sorted(n for n in os.listdir(entry or ".") if n.endswith("-info"))
                ).encode()
            )
    return h.hexdigest()[:16]


def package_version(module: str | None) -> str | None:
    if module is None:
        return None
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    for dist in packages_distributions().get(module.split(".", 1)[0], []):
        with contextlib.suppress(PackageNotFoundError):
            return f"{dist} {version(dist)}"
    return None


def signal_name(returncode: int) -> str:
    try:
        return signals.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


@dataclass
class Crash:
    """A native crash of one node: where, in what, how often in a row."""

    signal: str
    step: str
    culprit: str | None = None
    version: str | None = None
    during: str = "probe"  # "probe" (before the load) or "run" (in the daemon)
    count: int = 1

    def same(self, other: Crash) -> bool:
        return (self.signal, self.step, self.culprit) == (other.signal, other.step, other.culprit)

    def describe(self) -> str:
        what = f" in {self.culprit}" + (f" ({self.version})" if self.version else "")
        where = "its probe" if self.during == "probe" else "the daemon"
        times = f" ({self.count} times in a row)" if self.count > 1 else ""
        return f"{self.signal}{what if self.culprit else ''} killed {where} at {self.step}{times}"


@dataclass
class Verdict:
    """What is known of one node entry (per :func:`fingerprint` and config entry)."""

    probed: bool = False
    crash: Crash | None = None
    blocked: dict[str, str] = field(default_factory=dict)
    unavailable: bool = False

    def note(self) -> str | None:
        """For ``NodeSummary.error``: why the node is out, or what it runs without."""
        if self.crash is None:
            return None
        if self.unavailable:
            return f"unavailable: {self.crash.describe()}"[:300]
        if self.blocked:
            return f"running without {', '.join(self.blocked)}: {self.crash.describe()}"[:300]
        return f"restarted after {self.crash.describe()}"[:300]


@dataclass(frozen=True)
class Target:
    """A node as the guard sees it: its name, implementation and config entry."""

    name: str
    impl: str  # "package.module:Class"
    entry: dict[str, Any]

    @property
    def package(self) -> str:
        return self.impl.partition(":")[0].rpartition(".")[0] or self.impl.partition(":")[0]

    @property
    def key(self) -> str:
        raw = json.dumps([self.name, self.impl, self.entry], sort_keys=True, default=str)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


class BackendGuard:
    """The verdicts of one daemon's nodes, its fault log, and the probes."""

    def __init__(self, config: Config, node_id: str, targets: Iterable[Target]) -> None:
        self.config = config
        self.targets = {t.name: t for t in targets}
        folder = config.daemon.state_dir / "backends"
        self.store_path = folder / f"{config.realm}.{node_id}.json"
        self.fault_path = folder / f"{config.realm}.{node_id}.fault"
        self.fingerprint = fingerprint()
        self.verdicts: dict[str, Verdict] = {}
        self._fault_file: IO[str] | None = None
        self._started = time.time()
        self.busy = Busy(folder / f"{config.realm}.{node_id}.busy")

    # ---------------------------------------------------------------- store

    def verdict(self, name: str) -> Verdict:
        return self.verdicts.setdefault(self.targets[name].key, Verdict())

    def _load(self) -> float | None:
        try:
            data = json.loads(self.store_path.read_text())
        except (OSError, ValueError):
            return None
        if data.get("version") != STORE_VERSION or data.get("fingerprint") != self.fingerprint:
            log.info(
                "installed packages changed since the last probe: probing native backends again"
            )
            return None
        for key, raw in data.get("nodes", {}).items():
            crash = Crash(**raw["crash"]) if raw.get("crash") else None
            self.verdicts[key] = Verdict(
                raw.get("probed", False),
                crash,
                raw.get("blocked", {}),
                raw.get("unavailable", False),
            )
        started = data.get("started")
        return float(started) if isinstance(started, int | float) else None

    def save(self) -> None:
        data = {
            "version": STORE_VERSION,
            "fingerprint": self.fingerprint,
            "started": self._started,
            "nodes": {k: asdict(v) for k, v in self.verdicts.items()},
        }
        try:
            self.store_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.store_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(self.store_path)
        except OSError as exc:
            log.warning("cannot keep backend verdicts in %s: %s", self.store_path, exc)

    # ------------------------------------------------------------ fault log

    def open(self) -> None:
        """Read the store and what the last run's fault log says; start this run's log."""
        last_start = self._load()
        with contextlib.suppress(OSError):
            text = self.fault_path.read_text(errors="replace")
            crashed_at = self.fault_path.stat().st_mtime
            if text.strip():
                self._learn_from_run(text, crashed_at - (last_start or 0.0), self.busy.previous())
            # Read once: kept beside for a person, never counted again.
            self.fault_path.replace(self.fault_path.with_suffix(".fault-last"))
        self.busy.open()
        for v in self.verdicts.values():
            for module, reason in v.blocked.items():
                BLOCKER.block(module, reason)
        self.save()
        if faulthandler.is_enabled():  # someone else's (pytest running us in-process)
            return
        try:
            self.fault_path.parent.mkdir(parents=True, exist_ok=True)
            self._fault_file = self.fault_path.open("w")
        except OSError as exc:
            log.warning("no fault log (%s): a native crash will not be traced", exc)
            return
        faulthandler.enable(file=self._fault_file, all_threads=True)

    def close(self) -> None:
        self.busy.close()
        if self._fault_file is not None:
            faulthandler.disable()
            self._fault_file.close()
            self._fault_file = None

    def _learn_from_run(self, text: str, lived: float, busy: list[str]) -> None:
        """Blame the node whose code is on the crashed stack, else the nodes that were
        executing a task (a backend called in a worker thread has no node frame)."""
        fault = parse_fault(text)
        if fault is None:
            return
        stack = relevant_stack(fault)
        blamed_nodes: list[tuple[Target, str]] = []
        for target in self.targets.values():
            node_frame = _outermost_in(stack, target.package)
            if node_frame is not None:
                blamed_nodes.append((target, f"{node_frame.func} ({node_frame})"))
        if not blamed_nodes:
            blamed_nodes = [(self.targets[n], "a task") for n in busy if n in self.targets]
        if not blamed_nodes:
            log.error(
                "the last run died of %s outside any node (%s)", fault.signal, self.fault_path
            )
        for target, place in blamed_nodes:
            blamed, frame = culprit(stack, [target.package, "daemon"])
            where = place
            if frame is not None and not place.endswith(f"({frame})"):
                where += f", {frame}"
            crash = Crash(fault.signal, where, blamed, package_version(blamed), during="run")
            v = self.verdict(target.name)
            if v.crash is not None and v.crash.same(crash) and lived < HEALTHY_RUN:
                crash.count = v.crash.count + 1
            v.crash = crash
            log.error("node %s crashed the last run: %s", target.name, crash.describe())
            if blamed is not None:
                _block(v, blamed, _reason(crash))
            elif crash.count >= MAX_IDENTICAL_CRASHES:
                v.unavailable = True
                log.error(
                    "node %s not started again: %d identical crashes", target.name, crash.count
                )

    def start_delay(self, name: str, initial: float, cap: float) -> float:
        """How long a node that crashed the last run waits before loading again."""
        v = self.verdict(name)
        if v.crash is None or v.crash.during != "run" or v.blocked:
            return 0.0
        return float(min(cap, initial * 2 ** (v.crash.count - 1)))

    # ---------------------------------------------------------------- probes

    def needs_probe(self, name: str) -> bool:
        target = self.targets[name]
        return target.package not in PURE_PYTHON and not self.verdict(name).probed

    async def vet(self) -> None:
        """Probe every node whose verdict is not known (one child for all of them)."""
        pending = [t for t in self.targets.values() if self.needs_probe(t.name)]
        if not pending:
            return
        log.info(
            "probing %s before loading (native backends run in a child first)",
            ", ".join(t.name for t in pending),
        )
        began = time.monotonic()
        while pending:
            blocked = {m: r for v in self.verdicts.values() for m, r in v.blocked.items()}
            try:
                done, crashed = await _run_child(self.config, pending, blocked)
            except (OSError, ValueError, pickle.PicklingError, AttributeError, TypeError) as exc:
                # No probe (the config does not pickle, no interpreter to start): load
                # as before probes, and try again at the next start.
                log.warning("cannot probe %s: %s", ", ".join(t.name for t in pending), exc)
                break
            for name in done:
                self.verdict(name).probed = True
            pending = [t for t in pending if t.name not in done]
            if crashed is None:  # the child ended without a crash: the rest is unknown
                break
            name, crash = crashed
            target = self.targets[name]
            v = self.verdict(name)
            v.crash = crash
            log.error("node %s: %s", name, crash.describe())
            pending = [t for t in pending if t.name != name]
            if crash.culprit and crash.culprit not in v.blocked and len(v.blocked) < MAX_BLOCKS:
                _block(v, crash.culprit, _reason(crash))
                log.warning("node %s: probing it again without %s", name, crash.culprit)
                pending.insert(0, target)
            else:
                v.probed = v.unavailable = True
        self.save()
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        log.info("probe done in %.1fs (child peak RSS %.0f MB)", time.monotonic() - began, peak)


class Busy:
    """Which nodes are executing a task right now, kept in a file as it changes (one
    ``pwrite``), so that the run after a crash knows whose task was in flight."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.active: dict[str, int] = {}
        self._fd: int | None = None
        self._written = 0

    def previous(self) -> list[str]:
        try:
            names = json.loads(self.path.read_bytes() or b"[]")
        except (OSError, ValueError):
            return []
        return [str(n) for n in names] if isinstance(names, list) else []

    def open(self) -> None:
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def _write(self) -> None:
        if self._fd is None:
            return
        data = json.dumps(sorted(self.active)).encode()
        with contextlib.suppress(OSError):
            os.pwrite(self._fd, data.ljust(self._written), 0)
            self._written = max(self._written, len(data))

    @contextlib.contextmanager
    def entered(self, name: str) -> Iterator[None]:
        self.active[name] = self.active.get(name, 0) + 1
        if self.active[name] == 1:
            self._write()
        try:
            yield
        finally:
            self.active[name] -= 1
            if not self.active[name]:
                del self.active[name]
                self._write()


class Tracked:
    """A node as the worker's executor, its tasks counted in :class:`Busy`."""

    def __init__(self, node: Executor, name: str, busy: Busy) -> None:
        self.node, self.name, self.busy = node, name, busy

    async def execute(self, task: TaskRun) -> Any:
        with self.busy.entered(self.name):
            return await self.node.execute(task)


def _block(verdict: Verdict, module: str, reason: str) -> None:
    """Keep ``module`` out of this node, and of this process from now on (an import
    is process-wide: whatever imports it next fails soft)."""
    verdict.blocked[module] = reason
    BLOCKER.block(module, reason)


def _reason(crash: Crash) -> str:
    return (
        f"it crashed {'the probe' if crash.during == 'probe' else 'the daemon'} with "
        f"{crash.signal} at {crash.step} (kept out until its version changes)"
    )


def _outermost_in(stack: tuple[Frame, ...], package: str) -> Frame | None:
    from daemon.probe_fault import module_of

    found = None
    for frame in stack:  # innermost first: the last match is the outermost
        module = module_of(frame.file)
        if module is not None and within(module, package):
            found = frame
    return found


async def _run_child(
    config: Config, targets: list[Target], blocked: dict[str, str]
) -> tuple[set[str], tuple[str, Crash] | None]:
    """One probe child over ``targets``: the names that finished, and the crash."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daemon.probe_child",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    request = {
        "config": config,
        "blocked": blocked,
        "nodes": [{"name": t.name, "impl": t.impl} for t in targets],
    }
    proc.stdin.write(pickle.dumps(sys.path) + pickle.dumps(request))
    proc.stdin.close()
    err = bytearray()

    async def read_err(stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            err.extend(chunk)
            del err[:-STDERR_KEEP]

    err_task = asyncio.create_task(read_err(proc.stderr))
    done: set[str] = set()
    node, step, last_import = None, "start", None
    try:
        while True:
            try:
                async with asyncio.timeout(PROBE_STEP_TIMEOUT):
                    line = await proc.stdout.readline()
            except TimeoutError:
                log.warning("probe of %s hung at %s: loading it without a verdict", node, step)
                proc.kill()
                if node is not None:
                    done.add(node)  # a hang is not a crash: load it as before
                return done, None
            if not line:
                break
            msg = json.loads(line)
            node = msg.get("node", node)
            if msg.get("done"):
                done.add(msg["node"])
                if msg.get("error"):
                    log.info("probe: node %s failed to set up (%s)", msg["node"], msg["error"])
                node, step, last_import = None, "start", None
            elif "import" in msg:
                last_import = msg["import"]
            elif "step" in msg:
                step, last_import = msg["step"], None
        code = await proc.wait()
        await err_task
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        err_task.cancel()
    if code >= 0 or node is None:
        if code:
            tail = err.decode(errors="replace")[-2000:]
            log.warning("probe child exited with %d: %s", code, tail)
        return done, None
    target = next(t for t in targets if t.name == node)
    return done, (node, _probe_crash(target, code, step, last_import, bytes(err)))


def _probe_crash(
    target: Target, code: int, step: str, last_import: str | None, err: bytes
) -> Crash:
    fault = parse_fault(err.decode(errors="replace"))
    where = step + (f", importing {last_import}" if last_import else "")
    blamed = None
    if fault is not None:
        blamed, frame = culprit(relevant_stack(fault), [target.package, "daemon"])
        if frame is not None:
            where += f" ({frame})"
    sig = fault.signal if fault is not None else signal_name(code)
    if code == -signals.SIGKILL:
        sig = "SIGKILL (out of memory?)"
    return Crash(sig, where, blamed, package_version(blamed))


# The node whose load is running (set around a node's setup; copied into the
# threads its setup starts with asyncio.to_thread), for the import log.
loading: Final[contextvars.ContextVar[str | None]] = contextvars.ContextVar(
    "mtor_loading_node", default=None
)
_import_log: Final[list[bool]] = []  # installed once per process (audit hooks stay)


def log_imports() -> None:
    """Log each third-party package a node's load imports, before it is imported:
    the line a native crash at import leaves last in the journal."""
    if _import_log:
        return
    _import_log.append(True)
    seen = set(sys.modules)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event != "import":
            return
        node = loading.get()
        if node is None:
            return
        top = str(args[0]).partition(".")[0]
        if top in seen:
            return
        seen.add(top)
        if top not in sys.stdlib_module_names:
            log.info("node %s imports %s", node, top)

    sys.addaudithook(hook)
