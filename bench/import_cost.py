"""Where the node daemon's memory and start-up time go: its imports, stage by stage.

* ``rss_stages``: RSS after cumulative import stages, each in a fresh
  interpreter (``VmRSS``; ``RssAnon`` is heap, ``RssFile`` mapped code/libraries);
* ``python_heap_by_package``: Python-level allocations still held after
  importing everything the node imports (``tracemalloc``), charged to the
  package whose code was running (code objects count for their importer);
* ``import_time_by_package``: ``python -X importtime`` self time summed by
  top-level package.

    .venv/bin/python -m bench.import_cost
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict
from typing import Any, Final

from bench.common import ROOT, clean_env, emit, machine

NODE_IMPORTS: Final = (
    "import daemon.cli.main, daemon.runtime, nodes.sensors.node, nodes.sensors.readers"
)
STAGES: Final = [
    ("interpreter", "pass"),
    ("+ asyncio, ssl", "import asyncio, ssl"),
    ("+ the MQTT client (daemon.mqtt)", "import daemon.mqtt"),
    ("+ pydantic (BaseModel)", "from pydantic import BaseModel"),
    ("+ PyYAML", "import yaml"),
    ("+ daemon.messages, protocol models", "import daemon.messages, daemon.protocol.node"),
    ("+ daemon.config, node config models", "import daemon.config"),
    ("+ bus, runtime, CLI, sensors node", NODE_IMPORTS),
]
_STATUS = (
    "import re\n"
    "s = open('/proc/self/status').read()\n"
    "print(*(int(re.search(k + r':\\s+(\\d+)', s).group(1)) for k in "
    "('VmRSS', 'RssAnon', 'RssFile')))"
)
_HEAP = """
import tracemalloc, json, sys
tracemalloc.start(100)
{imports}
snap = tracemalloc.take_snapshot()
out = {{}}
for trace in snap.traces:
    # Charge each block to the innermost frame that is not the import machinery
    # (module code objects are allocated by importlib on behalf of the importer).
    name = "(import machinery)"
    for frame in reversed(trace.traceback):
        if "importlib" not in frame.filename:
            name = frame.filename
            break
    out[name] = out.get(name, 0) + trace.size
json.dump(out, sys.stdout)
"""


def _python(code: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *flags, "-c", code],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )


def _package(path: str) -> str:
    """``.../site-packages/pydantic/main.py`` → ``pydantic``; ROOT files → ``daemon``..."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            top = path.split(marker, 1)[1].split("/", 1)[0]
            return re.sub(r"(\.py|\.cpython.*|-.*)$", "", top)
    if path.startswith(str(ROOT)):
        return path[len(str(ROOT)) + 1 :].split("/", 1)[0]
    if "<frozen" in path or "/lib/python3" in path:
        return "(stdlib)"
    return "(other)"


def rss_stages() -> list[dict[str, Any]]:
    rows = []
    code = ""
    previous = None
    for label, stage in STAGES:
        code += stage + "\n"
        rss, anon, file = (int(x) for x in _python(code + _STATUS).stdout.split())
        rows.append(
            {
                "stage": label,
                "rss_mb": round(rss / 1024, 1),
                "delta_mb": round((rss - previous) / 1024, 1) if previous else None,
                "anon_mb": round(anon / 1024, 1),
                "file_mb": round(file / 1024, 1),
            }
        )
        previous = rss
    return rows


def python_heap() -> dict[str, float]:
    sizes: dict[str, int] = json.loads(_python(_HEAP.format(imports=NODE_IMPORTS)).stdout)
    by_package: dict[str, int] = defaultdict(int)
    for path, size in sizes.items():
        by_package[_package(path)] += size
    top = sorted(by_package.items(), key=lambda kv: -kv[1])
    return {name: round(size / 1048576, 2) for name, size in top[:12]}


def import_time() -> dict[str, float]:
    err = _python(NODE_IMPORTS, "-X", "importtime").stderr
    by_package: dict[str, int] = defaultdict(int)
    for line in err.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if match is None:
            continue
        self_us, name = int(match.group(1)), match.group(4)
        top = name.split(".")[0]
        by_package[top if top in _THIRD_PARTY_AND_OURS else "(stdlib)"] += self_us
    top = sorted(by_package.items(), key=lambda kv: -kv[1])
    return {name: round(us / 1000, 1) for name, us in top[:12]}


_THIRD_PARTY_AND_OURS: Final = frozenset(
    {
        "daemon",
        "nodes",
        "pydantic",
        "pydantic_core",
        "annotated_types",
        "typing_extensions",
        "typing_inspection",
        "aiomqtt",
        "paho",
        "yaml",
        "_yaml",
    }
)


def main() -> None:
    emit(
        {
            "benchmark": "import_cost",
            "machine": machine(),
            "rss_stages": rss_stages(),
            "python_heap_by_package_mb": python_heap(),
            "import_time_by_package_ms": import_time(),
        }
    )


if __name__ == "__main__":
    main()
