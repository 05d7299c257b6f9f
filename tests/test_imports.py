"""The import graph of ``daemon/`` and ``nodes/``: no circle in the core, and
the core does not depend on node types (they register themselves).

The graph is read from the source with :mod:`ast`: every ``import`` and
``from ... import``, resolved to the module files of this repository.  An edge
is one of three kinds, reported separately:

- ``top``: runs when the module is imported;
- ``deferred``: inside a function (runs when that is called);
- ``typing``: under ``if TYPE_CHECKING:`` (a design dependency, never run).

Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``: those count
as edges too, except to the packages the importing module is itself inside.
A cycle is a strongly connected component of more than one module.

``python -m tests.test_imports`` prints the components of each kind.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

ROOT: Final = Path(__file__).resolve().parent.parent
PACKAGES: Final = ("daemon", "nodes")
Kind = Literal["top", "deferred", "typing"]

# Cycles among daemon/ modules that the registry work (issue 15) could not break
# from the files it owns: each with who must change what.  Keyed by modules of
# the strongly connected component (all edge kinds together); a component found
# matches an entry when it shares two of them (the same circle, grown or shrunk
# while its owners work on it).
KNOWN_DAEMON_CYCLES: Final[dict[tuple[str, ...], str]] = {}

# daemon/ modules that still import nodes/, each with the reason (the rest of the
# core must not): the CLI is the application shell, the others are to be changed.
KNOWN_CORE_TO_NODES: Final[dict[str, str]] = {
    "daemon.cli.voice_cmd": "the `mtor listen/say` tools run a voice node in-process",
    "daemon.cli.vision_cmd": "the `mtor detect` tools read images with the vision helpers",
}


@dataclass
class Graph:
    modules: dict[str, Path]
    edges: dict[Kind, dict[str, set[str]]] = field(default_factory=dict)

    def union(self, kinds: Iterable[Kind]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {m: set() for m in self.modules}
        for kind in kinds:
            for m, targets in self.edges.get(kind, {}).items():
                out[m] |= targets
        return out

    def kind_of(self, a: str, b: str) -> Kind:
        for kind in ("top", "deferred", "typing"):
            if b in self.edges[kind][a]:
                return kind
        raise KeyError((a, b))


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def build_graph(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> Graph:
    modules = {
        _module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))
    }
    graph = Graph(modules, {"top": {}, "deferred": {}, "typing": {}})
    for name, path in modules.items():
        found: dict[Kind, set[str]] = {"top": set(), "deferred": set(), "typing": set()}
        _Visitor(name, path.name == "__init__.py", modules, found).visit(
            ast.parse(path.read_text(), str(path))
        )
        for kind, targets in found.items():
            graph.edges[kind][name] = targets - {name}
    return graph


class _Visitor(ast.NodeVisitor):
    def __init__(
        self, module: str, is_package: bool, modules: dict[str, Path], out: dict[Kind, set[str]]
    ) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.modules = modules
        self.out = out
        self.depth = 0  # functions we are inside
        self.typing = 0  # `if TYPE_CHECKING:` blocks we are inside

    def _kind(self) -> Kind:
        return "typing" if self.typing else "deferred" if self.depth else "top"

    def _resolve(self, dotted: str) -> str | None:
        while dotted and dotted not in self.modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    def _add(self, dotted: str) -> None:
        target = self._resolve(dotted)
        if target is None:
            return
        parts = target.split(".")
        chain = [".".join(parts[:i]) for i in range(1, len(parts))] + [target]
        for mod in chain:  # a/__init__, a/b/__init__, then a.b.c itself
            inside = self.module == mod or self.module.startswith(mod + ".")
            if mod in self.modules and (mod == target or not inside):
                self.out[self._kind()].add(mod)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            pkg = self.package
            for _ in range(node.level - 1):
                pkg = pkg.rpartition(".")[0]
            base = f"{pkg}.{base}" if base else pkg
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in self.modules else base)

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):
            self.typing += 1
            for child in node.body:
                self.visit(child)
            self.typing -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)


def cycles(edges: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[tuple[str, ...]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work: list[tuple[str, list[str]]] = [(start, sorted(edges[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, pending = work[-1]
            if pending:
                nxt = pending.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(edges.get(nxt, ()))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(tuple(sorted(component)))
    return sorted(found)


def within(edges: dict[str, set[str]], prefix: str) -> dict[str, set[str]]:
    inside = lambda m: m == prefix or m.startswith(prefix + ".")  # noqa: E731
    return {m: {t for t in ts if inside(t)} for m, ts in edges.items() if inside(m)}


def describe(graph: Graph, component: tuple[str, ...]) -> str:
    union = graph.union(("top", "deferred", "typing"))
    links = [
        f"{a} -> {b} ({graph.kind_of(a, b)})" for a in component for b in component if b in union[a]
    ]
    return "; ".join(links)


# ---------------------------------------------------------------------- tests


def test_the_graph_sees_imports_of_every_kind() -> None:
    # The reader itself: known edges of each kind (if these change, update them).
    graph = build_graph()
    assert "daemon.config" in graph.edges["top"]["daemon.cli.up"]
    assert "daemon.modelstore" in graph.edges["deferred"]["nodes.chat"]
    assert "daemon.node" in graph.edges["typing"]["nodes.catalog"]
    assert "daemon.orchestrator" in graph.edges["top"]["daemon.config"]  # its __init__ runs
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_daemon_modules() -> None:
    graph = build_graph()
    found = cycles(within(graph.union(("top", "deferred", "typing")), "daemon"))
    new = [c for c in found if not any(_same(c, known) for known in KNOWN_DAEMON_CYCLES)]
    assert not new, "import cycles in daemon/:\n" + "\n".join(describe(graph, c) for c in new)
    # A known one that is gone must leave the list (so it cannot come back unseen).
    gone = [k for k in KNOWN_DAEMON_CYCLES if not any(_same(c, k) for c in found)]
    assert not gone, f"no longer cycles, remove them from KNOWN_DAEMON_CYCLES: {gone}"


def _same(component: tuple[str, ...], known: tuple[str, ...]) -> bool:
    return len(set(component) & set(known)) >= 2


def test_no_cycle_runs_at_import_time() -> None:
    # Among the imports that run (top level and in functions), none at all.
    graph = build_graph()
    assert cycles(graph.union(("top", "deferred"))) == []


def test_the_core_does_not_import_node_types() -> None:
    graph = build_graph()
    union = graph.union(("top", "deferred", "typing"))
    core = within_core(union)
    importers = {m for m, targets in core.items() if any(t.startswith("nodes") for t in targets)}
    assert "daemon.config" not in importers
    assert "daemon.plugins" not in importers
    unexpected = importers - set(KNOWN_CORE_TO_NODES)
    assert not unexpected, f"daemon/ modules importing nodes/: {sorted(unexpected)}"
    gone = set(KNOWN_CORE_TO_NODES) - importers
    assert not gone, f"no longer import nodes/, remove from KNOWN_CORE_TO_NODES: {sorted(gone)}"


def within_core(union: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: ts for m, ts in union.items() if m == "daemon" or m.startswith("daemon.")}


def test_importing_the_config_loads_no_node_type() -> None:
    code = "import daemon.config, sys; print([m for m in sys.modules if m.startswith('nodes')])"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_validating_a_config_registers_the_node_types() -> None:
    # The other half: the first validation fills the registry by itself, and an
    # unknown type is named with every registered one.
    code = (
        "import sys\n"
        "from daemon.config import build_config\n"
        "from daemon.errors import ConfigError\n"
        "try:\n"
        "    build_config({'nodes': {'x': {'type': 'nope'}}})\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
        "print(sorted(m for m in sys.modules if m.count('.') == 1 and m.startswith('nodes.')))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    first, packages = proc.stdout.strip().splitlines()[-2:]
    assert "nodes.x: Input tag 'nope' found using 'type' does not match" in proc.stdout, first
    for type_name in ("sensors", "reference", "chat", "voice", "camera", "vision"):
        assert f"'{type_name}'" in proc.stdout
        assert f"nodes.{type_name}" in packages


if __name__ == "__main__":  # a report: python -m tests.test_imports
    g = build_graph()
    for label, kinds in (
        ("top level only", ("top",)),
        ("top level + in functions", ("top", "deferred")),
        ("all, typing imports too", ("top", "deferred", "typing")),
    ):
        for scope in ("daemon", None):
            union = g.union(kinds)  # type: ignore[arg-type]
            comps = cycles(within(union, scope) if scope else union)
            print(f"{label}, {scope or 'daemon + nodes'}: {len(comps)} cycle(s)")
            for comp in comps:
                print("   ", describe(g, comp))
