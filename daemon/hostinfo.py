"""Host facts and metrics read straight from /proc and /sys (no extra package).

Cheap enough to call every few seconds; every reader returns ``None`` where
the platform does not have the file (containers, non-Pi boards).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from daemon.protocol.node import Hardware

PROC = Path("/proc")
SYS = Path("/sys")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def hardware() -> Hardware:
    """What this machine is: arch, CPU, RAM, board and accelerators."""
    cpu_model = None
    cpuinfo = _read(PROC / "cpuinfo") or ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware") and value.strip():
            cpu_model = value.strip()
            break
    board = _read(PROC / "device-tree/model")
    return Hardware(
        arch=platform.machine(),
        cpu_model=cpu_model,
        cpu_count=os.cpu_count() or 1,
        ram_mb=int((memory() or (0, 0))[0] / 1024),
        board=board.strip("\0\n ") if board else None,
        accelerators=accelerators(),
    )


def accelerators() -> list[str]:
    """Inference accelerators visible to this host (device nodes, Jetson release file)."""
    found = []
    checks = {
        "nvidia-gpu": Path("/dev/nvidia0"),
        "nvidia-jetson": Path("/etc/nv_tegra_release"),
        "coral-tpu": Path("/dev/apex_0"),
        "hailo": Path("/dev/hailo0"),
        "rockchip-npu": Path("/dev/rknpu"),
    }
    for name, path in checks.items():
        if path.exists():
            found.append(name)
    return found


def memory() -> tuple[int, int] | None:
    """(total, available) in KiB."""
    text = _read(PROC / "meminfo")
    if text is None:
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            values[key] = int(parts[0])
    total = values.get("MemTotal", 0)
    return total, values.get("MemAvailable", values.get("MemFree", 0))


def load() -> tuple[float, float, float] | None:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return None
    return round(one, 2), round(five, 2), round(fifteen, 2)


def cpu_temperature() -> float | None:
    """The hottest thermal zone in °C (the SoC on a Pi), or None."""
    best: float | None = None
    for zone in sorted((SYS / "class/thermal").glob("thermal_zone*/temp")):
        text = _read(zone)
        try:
            value = int(text.strip()) / 1000.0 if text else None
        except ValueError:
            value = None
        if value is not None and -40 < value < 150 and (best is None or value > best):
            best = value
    return best


def battery_percent() -> float | None:
    for cap in (SYS / "class/power_supply").glob("*/capacity"):
        text = _read(cap)
        if text and text.strip().isdigit():
            return float(text.strip())
    return None


def uptime() -> float | None:
    text = _read(PROC / "uptime")
    return float(text.split()[0]) if text else None


def disk_percent(path: str) -> float | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    total = st.f_blocks * st.f_frsize
    if total == 0:
        return None
    free = st.f_bavail * st.f_frsize
    used = total - st.f_bfree * st.f_frsize
    return round(100.0 * used / (used + free), 2) if used + free else None


def rss_mb() -> float | None:
    """Resident memory of this process in MiB."""
    text = _read(PROC / "self/statm")
    if text is None:
        return None
    return round(int(text.split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1048576, 1)


@dataclass
class CpuMeter:
    """System CPU % between successive calls (from /proc/stat)."""

    _last: tuple[int, int] | None = None

    def sample(self) -> float | None:
        text = _read(PROC / "stat")
        if not text:
            return None
        fields = [int(x) for x in text.splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        total = sum(fields[:8])
        last, self._last = self._last, (idle, total)
        if last is None or total == last[1]:
            return None
        return round(100.0 * (1 - (idle - last[0]) / (total - last[1])), 1)


def monotonic() -> float:
    return time.monotonic()
