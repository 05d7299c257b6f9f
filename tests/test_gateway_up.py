"""``mtor up`` runs the gateway and prints the dashboard's URL with a login token in it
(as Jupyter does); that token is an API key of the realm's sysop."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import httpx
import pytest

from daemon.broker import free_port
from daemon.provision.brokerdir import BrokerDir
from tests.conftest import mtor_env, write_config

pytestmark = pytest.mark.slow

URL_LINE = re.compile(r"the dashboard is at (http://127\.0\.0\.1:(\d+)/#token=([A-Za-z0-9_-]+))")


async def test_mtor_up_prints_a_dashboard_url_whose_token_is_an_api_key(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        {
            "realm": "upgw",
            "node_id": "box",
            "broker": {"url": f"mqtt://127.0.0.1:{free_port()}"},
            "daemon": {"state_dir": str(tmp_path / "state")},
            "orchestrator": {"state_dir": str(tmp_path / "orch")},
            "gateway": {"port": free_port()},
        },
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon.cli.main", "up", "--config", str(path),
        env=mtor_env(), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    log: list[str] = []
    rest: asyncio.Task[bytes] | None = None
    try:
        async with asyncio.timeout(60):
            while (m := URL_LINE.search("".join(log[-3:]))) is None:
                line = (await proc.stderr.readline()).decode(errors="replace")
                assert line, "mtor up ended:\n" + "".join(log)
                log.append(line)
        rest = asyncio.create_task(proc.stderr.read())  # keep the pipe from filling up
        url, port, token = m.group(1), int(m.group(2)), m.group(3)
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as c:
            me = await c.get("/api/whoami", headers={"Authorization": f"Bearer {token}"})
            assert me.json() == {"name": "sysop", "role": "sysop"}, me.text
            assert (await c.get("/api/whoami")).status_code == 401
            page = await c.get(url.split("#")[0])
            assert page.status_code == 200 and "M-TOR" in page.text
        # the gateway logged in with its own broker account, role gateway
        accounts = BrokerDir(tmp_path / "state" / "broker").accounts()
        gateway = accounts.get("gateway")
        assert gateway is not None and gateway.role == "gateway"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(30):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if rest is not None:
            await rest
