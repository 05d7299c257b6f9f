"""``mtor models ...`` (the model manager's CLI; filled in by the chat issue)."""

from __future__ import annotations

import argparse
from typing import Any

from daemon.cli.common import Command


def add_commands(sub: Any, common: argparse.ArgumentParser) -> dict[str, Command]:
    return {}
