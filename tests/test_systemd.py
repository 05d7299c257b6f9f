"""The systemd units in systemd/: ``systemd-analyze verify`` and the settings we rely on."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT_DIR = ROOT / "systemd"
UNITS = ("mtor-node.service", "mtor-orchestrator.service")
# The venv `install.sh --system` creates; the units name it and install.sh
# rewrites it when --prefix differs.
SYSTEM_VENV = "/opt/mtor/venv/"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectControlGroups": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "ReadWritePaths": "/var/lib/mtor",
    "StateDirectory": "mtor",
    "UMask": "0077",
    "PrivateMounts": "yes",
    # Both units run as mtor; systemd removes mtor's IPC objects once neither runs.
    "RemoveIPC": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
}
# What only the orchestrator can have: the node's backends need W+X pages
# (CTranslate2/oneDNN JIT), /proc/stat, meminfo and cpuinfo (sensors, health,
# onnxruntime), sched_setaffinity (onnxruntime) and its audio/video groups.
ORCHESTRATOR_ONLY = {
    "PrivateDevices": "yes",
    "MemoryDenyWriteExecute": "yes",
    "ProcSubset": "pid",
    "PrivateUsers": "yes",
}
# `systemd-analyze security --offline=true` exposure (0 best, 10 worst) the units
# reach, measured with systemd 252 (Debian 12); before issue 13: 2.0 and 1.7.
EXPOSURE = {"mtor-node.service": 1.7, "mtor-orchestrator.service": 1.1}
SERVICE = {
    "Type": "notify",
    "NotifyAccess": "main",
    "WatchdogSec": "30",
    "Restart": "on-failure",
    "RestartSec": "2",
    "User": "mtor",
    "StandardOutput": "journal",
    "StandardError": "journal",
}


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service(unit: str) -> dict[str, list[str]]:
    return parse_unit((UNIT_DIR / unit).read_text())["Service"]


@pytest.mark.parametrize("unit", UNITS)
def test_notify_restart_and_journald(unit: str) -> None:
    svc = service(unit)
    for key, value in SERVICE.items():
        assert svc.get(key) == [value], f"{unit}: {key}= should be {value}"
    prevented = set(" ".join(svc["RestartPreventExitStatus"]).split())
    assert {"77", "78"} <= prevented, "auth refused / bad config must not restart"
    assert svc["SyslogIdentifier"] == [unit.removesuffix(".service")]


@pytest.mark.parametrize("unit", UNITS)
def test_hardening(unit: str) -> None:
    svc = service(unit)
    for key, value in HARDENING.items():
        assert svc.get(key) == [value], f"{unit}: {key}= should be {value}"


@pytest.mark.parametrize("unit", UNITS)
def test_commands_use_the_system_venv_and_config(unit: str) -> None:
    svc = service(unit)
    role = unit.removeprefix("mtor-").removesuffix(".service")
    assert svc["ExecStartPre"] == [f"{SYSTEM_VENV}bin/mtor config validate"]
    assert svc["ExecStart"] == [f"{SYSTEM_VENV}bin/mtor {role} --config /etc/mtor/config.yaml"]
    assert "MTOR_CONFIG=/etc/mtor/config.yaml" in svc["Environment"]


def test_node_can_reach_devices() -> None:
    svc = service("mtor-node.service")
    assert "PrivateDevices" not in svc
    assert "DevicePolicy" not in svc
    assert set(svc["SupplementaryGroups"][0].split()) >= {"audio", "video"}


def test_node_keeps_what_its_backends_need() -> None:
    svc = service("mtor-node.service")
    for key in ORCHESTRATOR_ONLY:
        assert key not in svc, f"mtor-node.service: {key}= breaks a backend (see the unit)"
    assert svc["SystemCallFilter"] == ["@system-service", "~@privileged"]


def test_orchestrator_is_locked_down_further() -> None:
    svc = service("mtor-orchestrator.service")
    for key, value in ORCHESTRATOR_ONLY.items():
        assert svc.get(key) == [value], f"mtor-orchestrator.service: {key}= should be {value}"
    assert svc["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert "SupplementaryGroups" not in svc


def test_install_sh_uses_the_same_venv() -> None:
    script = (ROOT / "install.sh").read_text()
    match = re.search(r"^SYSTEM_PREFIX=(\S+)$", script, re.MULTILINE)
    assert match is not None, "install.sh sets SYSTEM_PREFIX"
    assert f"{match.group(1)}/venv/" == SYSTEM_VENV


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart= binaries exist: point the copies at this venv's mtor.
    mtor = Path(sys.executable).parent / "mtor"
    assert mtor.is_file(), f"{mtor} missing: install the project into this venv"
    for unit in UNITS:
        text = (UNIT_DIR / unit).read_text().replace(f"{SYSTEM_VENV}bin/mtor", str(mtor))
        (tmp_path / unit).write_text(text)
    assert SYSTEMD_ANALYZE is not None
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", *(str(tmp_path / u) for u in UNITS)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = (proc.stdout + proc.stderr).splitlines()
    # Only what concerns our units fails the test; other units on the host may be noisy.
    ours = [line for line in output if str(tmp_path) in line or any(u in line for u in UNITS)]
    assert not ours, "systemd-analyze verify:\n" + "\n".join(output)


def exposure(unit_file: Path) -> float:
    """The overall exposure ``systemd-analyze security`` gives a unit file, or a skip
    where this systemd-analyze cannot judge a file offline (--offline is systemd 250+)."""
    assert SYSTEMD_ANALYZE is not None
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(unit_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = proc.stdout + proc.stderr
    if "--offline" in out and ("unrecognized" in out or "unknown option" in out):
        pytest.skip(f"{SYSTEMD_ANALYZE} has no --offline (systemd 250+): {out.strip()[:200]}")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert match is not None, f"no exposure level in:\n{out}"
    return float(match.group(1))


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", UNITS)
def test_security_exposure(unit: str) -> None:
    score = exposure(UNIT_DIR / unit)
    assert score <= EXPOSURE[unit], f"{unit}: exposure {score}, worse than {EXPOSURE[unit]}"
