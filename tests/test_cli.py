"""The command line as a user types it: real `mtor` subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path

import yaml

from daemon.broker import PrivateBroker, free_port
from daemon.config import build_config, read_yaml
from daemon.orchestrator.service import Orchestrator
from daemon.provision.brokerdir import BrokerDir
from tests.conftest import ROOT, mtor_env


async def mtor(*args: str, cwd: Path = ROOT) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daemon.cli.main",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=mtor_env(),
        cwd=cwd,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_realm_options_work_after_any_sub_command(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"realm": "fromfile", "nodes": {}}))
    for args in (
        ("config", "show", "--json", "--realm", "late"),
        ("--realm", "late", "config", "show", "--json"),
    ):
        code, out, err = await mtor(*args, "--config", str(config))
        assert code == 0, err
        assert json.loads(out)["realm"] == "late"
    code, out, err = await mtor("workflows", "list", "--config", str(config), "--json")
    assert (code, json.loads(out)) == (0, []), err


async def test_workflows_validate_knows_a_config_file(tmp_path: Path) -> None:
    good = {"hello": {"steps": [{"publish": "~/out/hello", "payload": "hi"}]}}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"realm": "home", "nodes": {}, "workflows": good}))
    code, out, err = await mtor("workflows", "validate", str(config))
    assert code == 0, err
    assert "is a realm config file (nodes, realm)" in err and "1 workflow(s) OK" in out
    bad = {"realm": "home", "workflows": {"w": {"steps": [{"task": 5}]}}}
    config.write_text(yaml.safe_dump(bad))
    code, out, err = await mtor("workflows", "validate", str(config))
    assert code == 78 and "workflows" in err and "w.steps[0]" in err, err
    flows = tmp_path / "flows.yaml"  # a workflows file, one of them named like a section
    flows.write_text(yaml.safe_dump({"broker": good["hello"], **good}))
    code, out, err = await mtor("workflows", "validate", str(flows))
    assert (code, out.strip(), err) == (0, f"{flows}: 2 workflow(s) OK", "")


async def test_events_that_do_not_come_are_not_an_unreachable_broker(
    broker: PrivateBroker, realm: str
) -> None:
    args = ("--broker", broker.url, "--realm", realm, "--count", "1", "--timeout", "0.5")
    code, out, err = await mtor("events", *args)
    assert (code, out) == (1, ""), err
    assert "0 of 1 event(s) in 0.5s" in err
    code, out, err = await mtor("events", "--broker", "mqtt://127.0.0.1:1", "--count", "1")
    assert code == 69, err  # this one is


async def test_sysop_commands_find_the_system_brokers_admin(tmp_path: Path) -> None:
    """install.sh --system: /etc/mtor/config.yaml names the generated broker's
    accounts.json; root's CLI logs in as its admin (sysop) by itself, no --token."""
    d = BrokerDir.init(tmp_path / "broker", "sys", port=free_port(), tls_port=None)
    orch_cfg = read_yaml(d.client_dir("orchestrator") / "config.yaml")
    orch_cfg["orchestrator"]["state_dir"] = str(tmp_path / "orch")
    broker = PrivateBroker.generated(d.conf_file, d.settings().port)
    broker.start()
    stop = asyncio.Event()
    try:
        orch = Orchestrator(build_config(orch_cfg, environ={}))
        task = asyncio.create_task(orch.run(stop))
        await asyncio.wait_for(orch._online.wait(), 10)
        config = tmp_path / "config.yaml"  # what a service install's CLI reads: no account
        config.write_text(yaml.safe_dump({
            "realm": "sys", "orchestrator": {"accounts_file": str(d.accounts_file)},
        }))  # fmt: skip
        code, out, err = await mtor("admin", "users", "--config", str(config), cwd=tmp_path)
        assert code == 0, err
        assert "sysop" in out
        other = tmp_path / "other.yaml"  # another broker named: its password never goes there
        other.write_text(yaml.safe_dump({
            "realm": "sys", "broker": {"url": "mqtt://127.0.0.1:1"},
            "orchestrator": {"accounts_file": str(d.accounts_file)},
        }))  # fmt: skip
        code, out, err = await mtor("admin", "users", "--config", str(other), cwd=tmp_path)
        assert code == 69, err
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        broker.cleanup()


def test_every_option_of_every_command_has_a_help_text() -> None:
    import argparse

    from daemon.cli.main import build_parser

    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}")
            elif action.help is None and "-h" not in action.option_strings:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "mtor")
    assert not missing, sorted(set(missing))
