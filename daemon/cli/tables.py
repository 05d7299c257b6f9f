"""Readable output for the CLI: aligned tables and short values (``--json`` for scripts)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

Row = Sequence[Any]


def table(header: Row, rows: Iterable[Row]) -> str:
    """Columns aligned on their widest cell; a missing value is ``-``."""
    cells = [[cell(v) for v in header], *([cell(v) for v in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def cell(v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.2f}"
    text = str(v)
    return text if len(text) <= 48 else text[:47] + "…"


def ms(v: float | None) -> str:
    """Milliseconds as people read them: 0.84 ms, 312 ms, 4.2 s."""
    if v is None:
        return "-"
    if v < 10:
        return f"{v:.2f} ms"
    if v < 1000:
        return f"{v:.0f} ms"
    return f"{v / 1000:.1f} s"


def when(epoch: float | None, now: float | None = None) -> str:
    """An epoch time as local HH:MM:SS today, else YYYY-MM-DD HH:MM."""
    if epoch is None:
        return "-"
    now = time.time() if now is None else now
    t = time.localtime(epoch)
    if time.strftime("%Y-%m-%d", t) == time.strftime("%Y-%m-%d", time.localtime(now)):
        return time.strftime("%H:%M:%S", t)
    return time.strftime("%Y-%m-%d %H:%M", t)


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
