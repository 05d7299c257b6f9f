"""Collect workflows: ``workflows:`` of the config plus the files of ``workflows_dir``.

Each ``*.yaml`` / ``*.yml`` file in the directory is a mapping name →
definition.  Errors name the file and the key path; a name defined twice is
an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from daemon.config import Config, explain_validation, read_yaml
from daemon.errors import ConfigError
from daemon.workflows.model import WorkflowConfig, check_name

_FILE: TypeAdapter[dict[str, WorkflowConfig]] = TypeAdapter(dict[str, WorkflowConfig])


def parse_file(path: Path) -> dict[str, WorkflowConfig]:
    """The workflows of one file (raises :class:`ConfigError` with key paths)."""
    return parse_mapping(read_yaml(path), str(path))


def parse_mapping(data: dict[str, Any], source: str) -> dict[str, WorkflowConfig]:
    try:
        for name in data:
            check_name(str(name))
        return _FILE.validate_python(data)
    except ValidationError as exc:
        raise ConfigError(explain_validation(exc, source)) from exc
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def load_workflows(config: Config, base: Path | None = None) -> dict[str, WorkflowConfig]:
    """Every workflow of ``config`` (its own and its directory's)."""
    out = dict(config.workflows)
    where = dict.fromkeys(out, "config")
    if config.workflows_dir is not None:
        folder = config.workflows_dir
        if base is not None and not folder.is_absolute():
            folder = base / folder
        if not folder.is_dir():
            raise ConfigError(f"workflows_dir: {folder} is not a directory")
        files = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
        for file in files:
            for name, wf in parse_file(file).items():
                if name in out:
                    raise ConfigError(f"{file}: workflow {name!r} already defined in {where[name]}")
                out[name] = wf
                where[name] = str(file)
    return out
