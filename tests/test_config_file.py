"""The shipped ``config.yaml``: it validates, it is the defaults, and it documents every key."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from daemon.config import Config, build_config
from daemon.plugins import NodeConfigBase, node_types

ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILE = ROOT / "config.yaml"
KEY_LINE = re.compile(r"^(\s*)(-\s+)?([A-Za-z_][A-Za-z0-9_]*):(\s|$)")


def uncomment_nodes(shipped: str) -> str:
    """config.yaml with its commented-out ``nodes:`` block uncommented (it runs from
    ``# nodes:`` to the end of the file), as a user who names their nodes has it."""
    head, sep, block = shipped.partition("\n# nodes:\n")
    assert sep, "config.yaml has no commented-out `# nodes:` block"
    lines = ("nodes:\n" + block).splitlines()
    return head + "\n" + "\n".join(re.sub(r"^# ?", "", line) for line in lines) + "\n"


@pytest.fixture(scope="module")
def shipped() -> str:
    return CONFIG_FILE.read_text()


@pytest.fixture(scope="module")
def text(shipped: str) -> str:
    return uncomment_nodes(shipped)


@pytest.fixture(scope="module")
def data(text: str) -> dict[str, Any]:
    loaded = yaml.safe_load(text)
    assert isinstance(loaded, dict)
    return loaded


def test_mtor_config_validate_accepts_it() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTOR_")}
    proc = subprocess.run(
        [sys.executable, "-m", "daemon.cli.main", "config", "validate", str(CONFIG_FILE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout


def test_it_is_the_built_in_defaults(data: dict[str, Any]) -> None:
    # The file documents the defaults; a value that differs from the code's
    # default would silently override it on every install.
    from_file = build_config(data, {}).model_dump(mode="json")
    builtin = build_config({}, {}).model_dump(mode="json")
    assert from_file == builtin


def test_sensors_node_enabled(data: dict[str, Any]) -> None:
    config = build_config(data, {})
    node = config.nodes["sensors"]
    assert node.type == "sensors"
    assert node.enabled


# --------------------------------------------------------- every key appears


def _models_in(annotation: Any, suffix: str = "") -> Iterator[tuple[str, type[BaseModel]]]:
    """The models inside a field's type, with how they nest: "" (a mapping
    key), "[]" (list items) or "{}" (values of a dict keyed by the user)."""
    if annotation is NodeConfigBase:
        # A `nodes:` entry: any registered node type (daemon.plugins).
        for node_type in node_types().values():
            yield suffix, node_type.config
        return
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield suffix, annotation
        return
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        yield from _models_in(args[0], suffix)
    elif origin in (list, tuple, set, frozenset):
        for arg in args:
            yield from _models_in(arg, suffix + "[]")
    elif origin is dict:
        yield from _models_in(args[1], suffix + "{}")
    elif origin in (typing.Union, types.UnionType):
        for arg in args:
            yield from _models_in(arg, suffix)


def _type_tag(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("type")
    return field.default if field is not None and isinstance(field.default, str) else None


def _walk(
    model: type[BaseModel], node: Any, path: str
) -> Iterator[tuple[str, bool, dict[str, Any] | None]]:
    """(dotted path, in a list item?, the mapping that should hold it) for every field."""
    for name, field in model.model_fields.items():
        key = f"{path}.{name}" if path else name
        here = node if isinstance(node, dict) else None
        yield key, here is None, here
        child = here.get(name) if here is not None else None
        for suffix, sub in _models_in(field.annotation):
            if suffix == "":
                yield from _walk(sub, child, key)
            elif suffix == "{}":
                # A dict of models keyed by the user (nodes:): walk the entries
                # the file has, each with the model of its `type`.
                for entry_name, entry in (child or {}).items():
                    if isinstance(entry, dict) and entry.get("type") == _type_tag(sub):
                        yield from _walk(sub, entry, f"{key}.{entry_name}")
            else:
                # Items of a list: documented in a commented example.
                yield from _walk(sub, None, f"{key}{suffix}")


def test_every_config_key_appears(text: str, data: dict[str, Any]) -> None:
    missing = []
    for path, in_list, mapping in _walk(Config, data, ""):
        leaf = path.rsplit(".", 1)[-1]
        if in_list:
            if not re.search(rf"^\s*#\s*(-\s+)?{leaf}:", text, re.MULTILINE):
                missing.append(f"{path} (in a commented example)")
        elif mapping is None or leaf not in mapping:
            missing.append(path)
    assert not missing, "config.yaml lacks: " + ", ".join(missing)


def test_sensors_node_walked(data: dict[str, Any]) -> None:
    paths = {path for path, _, _ in _walk(Config, data, "")}
    assert "nodes.sensors.interval" in paths
    assert "nodes.sensors.sensors[].name" in paths
    assert "broker.tls.ca_file" in paths


def test_every_key_is_commented(text: str) -> None:
    # Each key carries a comment: on its own line or in the lines just above.
    lines = text.splitlines()
    bare = []
    for number, line in enumerate(lines):
        match = KEY_LINE.match(line)
        if match is None or "#" in line:
            continue
        previous = next((p for p in reversed(lines[:number]) if p.strip()), "")
        if not previous.lstrip().startswith("#"):
            bare.append(f"line {number + 1}: {line.strip()}")
    assert not bare, "keys without a comment:\n" + "\n".join(bare)


def test_commented_sensor_examples_validate(text: str) -> None:
    # The examples are meant to be uncommented: they must be valid.
    block = text.split("# Examples:\n", 1)[1].split("sensors: []", 1)[0]
    example = "\n".join(re.sub(r"^\s*# ?", "", line) for line in block.splitlines())
    items = yaml.safe_load(example)
    assert isinstance(items, list)
    assert items
    config = build_config({"nodes": {"sensors": {"type": "sensors", "sensors": items}}}, {})
    sensors = config.nodes["sensors"]
    assert sensors.type == "sensors"
    assert [s.name for s in sensors.sensors] == [item["name"] for item in items]


def test_every_key_is_in_the_configuration_doc(data: dict[str, Any]) -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    missing = []
    for path, _, _ in _walk(Config, data, ""):
        leaf = path.rsplit(".", 1)[-1].removesuffix("[]")
        # A key is named in a table row (`leaf`) or a heading (`section.key`).
        if f"`{leaf}`" not in doc and f"`{path}`" not in doc:
            missing.append(path)
    assert not missing, "docs/configuration.md does not mention: " + ", ".join(missing)


def test_shipped_file_leaves_the_nodes_to_the_machine(shipped: str) -> None:
    # No `nodes:` key as shipped: `mtor node` hosts every node type that works
    # there (daemon.cli.nodes); uncommented, the block is the built-in default.
    loaded = yaml.safe_load(shipped)
    assert "nodes" not in loaded
    assert not build_config(loaded, {}).nodes_named
    named = build_config(yaml.safe_load(uncomment_nodes(shipped)), {})
    assert named.nodes_named
    assert named.nodes == build_config({}, {}).nodes


def test_commented_node_examples_are_valid(text: str) -> None:
    """The node examples at the end of config.yaml validate once uncommented."""
    block = text.split("# BEGIN EXAMPLES")[1].split("# END EXAMPLES", maxsplit=1)[0]
    uncommented = "\n".join(
        re.sub(r"^  # ?", "", line) for line in block.splitlines()[1:] if line.strip()
    )
    nodes = yaml.safe_load(uncommented)
    assert {"voice", "camera", "vision"} <= {n["type"] for n in nodes.values()}
    config = build_config({"nodes": nodes})
    assert set(config.nodes) == set(nodes)
