"""The daemons' garbage-collector settings: on in the CLI, untouched elsewhere."""

from __future__ import annotations

import gc
import subprocess
import sys

from daemon import gctune


def test_settle_is_a_no_op_unless_configured() -> None:
    before = (gc.get_threshold(), gc.get_freeze_count())
    gctune.settle()
    assert (gc.get_threshold(), gc.get_freeze_count()) == before


def test_configure_freezes_and_raises_thresholds() -> None:
    code = (
        "import gc; from daemon import gctune; gctune.configure(); a = gc.get_freeze_count(); "
        "keep = [[i] for i in range(1000)]; gctune.settle(); "
        "print(gc.get_threshold(), a > 0, gc.get_freeze_count() >= a + 1000)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"{gctune.THRESHOLDS} True True"
