"""Reading a native crash: what :mod:`faulthandler` wrote when a process died of a
fatal signal, which module it died in, and keeping that module out afterwards.

Pure helpers for :mod:`daemon.probe` (the probe child and the daemon's own fault
log both write :mod:`faulthandler` output; this reads it):

* :func:`parse_fault` — the signal and the Python stacks of a faulthandler dump;
* :func:`module_of` — the dotted module a source file is, by ``sys.path``;
* :func:`culprit` — the innermost frame that is neither the standard library nor
  the node's own package: the backend to blame.  A module under
  ``site-packages`` is blamed as its top-level package (``onnxruntime``, not
  ``onnxruntime.capi._pybind_state``): that is what a node imports and what a
  package version is about;
* :class:`Blocker` — a ``sys.meta_path`` finder that makes importing a blamed
  module raise :class:`ImportError`, so the node's lazy import of it fails soft
  exactly as a missing package does (the node then advertises what is left).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import re
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

# faulthandler's first line names the fatal signal by its C description.
_SIGNALS: dict[str, str] = {
    "Segmentation fault": "SIGSEGV",
    "Aborted": "SIGABRT",
    "Bus error": "SIGBUS",
    "Floating point exception": "SIGFPE",
    "Illegal instruction": "SIGILL",
}
_FATAL = re.compile(r"^Fatal Python error: (.+?)\s*$", re.M)
_THREAD = re.compile(r"^(Current thread|Thread) 0x[0-9a-f]+", re.M)
_FRAME = re.compile(r'^\s+File "(.+)", line (\d+) in (.+)$')
_STDLIB = (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"])
_SITE_DIRS = ("site-packages", "dist-packages")


@dataclass(frozen=True, slots=True)
class Frame:
    file: str
    line: int
    func: str

    def __str__(self) -> str:
        return f"{Path(self.file).name}:{self.line} in {self.func}"


@dataclass(frozen=True, slots=True)
class Fault:
    """A faulthandler dump: the signal, and each thread's stack (innermost first;
    the thread that took the signal first)."""

    signal: str
    threads: tuple[tuple[Frame, ...], ...]


def parse_fault(text: str) -> Fault | None:
    """The fault in ``text`` (the last one, if several runs appended), or ``None``."""
    starts = list(_FATAL.finditer(text))
    if not starts:
        return None
    last = starts[-1]
    body = text[last.end() :]
    name = last.group(1)
    signal = _SIGNALS.get(name, name)
    threads: list[tuple[Frame, ...]] = []
    current: tuple[Frame, ...] | None = None
    pieces = _THREAD.split(body)  # [before, kind, block, kind, block, ...]
    for kind, block in zip(pieces[1::2], pieces[2::2], strict=True):
        frames = tuple(
            Frame(m.group(1), int(m.group(2)), m.group(3))
            for line in block.splitlines()
            if (m := _FRAME.match(line))
        )
        if kind == "Current thread" and current is None:
            current = frames
        else:
            threads.append(frames)
    ordered = ([current] if current is not None else []) + threads
    return Fault(signal, tuple(ordered))


def is_stdlib(file: str) -> bool:
    if file.startswith("<"):  # <frozen importlib._bootstrap>, <string>
        return True
    if any(part in _SITE_DIRS for part in Path(file).parts):
        return False
    return file.startswith(_STDLIB)


def module_of(file: str, path: Sequence[str] | None = None) -> str | None:
    """The dotted module name ``file`` is imported as (longest ``sys.path`` entry)."""
    target = Path(file)
    best: tuple[int, str] | None = None
    for entry in path if path is not None else sys.path:
        base = Path(entry or ".").resolve()
        try:
            rel = target.relative_to(base)
        except ValueError:
            continue
        if rel.suffix not in (".py", ".pyc", ".so") and rel.suffix:
            continue
        parts = list(rel.parts)
        parts[-1] = parts[-1].split(".", 1)[0]
        if parts[-1] == "__init__":
            parts.pop()
        if parts and (best is None or len(str(base)) > best[0]):
            best = (len(str(base)), ".".join(parts))
    return best[1] if best else None


def blame_name(file: str, path: Sequence[str] | None = None) -> str | None:
    """What to block for a frame in ``file``: a site-packages module's top-level
    package, any other module's full dotted name."""
    module = module_of(file, path)
    if module is None:
        return None
    if any(part in _SITE_DIRS for part in Path(file).parts):
        return module.split(".", 1)[0]
    return module


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def culprit(
    frames: Sequence[Frame], own_packages: Sequence[str], path: Sequence[str] | None = None
) -> tuple[str | None, Frame | None]:
    """The module to blame in a stack (innermost first) and its frame: the innermost
    non-stdlib frame outside ``own_packages`` (the node's own code and the daemon,
    which must never be blocked).  ``(None, frame)``: the innermost non-stdlib frame
    is the node's own code (a native call it makes directly, e.g. into cv2)."""
    for frame in frames:
        if is_stdlib(frame.file):
            continue
        name = blame_name(frame.file, path)
        if name is None:
            continue
        if any(within(name, p) or within(p, name) for p in own_packages):
            return None, frame
        return name, frame
    return None, None


def relevant_stack(fault: Fault, ignore: Sequence[str] = ("daemon",)) -> tuple[Frame, ...]:
    """The stack that crashed: the signalled thread's, unless it ran only the standard
    library and ``ignore`` (a signal sent with kill() lands on the main thread, idle
    in the daemon's event loop), then the first thread that ran other code."""

    def counts(frame: Frame) -> bool:
        if is_stdlib(frame.file):
            return False
        module = module_of(frame.file)
        return module is None or not any(within(module, p) for p in ignore)

    for frames in fault.threads:
        if any(counts(f) for f in frames):
            return frames
    return fault.threads[0] if fault.threads else ()


class Blocker(importlib.abc.MetaPathFinder):
    """Refuses the import of blocked modules (and their submodules) with a reason."""

    def __init__(self) -> None:
        self.blocked: dict[str, str] = {}

    def block(self, module: str, reason: str) -> None:
        self.blocked[module] = reason
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        for module, reason in self.blocked.items():
            if within(fullname, module):
                raise ImportError(f"{module} disabled: {reason}", name=fullname)
        return None


BLOCKER = Blocker()
