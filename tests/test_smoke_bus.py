from __future__ import annotations

from daemon.config import Config
from tests.conftest import Collector, running_bus


async def test_publish_subscribe_roundtrip(config: Config) -> None:
    async with running_bus(config) as bus:
        got = Collector()
        await bus.subscribe(f"mtor/{config.realm}/x/#", got)
        await bus.publish(f"mtor/{config.realm}/x/y", b"hello", qos=1)
        msg = await got.wait_for(lambda m: m.payload == b"hello", timeout=5)
        assert msg.topic == f"mtor/{config.realm}/x/y"
