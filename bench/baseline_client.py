"""The baseline: a bare aiomqtt client doing the least a node must do.

It connects (MQTT 5, with a retained *offline* will), publishes a retained
*online* with a timestamp to ``bench/<realm>/<id>/state`` and then either
exits (``--once``) or stays connected, reconnecting with the node daemon's
default backoff (0.1 s doubling to 5 s, ±20 % jitter) whenever it loses the
broker.  Run as ``python -m bench.baseline_client HOST PORT REALM ID [--once]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import aiomqtt

# The node daemon's defaults (daemon.config.BrokerConfig), so the comparison is fair.
INITIAL_DELAY = 0.1
MAX_DELAY = 5.0
JITTER = 0.2
KEEPALIVE = 30


def state(value: str) -> bytes:
    return json.dumps({"state": value, "ts": round(time.time(), 3)}).encode()


async def main(host: str, port: int, realm: str, client_id: str, once: bool) -> None:
    topic = f"bench/{realm}/{client_id}/state"
    will = aiomqtt.Will(topic, state("offline"), qos=1, retain=True)
    attempt = 0
    while True:
        try:
            async with aiomqtt.Client(
                host,
                port,
                identifier=f"bench-{client_id}",
                protocol=aiomqtt.ProtocolVersion.V5,
                will=will,
                keepalive=KEEPALIVE,
            ) as client:
                attempt = 0
                await client.publish(topic, state("online"), qos=1, retain=True)
                if once:
                    return
                async for _ in client.messages:
                    pass
        except aiomqtt.MqttError:
            pass
        delay = min(MAX_DELAY, INITIAL_DELAY * 2**attempt) * (1 + random.uniform(-JITTER, JITTER))
        attempt += 1
        await asyncio.sleep(delay)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("realm")
    parser.add_argument("client_id")
    parser.add_argument("--once", action="store_true", help="publish online and exit")
    args = parser.parse_args()
    asyncio.run(main(args.host, args.port, args.realm, args.client_id, args.once))
